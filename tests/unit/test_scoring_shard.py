"""Scoring a shard (bcc_pipeline.scoring.shard): the model sees whole batches, a shard started twice at
once scores each file once, files still being written wait for the next run, odd names and big images.
In-process, with a tiny champion model."""

from __future__ import annotations

import os
import shutil
import threading

from sqlalchemy import select

from bcc_pipeline import files, scoring
from bcc_pipeline.errors import ConfigError
from bcc_pipeline.store import InboxFile, Prediction, session_scope
from tests.support import archived, count_rows, fill_inbox, inbox_files, scoring_settings


def test_the_model_only_sees_batches(make_settings, sqlite_url, register_champion, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 11)
    calls: list[int] = []
    r = scoring.score_inbox(s, batch_size=4, hooks=scoring.Hooks(on_model_batch=calls.append))
    assert r["scored"] == 11 and calls == [4, 4, 3]


def test_the_model_starts_the_next_batch_before_this_one_commits(
    make_settings, sqlite_url, register_champion, png_writer
):
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 6)
    events: list[str] = []
    hooks = scoring.Hooks(
        on_model_batch=lambda n: events.append("model"),
        on_batch_committed=lambda paths: events.append("commit"),
    )
    assert scoring.score_inbox(s, batch_size=2, hooks=hooks)["scored"] == 6
    assert events == ["model", "model", "commit", "model", "commit", "commit"]


def test_content_of_the_batch_still_being_committed_is_predicted_once(
    make_settings, sqlite_url, register_champion, png_writer
):
    """The model works on a batch while the one before it commits: a content in both is not predicted
    again, and the later file is its duplicate with the earlier batch's probability."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    a, b, c = (png_writer(s.inbox_dir / f"{name}.png", seed=i, size=40) for i, name in enumerate("abc"))
    shutil.copyfile(a, s.inbox_dir / "d.png")  # batches of 2 in name order: [a, b], [c, d]
    calls: list[int] = []
    r = scoring.score_inbox(s, batch_size=2, hooks=scoring.Hooks(on_model_batch=calls.append))
    assert calls == [2, 1]  # d's content was already in the model's hands with a
    assert (r["scored"], r["duplicates"]) == (3, 1)
    with session_scope(sqlite_url) as ss:
        rows = ss.execute(select(InboxFile.path, InboxFile.status, InboxFile.sha256)).all()
        n_preds = len(ss.scalars(select(Prediction.image_sha256)).all())
    status = {files.path_from_display(p): (st, sha) for p, st, sha in rows}
    assert status["d.png"] == ("duplicate", status["a.png"][1]) and status["a.png"][0] == "scored"
    assert n_preds == 3 and inbox_files(s.inbox_dir) == [] and len(archived(s)) == 4


def test_same_shard_twice_at_once_scores_each_file_once(
    make_settings, migrated_url, register_champion, png_writer
):
    s = scoring_settings(make_settings, migrated_url)
    register_champion(s)
    imgs = fill_inbox(s.inbox_dir, png_writer, 12)
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
    # a twin that started while its shard was being scored is refused (round 23); one that came after
    # finds nothing left to do
    assert all(isinstance(e, ConfigError) and "being scored by another process" in str(e) for e in errors), (
        errors
    )
    summary = scoring.finalize_run(s, "twice")
    assert (summary["scored"], summary["duplicates"]) == (12, 1)
    assert sum(r["scored"] for r in results) == 12 and sum(r["duplicates"] for r in results) == 1
    assert count_rows(migrated_url, Prediction) == 12 and count_rows(migrated_url, InboxFile) == 13
    assert inbox_files(s.inbox_dir) == [] and len(archived(s)) == 13


def test_file_still_being_written_is_skipped(make_settings, sqlite_url, register_champion, png_writer):
    s = make_settings(sqlite_url, settle_seconds=30)
    register_champion(s)
    for p in fill_inbox(s.inbox_dir, png_writer, 3):
        os.utime(p, (1, 1))
    png_writer(s.inbox_dir / "uploading.png")
    r = scoring.score_inbox(s)
    assert (r["scored"], r["skipped"]) == (3, 1) and r["skipped_paths"] == ["uploading.png"]
    assert inbox_files(s.inbox_dir) == ["uploading.png"]


def test_odd_names_and_a_big_image(make_settings, sqlite_url, register_champion, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
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
    assert inbox_files(s.inbox_dir) == []


def test_an_interrupt_records_the_run_as_failed(make_settings, sqlite_url, register_champion, png_writer):
    """Ctrl-C (and Airflow's timeout and terminate, also BaseException) in the middle of a shard: the run is
    recorded ``failed`` with ``finished_at``, not left ``running``; the interrupt goes on up; nothing moved."""
    import pytest

    from bcc_pipeline.store import ScoringRun

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)

    def interrupt(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scoring.score_inbox(s, run_id="interrupted", hooks=scoring.Hooks(on_model_batch=interrupt))
    with session_scope(sqlite_url) as ses:
        run = ses.get(ScoringRun, "interrupted")
        assert (run.status, run.error) == ("failed", "KeyboardInterrupt") and run.finished_at is not None
    assert len(inbox_files(s.inbox_dir)) == 3


def test_an_interrupt_while_finalizing_records_the_run_as_failed(
    make_settings, sqlite_url, register_champion, png_writer, monkeypatch
):
    import pytest

    from bcc_pipeline.scoring import run as run_module
    from bcc_pipeline.store import ScoringRun

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)
    scoring.plan_shards(s, "fin", 1)
    scoring.score_shard(s, "fin", 0)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "sweep_interrupted", interrupt)  # the first step of finalizing
    with pytest.raises(KeyboardInterrupt):
        scoring.finalize_run(s, "fin")
    with session_scope(sqlite_url) as ses:
        run = ses.get(ScoringRun, "fin")
        assert (run.status, run.error) == ("failed", "KeyboardInterrupt") and run.finished_at is not None
