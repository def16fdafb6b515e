import pytest
from sqlalchemy import select

from bcc_pipeline import registry
from bcc_pipeline.errors import NoChampionError, RegistryError
from bcc_pipeline.store import ModelVersion, Promotion, session_scope

GOOD = {"accuracy": 0.93, "sensitivity": 0.96, "roc_auc": 0.97}
FLOORS = {"min_accuracy": 0.8, "min_sensitivity": 0.9, "tolerance": 0.02}


def _add(s, version, status="candidate", metrics=GOOD):
    s.add(ModelVersion(version=version, status=status, artifact_path=f"/m/{version}/model.keras",
                       artifact_sha256="0" * 64, base_weights="none", profile="demo", image_size=32,
                       preprocessing="p", hyperparameters={}, manifest_hash="m" * 64, n_train=8, n_val=2,
                       threshold=0.4, code_version="t"))
    s.flush()
    registry.save_metrics(s, version, "validation", metrics)


def test_version_ids_are_unique_and_sortable():
    ids = {registry.new_version_id() for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("v") for i in ids)


def test_first_model_faces_floors_only():
    d = registry.evaluate_gate(GOOD, None, **FLOORS)
    assert d.passed and "floors only" in d.summary
    d = registry.evaluate_gate({"accuracy": 0.7, "sensitivity": 0.96, "roc_auc": 0.9}, None, **FLOORS)
    assert not d.passed and "accuracy 0.7000 is below the floor 0.8000" in d.summary


def test_gate_compares_with_champion_within_tolerance():
    champ = {"accuracy": 0.94, "sensitivity": 0.97, "roc_auc": 0.98}
    assert registry.evaluate_gate(GOOD, champ, champion_version="v0", **FLOORS).passed  # within 0.02
    worse = dict(GOOD, roc_auc=0.90)
    d = registry.evaluate_gate(worse, champ, champion_version="v0", **FLOORS)
    assert not d.passed and "roc_auc 0.9000 is worse than champion v0's 0.9800" in d.summary
    d = registry.evaluate_gate({"accuracy": None, "sensitivity": 0.95}, None, **FLOORS)
    assert not d.passed


def test_gate_decision_promotes_then_is_idempotent(migrated_url):
    with session_scope(migrated_url) as s:
        _add(s, "v1")
        d = registry.evaluate_gate(GOOD, None, **FLOORS)
        row = registry.record_gate_decision(s, "v1", d, actor="test")
        assert row.decision == "promoted" and row.to_version == "v1" and row.from_version is None
        again = registry.record_gate_decision(s, "v1", d, actor="test")
        assert again.id == row.id
        assert registry.get_champion(s).version == "v1"
        assert len(s.scalars(select(Promotion)).all()) == 1
        assert row.evidence["candidate"]["accuracy"] == 0.93


def test_rejection_keeps_champion(migrated_url):
    with session_scope(migrated_url) as s:
        _add(s, "v1", status="champion")
        _add(s, "v2", metrics={"accuracy": 0.5, "sensitivity": 0.95, "roc_auc": 0.6})
        d = registry.evaluate_gate(registry.metrics_of(s, "v2"), GOOD, champion_version="v1", **FLOORS)
        row = registry.record_gate_decision(s, "v2", d, actor="test")
        assert row.decision == "rejected" and "below the floor" in row.reason
        assert registry.get_champion(s).version == "v1"
        assert s.get(ModelVersion, "v2").status == "rejected"
        with pytest.raises(RegistryError, match="not a candidate"):
            registry.record_gate_decision(s, "v1", d, actor="test")


def test_manual_promote_and_rollback_chain(migrated_url):
    with session_scope(migrated_url) as s:
        for v in ("v1", "v2", "v3"):
            _add(s, v)
        with pytest.raises(NoChampionError):
            registry.rollback(s, actor="t", reason="nothing yet")
        registry.promote(s, "v1", actor="alice", reason="first")
        with pytest.raises(RegistryError, match="replaced no earlier champion"):
            registry.rollback(s, actor="t", reason="r")
        registry.promote(s, "v2", actor="alice", reason="better")
        registry.promote(s, "v3", actor="alice", reason="better still")
        assert s.get(ModelVersion, "v2").status == "retired"
        r = registry.rollback(s, actor="bob", reason="v3 misbehaves")
        assert (r.from_version, r.to_version, r.decision) == ("v3", "v2", "rollback")
        r = registry.rollback(s, actor="bob", reason="v2 too")
        assert (r.from_version, r.to_version) == ("v2", "v1")
        assert registry.get_champion(s).version == "v1"
        assert [p.decision for p in s.scalars(select(Promotion).order_by(Promotion.id))] == [
            "manual", "manual", "manual", "rollback", "rollback"]
        assert [m.status for m in registry.list_versions(s)].count("champion") == 1


def test_promote_errors(migrated_url):
    with session_scope(migrated_url) as s:
        _add(s, "v1", status="champion")
        with pytest.raises(RegistryError, match="unknown model version"):
            registry.promote(s, "nope", actor="a", reason="r")
        with pytest.raises(RegistryError, match="already the champion"):
            registry.promote(s, "v1", actor="a", reason="r")
        with pytest.raises(RegistryError, match="needs a --reason"):
            registry.promote(s, "v1", actor="a", reason="  ")
        with pytest.raises(RegistryError, match="needs a --reason"):
            registry.rollback(s, actor="a", reason="")


def test_decision_for_is_the_gate_decision_only(migrated_url):
    with session_scope(migrated_url) as s:
        _add(s, "v1")
        _add(s, "v2")
        assert registry.decision_for(s, "v1") is None
        registry.promote(s, "v1", actor="alice", reason="by hand")  # a manual promotion is not the gate's
        assert registry.decision_for(s, "v1") is None
        d = registry.evaluate_gate(GOOD, dict(GOOD), champion_version="v1", **FLOORS,
                                   comparison={"images": 4, "fallback": "compared on all 4 validation images"})
        row = registry.record_gate_decision(s, "v2", d, actor="test")
        assert registry.decision_for(s, "v2").id == row.id and row.decision == "promoted"
        assert row.evidence["comparison"]["images"] == 4
        assert "compared on all 4 validation images" in row.reason
        assert registry.decision_for(s, "nope") is None
