"""bcc_pipeline.pipelines: the retrain-or-skip rule; evaluation on the calibration split and the frozen
holdout; the gate against the champion on the same holdout, with and without approval. The model is the
tiny classifier of conftest.py (no DenseNet)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from bcc_pipeline import pipelines, registry
from bcc_pipeline.dataset import write_manifest
from bcc_pipeline.files import sha256_file
from bcc_pipeline.store import ImageRecord, session_scope, upgrade

T0 = dt.datetime(2026, 1, 1, 12, 0)
PERFECT = {"accuracy": 1.0, "sensitivity": 1.0, "specificity": 1.0, "roc_auc": 1.0}


# -- should_retrain -------------------------------------------------------------------------------
def _add_images(
    url: str,
    n: int,
    *,
    at: dt.datetime,
    prefix: str,
    label: str | None = "benign",
    excluded: str | None = None,
) -> None:
    with session_scope(url) as s:
        for i in range(n):
            s.add(
                ImageRecord(
                    sha256=f"{prefix}{i:03d}".ljust(64, "0"),
                    label=label,
                    width=64,
                    height=64,
                    format="PNG",
                    source_path=f"/landing/{prefix}{i}.png",
                    excluded_reason=excluded,
                    first_seen_at=at,
                )
            )


def test_should_retrain_counts_usable_images_after_the_champion_cutoff(
    sqlite_url, make_settings, register_champion
):
    settings = make_settings(sqlite_url)
    upgrade(sqlite_url)
    later = T0 + dt.timedelta(days=1)
    _add_images(sqlite_url, 5, at=T0, prefix="a")
    _add_images(sqlite_url, 3, at=later, prefix="b", label="malignant")
    _add_images(sqlite_url, 2, at=later, prefix="c", excluded="seen under two labels")  # not usable
    _add_images(sqlite_url, 2, at=later, prefix="d", label=None)  # unlabelled: scored, not trained on

    # no champion yet: every usable labelled image is new
    assert pipelines.should_retrain(settings, 8) == (
        True,
        "training: 8 >= min_new_images=8; 8 new labelled images since the champion's data "
        "(total 8, champion none yet)",
    )
    go, reason = pipelines.should_retrain(settings, 9)
    assert not go and reason.startswith("skipping training: 8 < min_new_images=9")

    version = register_champion(settings)
    with session_scope(sqlite_url) as s:
        registry.get_champion(s).data_cutoff = T0 + dt.timedelta(hours=1)
    assert pipelines.should_retrain(settings, 3)[0]
    go, reason = pipelines.should_retrain(settings, 4)
    assert not go and reason == (
        "skipping training: 3 < min_new_images=4; 3 new labelled images since the "
        f"champion's data (total 8, champion {version})"
    )
    go, reason = pipelines.should_retrain(settings, 4, force=True)
    assert go and reason.startswith("training (forced): 3 new labelled images")
    assert pipelines.should_retrain(settings, 0)[0]


@pytest.mark.parametrize("bad", [-1, 2.5, "3", None, True])
def test_should_retrain_rejects_a_bad_minimum(bad, sqlite_url, make_settings):
    with pytest.raises(ValueError, match="min_new"):
        pipelines.should_retrain(make_settings(sqlite_url), bad)


# -- evaluation and the gate on the frozen holdout (the tiny classifier of conftest.py, no DenseNet) --------
ROLE_SIZES = {"train": 4, "validation": 4, "calibration": 10}


def _images(tmp_path: Path, write_png, prefix: str, n: int, seed0: int) -> list[dict]:
    out = []
    for i in range(n):
        label = "benign" if i % 2 == 0 else "malignant"
        path = write_png(tmp_path / "img" / f"{prefix}{i}.png", size=40, seed=seed0 + i)
        out.append(
            {"sha256": sha256_file(path), "label": label, "group_id": f"{prefix}{i}", "path": str(path)}
        )
    return out


def _manifests(
    tmp_path: Path, write_png, *, cal_seed: int = 100, holdout_seed: int = 500, n_holdout: int = 12
):
    """A development manifest (train/validation/calibration) and a separate holdout manifest."""
    dev = []
    for role, n in ROLE_SIZES.items():
        seed0 = cal_seed if role == "calibration" else {"train": 0, "validation": 50}[role]
        dev += [{**e, "split": role} for e in _images(tmp_path, write_png, f"{role}{seed0}-", n, seed0)]
    hold = [
        {**e, "split": "holdout"}
        for e in _images(tmp_path, write_png, f"hold{holdout_seed}-", n_holdout, holdout_seed)
    ]
    key = lambda e: e["sha256"]  # noqa: E731
    return (
        write_manifest(sorted(dev, key=key), tmp_path / "manifests", seed=0, val_fraction=0.2),
        write_manifest(sorted(hold, key=key), tmp_path / "holdouts", seed=0, val_fraction=0.2),
    )


def _trained(settings, version: str, tiny_model_artifact, dev, holdout) -> Path:
    """What train_step leaves behind, with the tiny classifier as the model."""
    import shutil

    src, artifact_sha = tiny_model_artifact
    model_dir = settings.models_dir / version
    model_dir.mkdir(parents=True)
    shutil.copyfile(src, model_dir / "model.keras")
    meta = {
        "version": version,
        "artifact_sha256": artifact_sha,
        "manifest_path": str(dev.path),
        "manifest_hash": dev.hash,
        "holdout_path": str(holdout.path),
        "image_size": 32,
        "preprocessing": "densenet-torch-v1",
        "hyperparameters": {"base_weights": "none", "profile": "demo"},
        "n_train": 4,
        "n_val": 4,
        "code_version": "test",
        "data_cutoff": None,
        "lineage": {
            "manifests": {"train": "t", "validation": "v", "calibration": "c", "holdout": holdout.hash}
        },
    }
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    (model_dir / "history.json").write_text(json.dumps({"loss": [0.7, 0.6], "val_loss": [0.7, 0.65]}))
    return model_dir


def _calibration_probs(settings, model_dir: Path, dev, temperature: float):
    from bcc_pipeline import dataset, model, stats, training

    meta = json.loads((model_dir / "metadata.json").read_text())
    net = model.load_artifact(model_dir / "model.keras", meta["artifact_sha256"])
    paths, _ = dataset.manifest_arrays(dev, "calibration")
    ds = dataset.make_dataset(
        paths,
        None,
        image_size=32,
        batch_size=8,
        max_pixels=settings.max_pixels,
        min_side=settings.min_side,
        cache=False,
    )
    return stats.calibrate(training.predict_malignant(net, ds), temperature)


def test_threshold_and_temperature_never_see_the_holdout(
    sqlite_url, make_settings, tmp_path, tiny_model_artifact, png_writer
):
    settings = make_settings(sqlite_url)
    upgrade(sqlite_url)
    dev, hold_a = _manifests(tmp_path / "a", png_writer, holdout_seed=500)
    _, hold_b = _manifests(tmp_path / "b", png_writer, holdout_seed=900, n_holdout=8)
    dev_c, _ = _manifests(tmp_path / "c", png_writer, cal_seed=300)
    quiet = {"progress": lambda _: None}
    _trained(settings, "v-a", tiny_model_artifact, dev, hold_a)
    a = pipelines.evaluate_step(settings, "v-a", **quiet)
    _trained(settings, "v-b", tiny_model_artifact, dev, hold_b)
    b = pipelines.evaluate_step(settings, "v-b", **quiet)
    _trained(settings, "v-c", tiny_model_artifact, dev_c, hold_a)
    c = pipelines.evaluate_step(settings, "v-c", **quiet)
    # another holdout changes what is reported, never what was chosen
    assert (a["temperature"], a["threshold"]) == (b["temperature"], b["threshold"])
    assert a["holdout"]["n"] == 12 and b["holdout"]["n"] == 8 and a["holdout"] != b["holdout"]
    # another calibration split changes the choices (so the comparison above can fail)
    assert (c["temperature"], c["threshold"]) != (a["temperature"], a["threshold"])
    # the threshold lies strictly between two adjacent observed calibrated calibration probabilities
    probs = _calibration_probs(settings, settings.models_dir / "v-a", dev, a["temperature"])
    lo, hi = a["operating_point"]["between"]
    assert lo < a["threshold"] < hi and hi in probs and (lo in probs or lo == 0.0)
    assert not ((probs > lo) & (probs < hi)).any()
    assert a["operating_point"]["chosen_on"] == "calibration" and a["operating_point"]["n"] == 10
    # the holdout's manifest hash is recorded with every version: equal for the same frozen holdout
    with session_scope(sqlite_url) as s:
        hashes = {
            v: registry.get_version(s, v).lineage["manifests"]["holdout"] for v in ("v-a", "v-b", "v-c")
        }
    assert hashes["v-a"] == hashes["v-c"] != hashes["v-b"]


def test_evaluate_step_records_calibration_intervals_lineage_and_the_card(
    sqlite_url, make_settings, tmp_path, tiny_model_artifact, png_writer
):
    settings = make_settings(sqlite_url)
    upgrade(sqlite_url)
    dev, hold = _manifests(tmp_path, png_writer)
    model_dir = _trained(settings, "v-eval", tiny_model_artifact, dev, hold)
    previous = json.dumps([{"sha256": "old", "label": "benign", "prob_malignant": 0.5}] * 200)
    (model_dir / "holdout_predictions.json").write_text(previous)
    lines: list[str] = []
    with open(model_dir / "holdout_predictions.json") as reader:
        out = pipelines.evaluate_step(settings, "v-eval", progress=lines.append)
        assert reader.read() == previous  # replaced, not overwritten
    rows = json.loads((model_dir / "holdout_predictions.json").read_text())
    assert sorted(r["sha256"] for r in rows) == sorted(e["sha256"] for e in hold.split("holdout"))
    from bcc_pipeline import stats

    for r in rows:  # prob_malignant is the calibrated probability
        assert r["prob_malignant"] == pytest.approx(
            float(stats.calibrate([r["prob_uncalibrated"]], out["temperature"])[0])
        )
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["threshold"] == out["threshold"] and meta["temperature"] == out["temperature"]
    assert set(meta["calibration"]) >= {"ece_before", "ece_after", "brier_before", "brier_after"}
    with session_scope(sqlite_url) as s:
        mv = registry.get_version(s, "v-eval")
        assert mv.status == "candidate" and mv.temperature == out["temperature"]
        assert len(mv.lineage["manifests"]["holdout"]) == 64
        ivs = registry.intervals_of(s, "v-eval", "holdout")
        assert ivs["sensitivity"]["n"] == 6 and ivs["specificity"]["n"] == 6 and ivs["accuracy"]["n"] == 12
        assert ivs["sensitivity"]["lower"] <= ivs["sensitivity"]["value"] <= ivs["sensitivity"]["upper"]
        assert "seed 42" in ivs["roc_auc"]["method"]
        assert registry.metrics_of(s, "v-eval", "holdout")["ece_uncalibrated"] is not None
    assert any(line.startswith("sensitivity ") and line.endswith("/6 (holdout)") for line in lines)
    assert (model_dir / "plots" / "reliability.png").is_file()
    card = (model_dir / "model_card.md").read_text()
    for part in (
        "## Intended use",
        "synthetic demo",
        "| calibration | 5 | 5 |",
        "| holdout | 6 | 6 |",
        "## Threshold",
        "midway",
        "## Gate decision",
        "Not decided yet",
        "## Lineage",
        meta["lineage"]["manifests"]["holdout"],
    ):
        assert part in card, part
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]


def _evaluated_with_champion(settings, tmp_path, tiny_model_artifact, png_writer) -> dict:
    """A candidate evaluated on the holdout and a champion that is the same network with the same
    temperature and threshold: every paired difference is exactly 0."""
    from tests.support import install_artifact, register_version

    upgrade(settings.database_url)
    dev, hold = _manifests(tmp_path, png_writer)
    _trained(settings, "v-cand", tiny_model_artifact, dev, hold)
    out = pipelines.evaluate_step(settings, "v-cand", progress=lambda _: None)
    dest = install_artifact(tiny_model_artifact[0], settings.models_dir, "v-champ")
    (settings.models_dir / "v-champ" / "metadata.json").write_text(
        json.dumps({"manifest_path": str(dev.path)})
    )
    register_version(
        settings,
        "v-champ",
        artifact=(dest, tiny_model_artifact[1]),
        threshold=out["threshold"],
        temperature=out["temperature"],
        profile="demo",
    )
    return out


def _evidence(url: str, version: str = "v-cand") -> dict:
    with session_scope(url) as s:
        return registry.decision_for(s, version).evidence


def test_gate_compares_with_the_champion_on_the_same_holdout(
    sqlite_url, make_settings, tmp_path, tiny_model_artifact, png_writer
):
    settings = make_settings(sqlite_url, gate_min_accuracy=0.0, gate_min_sensitivity=0.0)
    _evaluated_with_champion(settings, tmp_path, tiny_model_artifact, png_writer)
    messages: list[str] = []
    out = pipelines.gate_step(settings, "v-cand", actor="test", progress=messages.append)
    assert out["decision"] == "promoted", out["reason"]
    assert out["champion"] == "v-cand" and out["rule"] == registry.GATE_RULE
    ev = _evidence(sqlite_url)
    assert ev["comparison"]["images"] == 12 and ev["comparison"]["bootstrap_seed"] == settings.seed
    for name in ("sensitivity", "specificity", "roc_auc"):
        d = ev["differences"][name]
        assert (d["value"], d["lower"], d["upper"], d["n"]) == (0.0, 0.0, 0.0, 12), name
    assert "Candidate `v-cand`" in out["markdown"] and "model_card.md" in out["markdown"]
    assert sum(m.startswith("scoring champion v-champ on the frozen holdout") for m in messages) == 1
    # decided once: a retry returns the recorded decision without scoring again
    again = pipelines.gate_step(settings, "v-cand", actor="test", progress=messages.append)
    assert again == out and sum(m.startswith("scoring champion") for m in messages) == 1


@pytest.mark.parametrize("approved", [True, False])
def test_gate_with_approval_waits_for_a_person(
    sqlite_url, make_settings, tmp_path, tiny_model_artifact, png_writer, approved
):
    settings = make_settings(
        sqlite_url, gate_min_accuracy=0.0, gate_min_sensitivity=0.0, require_approval=True
    )
    _evaluated_with_champion(settings, tmp_path, tiny_model_artifact, png_writer)
    out = pipelines.gate_step(settings, "v-cand", actor="test", progress=lambda _: None)
    assert out["decision"] == registry.AWAITING and out["champion"] == "v-champ"
    done = pipelines.finish_approval(settings, "v-cand", approved, actor="dr.grey", comment="checked")
    assert done["decision"] == ("promoted" if approved else "rejected")
    assert done["champion"] == ("v-cand" if approved else "v-champ")
    assert _evidence(sqlite_url)["approval"]["actor"] == "dr.grey"
    card = (settings.models_dir / "v-cand" / "model_card.md").read_text()
    assert f"Human approval: {'approved' if approved else 'rejected'} by `dr.grey`: checked" in card


def test_cli_prints_holdout_intervals_temperature_hashes_and_the_card(
    sqlite_url, make_settings, tmp_path, tiny_model_artifact, png_writer, monkeypatch, capsys
):
    from bcc_pipeline import cli

    settings = make_settings(sqlite_url, gate_min_accuracy=0.0, gate_min_sensitivity=0.0)
    out = _evaluated_with_champion(settings, tmp_path, tiny_model_artifact, png_writer)
    pipelines.gate_step(settings, "v-cand", actor="test", progress=lambda _: None)
    monkeypatch.setenv("BCC_HOME", str(settings.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)

    assert cli.main(["models", "--json"]) == 0
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    cand = rows["v-cand"]
    assert cand["temperature"] == out["temperature"] and cand["status"] == "champion"
    assert set(cand["manifest_hashes"]) == {"train", "validation", "calibration", "holdout"}
    assert cand["intervals"]["sensitivity"]["n"] == 6 and cand["intervals"]["roc_auc"]["k"] is None

    assert cli.main(["models"]) == 0
    table = capsys.readouterr().out
    s = cand["intervals"]["sensitivity"]
    assert f"{s['value']:.2f} [{s['lower']:.2f}, {s['upper']:.2f}] {s['k']}/6" in table

    assert cli.main(["status", "--rows", "0"]) == 0
    status = capsys.readouterr().out
    assert "champion        v-cand" in status and f"temperature {out['temperature']:.3f}" in status
    assert (
        f"sensitivity {s['value']:.2f} [{s['lower']:.2f}, {s['upper']:.2f}], {s['k']}/6 (holdout)" in status
    )

    assert cli.main(["model-card", "v-cand"]) == 0
    card = capsys.readouterr().out
    assert (
        card.startswith("# Model card: v-cand") and "**promoted**" in card and "Candidate − champion" in card
    )
    assert cli.main(["model-card", "v-nope"]) == 1
    assert "unknown model version" in capsys.readouterr().err


def test_the_threshold_interval_is_printed_with_enough_decimals_to_tell_its_ends_apart() -> None:
    from bcc_pipeline.model_card import format_between

    assert format_between([0.33295465701147503, 0.3568386422323528]) == "0.3330 and 0.3568"
    assert format_between([0.1234561, 0.1234569]) == "0.123456 and 0.123457"
    assert format_between([0.0, 0.0]).startswith("0.0000000000000000")
    assert format_between(None) == "n/a (no malignant calibration image)"
