"""bcc_pipeline.pipelines: the retrain-or-skip rule, the gate's choice of images for the champion
duel, and the files the steps write. The champion is the tiny classifier of conftest.py (no DenseNet)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from bcc_pipeline import pipelines, registry
from bcc_pipeline.dataset import write_manifest
from bcc_pipeline.files import sha256_file
from bcc_pipeline.store import ImageRecord, ModelVersion, Promotion, session_scope, upgrade

T0 = dt.datetime(2026, 1, 1, 12, 0)
PERFECT = {"accuracy": 1.0, "sensitivity": 1.0, "specificity": 1.0, "roc_auc": 1.0}


# -- should_retrain -------------------------------------------------------------------------------
def _add_images(url: str, n: int, *, at: dt.datetime, prefix: str, label: str | None = "benign",
                excluded: str | None = None) -> None:
    with session_scope(url) as s:
        for i in range(n):
            s.add(ImageRecord(sha256=f"{prefix}{i:03d}".ljust(64, "0"), label=label, width=64, height=64,
                              format="PNG", source_path=f"/landing/{prefix}{i}.png", excluded_reason=excluded,
                              first_seen_at=at))


def test_should_retrain_counts_usable_images_after_the_champion_cutoff(sqlite_url, make_settings,
                                                                       register_champion):
    settings = make_settings(sqlite_url)
    upgrade(sqlite_url)
    later = T0 + dt.timedelta(days=1)
    _add_images(sqlite_url, 5, at=T0, prefix="a")
    _add_images(sqlite_url, 3, at=later, prefix="b", label="malignant")
    _add_images(sqlite_url, 2, at=later, prefix="c", excluded="seen under two labels")  # not usable
    _add_images(sqlite_url, 2, at=later, prefix="d", label=None)  # unlabelled: scored, not trained on

    # no champion yet: every usable labelled image is new
    assert pipelines.should_retrain(settings, 8) == (
        True, "training: 8 >= min_new_images=8; 8 new labelled images since the champion's data "
              "(total 8, champion none yet)")
    go, reason = pipelines.should_retrain(settings, 9)
    assert not go and reason.startswith("skipping training: 8 < min_new_images=9")

    version = register_champion(settings)
    with session_scope(sqlite_url) as s:
        registry.get_champion(s).data_cutoff = T0 + dt.timedelta(hours=1)
    assert pipelines.should_retrain(settings, 3)[0]
    go, reason = pipelines.should_retrain(settings, 4)
    assert not go and reason == ("skipping training: 3 < min_new_images=4; 3 new labelled images since the "
                                 f"champion's data (total 8, champion {version})")
    go, reason = pipelines.should_retrain(settings, 4, force=True)
    assert go and reason.startswith("training (forced): 3 new labelled images")
    assert pipelines.should_retrain(settings, 0)[0]


@pytest.mark.parametrize("bad", [-1, 2.5, "3", None, True])
def test_should_retrain_rejects_a_bad_minimum(bad, sqlite_url, make_settings):
    with pytest.raises(ValueError, match="min_new"):
        pipelines.should_retrain(make_settings(sqlite_url), bad)


# -- the gate's duel images -----------------------------------------------------------------------
NAMES = [f"b{i}" for i in range(1, 5)] + [f"m{i}" for i in range(1, 5)]  # benign b1..b4, malignant m1..m4


def _dataset(tmp_path: Path, write_png):
    """Eight real PNGs and ``manifest(validation_names, folder)`` writing a manifest of them."""
    files = {n: write_png(tmp_path / "img" / f"{n}.png", size=48, seed=i) for i, n in enumerate(NAMES)}
    sha = {n: sha256_file(p) for n, p in files.items()}

    def manifest(validation: set[str], folder: str):
        entries = [{"sha256": sha[n], "label": "benign" if n[0] == "b" else "malignant", "group_id": n,
                    "path": str(files[n]), "split": "validation" if n in validation else "train"}
                   for n in NAMES]
        return write_manifest(sorted(entries, key=lambda e: e["sha256"]), tmp_path / folder, seed=0,
                              val_fraction=0.5)

    return sha, manifest


def _duel_setup(settings, tmp_path: Path, register_champion, write_png, *, champion_trained_on: list[str]) -> dict:
    """The candidate validates on b1, b2, m1, m2; the tiny champion's manifest says it was trained on
    ``champion_trained_on``."""
    sha, manifest = _dataset(tmp_path, write_png)
    cand_manifest = manifest({"b1", "b2", "m1", "m2"}, "cand-manifests")
    champ_manifest = manifest(set(NAMES) - set(champion_trained_on), "champ-manifests")
    champion = register_champion(settings, version="v-champ")
    (settings.models_dir / champion / "metadata.json").write_text(
        json.dumps({"manifest_path": str(champ_manifest.path)}))

    cand_dir = settings.models_dir / "v-cand"
    cand_dir.mkdir(parents=True)
    (cand_dir / "metadata.json").write_text(json.dumps({"manifest_path": str(cand_manifest.path)}))
    probs = {"b1": 0.1, "b2": 0.2, "m1": 0.8, "m2": 0.9}
    (cand_dir / "validation_predictions.json").write_text(json.dumps(
        [{"sha256": sha[n], "label": n[0], "prob_malignant": p} for n, p in probs.items()]))
    with session_scope(settings.database_url) as s:
        s.add(ModelVersion(version="v-cand", status="candidate", artifact_path=str(cand_dir / "model.keras"),
                           artifact_sha256="0" * 64, base_weights="none", profile="demo", image_size=32,
                           preprocessing="densenet-torch-v1", hyperparameters={}, manifest_hash=cand_manifest.hash,
                           n_train=4, n_val=4, threshold=0.5, code_version="test"))
        s.flush()
        registry.save_metrics(s, "v-cand", "validation", PERFECT)
    return {"champion": champion}


def _evidence(url: str) -> dict:
    with session_scope(url) as s:
        return s.scalars(select(Promotion).where(Promotion.candidate_version == "v-cand")).one().evidence


def test_gate_falls_back_explicitly_when_unseen_images_leave_one_class(sqlite_url, make_settings, tmp_path,
                                                                      register_champion, png_writer):
    settings = make_settings(sqlite_url, gate_tolerance=1.0)
    # the champion trained on both benign validation images: only m1, m2 would remain
    info = _duel_setup(settings, tmp_path, register_champion, png_writer, champion_trained_on=["b1", "b2", "m3", "m4"])
    messages: list[str] = []
    out = pipelines.gate_step(settings, "v-cand", actor="test", progress=messages.append)

    evidence = _evidence(sqlite_url)
    comparison = evidence["comparison"]
    assert {k: comparison[k] for k in ("validation_images", "champion_trained_on", "images")} == {
        "validation_images": 4, "champion_trained_on": 2, "images": 4}
    assert comparison["fallback"].startswith(
        "compared on all 4 validation images, 2 of which the champion was trained on: without them only "
        "malignant images would remain")
    assert evidence["champion"]["n"] == 4.0 and evidence["champion_version"] == info["champion"]
    assert comparison["fallback"] in out["reason"]  # the promotion log's reason says it too
    duel = next(m for m in messages if m.startswith("scoring champion"))
    assert "(4 of 4; 2 were in the champion's training data); falling back: compared on all 4" in duel
    # decided once: a retry returns the recorded decision without scoring again
    again = pipelines.gate_step(settings, "v-cand", actor="test", progress=messages.append)
    assert again == out and sum(m.startswith("scoring champion") for m in messages) == 1


def test_gate_leaves_out_images_the_champion_trained_on(sqlite_url, make_settings, tmp_path, register_champion,
                                                        png_writer):
    settings = make_settings(sqlite_url, gate_tolerance=1.0)
    _duel_setup(settings, tmp_path, register_champion, png_writer, champion_trained_on=["b1", "m3", "m4"])
    messages: list[str] = []
    pipelines.gate_step(settings, "v-cand", actor="test", progress=messages.append)

    evidence = _evidence(sqlite_url)
    assert evidence["comparison"] == {"validation_images": 4, "champion_trained_on": 1, "images": 3,
                                      "fallback": None}
    # both sides measured on the same three images (the candidate from its recorded predictions)
    assert evidence["candidate"]["n"] == 3.0 and evidence["champion"]["n"] == 3.0
    assert evidence["candidate"]["accuracy"] == 1.0
    assert not [m for m in messages if "falling back" in m]


# -- evaluate_step's files ---------------------------------------------------------------------------
def test_evaluate_step_replaces_validation_predictions_atomically(sqlite_url, make_settings, tmp_path,
                                                                  tiny_model_artifact, png_writer):
    """The gate reads validation_predictions.json back; a reader of the previous file (a retried
    evaluation's) keeps reading it whole, because the new file replaces it rather than overwriting it."""
    import shutil

    settings = make_settings(sqlite_url)
    upgrade(sqlite_url)
    sha, manifest = _dataset(tmp_path, png_writer)
    m = manifest({"b1", "b2", "m1", "m2"}, "manifests")
    src, artifact_sha = tiny_model_artifact
    model_dir = settings.models_dir / "v-eval"
    model_dir.mkdir(parents=True)
    shutil.copyfile(src, model_dir / "model.keras")
    meta = {"version": "v-eval", "artifact_sha256": artifact_sha, "manifest_path": str(m.path),
            "manifest_hash": m.hash, "image_size": 32, "preprocessing": "densenet-torch-v1",
            "hyperparameters": {"base_weights": "none", "profile": "demo"}, "n_train": 4, "n_val": 4,
            "code_version": "test", "data_cutoff": None}
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    (model_dir / "history.json").write_text(json.dumps({"loss": [0.7, 0.6], "val_loss": [0.7, 0.65]}))
    previous = json.dumps([{"sha256": "old", "label": "benign", "prob_malignant": 0.5}] * 200)
    (model_dir / "validation_predictions.json").write_text(previous)

    with open(model_dir / "validation_predictions.json") as reader:
        out = pipelines.evaluate_step(settings, "v-eval", progress=lambda _: None)
        assert reader.read() == previous
    rows = json.loads((model_dir / "validation_predictions.json").read_text())
    assert sorted(r["sha256"] for r in rows) == sorted(sha[n] for n in ("b1", "b2", "m1", "m2"))
    assert all(0.0 <= r["prob_malignant"] <= 1.0 for r in rows)
    assert json.loads((model_dir / "metadata.json").read_text())["threshold"] == out["threshold"]
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]
    with session_scope(sqlite_url) as s:
        assert registry.get_version(s, "v-eval").status == "candidate"
