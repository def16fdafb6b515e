"""Planning scoring runs (bcc_pipeline.scoring.plan): the champion and the inference back-end are pinned
for the whole run, a plan is written once and reused, shards are disjoint, and a database without the
scoring schema or without a champion is a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from bcc_pipeline import leftovers, scoring, store
from bcc_pipeline.errors import ConfigError, NoChampionError
from bcc_pipeline.store import Prediction, session_scope
from bcc_pipeline.validation import validate_backends
from tests.support import fill_inbox, scoring_settings


def test_no_champion_is_a_clear_error(make_settings, sqlite_url, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
    store.upgrade(sqlite_url)
    png_writer(s.inbox_dir / "a.png")
    with pytest.raises(NoChampionError, match="no champion"):
        scoring.score_inbox(s)
    assert (s.inbox_dir / "a.png").exists()


def test_champion_is_pinned_for_the_whole_run(make_settings, sqlite_url, register_champion, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
    v1 = register_champion(s, "v1")
    fill_inbox(s.inbox_dir, png_writer, 4)
    plan = scoring.plan_shards(s, "run-pinned", 2)
    assert plan["model_version"] == v1 and plan["n_files"] == 4
    register_champion(s, "v2")  # promoted between planning and scoring
    for k in range(2):
        scoring.score_shard(s, "run-pinned", k)
    summary = scoring.finalize_run(s, "run-pinned")
    assert summary["model_version"] == v1 and summary["scored"] == 4
    with session_scope(sqlite_url) as ses:
        assert set(ses.scalars(select(Prediction.model_version))) == {v1}


def test_inference_backend_is_pinned_in_the_plan(make_settings, sqlite_url, register_champion, png_writer):
    """The plan records the back-end; every shard uses it even when the settings say otherwise later, and
    the probabilities agree with the fp32 Keras run of the same files."""
    s = scoring_settings(make_settings, sqlite_url, inference="keras")
    register_champion(s)
    paths = fill_inbox(s.inbox_dir, png_writer, 6)
    copies = s.home / "copies"
    for p in paths:
        dest = copies / p.relative_to(s.inbox_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    plan = scoring.plan_shards(s, "run-keras", 2)
    assert plan["inference"] == "keras"
    other = scoring_settings(make_settings, sqlite_url, inference="openvino")  # the settings change meanwhile
    for k in range(2):
        assert scoring.score_shard(other, "run-keras", k)["inference"] == "keras"
    summary = scoring.finalize_run(other, "run-keras")
    assert summary["inference"] == "keras" and summary["precision"] == "f32" and summary["scored"] == 6
    with session_scope(sqlite_url) as ses:
        keras_probs = dict(ses.execute(select(Prediction.source_path, Prediction.prob_malignant)).all())
    # the same images under a second model version, scored with OpenVINO fp32
    v2 = register_champion(s, "v-openvino")
    validate_backends(other, v2, ["openvino"])  # an explicit back-end scores only once validated
    shutil.copytree(copies, s.inbox_dir, dirs_exist_ok=True)
    r = scoring.score_inbox(other, run_id="run-openvino")
    assert r["inference"] == "openvino" and r["scored"] == 6
    with session_scope(sqlite_url) as ses:
        ov_probs = dict(
            ses.execute(
                select(Prediction.source_path, Prediction.prob_malignant).where(
                    Prediction.model_version == v2
                )
            ).all()
        )
    assert keras_probs.keys() == ov_probs.keys()
    assert max(abs(keras_probs[k] - ov_probs[k]) for k in keras_probs) < 1e-5
    with pytest.raises(ConfigError, match="unknown inference back-end"):
        scoring.plan_shards(s, "run-bad", 1, inference="tpu")


def test_unknown_inference_setting_is_refused(make_settings):
    with pytest.raises(ConfigError, match="BCC_INFERENCE='gpu'"):
        make_settings(inference="gpu")


def test_plan_is_reused_and_shards_are_disjoint(make_settings, sqlite_url, register_champion, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 7)
    a = scoring.plan_shards(s, "r1", 3)
    png_writer(s.inbox_dir / "late.png")  # arrives after planning: not in this run
    b = scoring.plan_shards(s, "r1", 3)
    assert a == b and a["n_files"] == 7
    plan = json.loads(Path(a["plan_path"]).read_text())
    flat = [p for shard in plan["shards"] for p in shard]
    assert len(flat) == len(set(flat)) == 7 and all(plan["shards"])
    with pytest.raises(ConfigError, match="already planned"):
        scoring.plan_shards(s, "r1", 2)
    with pytest.raises(ConfigError, match="shards 0..2"):
        scoring.score_shard(s, "r1", 3)


def test_older_schema_says_to_upgrade(make_settings, sqlite_url, png_writer):
    from bcc_pipeline.errors import StoreError

    s = scoring_settings(make_settings, sqlite_url)
    store.upgrade(sqlite_url, "0001")
    with pytest.raises(StoreError, match="bcc db upgrade"):
        scoring.plan_shards(s, "r", 1)


def test_planning_marks_the_home_and_sweeps_stale_temporaries(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Planning a run marks the home (``.bcc-home``) and removes the temporaries killed processes left in
    the folders the pipeline writes (an atomic write under runs/, a conversion under models/<v>/compiled/);
    fresh ones, foreign names and inbox files stay."""
    import os

    s = scoring_settings(make_settings, sqlite_url)
    version = register_champion(s)
    compiled = s.models_dir / version / "compiled"
    stale_dir = compiled / ".bcc-tmp-openvino-0123456789abcdef.h4j5"
    stale_dir.mkdir(parents=True)
    (stale_dir / "model.bin").write_bytes(b"half a model")
    stale_file = s.runs_dir / "old-run" / ".bcc-tmp-plan.json.k3j2.tmp"
    stale_file.parent.mkdir(parents=True)
    stale_file.write_text('{"half')
    fresh = compiled / ".bcc-tmp-onnx-0123456789abcdef.a1b2"
    fresh.mkdir()
    foreign = s.runs_dir / "old-run" / "notes.bcc-tmp-kept"
    foreign.write_text("x")
    old = os.stat(stale_file).st_mtime - leftovers.STALE_TEMP_SECONDS - 60
    for p in (stale_dir / "model.bin", stale_dir, stale_file, foreign):
        os.utime(p, (old, old))
    fill_inbox(s.inbox_dir, png_writer, 2)
    assert not s.home_marker.exists()
    assert scoring.plan_shards(s, "r1", 1)["n_files"] == 2
    assert s.home_marker.is_file()
    assert not stale_dir.exists() and not stale_file.exists()
    assert fresh.is_dir() and foreign.is_file() and len(list(s.inbox_dir.rglob("*.png"))) == 2


def test_a_run_whose_planning_sweep_fails_is_recorded_as_failed(
    make_settings, sqlite_url, register_champion, png_writer, monkeypatch
):
    """The run's row is opened before the sweep of interrupted moves; whatever stops that sweep records the
    run as failed with the error, instead of leaving it `running`."""
    from bcc_pipeline.scoring import plan as plan_module
    from bcc_pipeline.store import ScoringRun

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)

    def broken_sweep(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_module, "sweep_interrupted", broken_sweep)
    with pytest.raises(OSError):
        scoring.plan_shards(s, "swept", 1)
    with session_scope(sqlite_url) as db:
        run = db.get(ScoringRun, "swept")
    assert run.status == "failed" and "no space left on device" in run.error and run.finished_at is not None
