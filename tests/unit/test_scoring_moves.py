"""Moving scored files (bcc_pipeline.files and bcc_pipeline.scoring.moves): nothing is overwritten or lost,
links move as links, and a run interrupted at any point (crash after a batch's commit, crash in the middle
of a move, a file that cannot be moved) is finished by the next run. The interruptions go through the
scoring hooks (:class:`bcc_pipeline.scoring.Hooks`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from bcc_pipeline import files, scoring
from bcc_pipeline.store import InboxFile, Prediction, session_scope

from .scoring_support import Crash, archived, count_rows, fill_inbox, inbox_files, scoring_settings


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

    def crash_mid_move(src, dest):
        n["moves"] += 1
        if n["moves"] == 6:  # linked into the archive, but the inbox copy is not removed yet
            os.link(src, dest)
            raise Crash
        return files.move_no_clobber(src, dest)

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="again", batch_size=4, hooks=scoring.Hooks(move_file=crash_mid_move))
    r = scoring.score_inbox(s, run_id="again", batch_size=4)
    assert (r["scored"], r["duplicates"], r["status"]) == (10, 0, "finished")
    assert inbox_files(s.inbox_dir) == [] and len(archived(s)) == 10  # no "~1" copies
    assert count_rows(sqlite_url, Prediction) == 10


def test_unmovable_file_is_reported_not_lost(make_settings, sqlite_url, register_champion, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)
    def refuse(src, dest):
        if str(src).endswith("img001.png"):
            raise PermissionError(13, "Permission denied")
        return files.move_no_clobber(src, dest)

    r = scoring.score_inbox(s, hooks=scoring.Hooks(move_file=refuse))
    assert r["status"] == "move_failed" and r["move_failed"] == 1 and r["scored"] == 3
    assert r["move_failures"][0]["path"] == "patient_1/img001.png"
    assert "Permission denied" in r["move_failures"][0]["error"]
    assert inbox_files(s.inbox_dir) == ["patient_1/img001.png"]
    r2 = scoring.score_inbox(s)  # the next run moves it where the first run meant it to go
    assert r2["recovered"] == 1 and r2["scored"] == 0 and inbox_files(s.inbox_dir) == []
    assert (s.archive_dir / r["run_id"] / "patient_1" / "img001.png").exists()
    assert scoring.finalize_run(s, r["run_id"])["status"] == "finished"
