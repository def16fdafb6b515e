"""The read-only queries behind the UI pages and `bcc status`/`bcc models`: predictions with paging,
sorting and filters (bcc_pipeline.predictions), model versions, runs, rejections, the inbox and the
file look-ups that must never leave BCC_HOME (bcc_pipeline.overview). SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest

from bcc_pipeline import overview, predictions
from bcc_pipeline.errors import ConfigError
from bcc_pipeline.store import (
    InboxFile,
    Metric,
    ModelVersion,
    Prediction,
    Promotion,
    Rejection,
    ScoringRun,
    session_scope,
)

T0 = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)


def _mv(version: str, status: str, created: dt.datetime, plots_dir: str | None = None) -> ModelVersion:
    return ModelVersion(
        version=version,
        status=status,
        artifact_path=f"/m/{version}",
        artifact_sha256="a" * 64,
        base_weights="none",
        profile="demo",
        image_size=32,
        preprocessing="densenet-torch-v1",
        hyperparameters={},
        manifest_hash="0" * 64,
        n_train=10,
        n_val=4,
        threshold=0.4,
        code_version="test",
        created_at=created,
        plots_dir=plots_dir,
    )


@pytest.fixture
def seeded(migrated_url, make_settings, png_writer):
    """Three model versions (the champion is neither newest nor oldest), 12 predictions over 12 hours,
    two scoring runs, rejections, an archived image and a plots folder."""
    s = make_settings(migrated_url)
    plots = s.models_dir / "v2" / "plots"
    for name in ("roc.png", "confusion_matrix.png", "training_curves.png", "extra.png"):
        png_writer(plots / name, size=8)
    (plots / "notes.txt").write_text("not a plot")
    archived = png_writer(s.archive_dir / "run-b" / "ward_1" / "img_00.png", size=16)
    shas = [f"{i:064x}" for i in range(12)]
    with session_scope(s.database_url) as db:
        db.add_all(
            [
                _mv("v1", "retired", T0 - dt.timedelta(days=3)),
                _mv("v2", "champion", T0 - dt.timedelta(days=2), plots_dir=str(plots)),
                _mv("v3", "rejected", T0 - dt.timedelta(days=1)),
            ]
        )
        db.flush()
        db.add_all(
            [
                Metric(model_version="v2", split="validation", name="accuracy", value=0.9),
                Metric(model_version="v2", split="validation", name="roc_auc", value=0.95),
                Metric(model_version="v2", split="holdout", name="accuracy", value=0.88),
                Metric(model_version="v3", split="validation", name="accuracy", value=0.7),
            ]
        )
        db.add_all(
            [
                Promotion(
                    candidate_version="v2",
                    from_version="v1",
                    to_version="v2",
                    decision="promoted",
                    reason="gate passed",
                    actor="airflow",
                    evidence={"accuracy": 0.9},
                    decided_at=T0 - dt.timedelta(days=2),
                ),
                Promotion(
                    candidate_version="v3",
                    from_version="v2",
                    to_version="v2",
                    decision="rejected",
                    reason="accuracy 0.70 < floor 0.80",
                    actor="airflow",
                    evidence={},
                    decided_at=T0 - dt.timedelta(days=1),
                ),
            ]
        )
        db.add_all(
            [
                ScoringRun(
                    run_id="run-a",
                    model_version="v2",
                    started_at=T0,
                    status="success",
                    finished_at=T0 + dt.timedelta(minutes=1),
                    counts={"scored": 6, "rejected": 2},
                ),
                ScoringRun(
                    run_id="run-b",
                    model_version="v2",
                    started_at=T0 + dt.timedelta(hours=6),
                    status="success",
                    counts={"scored": 6, "rejected": 1},
                ),
            ]
        )
        for i, sha in enumerate(shas):
            db.add(
                Prediction(
                    image_sha256=sha,
                    model_version="v2" if i % 3 else "v1",
                    prob_malignant=i / 12,
                    label="malignant" if i / 12 >= 0.4 else "benign",
                    threshold=0.4,
                    source_path=f"ward_{i % 2}/img_{i:02d}.png",
                    run_id="run-a" if i < 6 else "run-b",
                    scored_at=T0 + dt.timedelta(hours=i),
                )
            )
        db.add_all(
            [
                Rejection(
                    run_id="run-a",
                    stage="scoring",
                    path="bad1.png",
                    reason="cannot decode",
                    moved_to=str(s.quarantine_dir / "run-a" / "bad1.png"),
                    rejected_at=T0,
                ),
                Rejection(
                    run_id="run-a",
                    stage="scoring",
                    path="bad2.png",
                    reason="cannot decode",
                    moved_to=str(s.quarantine_dir / "run-a" / "bad2.png"),
                    rejected_at=T0 + dt.timedelta(minutes=1),
                ),
                Rejection(
                    run_id="run-b",
                    stage="scoring",
                    path="huge.png",
                    reason="too many pixels",
                    moved_to=None,
                    rejected_at=T0 + dt.timedelta(hours=6),
                ),
            ]
        )
        db.add(
            InboxFile(
                run_id="run-b",
                path="ward_1/img_00.png",
                path_key="k" * 64,
                sha256=shas[0],
                status="scored",
                moved_to=str(archived),
            )
        )
    png_writer(s.quarantine_dir / "run-a" / "bad1.png", size=8)
    return s, shas


def test_query_predictions_sort_page_filter_and_count(seeded):
    s, _ = seeded
    every = list(predictions.query_predictions(s))
    assert [r["source_path"][-10:] for r in every[:2]] == [
        "img_11.png",
        "img_10.png",
    ]  # newest first, as before
    assert tuple(every[0]) == predictions.PREDICTION_FIELDS
    assert predictions.count_predictions(s) == 12
    # pages: consecutive, disjoint, and together the whole ordered list
    pages = [list(predictions.query_predictions(s, limit=5, offset=o)) for o in (0, 5, 10)]
    assert [len(p) for p in pages] == [5, 5, 2]
    assert sum(pages, []) == every
    asc = list(predictions.query_predictions(s, sort="prob_malignant"))
    assert [r["prob_malignant"] for r in asc] == sorted(r["prob_malignant"] for r in every)
    desc = list(predictions.query_predictions(s, sort="-prob_malignant", limit=1))
    assert desc[0]["prob_malignant"] == max(r["prob_malignant"] for r in every)
    # date range: [since, until)
    window = dict(since=T0 + dt.timedelta(hours=3), until=T0 + dt.timedelta(hours=7))
    got = list(predictions.query_predictions(s, **window))
    assert [r["source_path"][-6:-4] for r in got] == ["06", "05", "04", "03"]
    assert predictions.count_predictions(s, **window) == 4
    # path substring: case-insensitive; LIKE wildcards match only themselves
    assert predictions.count_predictions(s, path_contains="WARD_1/") == 6
    assert predictions.count_predictions(s, path_contains="img_1") == 2
    assert predictions.count_predictions(s, path_contains="%") == 0
    assert predictions.count_predictions(s, path_contains="_") == 12
    # filters combine, and count agrees with the rows
    f = dict(label="malignant", model_version="v2", path_contains="ward_0")
    rows = list(predictions.query_predictions(s, **f))
    assert rows and all(
        r["label"] == "malignant" and r["model_version"] == "v2" and "ward_0" in r["source_path"]
        for r in rows
    )
    assert predictions.count_predictions(s, **f) == len(rows)
    assert predictions.count_predictions(s, latest=True) == 12
    for bad in (dict(sort="sha256; drop table"), dict(offset=-1), dict(limit=-1), dict(label="unsure")):
        with pytest.raises(ConfigError):
            list(predictions.query_predictions(s, **bad))


def test_model_versions_runs_promotions_rejections(seeded):
    s, _ = seeded
    newest = overview.model_versions(s)
    assert [v["version"] for v in newest] == ["v3", "v2", "v1"]
    champ_first = overview.model_versions(s, champion_first=True)
    assert [v["version"] for v in champ_first] == ["v2", "v3", "v1"]
    v2 = champ_first[0]
    assert v2["metrics"] == {"validation": {"accuracy": 0.9, "roc_auc": 0.95}, "holdout": {"accuracy": 0.88}}
    assert v2["validation"] == {"accuracy": 0.9, "roc_auc": 0.95}
    assert v2["plots"] == ["training_curves.png", "confusion_matrix.png", "roc.png", "extra.png"]
    assert v2["created_at"].endswith("+00:00")
    assert overview.model_versions(s)[2]["plots"] == []

    champ = overview.champion_summary(s)
    assert champ["version"] == "v2" and champ["validation"]["roc_auc"] == 0.95
    assert [os.path.basename(p) for p in champ["plots"]] == sorted(
        ["training_curves.png", "confusion_matrix.png", "roc.png", "extra.png"]
    )

    log = overview.promotion_log(s)
    assert [(p["decision"], p["candidate_version"]) for p in log] == [("rejected", "v3"), ("promoted", "v2")]
    assert overview.promotion_log(s, limit=1)[0]["reason"].startswith("accuracy 0.70")

    runs = overview.scoring_runs(s)
    assert [r["run_id"] for r in runs] == ["run-b", "run-a"]
    assert runs[1]["counts"] == {"scored": 6, "rejected": 2} and runs[0]["finished_at"] is None

    groups = overview.rejection_summary(s)
    assert [(g["reason"], g["count"], g["runs"]) for g in groups] == [
        ("cannot decode", 2, 1),
        ("too many pixels", 1, 1),
    ]
    assert groups[0]["examples"] == ["bad2.png", "bad1.png"] and groups[0]["last_at"].endswith("+00:00")
    assert [g["reason"] for g in overview.rejection_summary(s, run_id="run-b")] == ["too many pixels"]

    q = overview.quarantine_entries(s)
    assert [(e["path"], e["present"]) for e in q] == [("bad2.png", False), ("bad1.png", True)]


def test_no_champion_and_empty_database(migrated_url, make_settings):
    s = make_settings(migrated_url)
    assert overview.champion_summary(s) is None
    assert overview.model_versions(s) == overview.scoring_runs(s) == overview.rejection_summary(s) == []
    assert predictions.count_predictions(s) == 0


def test_an_unmigrated_database_says_what_to_run(sqlite_url, make_settings):
    from bcc_pipeline.errors import StoreError

    s = make_settings(sqlite_url)
    for call in (
        overview.model_versions,
        overview.champion_summary,
        overview.promotion_log,
        overview.scoring_runs,
        overview.rejection_summary,
        overview.quarantine_entries,
        predictions.count_predictions,
        lambda s: overview.plot_file(s, "v1", "roc.png"),
        lambda s: overview.archived_image(s, "0" * 64),
        lambda s: overview.archived_images(s, ["0" * 64]),
        overview.inbox_status,
    ):
        with pytest.raises(StoreError, match="bcc db upgrade"):
            call(s)
    assert overview.archived_images(s, ["not-a-hash"]) == {}  # nothing to look up: no database needed


def test_plot_and_archived_image_never_leave_home(seeded, tmp_path, png_writer):
    s, shas = seeded
    assert overview.plot_file(s, "v2", "roc.png") == (s.models_dir / "v2" / "plots" / "roc.png").resolve()
    assert overview.plot_file(s, "v2", "missing.png") is None
    assert overview.plot_file(s, "v1", "roc.png") is None  # v1 has no plots folder
    assert overview.plot_file(s, "nope", "roc.png") is None
    for bad in (
        "../roc.png",
        "/etc/passwd",
        "..",
        "roc.png/..",
        "notes.txt",
        "%2e%2e%2froc.png",
        "",
        "a/b.png",
    ):
        with pytest.raises(ConfigError):
            overview.plot_file(s, "v2", bad)
    outside = png_writer(tmp_path / "outside.png", size=8)
    (s.models_dir / "v2" / "plots" / "escape.png").symlink_to(outside)
    assert overview.plot_file(s, "v2", "escape.png") is None  # a link out of the folder is not followed out

    assert (
        overview.archived_image(s, shas[0]) == (s.archive_dir / "run-b" / "ward_1" / "img_00.png").resolve()
    )
    assert overview.archived_image(s, shas[1]) is None  # never archived
    for bad in ("../" + shas[0][3:], shas[10].upper(), "x" * 64, ""):
        with pytest.raises(ConfigError):
            overview.archived_image(s, bad)
    # a ledger row pointing outside the archive (a tampered or foreign row) is never served
    with session_scope(s.database_url) as db:
        db.add(
            InboxFile(
                run_id="run-x",
                path="o.png",
                path_key="o" * 64,
                sha256=shas[2],
                status="scored",
                moved_to=str(outside),
            )
        )
    assert overview.archived_image(s, shas[2]) is None
    os.remove(s.archive_dir / "run-b" / "ward_1" / "img_00.png")
    assert overview.archived_image(s, shas[0]) is None  # archive cleaned up: no thumbnail


def test_inbox_status_uses_scoring_discovery(migrated_url, make_settings, png_writer):
    s = make_settings(migrated_url, settle_seconds=60)
    old = png_writer(s.inbox_dir / "ward_2" / "ready.png")
    past = time.time() - 600
    os.utime(old, (past, past))
    png_writer(s.inbox_dir / "fresh.png")
    (s.inbox_dir / "notes.txt").write_text("x")
    st = overview.inbox_status(s)
    assert st["waiting"] == ["ward_2/ready.png"]
    assert st["being_written"] == ["fresh.png"]
    assert st["ignored"] == [{"path": "notes.txt", "reason": "not an image file extension"}]
    assert st["settle_seconds"] == 60 and st["quarantine"] == []


def test_cli_status_and_models_read_through_the_library(seeded, monkeypatch, capsys):
    import json

    from bcc_pipeline.cli import main

    s, _ = seeded
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", s.database_url)
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == ["v3", "v2", "v1"]
    assert list(rows[1]) == [
        "version",
        "status",
        "created_at",
        "profile",
        "image_size",
        "base_weights",
        "threshold",
        "n_train",
        "n_val",
        "manifest_hash",
        "artifact_path",
        "artifact_sha256",
        "plots_dir",
        "code_version",
        "temperature",
        "operating_point",
        "manifest_hashes",
        "lineage",
        "validation",
        "holdout",
        "intervals",
        "backends_validated_here",
    ]
    assert rows[1]["validation"] == {"accuracy": 0.9, "roc_auc": 0.95}
    assert main(["status", "--json", "--rows", "3"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["champion"]["version"] == "v2" and len(st["champion"]["plots"]) == 4
    assert st["last_scoring_run"]["run_id"] == "run-b" and st["last_scoring_run"]["counts"]["scored"] == 6
    assert len(st["latest_predictions"]) == 3
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "champion        v2" in out and "last scoring    run-b (success) with v2" in out
    assert main(["models"]) == 0
    assert capsys.readouterr().out.splitlines()[3].startswith("v2 ")  # after the legend and the header
