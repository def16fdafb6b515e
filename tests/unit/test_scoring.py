"""Batch scoring (bcc_pipeline.scoring + files): discovery, batching, the ledger, idempotence, moves,
interrupted runs, sharding, the view and `bcc predictions`. In-process, with a tiny champion model."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from bcc_pipeline import files, scoring, store
from bcc_pipeline.errors import ConfigError, NoChampionError
from bcc_pipeline.store import ImageRecord, InboxFile, Prediction, Rejection, ScoringRun, session_scope


# -- helpers ----------------------------------------------------------------------------------
def _settings(make_settings, url, **kw):
    return make_settings(url, settle_seconds=0, **kw)


def _fill(inbox: Path, png_writer, n: int, *, prefix: str = "img", seed0: int = 0) -> list[Path]:
    out = []
    for i in range(n):
        out.append(png_writer(inbox / f"patient_{i % 3}" / f"{prefix}{i:03d}.png", seed=seed0 + i, size=40))
    return out


def _count(url: str, model: type) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def _inbox_files(inbox: Path) -> list[str]:
    return sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file() or p.is_symlink())


def _archived(s) -> list[Path]:
    return [p for p in s.archive_dir.rglob("*") if p.is_file()]


# -- module surface ---------------------------------------------------------------------------
def test_importing_scoring_does_not_import_tensorflow():
    code = ("import sys, bcc_pipeline.scoring, bcc_pipeline.files, bcc_pipeline.cli; "
            "bad = [m for m in ('tensorflow', 'keras', 'airflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_migration_0002_up_down_up(db_url):
    store.upgrade(db_url)
    eng = store.get_engine(db_url)
    from sqlalchemy import inspect

    assert "inbox_files" in inspect(eng).get_table_names()
    assert "latest_predictions" in inspect(eng).get_view_names()
    from alembic import command

    with eng.begin() as conn:  # store has no downgrade(); Alembic's own command, as `alembic downgrade`
        cfg = store._alembic_config(db_url)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert store.current_revision(db_url) == "0001"
    eng.dispose()
    insp = inspect(store.get_engine(db_url))
    assert "inbox_files" not in insp.get_table_names() and "latest_predictions" not in insp.get_view_names()
    assert store.upgrade(db_url, "0002") == "0002"


# -- files ------------------------------------------------------------------------------------
def test_move_no_clobber_suffixes_and_never_overwrites(tmp_path):
    src_dir, dest_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    (dest_dir / "a").mkdir(parents=True)
    (dest_dir / "a" / "x.png").write_bytes(b"old")
    (src_dir / "x.png").write_bytes(b"new")
    moved = files.move_no_clobber(src_dir / "x.png", dest_dir / "a" / "x.png")
    assert moved.name == "x~1.png" and moved.read_bytes() == b"new"
    assert (dest_dir / "a" / "x.png").read_bytes() == b"old" and not (src_dir / "x.png").exists()


def test_move_finishes_an_interrupted_move(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    src, dest = tmp_path / "in" / "x.png", tmp_path / "out" / "x.png"
    src.write_bytes(b"data")
    os.link(src, dest)  # the first half of a move, then "SIGKILL"
    assert files.move_no_clobber(src, dest) == dest
    assert not src.exists() and dest.read_bytes() == b"data"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]


def test_move_moves_a_symlink_as_a_link_and_never_touches_its_target(tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("do not touch")
    before = os.stat(target)
    (tmp_path / "in").mkdir()
    link = tmp_path / "in" / "evil.png"
    link.symlink_to(target)
    moved = files.quarantine_file(link, tmp_path / "q", Path("evil.png"), "symbolic link")
    assert moved.is_symlink() and os.readlink(moved) == str(target)
    assert not os.path.lexists(link)
    after = os.stat(target)
    assert target.read_text() == "do not touch"
    assert (after.st_mtime_ns, after.st_ino, after.st_mode) == (before.st_mtime_ns, before.st_ino, before.st_mode)
    assert (tmp_path / "q" / "evil.png.reason.txt").read_text().strip() == "symbolic link"


def test_long_names_stay_within_the_name_limit(tmp_path):
    name = "é" * 120 + ".png"  # 244 bytes: the reason file needs a shorter stem
    assert len(os.fsencode(name)) == 244
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(b"x")
    moved = files.quarantine_file(tmp_path / "in" / name, tmp_path / "q", Path(name), "why")
    assert moved.name == name
    reasons = [p for p in (tmp_path / "q").iterdir() if p.name.endswith(".reason.txt")]
    assert len(reasons) == 1 and len(os.fsencode(reasons[0].name)) <= 255
    assert files.reason_path(moved) == reasons[0]
    assert len(os.fsencode(files.fit_name("a" * 300, "~12.png"))) == 255


def test_reason_file_never_replaces_a_quarantined_link(tmp_path):
    q = tmp_path / "q"
    q.mkdir()
    (q / "x.png.reason.txt").symlink_to("/etc/hostname")
    (q / "x.png").write_bytes(b"x")
    written = files.write_reason(q / "x.png", "why")
    assert (q / "x.png.reason.txt").is_symlink() and written.read_text() == "why\n"


def test_display_path_escapes_invalid_utf8():
    raw = os.fsdecode(b"bad\xffname.png")
    assert files.display_path(raw) == "bad\\xffname.png"


# -- discovery --------------------------------------------------------------------------------
def test_discover_sorts_the_inbox(make_settings, png_writer, tmp_path):
    s = make_settings(None, settle_seconds=60)
    inbox = s.inbox_dir
    old = png_writer(inbox / "a" / "old.png")
    os.utime(old, (1, 1))
    png_writer(inbox / "fresh.png")  # just written: skipped
    (inbox / "notes.txt").write_text("x")
    (inbox / ".DS_Store").write_bytes(b"x")
    (inbox / "Thumbs.db").write_bytes(b"x")
    (inbox / ".hidden").mkdir()
    png_writer(inbox / ".hidden" / "in_hidden.png")
    (inbox / "x.png").mkdir()
    os.utime(png_writer(inbox / "x.png" / "inside.png"), (1, 1))
    (inbox / "link.png").symlink_to(tmp_path / "elsewhere.png")
    (inbox / "dirlink").symlink_to(tmp_path)
    os.mkfifo(inbox / "pipe.png")
    found = scoring.discover(s)
    assert found["pending"] == ["a/old.png", "x.png/inside.png"]
    assert found["links"] == ["dirlink", "link.png"]
    assert found["skipped"] == ["fresh.png"]
    ignored = {i["path"]: i["reason"] for i in found["ignored"]}
    assert set(ignored) == {".DS_Store", ".hidden", "Thumbs.db", "notes.txt", "x.png", "pipe.png"}
    assert "folder" in ignored["x.png"] and "regular" in ignored["pipe.png"]


def test_inbox_inside_archive_is_refused(make_settings):
    s = make_settings(None)
    with pytest.raises(ConfigError, match="inside"):
        scoring.discover(s, s.archive_dir / "x")


# -- scoring ----------------------------------------------------------------------------------
def test_no_champion_is_a_clear_error(make_settings, sqlite_url, png_writer):
    s = _settings(make_settings, sqlite_url)
    store.upgrade(sqlite_url)
    png_writer(s.inbox_dir / "a.png")
    with pytest.raises(NoChampionError, match="no champion"):
        scoring.score_inbox(s)
    assert (s.inbox_dir / "a.png").exists()


def test_score_inbox_end_to_end_and_rerun_adds_nothing(make_settings, migrated_url, register_champion,
                                                       png_writer):
    s = _settings(make_settings, migrated_url)
    version = register_champion(s, threshold=0.5)
    imgs = _fill(s.inbox_dir, png_writer, 9)
    shutil.copyfile(imgs[0], s.inbox_dir / "same content.png")  # duplicate content under another name
    (s.inbox_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (s.inbox_dir / "readme.md").write_text("left alone")

    r = scoring.score_inbox(s, batch_size=4)
    assert (r["scored"], r["duplicates"], r["rejected"], r["ignored"], r["skipped"]) == (9, 1, 1, 1, 0)
    assert r["status"] == "finished" and r["model_version"] == version and r["move_failed"] == 0
    assert r["rejections"] == [{"path": "broken.png", "reason": r["rejections"][0]["reason"]}]
    assert "truncated or corrupt" in r["rejections"][0]["reason"]
    assert _inbox_files(s.inbox_dir) == ["readme.md"]
    run = r["run_id"]
    arch = s.archive_dir / run
    assert sorted(str(p.relative_to(arch)) for p in _archived(s)) == sorted(
        [str(p.relative_to(s.inbox_dir)) for p in imgs] + ["same content.png"])
    q = s.quarantine_dir / run
    assert (q / "broken.png").exists() and "truncated" in (q / "broken.png.reason.txt").read_text()

    with session_scope(migrated_url) as ses:
        preds = ses.scalars(select(Prediction)).all()
        assert len(preds) == 9 and {p.model_version for p in preds} == {version}
        for p in preds:
            assert p.label == ("malignant" if p.prob_malignant >= 0.5 else "benign") and p.threshold == 0.5
            assert p.run_id == run and p.source_path.startswith("patient_")
        ledger = {f.path: f for f in ses.scalars(select(InboxFile))}
        assert ledger["same content.png"].status == "duplicate"
        assert ledger["same content.png"].sha256 == ledger["patient_0/img000.png"].sha256
        assert all(f.moved_to for f in ledger.values())
        assert ses.scalar(select(func.count()).select_from(ImageRecord).where(ImageRecord.label.is_(None))) == 9
        rej = ses.scalars(select(Rejection)).one()
        assert (rej.stage, rej.path, rej.run_id) == ("scoring", "broken.png", run) and rej.moved_to
        row = ses.get(ScoringRun, run)
        assert row.status == "finished" and row.finished_at and row.counts["scored"] == 9
        assert row.model_version == version
        view = ses.execute(text("SELECT image_sha256, model_status, champion_version FROM latest_predictions")).all()
        assert len(view) == 9 and {(v.model_status, v.champion_version) for v in view} == {("champion", version)}

    # the same files again (e.g. restored from the archive): nothing new, all duplicates
    for p in _archived(s):
        dest = s.inbox_dir / "again" / p.relative_to(arch)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    r2 = scoring.score_inbox(s, batch_size=4)
    assert (r2["scored"], r2["duplicates"], r2["rejected"]) == (0, 10, 0)
    assert _count(migrated_url, Prediction) == 9
    # and a rerun of a finished run id changes nothing at all
    r3 = scoring.score_inbox(s, run_id=run)
    assert (r3["scored"], r3["duplicates"], r3["rejected"]) == (9, 1, 1) and _count(migrated_url, Prediction) == 9


def test_the_model_only_sees_batches(make_settings, sqlite_url, register_champion, png_writer, monkeypatch):
    s = _settings(make_settings, sqlite_url)
    register_champion(s)
    _fill(s.inbox_dir, png_writer, 11)
    calls: list[int] = []
    real = scoring._Model.predict

    def spy(self, x):
        calls.append(int(x.shape[0]))
        return real(self, x)

    monkeypatch.setattr(scoring._Model, "predict", spy)
    r = scoring.score_inbox(s, batch_size=4)
    assert r["scored"] == 11 and calls == [4, 4, 3]


def test_champion_is_pinned_for_the_whole_run(make_settings, sqlite_url, register_champion, png_writer):
    s = _settings(make_settings, sqlite_url)
    v1 = register_champion(s, "v1")
    _fill(s.inbox_dir, png_writer, 4)
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
    s = _settings(make_settings, sqlite_url, inference="keras")
    register_champion(s)
    paths = _fill(s.inbox_dir, png_writer, 6)
    copies = s.home / "copies"
    for p in paths:
        dest = copies / p.relative_to(s.inbox_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    plan = scoring.plan_shards(s, "run-keras", 2)
    assert plan["inference"] == "keras"
    other = _settings(make_settings, sqlite_url, inference="openvino")  # the settings change meanwhile
    for k in range(2):
        assert scoring.score_shard(other, "run-keras", k)["inference"] == "keras"
    summary = scoring.finalize_run(other, "run-keras")
    assert summary["inference"] == "keras" and summary["precision"] == "f32" and summary["scored"] == 6
    with session_scope(sqlite_url) as ses:
        keras_probs = dict(ses.execute(select(Prediction.source_path, Prediction.prob_malignant)).all())
    # the same images under a second model version, scored with OpenVINO fp32
    v2 = register_champion(s, "v-openvino")
    shutil.copytree(copies, s.inbox_dir, dirs_exist_ok=True)
    r = scoring.score_inbox(other, run_id="run-openvino")
    assert r["inference"] == "openvino" and r["scored"] == 6
    with session_scope(sqlite_url) as ses:
        ov_probs = dict(ses.execute(select(Prediction.source_path, Prediction.prob_malignant)
                                    .where(Prediction.model_version == v2)).all())
    assert keras_probs.keys() == ov_probs.keys()
    assert max(abs(keras_probs[k] - ov_probs[k]) for k in keras_probs) < 1e-5
    with pytest.raises(ConfigError, match="unknown inference back-end"):
        scoring.plan_shards(s, "run-bad", 1, inference="tpu")


def test_unknown_inference_setting_is_refused(make_settings):
    with pytest.raises(ConfigError, match="BCC_INFERENCE='gpu'"):
        make_settings(inference="gpu")


def test_plan_is_reused_and_shards_are_disjoint(make_settings, sqlite_url, register_champion, png_writer):
    s = _settings(make_settings, sqlite_url)
    register_champion(s)
    _fill(s.inbox_dir, png_writer, 7)
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


def test_same_shard_twice_at_once_scores_each_file_once(make_settings, migrated_url, register_champion,
                                                        png_writer):
    s = _settings(make_settings, migrated_url)
    register_champion(s)
    imgs = _fill(s.inbox_dir, png_writer, 12)
    shutil.copyfile(imgs[1], s.inbox_dir / "dup.png")
    scoring.plan_shards(s, "twice", 2)
    results, errors = [], []

    def work(k):
        try:
            results.append(scoring.score_shard(s, "twice", k, batch_size=3))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 0, 1, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    summary = scoring.finalize_run(s, "twice")
    assert (summary["scored"], summary["duplicates"]) == (12, 1)
    assert sum(r["scored"] for r in results) == 12 and sum(r["duplicates"] for r in results) == 1
    assert _count(migrated_url, Prediction) == 12 and _count(migrated_url, InboxFile) == 13
    assert _inbox_files(s.inbox_dir) == [] and len(_archived(s)) == 13


class _Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even except Exception handlers)."""


def test_crash_after_commit_before_moves_then_new_run(make_settings, migrated_url, register_champion, png_writer,
                                                      monkeypatch):
    s = _settings(make_settings, migrated_url)
    register_champion(s)
    _fill(s.inbox_dir, png_writer, 10)
    (s.inbox_dir / "bad.png").write_text("<html>not an image</html>")
    calls = {"n": 0}
    real = scoring._ShardScorer._move_all

    def crash_on_second_batch(self, moves):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash
        return real(self, moves)

    monkeypatch.setattr(scoring._ShardScorer, "_move_all", crash_on_second_batch)
    with pytest.raises(_Crash):
        scoring.score_inbox(s, run_id="crashed", batch_size=4)
    monkeypatch.setattr(scoring._ShardScorer, "_move_all", real)
    stranded = len(_inbox_files(s.inbox_dir))
    assert 0 < stranded < 11

    r = scoring.score_inbox(s, batch_size=4)  # what a person does: just run it again
    assert r["recovered"] == 4 and r["status"] == "finished"
    assert _inbox_files(s.inbox_dir) == []
    assert _count(migrated_url, Prediction) == 10
    with session_scope(migrated_url) as ses:
        rows = ses.scalars(select(InboxFile)).all()
        assert all(f.moved_to for f in rows)
        crashed = sorted(f.status for f in rows if f.run_id == "crashed")  # two batches of 4 committed
        assert crashed.count("scored") == 7 and crashed.count("rejected") == 1
    # the recovered files went where the crashed run meant them to go
    assert len(list((s.archive_dir / "crashed").rglob("*.png"))) == 7
    assert (s.quarantine_dir / "crashed" / "bad.png.reason.txt").exists()
    total = scoring.finalize_run(s, "crashed")
    assert total["scored"] + r["scored"] == 10


def test_crash_then_rerun_same_run_id(make_settings, sqlite_url, register_champion, png_writer, monkeypatch):
    s = _settings(make_settings, sqlite_url)
    register_champion(s)
    _fill(s.inbox_dir, png_writer, 10)
    real_move = scoring.move_no_clobber
    n = {"moves": 0}

    def crash_mid_move(src, dest):
        n["moves"] += 1
        if n["moves"] == 6:  # linked into the archive, but the inbox copy is not removed yet
            os.link(src, dest)
            raise _Crash
        return real_move(src, dest)

    monkeypatch.setattr(scoring, "move_no_clobber", crash_mid_move)
    with pytest.raises(_Crash):
        scoring.score_inbox(s, run_id="again", batch_size=4)
    monkeypatch.setattr(scoring, "move_no_clobber", real_move)
    r = scoring.score_inbox(s, run_id="again", batch_size=4)
    assert (r["scored"], r["duplicates"], r["status"]) == (10, 0, "finished")
    assert _inbox_files(s.inbox_dir) == [] and len(_archived(s)) == 10  # no "~1" copies
    assert _count(sqlite_url, Prediction) == 10


def test_unmovable_file_is_reported_not_lost(make_settings, sqlite_url, register_champion, png_writer,
                                             monkeypatch):
    s = _settings(make_settings, sqlite_url)
    register_champion(s)
    _fill(s.inbox_dir, png_writer, 3)
    real_move = scoring.move_no_clobber

    def refuse(src, dest):
        if str(src).endswith("img001.png"):
            raise PermissionError(13, "Permission denied")
        return real_move(src, dest)

    monkeypatch.setattr(scoring, "move_no_clobber", refuse)
    r = scoring.score_inbox(s)
    assert r["status"] == "move_failed" and r["move_failed"] == 1 and r["scored"] == 3
    assert r["move_failures"][0]["path"] == "patient_1/img001.png"
    assert "Permission denied" in r["move_failures"][0]["error"]
    assert _inbox_files(s.inbox_dir) == ["patient_1/img001.png"]
    monkeypatch.setattr(scoring, "move_no_clobber", real_move)
    r2 = scoring.score_inbox(s)  # the next run moves it where the first run meant it to go
    assert r2["recovered"] == 1 and r2["scored"] == 0 and _inbox_files(s.inbox_dir) == []
    assert (s.archive_dir / r["run_id"] / "patient_1" / "img001.png").exists()
    assert scoring.finalize_run(s, r["run_id"])["status"] == "finished"


def test_file_still_being_written_is_skipped(make_settings, sqlite_url, register_champion, png_writer):
    s = make_settings(sqlite_url, settle_seconds=30)
    register_champion(s)
    for p in _fill(s.inbox_dir, png_writer, 3):
        os.utime(p, (1, 1))
    png_writer(s.inbox_dir / "uploading.png")
    r = scoring.score_inbox(s)
    assert (r["scored"], r["skipped"]) == (3, 1) and r["skipped_paths"] == ["uploading.png"]
    assert _inbox_files(s.inbox_dir) == ["uploading.png"]


# -- bcc score / bcc predictions --------------------------------------------------------------
def test_cli_score_and_predictions(make_settings, migrated_url, register_champion, png_writer, monkeypatch,
                                   capsys):
    from bcc_pipeline.cli import main

    s = _settings(make_settings, migrated_url)
    version = register_champion(s)
    _fill(s.inbox_dir, png_writer, 5)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", migrated_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert main(["score", "--json", "--batch-size", "2", "--inference", "xla"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inference"] == "xla" and summary["precision"] == "f32"
    for k in ("scored", "duplicates", "rejected", "ignored", "skipped"):
        assert isinstance(summary[k], int)
    assert summary["scored"] == 5 and summary["model_version"] == version and summary["run_id"]
    assert isinstance(summary["images_per_second"], float) and summary["rejections"] == []

    assert main(["predictions", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5
    for row in rows:
        assert {"sha256", "source_path", "model_version", "prob_malignant", "label", "scored_at"} <= set(row)
        assert dt.datetime.fromisoformat(row["scored_at"]).tzinfo is not None
    malignant = sum(r["label"] == "malignant" for r in rows)
    assert main(["predictions", "--json", "--label", "malignant"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == malignant
    assert main(["predictions", "--format", "json", "--since", "1h", "--limit", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["predictions", "--format", "json", "--since", "2999-01-01"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["predictions", "--format", "json", "--model-version", "nope"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["predictions", "--format", "json", "--latest"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5
    assert main(["predictions", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sha256,source_path,model_version,prob_malignant,label") and len(lines) == 6
    assert main(["predictions"]) == 0
    assert "patient_" in capsys.readouterr().out
    assert main(["predictions", "--since", "yesterday-ish"]) == 1


def test_cli_score_without_champion_exits_non_zero(make_settings, sqlite_url, monkeypatch, capsys):
    from bcc_pipeline.cli import main

    s = _settings(make_settings, sqlite_url)
    store.upgrade(sqlite_url)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    assert main(["score", "--json"]) == 1
    err = capsys.readouterr().err
    assert "no champion" in err and len(err.strip().splitlines()) == 1


def test_memory_budget_bounds_and_is_fair():
    budget = scoring._MemoryBudget(100)
    log, lock = [], threading.Lock()

    def work(amount):
        got = budget.acquire(amount)
        with lock:
            log.append(budget.used)
        threading.Event().wait(0.01)
        budget.release(got)

    threads = [threading.Thread(target=work, args=(a,)) for a in (30, 30, 250, 30, 30, 30, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.used == 0 and len(log) == 7
    assert all(u <= 100 for u in log if u != 250)  # only the oversized one may exceed, and then alone
    assert 250 in log


def test_odd_names_and_a_big_image(make_settings, sqlite_url, register_champion, png_writer):
    s = _settings(make_settings, sqlite_url)
    register_champion(s)
    weird = os.fsdecode(b"not-utf8-\xff\xfe.png")
    png_writer(s.inbox_dir / weird, seed=1)
    png_writer(s.inbox_dir / "new\nline.png", seed=2)
    png_writer(s.inbox_dir / "big.png", seed=3, size=2500)  # 6.25 Mpx: more than the decode budget's share
    (s.inbox_dir / os.fsdecode(b"bad-\xff.jpg")).write_bytes(b"\xff\xd8\xff\xe0 cut")
    r = scoring.score_inbox(s)
    assert (r["scored"], r["rejected"]) == (3, 1) and r["status"] == "finished"
    assert r["rejections"][0]["path"] == "bad-\\xff.jpg"
    assert os.path.lexists(s.archive_dir / r["run_id"] / weird)
    q = s.quarantine_dir / r["run_id"] / os.fsdecode(b"bad-\xff.jpg")
    assert os.path.lexists(q) and files.reason_path(q).exists()
    with session_scope(sqlite_url) as ses:
        paths = set(ses.scalars(select(Prediction.source_path)))
    assert paths == {"not-utf8-\\xff\\xfe.png", "new\\nline.png", "big.png"}  # files.display_path
    assert _inbox_files(s.inbox_dir) == []


def test_older_schema_says_to_upgrade(make_settings, sqlite_url, png_writer):
    from bcc_pipeline.errors import StoreError

    s = _settings(make_settings, sqlite_url)
    store.upgrade(sqlite_url, "0001")
    with pytest.raises(StoreError, match="bcc db upgrade"):
        scoring.plan_shards(s, "r", 1)
