"""Moving scored files and finishing interrupted runs (bcc_pipeline.scoring.moves): a run interrupted at
any point (crash after a batch's commit, crash in the middle of a move, a file that cannot be moved) is
finished by the next run. The interruptions go through the scoring hooks
(:class:`bcc_pipeline.scoring.Hooks`). The move itself is tested in tests/unit/test_files.py."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import select

from bcc_pipeline import files, scoring
from bcc_pipeline.store import InboxFile, Prediction, session_scope
from tests.support import Crash, archived, count_rows, fill_inbox, inbox_files, scoring_settings


# -- interrupted runs -------------------------------------------------------------------------
def test_crash_after_commit_before_moves_then_new_run(make_settings, migrated_url, register_champion, png_writer):
    s = scoring_settings(make_settings, migrated_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 10)
    (s.inbox_dir / "bad.png").write_text("<html>not an image</html>")
    calls = {"n": 0}

    def crash_on_second_batch(paths):  # the batch is committed, its files not moved yet
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="crashed", batch_size=4,
                            hooks=scoring.Hooks(on_batch_committed=crash_on_second_batch))
    stranded = len(inbox_files(s.inbox_dir))
    assert 0 < stranded < 11

    r = scoring.score_inbox(s, batch_size=4)  # what a person does: just run it again
    assert r["recovered"] == 4 and r["status"] == "finished"
    assert inbox_files(s.inbox_dir) == []
    assert count_rows(migrated_url, Prediction) == 10
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


def test_crash_then_rerun_same_run_id(make_settings, sqlite_url, register_champion, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 10)
    n = {"moves": 0}

    def crash_mid_move(src, where):
        n["moves"] += 1
        if n["moves"] == 6:  # linked into the archive, but the inbox copy is not removed yet
            raise Crash

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="again", batch_size=4, hooks=scoring.Hooks(on_move_linked=crash_mid_move))
    r = scoring.score_inbox(s, run_id="again", batch_size=4)
    assert (r["scored"], r["duplicates"], r["status"]) == (10, 0, "finished")
    assert inbox_files(s.inbox_dir) == [] and len(archived(s)) == 10  # no "~1" copies
    assert count_rows(sqlite_url, Prediction) == 10


def test_unmovable_file_is_reported_not_lost(make_settings, sqlite_url, register_champion, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)
    def refuse(src, dest, **options):
        if str(src).endswith("img001.png"):
            raise PermissionError(13, "Permission denied")
        return files.move_no_clobber(src, dest, **options)

    r = scoring.score_inbox(s, hooks=scoring.Hooks(move_file=refuse))
    assert r["status"] == "move_failed" and r["move_failed"] == 1 and r["scored"] == 3
    assert r["move_failures"][0]["path"] == "patient_1/img001.png"
    assert "Permission denied" in r["move_failures"][0]["error"]
    assert inbox_files(s.inbox_dir) == ["patient_1/img001.png"]
    r2 = scoring.score_inbox(s)  # the next run moves it where the first run meant it to go
    assert r2["recovered"] == 1 and r2["scored"] == 0 and inbox_files(s.inbox_dir) == []
    assert (s.archive_dir / r["run_id"] / "patient_1" / "img001.png").exists()
    assert scoring.finalize_run(s, r["run_id"])["status"] == "finished"
