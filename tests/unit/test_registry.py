import pytest
from sqlalchemy import select

from bcc_pipeline import registry
from bcc_pipeline.errors import NoChampionError, RegistryError
from bcc_pipeline.store import ModelVersion, Promotion, session_scope

GOOD = {"accuracy": 0.93, "sensitivity": 0.96, "roc_auc": 0.97}
FLOORS = {"min_accuracy": 0.8, "min_sensitivity": 0.9, "margin": 0.05}
# candidate - champion on the same holdout: clearly non-inferior / clearly inferior
SAME = {
    "sensitivity": {"value": 0.0, "lower": -0.02, "upper": 0.02, "n": 300},
    "roc_auc": {"value": 0.01, "lower": -0.01, "upper": 0.03, "n": 300},
}
WORSE = {
    "sensitivity": {"value": -0.2, "lower": -0.3, "upper": -0.1, "n": 300},
    "roc_auc": {"value": 0.0, "lower": -0.01, "upper": 0.01, "n": 300},
}


def _add(s, version, status="candidate", metrics=GOOD):
    s.add(
        ModelVersion(
            version=version,
            status=status,
            artifact_path=f"/m/{version}/model.keras",
            artifact_sha256="0" * 64,
            base_weights="none",
            profile="demo",
            image_size=32,
            preprocessing="p",
            hyperparameters={},
            manifest_hash="m" * 64,
            n_train=8,
            n_val=2,
            threshold=0.4,
            code_version="t",
        )
    )
    s.flush()
    registry.save_metrics(s, version, "validation", metrics)


def test_version_ids_are_unique_and_sortable():
    ids = {registry.new_version_id() for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("v") for i in ids)


def test_first_model_faces_floors_only():
    d = registry.evaluate_gate(GOOD, None, **FLOORS)
    assert d.passed and "floors only" in d.summary
    d = registry.evaluate_gate({"accuracy": 0.7, "sensitivity": 0.96, "roc_auc": 0.9}, None, **FLOORS)
    assert not d.passed and "accuracy 0.7000 (holdout) is below the floor 0.80" in d.summary
    d = registry.evaluate_gate({"accuracy": None, "sensitivity": 0.95}, None, **FLOORS)
    assert not d.passed


def test_gate_compares_with_champion_by_the_interval_of_the_difference():
    champ = {"accuracy": 0.94, "sensitivity": 0.97, "roc_auc": 0.98}
    d = registry.evaluate_gate(GOOD, champ, champion_version="v0", differences=SAME, **FLOORS)
    assert d.decision == "promoted" and "non-inferior" in d.summary
    d = registry.evaluate_gate(GOOD, champ, champion_version="v0", differences=WORSE, **FLOORS)
    assert (
        d.decision == "rejected"
        and "sensitivity difference -0.200 [-0.300, -0.100] vs champion v0" in d.summary
    )
    # no difference computed for a metric: undecided, never promoted
    d = registry.evaluate_gate(GOOD, champ, champion_version="v0", differences={}, **FLOORS)
    assert d.decision == "insufficient_evidence"


def test_a_floor_rejects_but_the_comparison_with_the_champion_is_still_shown():
    champ = {"accuracy": 0.94, "sensitivity": 0.97, "roc_auc": 0.98}
    low = {**GOOD, "sensitivity": 0.5}
    d = registry.evaluate_gate(low, champ, champion_version="v0", differences=SAME, **FLOORS)
    assert d.decision == "rejected" and "is below the floor" in d.summary
    assert (
        "roc_auc difference" in d.summary
        and "vs champion v0 (for information: the floor decides)" in d.summary
    )
    assert d.differences == {k: dict(v) for k, v in SAME.items()}  # kept in the evidence


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
        assert row.evidence["rule"] == registry.GATE_RULE and row.evidence["decision"] == "promoted"


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
            "manual",
            "manual",
            "manual",
            "rollback",
            "rollback",
        ]
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
        d = registry.evaluate_gate(
            GOOD,
            dict(GOOD),
            champion_version="v1",
            **FLOORS,
            differences=SAME,
            comparison={"images": 4, "note": "2 holdout images the champion was trained on"},
        )
        row = registry.record_gate_decision(s, "v2", d, actor="test")
        assert registry.decision_for(s, "v2").id == row.id and row.decision == "promoted"
        assert row.evidence["comparison"]["images"] == 4
        assert "2 holdout images the champion was trained on" in row.reason
        assert registry.decision_for(s, "nope") is None


def test_insufficient_evidence_keeps_the_champion(migrated_url):
    with session_scope(migrated_url) as s:
        _add(s, "v1", status="champion")
        _add(s, "v2")
        wide = {k: {"value": 0.0, "lower": -0.2, "upper": 0.2, "n": 40} for k in ("sensitivity", "roc_auc")}
        d = registry.evaluate_gate(GOOD, GOOD, champion_version="v1", differences=wide, **FLOORS)
        row = registry.record_gate_decision(s, "v2", d, actor="test")
        assert row.decision == "insufficient_evidence" and (row.from_version, row.to_version) == ("v1", "v1")
        assert "more holdout images would be needed" in row.reason
        assert registry.get_champion(s).version == "v1" and s.get(ModelVersion, "v2").status == "rejected"
        assert row.evidence["more_images_needed"] == d.more_images_needed > 0


@pytest.mark.parametrize("approved", [True, False])
def test_approval_finishes_a_pending_decision(migrated_url, approved):
    with session_scope(migrated_url) as s:
        _add(s, "v1", status="champion")
        _add(s, "v2")
        d = registry.evaluate_gate(GOOD, GOOD, champion_version="v1", differences=SAME, **FLOORS)
        pending = registry.record_gate_decision(s, "v2", d, actor="airflow:gate", require_approval=True)
        assert pending.decision == registry.AWAITING and s.get(ModelVersion, "v2").status == "candidate"
        assert registry.get_champion(s).version == "v1"  # the gate does not promote by itself
        assert registry.record_gate_decision(s, "v2", d, actor="x", require_approval=True).id == pending.id
        row = registry.record_approval(s, "v2", approved, actor="dr.house", comment="looked at the plots")
        assert row.actor == "dr.house" and row.evidence["approval"]["comment"] == "looked at the plots"
        assert row.evidence["differences"] == pending.evidence["differences"]  # the gate's evidence is kept
        if approved:
            assert row.decision == "promoted" and registry.get_champion(s).version == "v2"
            assert s.get(ModelVersion, "v1").status == "retired"
        else:
            assert row.decision == "rejected" and registry.get_champion(s).version == "v1"
            assert s.get(ModelVersion, "v2").status == "rejected"
        assert "dr.house: looked at the plots" in row.reason
        # answering again the same way changes nothing; the other way is refused
        assert registry.record_approval(s, "v2", approved, actor="dr.house").id == row.id
        with pytest.raises(RegistryError, match="does not await approval"):
            registry.record_approval(s, "v2", not approved, actor="someone")


def test_approval_needs_a_pending_decision(migrated_url):
    with session_scope(migrated_url) as s:
        _add(s, "v1")
        with pytest.raises(RegistryError, match="no gate decision"):
            registry.record_approval(s, "v1", True, actor="a")
