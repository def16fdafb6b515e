"""Moving scored files and finishing interrupted runs (bcc_pipeline.scoring.moves): a run interrupted at
any point (crash after a batch's commit, crash in the middle of a move, a file that cannot be moved) is
finished by the next run. The interruptions go through the scoring hooks
(:class:`bcc_pipeline.scoring.Hooks`). The move itself is tested in tests/unit/test_files.py."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from bcc_pipeline import files, moving, scoring
from bcc_pipeline.images import sha256_file
from bcc_pipeline.store import InboxFile, Prediction, session_scope
from tests.support import (
    Crash,
    archived,
    count_rows,
    exchange,
    fill_inbox,
    foreign_home,
    inbox_files,
    scoring_settings,
)


# -- interrupted runs -------------------------------------------------------------------------
def _dies_after_move(n: int):
    """A ``move_file`` hook that moves, and after the ``n``-th move dies before the move is recorded."""
    moves = {"done": 0}

    def move(src, dest, **kw):
        where = moving.move_no_clobber(src, dest, **kw)
        moves["done"] += 1
        if moves["done"] == n:
            raise Crash
        return where

    return move


def test_crash_after_commit_before_moves_then_new_run(
    make_settings, migrated_url, register_champion, png_writer
):
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
        scoring.score_inbox(
            s, run_id="crashed", batch_size=4, hooks=scoring.Hooks(on_batch_committed=crash_on_second_batch)
        )
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
        scoring.score_inbox(
            s, run_id="again", batch_size=4, hooks=scoring.Hooks(on_move_linked=crash_mid_move)
        )
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
        return moving.move_no_clobber(src, dest, **options)

    r = scoring.score_inbox(s, hooks=scoring.Hooks(move_file=refuse))
    assert r["status"] == "move_failed" and r["move_failed"] == 1 and r["scored"] == 3
    assert r["move_failures"][0]["path"] == "patient_1/img001.png"
    assert "Permission denied" in r["move_failures"][0]["error"]
    assert inbox_files(s.inbox_dir) == ["patient_1/img001.png"]
    r2 = scoring.score_inbox(s)  # the next run moves it where the first run meant it to go
    assert r2["recovered"] == 1 and r2["scored"] == 0 and inbox_files(s.inbox_dir) == []
    assert (s.archive_dir / r["run_id"] / "patient_1" / "img001.png").exists()
    assert scoring.finalize_run(s, r["run_id"])["status"] == "finished"


# -- a file that changes between reading and moving ------------------------------------------
@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_a_file_rewritten_in_place_in_the_middle_of_its_move_is_never_archived_under_the_old_prediction(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, other_fs, fs
):
    """``rsync --inplace -t`` rewrites the file while it is being moved: after the hard link (or the copy
    across filesystems), before the inbox name is removed; size and mtime put back, and a hard link's
    change time says nothing. The bytes are hashed again before the inbox name goes: on one filesystem
    the link is undone (``changed``), across two the copy (the bytes that were scored) is kept and the new
    content stays; the next run scores it. Every archived file has its own prediction; nothing is lost."""
    root = other_fs if fs == "other-filesystem" else tmp_path / "scans"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(root))
    register_champion(s)
    target = png_writer(root / "p" / "a.png", seed=1, size=40)
    new_bytes = png_writer(tmp_path / "new.png", seed=999, size=40).read_bytes()
    assert len(new_bytes) == target.stat().st_size

    def rewrite(source, where):
        was = target.stat()
        with open(target, "r+b") as fh:  # in place: the same inode
            fh.write(new_bytes)
        os.utime(target, ns=(was.st_atime_ns, was.st_mtime_ns))

    r1 = scoring.score_inbox(s, inbox=str(root), run_id="run1", hooks=scoring.Hooks(on_move_linked=rewrite))
    assert r1["changed"] == (1 if fs == "same-filesystem" else 0)
    assert inbox_files(root) == ["p/a.png"] and target.read_bytes() == new_bytes  # the new content is kept
    scoring.score_inbox(s, inbox=str(root), run_id="run2")
    assert inbox_files(root) == []
    with session_scope(sqlite_url) as db:
        rows = [(x.sha256, x.moved_to) for x in db.scalars(select(InboxFile)) if x.moved_to]
        predicted = {p.image_sha256 for p in db.scalars(select(Prediction))}
    assert sorted(str(p) for p in archived(s)) == sorted(files.path_from_display(m) for _, m in rows)
    for sha, moved_to in rows:  # each archived file is the content its row (and prediction) is for
        assert sha256_file(files.path_from_display(moved_to)) == sha and sha in predicted
    assert sha256_file(tmp_path / "new.png") in {sha for sha, _ in rows}


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_an_inbox_file_renamed_within_the_inbox_mid_move_is_archived_once(
    make_settings, sqlite_url, register_champion, png_writer, other_fs, tmp_path, fs
):
    """An inbox file renamed into another inbox folder after its archive copy (across filesystems) or link
    was made, before its inbox name was removed: the move is dropped (kept, the copy would be a second one
    once the new name is scored) and the next run archives the file once, from its new name."""
    root = other_fs if fs == "other-filesystem" else tmp_path / "scans"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(root))
    register_champion(s)
    a = png_writer(root / "p" / "a.png", seed=1, size=40)
    content = sha256_file(a)
    renamed = root / "q" / "b.png"
    moved: list[Path] = []

    def rename_away(source, where):
        if not moved:
            renamed.parent.mkdir()
            os.rename(a, renamed)
            moved.append(renamed)

    scoring.score_inbox(s, inbox=str(root), run_id="run1", hooks=scoring.Hooks(on_move_linked=rename_away))
    assert moved
    scoring.score_inbox(s, inbox=str(root), run_id="run2")
    assert inbox_files(root) == []
    assert [sha256_file(f) for f in archived(s)] == [content]  # archived once
    with session_scope(sqlite_url) as db:
        placed = [x.moved_to for x in db.scalars(select(InboxFile)) if x.moved_to]
    assert [Path(files.path_from_display(m)) for m in placed] == archived(s)


def test_a_folder_mounted_over_the_archive_is_never_moved_into(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Deployment B's ``landing/malignant`` bind-mounted over ``archive/<run>/b`` after the batch was
    committed, before its files moved. Before, the scan was copied into B's ``landing/malignant`` (B's
    next intake would train on it as malignant) and gone from here once unmounted. Now the move refuses
    a mount inside the archive: the scan stays in the inbox (``move_failed``, the run is not finished),
    B's folder is untouched, and once the mount is gone the next run archives it."""
    import contextlib

    from tests.support import bind_mounted

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    other = foreign_home(tmp_path)
    png_writer(other.landing_dir / "malignant" / "t.png", seed=1)
    scan = png_writer(s.inbox_dir / "b" / "scan1.png", seed=2)
    before = sorted(p.name for p in (other.landing_dir / "malignant").iterdir())
    with contextlib.ExitStack() as stack:

        def mount_over_the_archive(paths):
            view = s.archive_dir / "r1" / "b"
            stack.enter_context(bind_mounted(other.landing_dir / "malignant", view))

        r1 = scoring.score_inbox(
            s, run_id="r1", hooks=scoring.Hooks(on_batch_committed=mount_over_the_archive)
        )
        assert r1["move_failed"] == 1 and r1["status"] != "finished"
        assert "mounted inside" in r1["move_failures"][0]["error"]
        assert sorted(p.name for p in (other.landing_dir / "malignant").iterdir()) == before
    assert scan.is_file()
    r2 = scoring.score_inbox(s, run_id="r2")
    assert r2["recovered"] == 1 and inbox_files(s.inbox_dir) == []
    assert [p.name for p in archived(s)] == ["scan1.png"]


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_a_file_killed_mid_move_then_exchanged_with_another_is_archived_once(
    make_settings, sqlite_url, register_champion, png_writer, other_fs, tmp_path, fs
):
    """Killed in the middle of a move (the link or copy at the destination, the inbox name not removed
    yet); then the file swaps names with another inbox file before the rerun. Before, the rerun recorded
    the killed move at its link or copy although the file was still in the inbox under the other name, and
    archived it again from there: two copies of one file. Now the interrupted move is dropped and each
    file is archived once."""
    root = other_fs if fs == "other-filesystem" else tmp_path / "scans"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(root))
    register_champion(s)
    a = png_writer(root / "p0" / "img0.png", seed=1, size=40)
    b = png_writer(root / "p1" / "other.png", seed=2, size=40)
    contents = sorted([sha256_file(a), sha256_file(b)])

    def die(source, where):
        raise Crash

    with pytest.raises(Crash):
        scoring.score_inbox(s, inbox=str(root), run_id="run1", hooks=scoring.Hooks(on_move_linked=die))
    exchange(a, b)
    scoring.score_inbox(s, inbox=str(root), run_id="run2")
    assert inbox_files(root) == []
    assert sorted(sha256_file(f) for f in archived(s)) == contents  # each file archived once
    assert all(os.lstat(f).st_nlink == 1 for f in archived(s))
    with session_scope(sqlite_url) as db:
        rows = [(x.sha256, x.moved_to) for x in db.scalars(select(InboxFile)) if x.moved_to]
    assert sorted(sha for sha, _ in rows) == contents
    for sha, moved_to in rows:
        assert sha256_file(files.path_from_display(moved_to)) == sha


def test_another_homes_folder_as_the_archive_is_never_moved_into(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Deployment B's ``landing/malignant`` bind-mounted at this home's ``archive/`` before the run: what
    is archived would become B's malignant training images. The shard refuses (one line, no retry); B's
    folder is untouched and the scan stays in the inbox. A plain filesystem there is fine (other tests)."""
    from tests.support import bind_mounted

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    other = foreign_home(tmp_path)
    png_writer(other.landing_dir / "malignant" / "t.png", seed=1)
    scan = png_writer(s.inbox_dir / "b" / "scan0.png", seed=2)
    with bind_mounted(other.landing_dir / "malignant", s.archive_dir):
        with pytest.raises(scoring.InboxRefused, match="refusing to move files into .*archive.*site_b"):
            scoring.score_inbox(s, run_id="r1")
    assert [p.name for p in (other.landing_dir / "malignant").iterdir()] == ["t.png"] and scan.is_file()


def test_a_recovery_at_planning_never_moves_into_another_homes_folder_at_the_archive(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Killed after the commit; the file's folder renamed; deployment B's ``landing/malignant`` then
    bind-mounted over ``archive/``. Before, the next run's planning finished the move from the new name
    into B's folder (B's intake then trained on the scan as malignant) and recorded it in archive/. Now
    planning refuses before it marks or moves anything; once the mount is gone the file is archived here."""
    from tests.support import bind_mounted

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    other = foreign_home(tmp_path)
    png_writer(other.landing_dir / "malignant" / "t.png", seed=1)
    png_writer(s.inbox_dir / "p0" / "img0.png", seed=2)

    def die(paths):
        raise Crash

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(on_batch_committed=die))
    os.rename(s.inbox_dir / "p0", s.inbox_dir / "p9")
    with bind_mounted(other.landing_dir / "malignant", s.archive_dir):
        with pytest.raises(scoring.InboxRefused, match="refusing to move files into .*archive.*site_b"):
            scoring.score_inbox(s, run_id="r2")
    assert [p.name for p in (other.landing_dir / "malignant").iterdir()] == ["t.png"]
    assert inbox_files(s.inbox_dir) == ["p9/img0.png"]
    scoring.score_inbox(s, run_id="r3")
    assert inbox_files(s.inbox_dir) == [] and [p.name for p in archived(s)] == ["img0.png"]
    with session_scope(sqlite_url) as db:
        placed = [x.moved_to for x in db.scalars(select(InboxFile)) if x.moved_to]
    assert [Path(files.path_from_display(m)) for m in placed] == archived(s)


@pytest.mark.parametrize("there", ["the same bytes", "nothing"])
def test_a_killed_move_is_never_looked_for_through_a_linked_folder_in_the_archive(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, there
):
    """Killed in the middle of a move (the file in ``archive/<run>/p0/``, its inbox name gone, nothing
    recorded); then ``archive/<run>/p0`` set aside and replaced by a link to another home's
    ``landing/malignant``. The next run looked for the file through the link, which the moves never
    follow: an image with the same bytes there was recorded as this file's archived copy (the record
    pointing into the other home), and with nothing there the file was written off as gone, for good.
    Now planning refuses (no retry), the row stays open, the other home is untouched; once the folder is
    back, the move is recorded where the file is."""
    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    other = foreign_home(tmp_path)
    theirs = other.landing_dir / "malignant"
    theirs.mkdir(parents=True)
    png_writer(s.inbox_dir / "p0" / "img0.png", seed=2)
    png_writer(s.inbox_dir / "p1" / "img1.png", seed=3)
    if there == "the same bytes":
        (theirs / "img0.png").write_bytes((s.inbox_dir / "p0" / "img0.png").read_bytes())
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in theirs.iterdir()}
    calls = []

    def die_at_the_second(src, where):  # img0 moved (its inbox name gone), nothing recorded
        calls.append(src)
        if len(calls) == 2:
            raise Crash

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(on_move_linked=die_at_the_second))
    folder = s.archive_dir / "r1" / "p0"
    assert (folder / "img0.png").is_file() and "p0/img0.png" not in inbox_files(s.inbox_dir)
    os.rename(folder, tmp_path / "set-aside")
    os.symlink(theirs, folder)
    with pytest.raises(scoring.InboxRefused, match="refusing to look for files moved into .*p0"):
        scoring.score_inbox(s, run_id="r2")
    with session_scope(sqlite_url) as db:
        row = db.scalars(select(InboxFile).where(InboxFile.path == "p0/img0.png")).one()
        assert row.moved_to is None and row.move_error is None
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in theirs.iterdir()} == before
    os.unlink(folder)
    os.rename(tmp_path / "set-aside", folder)
    r = scoring.score_inbox(s, run_id="r3")
    assert r["status"] == "finished" and inbox_files(s.inbox_dir) == []
    with session_scope(sqlite_url) as db:
        row = db.scalars(select(InboxFile).where(InboxFile.path == "p0/img0.png")).one()
    assert row.moved_to and Path(files.path_from_display(row.moved_to)) == folder / "img0.png"


@pytest.mark.parametrize("gone", ["its disk not mounted", "replaced by a link to an empty folder"])
def test_a_killed_move_is_not_written_off_while_archive_is_not_the_folder_it_went_to(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, gone
):
    """``archive/`` on a disk of its own (a bind mount here); killed in the middle of a move (the file in
    the archive, its inbox name gone, nothing recorded). The next run, while the disk was not mounted (or
    archive/ had been replaced by a link to an empty folder elsewhere, the old one set aside), found the
    file nowhere and wrote it off as having left the inbox, green, for good: once archive/ was back its
    archived copy had no record. Now archive/ has lost its mark: planning refuses (no retry), nothing is
    recorded; once archive/ is back the move is recorded where the file is."""
    import contextlib

    from tests.support import bind_mounted

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    disk, linked = tmp_path / "disk", gone == "replaced by a link to an empty folder"
    disk.mkdir()
    png_writer(s.inbox_dir / "p0" / "img0.png", seed=2)

    def mounted():  # archive/ as it is meant to be: its disk mounted (or a plain folder)
        return contextlib.nullcontext() if linked else bind_mounted(disk, s.archive_dir)

    def die(src, where):
        raise Crash

    with mounted(), pytest.raises(Crash):
        scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(on_move_linked=die))
    if linked:
        (tmp_path / "empty").mkdir()
        os.rename(s.archive_dir, tmp_path / "set-aside")
        os.symlink(tmp_path / "empty", s.archive_dir)
    with pytest.raises(scoring.InboxRefused, match="is not the folder this home has put files into"):
        scoring.score_inbox(s, run_id="r2")
    with session_scope(sqlite_url) as db:
        (row,) = db.scalars(select(InboxFile)).all()
        assert row.moved_to is None and row.move_error is None
    if linked:
        os.unlink(s.archive_dir)
        os.rename(tmp_path / "set-aside", s.archive_dir)
    with mounted():
        r = scoring.score_inbox(s, run_id="r3")
        assert r["status"] == "finished" and inbox_files(s.inbox_dir) == []
        with session_scope(sqlite_url) as db:
            (row,) = db.scalars(select(InboxFile)).all()
        assert row.moved_to and Path(files.path_from_display(row.moved_to)) == archived(s)[0]


@pytest.mark.parametrize(
    "when", ["over archive/ mid-run", "over archive/ made mid-run", "between the check and the link"]
)
def test_a_mount_made_over_the_archive_while_files_move_is_never_moved_into(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, monkeypatch, when
):
    """Deployment B's ``landing/malignant`` bind-mounted over ``archive/`` itself after the batch was
    committed (archive/ is pinned when the shard starts), or over ``archive/<run>/b`` in the instant
    between the move's mount check and its link (the mount table's count moved: the link is checked
    after it is made, and ours, found in B's folder, is taken back). Before, the scans went into B's
    ``landing/malignant`` and the runs stayed green. Now the moves fail (red), B's folder is untouched,
    and the next run archives the scans here."""
    import contextlib

    from bcc_pipeline import moving
    from tests.support import bind_mounted

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    if when == "over archive/ mid-run":
        s.archive_dir.mkdir(parents=True)  # else archive/ does not exist when the run begins
    other = foreign_home(tmp_path)
    png_writer(other.landing_dir / "malignant" / "t.png", seed=1)
    for i in range(2):
        png_writer(s.inbox_dir / "b" / f"scan{i}.png", seed=2 + i)
    before = sorted(p.name for p in (other.landing_dir / "malignant").rglob("*"))
    with contextlib.ExitStack() as stack:
        mounted = []

        def mount(view):
            if not mounted:
                mounted.append(stack.enter_context(bind_mounted(other.landing_dir / "malignant", view)))

        hooks = scoring.Hooks()
        if when.startswith("over archive/"):
            hooks = scoring.Hooks(on_batch_committed=lambda paths: mount(s.archive_dir))
        else:
            real_check = moving._require_unmounted

            def check_then_mount(root, folder, pinned):
                real_check(root, folder, pinned)
                mount(folder)

            monkeypatch.setattr(moving, "_require_unmounted", check_then_mount)
        if when.startswith("over archive/"):  # the moves fail, then finishing the run refuses archive/
            with pytest.raises(scoring.InboxRefused, match="refusing to move files into .*archive"):
                scoring.score_inbox(s, run_id="r1", hooks=hooks)
        else:
            r1 = scoring.score_inbox(s, run_id="r1", hooks=hooks)
            assert r1["move_failed"] >= 1 and r1["status"] != "finished"
        monkeypatch.undo()
        assert mounted
        assert sorted(p.name for p in (other.landing_dir / "malignant").rglob("*")) == before
    scoring.score_inbox(s, run_id="r2")
    assert inbox_files(s.inbox_dir) == []
    assert sorted(p.name for p in archived(s)) == ["scan0.png", "scan1.png"]
    assert sorted(p.name for p in (other.landing_dir / "malignant").rglob("*")) == before


def test_a_file_a_process_holds_open_for_writing_is_archived_as_a_copy_of_what_was_scored(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Round 27: scoring moves a file by hard link, so a writer that had it open before the move wrote on
    into the archived file: the prediction kept the scored bytes' hash while the archive (and the UI's
    thumbnail) showed another picture, green. A file open for writing is copied (and hashed), not linked."""
    import sys

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    held = png_writer(s.inbox_dir / "held.png", seed=1, size=40)
    free = png_writer(s.inbox_dir / "free.png", seed=2, size=40)
    scored = sha256_file(held)
    writer = subprocess.Popen(  # opened before the run, writes on after it
        [
            sys.executable,
            "-c",
            f"import sys\nf = open({str(held)!r}, 'r+b')\nprint('open', flush=True)\nsys.stdin.readline()\n"
            "f.seek(0)\nf.write(b'another picture')\nf.flush()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "open"
        r = scoring.score_inbox(s, run_id="r1")
        writer.communicate("go\n", timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert r["scored"] == 2 and inbox_files(s.inbox_dir) == []
    by_name = {f.name: f for f in archived(s)}
    assert sha256_file(by_name["held.png"]) == scored  # what was scored, whatever the writer did after
    assert os.lstat(by_name["free.png"]).st_nlink == 1
    with session_scope(sqlite_url) as ses:
        assert scored in set(ses.scalars(select(Prediction.image_sha256)))
    assert moving.open_for_writing(free.parent) is False  # a folder, or anything not a plain file: no


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_two_inbox_files_exchanged_in_the_middle_of_a_move_are_each_archived_once(
    make_settings, sqlite_url, register_champion, png_writer, other_fs, tmp_path, fs
):
    """Two inbox files swap names (``renameat2(RENAME_EXCHANGE)``, or two renames) after the first one is
    linked (or copied) into the archive and before its inbox name is removed: that name now holds the
    other file, and the file that was scored lives on under the other name. Before, the archive kept a
    hard link shared with that inbox name (an edit there changed archived bytes) and the next run
    archived the same file again. Now the move is undone (``changed``) and the next run archives each
    file once, from its new name, each archived copy a file of its own holding the content its row (and
    prediction) is for."""
    root = other_fs if fs == "other-filesystem" else tmp_path / "scans"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(root))
    register_champion(s)
    a = png_writer(root / "p" / "a.png", seed=1, size=40)
    b = png_writer(root / "q" / "b.png", seed=2, size=40)
    contents = sorted([sha256_file(a), sha256_file(b)])
    swapped: list[Path] = []

    def exchange_first(source, where):
        if not swapped:
            swapped.append(source)
            exchange(a, b)

    r1 = scoring.score_inbox(
        s, inbox=str(root), run_id="run1", hooks=scoring.Hooks(on_move_linked=exchange_first)
    )
    assert swapped and r1["changed"] >= 1
    assert all(os.lstat(f).st_nlink == 1 for f in archived(s))  # no archived file shares an inbox name
    scoring.score_inbox(s, inbox=str(root), run_id="run2")
    assert inbox_files(root) == []
    assert sorted(sha256_file(f) for f in archived(s)) == contents  # each file archived once
    with session_scope(sqlite_url) as db:
        rows = [(x.sha256, x.moved_to) for x in db.scalars(select(InboxFile)) if x.moved_to]
        predicted = {p.image_sha256 for p in db.scalars(select(Prediction))}
    assert sorted(sha for sha, _ in rows) == contents
    for sha, moved_to in rows:
        assert sha256_file(files.path_from_display(moved_to)) == sha and sha in predicted


@pytest.mark.parametrize("how", ["replaced", "rewritten", "rewritten-with-its-size-and-times"])
def test_file_swapped_after_scoring_is_left_for_the_next_run(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, how
):
    """A scanner's ``cp new && mv new old`` (replaced) or a rewrite in place (also one of the same size that
    puts the mtime back, as ``rsync --inplace -t``: the change time tells), after the batch is committed
    and before its files move: the new content is never archived under the old one's prediction."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)
    target = s.inbox_dir / "patient_1" / "img001.png"
    new_bytes = png_writer(tmp_path / "new.png", seed=999, size=40).read_bytes()

    def swap(paths):
        if "patient_1/img001.png" in paths:
            was = target.stat()
            if how == "replaced":
                (target.parent / "tmp.part").write_bytes(new_bytes)
                os.replace(target.parent / "tmp.part", target)
            else:
                target.write_bytes(new_bytes)
            if how == "rewritten-with-its-size-and-times":
                assert target.stat().st_size == was.st_size
                os.utime(target, ns=(was.st_atime_ns, was.st_mtime_ns))

    r = scoring.score_inbox(s, hooks=scoring.Hooks(on_batch_committed=swap))
    assert (r["scored"], r["changed"], r["move_failed"], r["status"]) == (3, 1, 0, "finished")
    assert inbox_files(s.inbox_dir) == ["patient_1/img001.png"]
    assert not (s.archive_dir / r["run_id"] / "patient_1" / "img001.png").exists()
    with session_scope(sqlite_url) as ses:
        row = ses.scalars(select(InboxFile).where(InboxFile.path == "patient_1/img001.png")).one()
        assert row.moved_to is None and row.move_error.startswith("the file changed")
    r2 = scoring.score_inbox(s)  # the next run scores what is there now
    assert (r2["scored"], r2["recovered"], r2["changed"], r2["status"]) == (1, 0, 0, "finished")
    assert inbox_files(s.inbox_dir) == []
    moved = s.archive_dir / r2["run_id"] / "patient_1" / "img001.png"
    assert moved.read_bytes() == new_bytes
    with session_scope(sqlite_url) as ses:
        pred = ses.scalars(select(Prediction).where(Prediction.run_id == r2["run_id"])).one()
        assert pred.image_sha256 == sha256_file(moved)


# -- files that cannot be moved ---------------------------------------------------------------
def test_a_file_that_keeps_failing_to_move_turns_red_then_goes_to_quarantine(
    make_settings, sqlite_url, register_champion, png_writer
):
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)

    def broken_archive(src, dest, **options):  # the archive refuses this one file, run after run
        if str(src).endswith("img001.png") and s.archive_dir in Path(dest).parents:
            raise OSError(errno.EIO, "Input/output error", str(dest))
        return moving.move_no_clobber(src, dest, **options)

    hooks = scoring.Hooks(move_file=broken_archive)
    first = scoring.score_inbox(s, hooks=hooks)
    assert (first["move_failed"], first["persistent_move_failures"], first["status"]) == (
        1,
        [],
        "move_failed",
    )
    error = first["move_failures"][0]["error"]  # the whole OS error, with the destination
    assert "[Errno 5] Input/output error" in error and error.endswith(
        str(first["archive_dir"]) + "/patient_1/img001.png'"
    )
    second = scoring.score_inbox(s, hooks=hooks)
    assert second["recovered"] == 0 and second["move_failed"] == 1  # recovered counts only real moves
    assert [f["path"] for f in second["persistent_move_failures"]] == ["patient_1/img001.png"]
    assert inbox_files(s.inbox_dir) == ["patient_1/img001.png"]
    assert scoring.MAX_MOVE_ATTEMPTS == 3
    third = scoring.score_inbox(s, hooks=hooks)  # the third failed attempt: quarantine, with the reason
    assert (third["quarantined_unmovable"], third["move_failed"], third["status"]) == (1, 0, "finished")
    assert inbox_files(s.inbox_dir) == []
    q = s.quarantine_dir / first["run_id"] / "patient_1" / "img001.png"
    assert (
        q.is_file() and "could not be moved to the archive in 3 attempts" in files.reason_path(q).read_text()
    )
    assert count_rows(sqlite_url, Prediction) == 3


def test_a_path_too_long_under_the_archive_is_moved_under_a_hashed_folder(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Folders nested so deep that ``inbox/<rel>`` fits in PATH_MAX but ``archive/<run>/<rel>`` does not."""
    inbox = tmp_path / "in"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(inbox))
    register_champion(s)
    png = png_writer(tmp_path / "x.png").read_bytes()
    room = 4080 - len(os.fsencode(inbox)) - len("/x.png")  # inbox/<rel> is 4080 bytes long
    folders = ["d" * 200] * (room // 201) + (["e" * (room % 201 - 1)] if room % 201 > 1 else [])
    inbox.mkdir()
    fd = os.open(inbox, os.O_RDONLY)
    try:
        for name in folders:  # each path a call sees stays short: relative to the folder above
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open("x.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, png)
        os.close(out)
    finally:
        os.close(fd)
    rel = "/".join(folders) + "/x.png"
    assert (
        len(os.fsencode(inbox / rel))
        < 4096
        < len(os.fsencode(s.archive_dir / "score-20260101T000000-abcdef" / rel))
    )
    r = scoring.score_inbox(s, inbox=inbox)
    assert (r["scored"], r["move_failed"], r["status"]) == (1, 0, "finished")
    (moved,) = archived(s)
    assert moved.name == "x.png" and moved.parent.name.startswith("#") and moved.read_bytes() == png
    assert not os.path.lexists(inbox / rel)


@pytest.mark.parametrize("name", [b"x\xff.png", b"new\nline.png", b"back\\slash.png"])
def test_a_move_finished_by_the_sweep_is_recorded_in_display_form(
    make_settings, sqlite_url, register_champion, png_writer, name
):
    """Killed after a move and before it was recorded: the next run's sweep records where the file went
    in the reversible display form, as a recorded move is, and later runs go on (a name that is not UTF-8
    crashed every later run)."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    s.inbox_dir.mkdir(parents=True)
    src = Path(os.fsdecode(os.path.join(os.fsencode(s.inbox_dir), name)))
    png_writer(src, seed=11)

    move_then_die = _dies_after_move(1)

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="killed", hooks=scoring.Hooks(move_file=move_then_die))
    for run in ("next", "after"):
        assert scoring.score_inbox(s, run_id=run)["status"] == "finished"
    with session_scope(sqlite_url) as db:
        row = db.scalars(select(InboxFile)).one()
    assert row.moved_to == files.display_path(archived(s)[0]) and "\n" not in row.moved_to
    assert files.path_from_display(row.moved_to) == os.fsdecode(archived(s)[0])
    assert row.path == files.display_path(os.fsdecode(name))


def test_a_folder_swapped_for_a_link_after_planning_is_never_read_or_moved_through(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Planning and scoring are separate tasks: an inbox folder replaced by a link to somebody else's
    folder in between is not followed; their file is neither scored nor moved into the archive."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "sub" / "a.png", seed=1)
    outside = tmp_path / "not-ours"
    theirs = png_writer(outside / "a.png", seed=2)
    before = theirs.read_bytes()
    scoring.plan_shards(s, "swapped", 1)
    os.rename(s.inbox_dir / "sub", tmp_path / "sub-away")
    os.symlink(outside, s.inbox_dir / "sub")
    scoring.score_shard(s, "swapped", 0)
    r = scoring.finalize_run(s, "swapped")
    assert r["scored"] == 0 and theirs.read_bytes() == before
    assert archived(s) == [] and count_rows(sqlite_url, Prediction) == 0


def test_a_link_quarantined_earlier_never_leads_a_move_outside_quarantine(
    make_settings, sqlite_url, register_champion, tmp_path
):
    """A path too long for quarantine/<run>/ goes under a hashed folder; a link in the inbox named like
    that folder is quarantined first, as a link. The long path's file must not then be moved (or its
    reason written) through that link into the link's target."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    victim = tmp_path / "victim"
    victim.mkdir()
    folder = "/".join(["d" * 200] * 19 + ["e" * 180])  # fits under inbox/, not under quarantine/<run>/
    hashed = files.fit_path(s.quarantine_dir / "r1", f"{folder}/y.png").parent.name
    assert hashed.startswith("#")
    s.inbox_dir.mkdir(parents=True)
    os.symlink(victim, s.inbox_dir / hashed)
    scoring.score_inbox(s, run_id="r1")  # the link is quarantined, as a link, at quarantine/r1/#<hash>
    assert (s.quarantine_dir / "r1" / hashed).is_symlink()
    (s.inbox_dir / folder).mkdir(parents=True)
    (s.inbox_dir / folder / "y.png").write_bytes(b"not an image")
    for run in ("r1", "r2"):  # a retry of r1 moves y.png to quarantine/r1/#<hash>/y.png: never through it
        scoring.score_inbox(s, run_id=run)
        assert os.listdir(victim) == []
    assert (s.quarantine_dir / "r1" / hashed).is_symlink()


def test_a_refused_file_replaced_before_its_interrupted_move_gets_its_own_rejection(
    make_settings, sqlite_url, register_champion
):
    """A link is refused unread (no content hash). Killed after the commit, then the path holds another
    bad file: the next run must not quarantine it under the link's reason as the link's recovered move,
    but reject it for its own reason."""
    from bcc_pipeline.store import Rejection

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    s.inbox_dir.mkdir(parents=True)
    p = s.inbox_dir / "a.png"
    os.symlink("/etc/hostname", p)

    def die(paths):
        raise Crash

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(on_batch_committed=die))
    p.unlink()
    p.write_bytes(b"%PDF-1.7 a scanner's PDF saved under the same name")
    r = scoring.score_inbox(s, run_id="r2")
    assert (r["recovered"], r["rejected"]) == (0, 1)
    moved = s.quarantine_dir / "r2" / "a.png"
    assert moved.read_bytes().startswith(b"%PDF") and "link" not in files.reason_path(moved).read_text()
    assert not os.path.lexists(s.quarantine_dir / "r1" / "a.png")
    with session_scope(sqlite_url) as db:
        reasons = {x.run_id: x.reason for x in db.scalars(select(Rejection))}
    assert "symbolic link" in reasons["r1"] and "symbolic link" not in reasons["r2"]


@pytest.mark.parametrize("order", [(0,), (1, 0), (0, 1)])
def test_a_folder_named_like_a_reason_file_never_blocks_a_quarantine(
    make_settings, sqlite_url, register_champion, order
):
    """A bad ``x.png`` beside a folder ``x.png.reason.txt/`` holding another bad file: both are quarantined
    with their reasons, in one run, whichever shard moves first (the folder's quarantine copy is
    ``x.png.reason.txt.d/``)."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    (s.inbox_dir / "x.png.reason.txt").mkdir(parents=True)
    (s.inbox_dir / "x.png").write_bytes(b"not an image")
    (s.inbox_dir / "x.png.reason.txt" / "y.png").write_bytes(b"not an image either")
    run = f"r{len(order)}-{order[0]}"
    scoring.plan_shards(s, run, len(order))
    for shard in order:
        scoring.score_shard(s, run, shard)
    r = scoring.finalize_run(s, run)
    assert (r["rejected"], r["status"]) == (2, "finished") and inbox_files(s.inbox_dir) == []
    q = s.quarantine_dir / run
    assert (q / "x.png").read_bytes() == b"not an image" and files.reason_path(q / "x.png").is_file()
    y = q / "x.png.reason.txt.d" / "y.png"
    assert y.read_bytes() == b"not an image either" and files.reason_path(y).is_file()


def test_a_255_byte_folder_named_like_a_reason_file_is_quarantined_under_a_shortened_name(
    make_settings, sqlite_url, register_champion
):
    """A folder name of 255 bytes ending in ``.reason.txt`` has no room for ``.d``: its quarantine copy
    gets a shortened, hashed name, so the bad file in it is quarantined in the first run (not a poison
    path failing to move, run after run)."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    folder = "r" * (255 - len(".reason.txt")) + ".reason.txt"
    (s.inbox_dir / folder).mkdir(parents=True)
    (s.inbox_dir / folder / "bad.png").write_bytes(b"not an image")
    r = scoring.score_inbox(s, run_id="run1")
    assert (r["rejected"], r["status"]) == (1, "finished") and inbox_files(s.inbox_dir) == []
    (copy,) = [p for p in (s.quarantine_dir / "run1").rglob("bad.png")]
    assert copy.read_bytes() == b"not an image" and files.reason_path(copy).is_file()
    assert copy.parent.name.endswith(".d") and len(os.fsencode(copy.parent.name)) <= 255


def test_an_inbox_link_re_pointed_after_planning_is_refused_by_every_shard(
    make_settings, sqlite_url, register_champion, png_writer
):
    """The inbox is judged when the run is planned; a link to it re-pointed before a shard runs (here into
    landing/, where a labelled image waits for intake) is refused, and nothing there is read or moved."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "batch1" / "a.png", seed=1)
    current = s.inbox_dir / "current"
    current.symlink_to(s.inbox_dir / "batch1")
    waiting = png_writer(s.landing_dir / "benign" / "p1" / "a.png", seed=2)
    scoring.plan_shards(s, "r1", 1, inbox=str(current))
    current.unlink()
    current.symlink_to(waiting.parent)
    with pytest.raises(scoring.InboxRefused, match="re-pointed"):
        scoring.score_shard(s, "r1", 0)
    assert waiting.exists() and archived(s) == [] and count_rows(sqlite_url, Prediction) == 0


def test_an_intake_and_a_scoring_run_with_one_run_id_keep_their_own_rejections(
    make_settings, sqlite_url, register_champion
):
    """Both DAGs use Airflow's run id; two runs scheduled at the same instant share it. Each stage keeps
    its own rejection row, with its own reason and where its own file went."""
    from bcc_pipeline.intake import intake
    from bcc_pipeline.store import Rejection

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    for root, data in ((s.landing_dir, b""), (s.inbox_dir, b"GIF89a broken")):
        (root / "benign" / "p1").mkdir(parents=True)
        (root / "benign" / "p1" / "x.png").write_bytes(data)
    rid = "scheduled__2026-01-04T02:00:00+00:00"
    intake(s, run_id=rid)
    scoring.score_inbox(s, run_id=rid)
    with session_scope(sqlite_url) as db:
        rows = {x.stage: x for x in db.scalars(select(Rejection))}
    assert set(rows) == {"intake", "scoring"}
    assert Path(files.path_from_display(rows["intake"].moved_to)).read_bytes() == b""
    assert Path(files.path_from_display(rows["scoring"].moved_to)).read_bytes() == b"GIF89a broken"
    assert rows["intake"].reason != rows["scoring"].reason


def test_a_move_recorded_by_a_later_run_is_found_where_the_file_really_went(
    make_settings, sqlite_url, register_champion
):
    """Two files whose quarantine names meet (``x.png.reason.txt/a.png`` is quarantined as
    ``x.png.reason.txt.d/a.png``, beside the real one's): the second goes to ``a~1.png``, and the process is
    killed before that move is recorded. The next run records each row where its own file is, with its own
    reason beside it, not the first file's place."""
    from bcc_pipeline.store import Rejection

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    (s.inbox_dir / "x.png.reason.txt").mkdir(parents=True)
    (s.inbox_dir / "x.png.reason.txt.d").mkdir()
    (s.inbox_dir / "x.png.reason.txt" / "a.png").write_bytes(b"")
    (s.inbox_dir / "x.png.reason.txt.d" / "a.png").write_bytes(b"GIF89a broken")
    move_then_die_on_the_second = _dies_after_move(2)

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="s1", hooks=scoring.Hooks(move_file=move_then_die_on_the_second))
    scoring.score_inbox(s, run_id="s2")
    with session_scope(sqlite_url) as db:
        rows = db.scalars(select(InboxFile)).all()
        reasons = {x.path: x.reason for x in db.scalars(select(Rejection))}
    assert len(rows) == 2 and len({r.moved_to for r in rows}) == 2
    for r in rows:
        where = Path(files.path_from_display(r.moved_to))
        original = b"" if r.path.startswith("x.png.reason.txt/") else b"GIF89a broken"
        assert where.read_bytes() == original
        assert files.reason_path(where).read_text().strip() == reasons[r.path]


def test_a_file_deleted_before_its_move_is_never_recorded_at_another_files_place(
    make_settings, sqlite_url, register_champion
):
    """Two files share a quarantine folder (``r.reason.txt/`` and ``r.reason.txt.d/``); one is deleted
    after its commit and before its move: it is recorded as gone, not as moved to the other's copy."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    for d in ("r.reason.txt", "r.reason.txt.d"):
        (s.inbox_dir / d).mkdir(parents=True)
        (s.inbox_dir / d / "a.png").write_bytes(b"not a png: " + d.encode())

    def delete_one(paths):
        os.unlink(s.inbox_dir / "r.reason.txt" / "a.png")

    r = scoring.score_inbox(s, run_id="run1", hooks=scoring.Hooks(on_batch_committed=delete_one))
    assert r["missing"] == 1
    with session_scope(sqlite_url) as db:
        rows = {x.path: x for x in db.scalars(select(InboxFile))}
    assert rows["r.reason.txt/a.png"].moved_to is None
    kept = Path(files.path_from_display(rows["r.reason.txt.d/a.png"].moved_to))
    assert kept.read_bytes() == b"not a png: r.reason.txt.d"


def test_two_links_with_equal_times_are_each_recorded_where_they_went(
    make_settings, sqlite_url, register_champion
):
    """Links refused unread have no content hash; two of them with the same size and mtime (as tar or
    rsync -a leave them) meet at one quarantine name. Killed after the second move, before its record: the
    next run finds each by its inode, not the first same-looking neighbour."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    for d, target in (("r.reason.txt.d", "/nowhere/target-1"), ("r.reason.txt", "/nowhere/target-2")):
        (s.inbox_dir / d).mkdir(parents=True)
        os.symlink(target, s.inbox_dir / d / "a.png")
        os.utime(s.inbox_dir / d / "a.png", ns=(1_700_000_000 * 10**9,) * 2, follow_symlinks=False)
    move_then_die_on_the_second = _dies_after_move(2)

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="run1", hooks=scoring.Hooks(move_file=move_then_die_on_the_second))
    scoring.score_inbox(s, run_id="run2")
    with session_scope(sqlite_url) as db:
        rows = {x.path: x.moved_to for x in db.scalars(select(InboxFile))}
    targets = {p: os.readlink(files.path_from_display(m)) for p, m in rows.items()}
    assert targets == {"r.reason.txt.d/a.png": "/nowhere/target-1", "r.reason.txt/a.png": "/nowhere/target-2"}
    assert all(files.reason_path(Path(files.path_from_display(m))).is_file() for m in rows.values())


def test_an_inbox_link_re_pointed_while_a_shard_runs_leads_nowhere_new(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """The inbox itself is a link; it is re-pointed into landing/ after the first batch's commit. The shard
    reads and moves through the folder the inbox resolved to when the run was planned: landing/ is never
    touched, and every inbox file is scored."""
    real = tmp_path / "real-inbox"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(tmp_path))
    register_champion(s)
    for i, n in enumerate("abcd"):
        png_writer(real / f"{n}.png", seed=i)
        png_writer(s.landing_dir / "benign" / f"{n}.png", seed=10 + i)
    link = tmp_path / "inbox-link"
    link.symlink_to(real)

    def re_point(paths):
        if os.readlink(link) == str(real):
            (tmp_path / "new-link").symlink_to(s.landing_dir / "benign")
            os.replace(tmp_path / "new-link", link)

    r = scoring.score_inbox(
        s, inbox=str(link), run_id="run1", batch_size=1, hooks=scoring.Hooks(on_batch_committed=re_point)
    )
    assert (r["scored"], r["changed"]) == (4, 0) and inbox_files(real) == []
    assert sorted(p.stem for p in (s.landing_dir / "benign").iterdir()) == list("abcd")


def test_the_inbox_folder_itself_swapped_for_a_link_while_a_shard_runs_is_never_read_or_moved_through(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """The inbox folder (a real folder) is renamed after the first batch's commit and a link to another
    home's landing/ put in its place. The shard neither reads nor moves anything through it: the
    foreign training images stay where they are; the inbox's files not yet moved are left for a later
    run (changed or skipped), nothing is lost."""
    foreign = tmp_path / "other-home-landing"
    inbox = tmp_path / "scans" / "inbox"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(tmp_path / "scans"))
    register_champion(s)
    for i, n in enumerate("abcd"):
        png_writer(inbox / f"{n}.png", seed=i)
        png_writer(foreign / f"{n}.png", seed=10 + i)
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}

    def swap(paths):
        if not inbox.is_symlink():
            inbox.rename(tmp_path / "scans" / "inbox-away")
            inbox.symlink_to(foreign)

    r = scoring.score_inbox(
        s, inbox=str(inbox), run_id="run1", batch_size=1, hooks=scoring.Hooks(on_batch_committed=swap)
    )
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before
    left = inbox_files(tmp_path / "scans" / "inbox-away")
    assert r["scored"] + r["duplicates"] >= 1 and len(archived(s)) + len(left) == 4
    assert all(p.read_bytes() not in before.values() for p in archived(s))


def test_a_rejected_files_move_recorded_by_a_later_run_is_recorded_in_rejections_too(
    make_settings, sqlite_url, register_champion
):
    from bcc_pipeline.store import Rejection

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    s.inbox_dir.mkdir(parents=True)
    (s.inbox_dir / "bad.png").write_bytes(b"garbage bytes")

    move_then_die = _dies_after_move(1)

    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(move_file=move_then_die))
    scoring.score_inbox(s, run_id="r2")
    with session_scope(sqlite_url) as db:
        ledger_row = db.scalars(select(InboxFile)).one()
        rejection = db.scalars(select(Rejection)).one()
    assert ledger_row.moved_to and rejection.moved_to == ledger_row.moved_to


@pytest.mark.parametrize("killed", [False, True], ids=["straight", "killed-after-the-second-move"])
def test_two_hard_links_whose_quarantine_names_meet_keep_a_name_each(
    make_settings, sqlite_url, register_champion, killed
):
    """Two inbox names of one inode, refused, whose quarantine names meet (``r.reason.txt/a.png`` is laid
    out as ``r.reason.txt.d/a.png``): the second is never taken for an interrupted attempt of its own
    move, so each row has its own name (``a.png``, ``a~1.png``), also when the run is killed after the
    second move and a later run records both."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    for d in ("r.reason.txt", "r.reason.txt.d"):
        (s.inbox_dir / d).mkdir(parents=True)
    (s.inbox_dir / "r.reason.txt" / "a.png").write_bytes(b"not an image")
    os.link(s.inbox_dir / "r.reason.txt" / "a.png", s.inbox_dir / "r.reason.txt.d" / "a.png")
    if killed:
        with pytest.raises(Crash):
            scoring.score_inbox(s, run_id="s1", hooks=scoring.Hooks(move_file=_dies_after_move(2)))
        scoring.score_inbox(s, run_id="s2")
    else:
        scoring.score_inbox(s, run_id="s1")
    _assert_a_name_each(s, sqlite_url, 2)


def test_identical_files_copied_across_filesystems_and_killed_keep_a_name_each(
    make_settings, sqlite_url, register_champion, other_fs
):
    """Two refused files with the same bytes and times in an inbox on another filesystem, whose quarantine
    names meet; killed after the second move, before it is recorded. Their copies cannot be told apart:
    the later run gives each row its own, never the first row's name twice (``a~1.png`` was left unrecorded)."""
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(other_fs))
    register_champion(s)
    for d in ("r.reason.txt", "r.reason.txt.d"):
        (other_fs / d).mkdir()
        (other_fs / d / "a.png").write_bytes(b"not an image")
        os.utime(other_fs / d / "a.png", ns=(1_700_000_000 * 10**9,) * 2)
    with pytest.raises(Crash):
        scoring.score_inbox(
            s, inbox=str(other_fs), run_id="s1", hooks=scoring.Hooks(move_file=_dies_after_move(2))
        )
    scoring.score_inbox(s, inbox=str(other_fs), run_id="s2")
    assert inbox_files(other_fs) == []
    _assert_a_name_each(s, sqlite_url, 2)


def test_an_archived_copy_whose_time_the_archive_filesystem_changed_is_recorded_where_it_went(
    make_settings, sqlite_url, register_champion, png_writer, other_fs
):
    """An inbox on another filesystem; scoring killed after a move, before its record. The archive's
    filesystem kept another modification time than the inbox file's (ext4 clamps a time past 2446 or
    before 1901; a coarser filesystem rounds it). The later run records the move at the archived copy (by
    size and content hash), not "left the inbox before it was moved" with the copy unrecorded."""
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(other_fs))
    register_champion(s)
    for i in range(2):
        png_writer(other_fs / f"p{i}" / "a.png", seed=i, size=40)
        os.utime(other_fs / f"p{i}" / "a.png", ns=(10**20,) * 2)  # the year 5138: tmpfs keeps it
    with pytest.raises(Crash):
        scoring.score_inbox(
            s, inbox=str(other_fs), run_id="s1", hooks=scoring.Hooks(move_file=_dies_after_move(1))
        )
    for copy in s.archive_dir.rglob("a.png"):
        os.utime(copy, ns=(15_032_385_535 * 10**9,) * 2)  # what ext4 makes of it
    scoring.score_inbox(s, inbox=str(other_fs), run_id="s2")
    assert inbox_files(other_fs) == []
    with session_scope(sqlite_url) as db:
        rows = db.scalars(select(InboxFile)).all()
    n_predictions = count_rows(sqlite_url, Prediction)
    copies = sorted(str(p) for p in s.archive_dir.rglob("*.png"))
    assert n_predictions == 2 and len(rows) == 2 and len(copies) == 2
    assert sorted(files.path_from_display(r.moved_to) for r in rows if r.moved_to) == copies


def test_a_file_no_path_reaches_turns_the_run_red_on_every_run(
    make_settings, sqlite_url, register_champion, png_writer, monkeypatch, capsys
):
    """A file deeper than PATH_MAX in the inbox cannot even be inspected, so no run scores it: each run
    scores the rest and lists it under ``unreachable``, and ``bcc score`` exits 1 naming it (the DAG run
    fails), instead of a green run that passes it over as ignored forever."""
    from bcc_pipeline.cli import main
    from tests.support import deeper_than_path_max

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "ok.png", seed=1, size=40)
    (s.inbox_dir / "over").mkdir()
    deeper_than_path_max(s.inbox_dir / "over", "x.png")
    summary = scoring.score_inbox(s, run_id="r1")
    (lost,) = summary["unreachable"]
    assert summary["scored"] == 1 and lost["path"].startswith("over/" + "d" * 250)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert main(["score"]) == 1
    err = capsys.readouterr().err
    assert "cannot be reached and are never scored" in err and "over/" + "d" * 250 in err


def _assert_a_name_each(s, url: str, n: int) -> None:
    """Every ledger row is recorded at its own quarantined copy with its reason beside it, and nothing else
    is in quarantine."""
    from bcc_pipeline.store import Rejection

    with session_scope(url) as db:
        rows = db.scalars(select(InboxFile)).all()
        rejected = {x.path: x.moved_to for x in db.scalars(select(Rejection))}
    places = sorted(r.moved_to for r in rows)
    assert len(rows) == n and len(set(places)) == n
    assert rejected == {r.path: r.moved_to for r in rows}
    for r in rows:
        assert files.reason_path(Path(files.path_from_display(r.moved_to))).is_file()
    copies = sorted(
        str(p) for p in s.quarantine_dir.rglob("*") if p.is_file() and not p.name.endswith(".reason.txt")
    )
    assert copies == sorted(files.path_from_display(m) for m in places)


def _die_at_first_link(source, where):
    raise Crash


@pytest.mark.parametrize("rerun", ["run1", "run2"], ids=["same-run-id", "new-run-id"])
def test_a_copy_across_filesystems_killed_then_the_file_replaced_leaves_nothing_behind(
    make_settings, sqlite_url, register_champion, png_writer, other_fs, rerun
):
    """Killed with the archive copy published (the inbox name not removed yet); the scanner then replaces
    the file with other content. The later run records the first file's copy, scores the new one, and
    removes the interrupted move's temporary name."""
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(other_fs))
    register_champion(s)
    png_writer(other_fs / "x.png", seed=1, size=40)
    with pytest.raises(Crash):
        scoring.score_inbox(
            s, inbox=str(other_fs), run_id="run1", hooks=scoring.Hooks(on_move_linked=_die_at_first_link)
        )
    (other_fs / "x.png").unlink()
    png_writer(other_fs / "x.png", seed=2, size=40)
    for run in dict.fromkeys([rerun, "run3"]):
        scoring.score_inbox(s, inbox=str(other_fs), run_id=run)
    assert inbox_files(other_fs) == [] and count_rows(sqlite_url, Prediction) == 2
    with session_scope(sqlite_url) as db:
        places = [r.moved_to for r in db.scalars(select(InboxFile))]
    assert len(places) == 2 and all(places) and len(set(places)) == 2
    assert not list(s.archive_dir.rglob(".bcc-move-*"))


@pytest.mark.parametrize("rerun", ["run1", "run2"], ids=["same-run-id", "new-run-id"])
def test_a_link_killed_with_its_copy_published_then_touched_is_quarantined_once(
    make_settings, sqlite_url, register_champion, other_fs, rerun
):
    """A symbolic link in an inbox on another filesystem; the run is killed with the link's quarantine copy
    published, and the inbox link is then touched (``touch -h``). A link's target cannot change in place,
    so it is still the link that was refused: the move is finished with that copy. One rejection, one
    quarantined link, nothing left in the inbox; before, the link was quarantined a second time."""
    from bcc_pipeline.store import Rejection

    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(other_fs))
    register_champion(s)
    os.symlink("/nowhere/target", other_fs / "link.png")
    with pytest.raises(Crash):
        scoring.score_inbox(
            s, inbox=str(other_fs), run_id="run1", hooks=scoring.Hooks(on_move_linked=_die_at_first_link)
        )
    os.utime(other_fs / "link.png", ns=(1_800_000_000 * 10**9,) * 2, follow_symlinks=False)
    for run in dict.fromkeys([rerun, "run3"]):
        scoring.score_inbox(s, inbox=str(other_fs), run_id=run)
    assert inbox_files(other_fs) == []
    with session_scope(sqlite_url) as db:
        rejections = db.scalars(select(Rejection)).all()
    assert len(rejections) == 1 and rejections[0].moved_to
    copies = [p for p in s.quarantine_dir.rglob("*") if p.is_symlink()]
    assert [os.readlink(p) for p in copies] == ["/nowhere/target"]
    assert str(copies[0]) == files.path_from_display(rejections[0].moved_to)


def _dies_at_link(n: int):
    seen = []

    def hook(source, where):
        seen.append(where)
        if len(seen) == n:
            raise Crash

    return hook


@pytest.mark.parametrize("rerun", ["run1", "run2"], ids=["same-run-id", "new-run-id"])
@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_a_hard_link_not_yet_committed_is_never_taken_for_a_killed_moves_file(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, other_fs, fs, rerun
):
    """``p0/b.png`` and ``p1/b_hl.png`` are one inode, in two batches of one run; the run is killed after
    ``p0/b.png`` moved and before that was recorded, when ``p1/b_hl.png`` has no row yet. The run planned
    ``p1/b_hl.png``: it is a file of its own, never ``p0/b.png`` renamed (which moved it under that row and
    left its archived copy unrecorded). Each name gets its own row and archived copy."""
    root = other_fs if fs == "other-filesystem" else tmp_path / "scans"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(root))
    register_champion(s)
    png_writer(root / "p0" / "b.png", seed=1, size=40)
    (root / "p1").mkdir()
    os.link(root / "p0" / "b.png", root / "p1" / "b_hl.png")
    with pytest.raises(Crash):
        scoring.score_inbox(
            s,
            inbox=str(root),
            run_id="run1",
            batch_size=1,
            hooks=scoring.Hooks(move_file=_dies_after_move(1)),
        )
    assert inbox_files(root) == ["p1/b_hl.png"]
    for run in dict.fromkeys([rerun, "run3"]):
        assert scoring.score_inbox(s, inbox=str(root), run_id=run, batch_size=1)["missing"] == 0
    assert inbox_files(root) == []
    assert _archived_once_each(s, sqlite_url) == {"p0/b.png": "b.png", "p1/b_hl.png": "b_hl.png"}


def _archived_once_each(s, url: str) -> dict[str, str]:
    """Every ledger row is recorded at an archived copy of its own, and nothing else is archived; returns
    each row's path with its copy's name."""
    with session_scope(url) as db:
        rows = {r.path: r.moved_to for r in db.scalars(select(InboxFile))}
    assert all(rows.values())
    places = sorted(files.path_from_display(m) for m in rows.values())
    assert sorted(str(p) for p in archived(s)) == places
    return {path: Path(files.path_from_display(m)).name for path, m in rows.items()}


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_two_hard_links_killed_mid_move_are_each_archived_once(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, other_fs, fs
):
    """``a.png`` and ``b.png`` are one inode; the run is killed in the middle of the second one's move
    (the first moved, its name gone). The later run must not take the waiting link for the first file
    renamed (same device and inode): each name is archived once, under its own row, no ``~1`` copy, no
    file 'missing'."""
    root = other_fs if fs == "other-filesystem" else tmp_path / "scans"
    root.mkdir(exist_ok=True)
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(root))
    register_champion(s)
    png_writer(root / "a.png", seed=1, size=40)
    os.link(root / "a.png", root / "b.png")
    png_writer(root / "c.png", seed=3, size=40)
    with pytest.raises(Crash):
        scoring.score_inbox(
            s,
            inbox=str(root),
            run_id="run1",
            batch_size=2,
            hooks=scoring.Hooks(on_move_linked=_dies_at_link(2)),
        )
    assert len(inbox_files(root)) == 2  # one of the links moved, the other half-way
    summary = scoring.score_inbox(s, inbox=str(root), run_id="run2", batch_size=2)
    assert summary["missing"] == 0
    assert inbox_files(root) == [] and count_rows(sqlite_url, Prediction) == 2
    assert _archived_once_each(s, sqlite_url) == {"a.png": "a.png", "b.png": "b.png", "c.png": "c.png"}


def _die_after_commit(paths):
    raise Crash


@pytest.mark.parametrize("killed", ["after-the-commit", "mid-move"])
@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
@pytest.mark.parametrize("renamed", ["sub-folder", "inbox"])
def test_a_run_killed_then_the_files_folder_renamed_is_finished_not_scored_again(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, other_fs, renamed, fs, killed
):
    """Killed after the batch's commit (nothing moved yet), or mid-move (hard-linked, or its copy across
    filesystems published; the inbox name not removed yet); someone then renames the file's folder, or
    the inbox itself (a folder renamed, and the file touched). The next run finds the file under its new
    name and finishes that run's move from there: one row, one archived copy, nothing left, not scored
    again under the new name."""
    root = other_fs if fs == "other-filesystem" else tmp_path / "scans"
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(root))
    register_champion(s)
    inbox = root / "in"
    png_writer(inbox / "case1" / "x.png", seed=1, size=40)
    if killed == "mid-move":
        hooks = scoring.Hooks(on_move_linked=_die_at_first_link)
    else:
        hooks = scoring.Hooks(on_batch_committed=_die_after_commit)
    with pytest.raises(Crash):
        scoring.score_inbox(s, inbox=str(inbox), run_id="run1", hooks=hooks)
    if renamed == "inbox":
        inbox = inbox.rename(root / "in-renamed")
    else:  # and the file touched (the same inode and bytes, another mtime)
        (inbox / "case1").rename(inbox / "case1-renamed")
        os.utime(inbox / "case1-renamed" / "x.png", ns=(1_800_000_000 * 10**9,) * 2)
    scoring.score_inbox(s, inbox=str(inbox), run_id="run2")
    assert inbox_files(inbox) == []
    with session_scope(sqlite_url) as db:
        rows = list(db.scalars(select(InboxFile)))
    assert [(r.run_id, r.path) for r in rows] == [("run1", "case1/x.png")]
    assert count_rows(sqlite_url, Prediction) == 1
    assert [str(p) for p in archived(s)] == [files.path_from_display(rows[0].moved_to)]
    assert not list(s.archive_dir.rglob(".bcc-move-*"))


def test_a_retried_run_finds_its_killed_moves_file_under_the_name_it_was_renamed_to(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Killed mid-move; the file's folder is renamed; the run is retried under the same run id (its plan,
    older than the rename, lists the old name), then a new run follows. The retry looks in the inbox as it
    is now and finishes the move from the new name: one row, one archived copy."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "case1" / "x.png", seed=1, size=40)
    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="run1", hooks=scoring.Hooks(on_move_linked=_die_at_first_link))
    (s.inbox_dir / "case1").rename(s.inbox_dir / "case1-renamed")
    scoring.score_inbox(s, run_id="run1")
    scoring.score_inbox(s, run_id="run2")
    assert inbox_files(s.inbox_dir) == []
    with session_scope(sqlite_url) as db:
        rows = list(db.scalars(select(InboxFile)))
    assert [(r.run_id, r.path) for r in rows] == [("run1", "case1/x.png")]
    assert [str(p) for p in archived(s)] == [files.path_from_display(rows[0].moved_to)]


def test_a_file_deleted_after_its_commit_is_recorded_as_gone_by_a_new_run(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Killed after the batch's commit; the file is then deleted. A new run (which does not plan that path)
    records the row as having left the inbox, instead of leaving it unsettled for good."""
    from bcc_pipeline.scoring import ledger

    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "x.png", seed=1, size=40)
    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="run1", hooks=scoring.Hooks(on_batch_committed=_die_after_commit))
    (s.inbox_dir / "x.png").unlink()
    scoring.score_inbox(s, run_id="run2")
    with session_scope(sqlite_url) as db:
        row = db.scalars(select(InboxFile)).one()
    assert row.moved_to is None and row.move_error and ledger.vanished(row.move_error)


def test_a_file_quarantined_as_unmovable_and_killed_before_the_record_is_recorded_there(
    make_settings, sqlite_url, register_champion, png_writer
):
    """The archive refuses a file in three runs, so the third quarantines it, and is killed right after that
    move. A later run finds it in quarantine (not only at its archive destination) and records it there,
    with the reason, instead of reporting it as having left the inbox."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "x.png", seed=1, size=40)

    def broken_archive(src, dest, **kw):
        if s.archive_dir in Path(dest).parents:
            raise OSError(errno.EIO, "Input/output error", str(dest))
        moving.move_no_clobber(src, dest, **kw)
        raise Crash  # killed right after the quarantine move

    for _ in range(2):
        assert scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(move_file=broken_archive))[
            "move_failed"
        ]
    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(move_file=broken_archive))
    r = scoring.score_inbox(s, run_id="r2")
    assert r["missing"] == 0 and inbox_files(s.inbox_dir) == []
    with session_scope(sqlite_url) as db:
        row = db.scalars(select(InboxFile)).one()
    where = Path(files.path_from_display(row.moved_to))
    assert s.quarantine_dir in where.parents and where.is_file()
    assert row.move_error.startswith("quarantined") and files.reason_path(where).is_file()


def test_a_file_copied_again_after_its_unrecorded_move_is_a_new_file(
    make_settings, sqlite_url, register_champion, png_writer
):
    """The move of ``x.png`` is done but not recorded (killed); a sync tool then puts the same bytes at
    ``x.png`` again (another inode). The later run records the first file where it went, and handles the
    copy as a new file (a duplicate of that content), not as the first file: no unrecorded archived copy."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "x.png", seed=1, size=40)
    data = (s.inbox_dir / "x.png").read_bytes()
    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(move_file=_dies_after_move(1)))
    (s.inbox_dir / "x.png").write_bytes(data)
    r = scoring.score_inbox(s, run_id="r2")
    assert r["duplicates"] == 1 and inbox_files(s.inbox_dir) == []
    with session_scope(sqlite_url) as db:
        places = [x.moved_to for x in db.scalars(select(InboxFile))]
    archived_copies = [p for p in s.archive_dir.rglob("*") if p.is_file()]
    assert len(places) == 2 and all(places) and len(set(places)) == 2
    assert sorted(map(str, archived_copies)) == sorted(files.path_from_display(p) for p in places)


@pytest.mark.parametrize("now", ["folder", "fifo"])
def test_an_unrecorded_move_whose_inbox_path_became_a_folder_or_fifo_is_recorded(
    make_settings, sqlite_url, register_champion, png_writer, now
):
    """Killed after archiving ``x.png``, before the record; the name ``x.png`` then holds a folder (or a
    FIFO), which no run plans as that path. The next run records the archived copy anyway."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "x.png", seed=1, size=40)
    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="r1", hooks=scoring.Hooks(move_file=_dies_after_move(1)))
    if now == "folder":
        (s.inbox_dir / "x.png").mkdir()
        png_writer(s.inbox_dir / "x.png" / "y.png", seed=2, size=40)
    else:
        os.mkfifo(s.inbox_dir / "x.png")
    scoring.score_inbox(s, run_id="r2")
    with session_scope(sqlite_url) as db:
        first = db.scalars(select(InboxFile).where(InboxFile.run_id == "r1")).one()
    assert first.moved_to and Path(files.path_from_display(first.moved_to)).is_file()


def test_two_links_across_filesystems_are_recorded_in_the_order_they_moved(
    make_settings, sqlite_url, register_champion, other_fs
):
    """Links (no content hash) with the same size and times on another filesystem, meeting at one
    quarantine name, killed after the second move: nothing but the order tells their copies apart. The
    files move in the ledger's order, which is the order a later run records them in, so each link is
    recorded at the copy with its own target (whatever the paths' names)."""
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(other_fs))
    register_champion(s)
    targets = {"v.reason.txt.d/a.png": "/nowhere/target-1", "v.reason.txt/a.png": "/nowhere/target-2"}
    for rel, target in targets.items():
        (other_fs / rel).parent.mkdir(exist_ok=True)
        os.symlink(target, other_fs / rel)
        os.utime(other_fs / rel, ns=(1_700_000_000 * 10**9,) * 2, follow_symlinks=False)
    with pytest.raises(Crash):
        scoring.score_inbox(
            s, inbox=str(other_fs), run_id="run1", hooks=scoring.Hooks(move_file=_dies_after_move(2))
        )
    scoring.score_inbox(s, inbox=str(other_fs), run_id="run2")
    with session_scope(sqlite_url) as db:
        rows = {x.path: x.moved_to for x in db.scalars(select(InboxFile))}
    assert {p: os.readlink(files.path_from_display(m)) for p, m in rows.items()} == targets


def _two_runs_planned(make_settings, url: str, register_champion, png_writer):
    """Settings whose inbox holds ``ok.png`` and a refused ``bad.png``, planned by runs A and B."""
    s = scoring_settings(make_settings, url)
    register_champion(s)
    png_writer(s.inbox_dir / "ok.png", seed=1, size=40)
    (s.inbox_dir / "bad.png").write_bytes(b"not an image")
    scoring.plan_shards(s, "A", 1)
    scoring.plan_shards(s, "B", 1)
    return s


def test_two_runs_interleaved_on_one_inbox_record_each_file_once(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Run B (a manual ``bcc score`` beside the nightly DAG run A) runs whole while run A has read the files
    and not yet committed them. B scores and moves them; A's claims of files B took are withdrawn when A
    finds them moved by B: each file has one ledger row, one rejection at most, one place."""
    from bcc_pipeline.store import Rejection

    s = _two_runs_planned(make_settings, sqlite_url, register_champion, png_writer)
    scoring.score_shard(
        s, "A", 0, hooks=scoring.Hooks(on_model_batch=lambda n: scoring.score_shard(s, "B", 0))
    )
    a, b = scoring.finalize_run(s, "A"), scoring.finalize_run(s, "B")
    assert (a["missing"], b["scored"], b["rejected"]) == (0, 1, 1)
    with session_scope(sqlite_url) as db:
        rows = db.scalars(select(InboxFile)).all()
        rejections = db.scalars(select(Rejection)).all()
    assert sorted(r.path for r in rows) == ["bad.png", "ok.png"] and all(r.moved_to for r in rows)
    assert [x.path for x in rejections] == ["bad.png"] and inbox_files(s.inbox_dir) == []


def test_a_quarantine_of_an_unmovable_file_killed_halfway_is_finished_when_the_archive_frees(
    make_settings, sqlite_url, register_champion, png_writer
):
    """The archive destination is blocked (a file where ``archive/run1/sub`` should be a folder) for three
    runs, so the third quarantines the file and is killed halfway (linked into quarantine, the inbox name
    not removed). The blocker goes; the next run finishes that quarantine move instead of archiving the
    file and leaving the quarantined link unrecorded: one place, recorded, with its reason."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "sub" / "x.png", seed=3, size=40)
    (s.archive_dir / "run1").mkdir(parents=True)
    (s.archive_dir / "run1" / "sub").write_bytes(b"blocker")
    for run in ("run1", "run2"):
        assert scoring.score_inbox(s, run_id=run)["move_failed"] == 1
    with pytest.raises(Crash):
        scoring.score_inbox(s, run_id="run3", hooks=scoring.Hooks(on_move_linked=_die_at_first_link))
    (s.archive_dir / "run1" / "sub").unlink()
    scoring.score_inbox(s, run_id="run4")
    assert inbox_files(s.inbox_dir) == []
    with session_scope(sqlite_url) as db:
        row = db.scalars(select(InboxFile)).one()
    where = Path(files.path_from_display(row.moved_to))
    assert s.quarantine_dir in where.parents and files.reason_path(where).is_file()
    assert row.move_error.startswith("quarantined") and not list(s.archive_dir.rglob("x.png"))


def test_a_file_put_back_and_deleted_before_its_move_is_missing_not_withdrawn(
    make_settings, sqlite_url, register_champion, png_writer, other_fs
):
    """``archive/`` on another filesystem: run0 archives ``x.png`` (a copy; the inbox inode is freed). A
    sync puts ``x.png`` back (the same bytes and mtime; ext4 gives it the same inode number again), run A
    takes it on, and an operator deletes it before A moves it. Nobody took it from under A: A records it
    as having left the inbox; its claim is not withdrawn as if run0 (which looks the same) had moved it."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    s.home.mkdir(parents=True, exist_ok=True)
    s.archive_dir.symlink_to(other_fs)
    x = png_writer(s.inbox_dir / "x.png", seed=1, size=40)
    os.utime(x, ns=(1_700_000_000 * 10**9,) * 2)
    data, first = x.read_bytes(), moving.identity(os.lstat(x))
    scoring.score_inbox(s, run_id="run0")
    if not _write_on_inode(x, data, first, s.home / "scratch"):
        pytest.skip("this filesystem gave no new file that inode number again: nothing looks the same")
    r = scoring.score_inbox(s, run_id="A", hooks=scoring.Hooks(on_batch_committed=lambda paths: x.unlink()))
    assert r["missing"] == 1
    with session_scope(sqlite_url) as db:
        row = db.scalars(select(InboxFile).where(InboxFile.run_id == "A")).one()
    assert row.moved_to is None and row.move_error == "the file left the inbox before it was moved"


def _write_on_inode(path: Path, data: bytes, ident: moving.Identity, scratch: Path) -> bool:
    """Write ``data`` at ``path`` as a new file that gets the inode number and mtime of ``ident`` (ext4
    gives a freed inode number out again): new files are made in ``scratch`` (same filesystem) until one
    has it, and that one is renamed into place. False when none got it."""
    scratch.mkdir(parents=True, exist_ok=True)
    made = []
    try:
        for i in range(500):
            q = scratch / f"fill{i}"
            q.write_bytes(data)
            if os.lstat(q).st_ino == ident[1]:
                os.utime(q, ns=(ident[3], ident[3]))
                os.rename(q, path)
                return moving.identity(os.lstat(path)) == ident
            made.append(q)
        return False
    finally:
        for q in made:
            q.unlink()


def test_interleaved_runs_are_told_apart_by_row_order_not_by_clocks(
    make_settings, sqlite_url, register_champion, png_writer, monkeypatch
):
    """As above, with run B on a host whose clock is an hour behind A's: what B wrote is still newer than
    A's look-up (row ids, not timestamps), so A withdraws its claims of the files B moved."""
    import datetime as dt

    from bcc_pipeline.scoring import ledger as ledger_module

    s = _two_runs_planned(make_settings, sqlite_url, register_champion, png_writer)
    real_now = ledger_module.utcnow

    def run_b_an_hour_behind(n):
        monkeypatch.setattr(ledger_module, "utcnow", lambda: real_now() - dt.timedelta(hours=1))
        scoring.score_shard(s, "B", 0)
        monkeypatch.setattr(ledger_module, "utcnow", real_now)

    scoring.score_shard(s, "A", 0, hooks=scoring.Hooks(on_model_batch=run_b_an_hour_behind))
    with session_scope(sqlite_url) as db:
        rows = db.scalars(select(InboxFile)).all()
    assert sorted((r.run_id, r.path) for r in rows) == [("B", "bad.png"), ("B", "ok.png")]
    assert all(r.moved_to for r in rows) and inbox_files(s.inbox_dir) == []


def test_a_file_another_run_moved_for_this_one_keeps_its_record(
    make_settings, sqlite_url, register_champion, png_writer
):
    """Run A runs between run B's commit and B's moves, takes B's committed rows for an interrupted run's,
    moves the files and records them on B's rows. B's own moves then find the files gone: B keeps what was
    recorded on its rows instead of overwriting it with 'left the inbox'."""
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    png_writer(s.inbox_dir / "ok.png", seed=1, size=40)
    (s.inbox_dir / "bad.png").write_bytes(b"not an image")
    scoring.plan_shards(s, "B", 1)

    def let_a_run(paths):
        scoring.score_inbox(s, run_id="A")

    scoring.score_shard(s, "B", 0, hooks=scoring.Hooks(on_batch_committed=let_a_run))
    with session_scope(sqlite_url) as db:
        rows = {r.path: r for r in db.scalars(select(InboxFile).where(InboxFile.run_id == "B"))}
    assert set(rows) == {"ok.png", "bad.png"} and inbox_files(s.inbox_dir) == []
    for r in rows.values():
        assert r.moved_to and Path(files.path_from_display(r.moved_to)).is_file() and r.move_error is None


def test_a_move_done_but_for_its_temporary_name_is_a_move_and_later_runs_go_on(
    make_settings, sqlite_url, register_champion, png_writer, other_fs
):
    """Round 22. Across filesystems, the archive's run folder refuses deletes (made immutable, or turned
    read-only) once the copy is published: the inbox name is removed, then the copy's temporary name cannot
    be. Before, the move was reported as failed ("it stays in the inbox") with the file already archived,
    and every later run died with an unexpected error in the sweep. Now the move is recorded where the
    file went, with a warning naming the temporary name, and a later run goes on."""
    if os.geteuid() != 0:
        pytest.skip("needs root for chattr +i")
    s = scoring_settings(make_settings, sqlite_url, inbox_roots=str(other_fs))
    register_champion(s)
    png_writer(other_fs / "p" / "a.png", seed=1, size=40)
    frozen: list[Path] = []

    def freeze(source, where):
        if subprocess.run(["chattr", "+i", str(where.parent)], capture_output=True).returncode != 0:
            pytest.skip("this filesystem takes no immutable flag")
        frozen.append(where.parent)

    try:
        r = scoring.score_inbox(
            s, inbox=str(other_fs), run_id="run1", hooks=scoring.Hooks(on_move_linked=freeze)
        )
        assert frozen and (r["status"], r["move_failed"], r["scored"]) == ("finished", 0, 1)
        assert inbox_files(other_fs) == []
        png_writer(other_fs / "p" / "b.png", seed=2, size=40)
        assert scoring.score_inbox(s, inbox=str(other_fs), run_id="run2")["scored"] == 1
    finally:
        for folder in frozen:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    with session_scope(sqlite_url) as db:
        rows = db.scalars(select(InboxFile)).all()
    assert len(rows) == 2 and all(
        r.moved_to and Path(files.path_from_display(r.moved_to)).is_file() for r in rows
    )
