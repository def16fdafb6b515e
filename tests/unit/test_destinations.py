"""Whose ``archive/``, ``quarantine/`` and ``dataset/`` are (:mod:`bcc_pipeline.destinations`): the mark on
each folder, and the home's list of the folders it marked."""

from __future__ import annotations

import os
import subprocess

import pytest

from bcc_pipeline.config import load_settings
from bcc_pipeline.destinations import ATTRIBUTE, ROOTS_LIST, destination_lost, listed
from bcc_pipeline.homes import destination_refusal
from tests.support import bind_mounted, foreign_home


def _xattrs_here(folder) -> None:
    try:
        os.setxattr(folder, "user.bcc.probe", b"1")
        os.removexattr(folder, "user.bcc.probe")
    except OSError as exc:
        pytest.skip(f"this filesystem keeps no extended attributes: {exc}")


def test_a_disk_marked_by_another_home_is_never_this_homes_archive(make_settings, tmp_path):
    """Homes A and B each keep ``archive/`` on a disk of their own; B's disk is mounted at A's archive/
    (the disks swapped). Its mark names B: before, A's run moved its scans onto B's disk, green. Now it
    is refused; so is a disk marked as another folder of this home (quarantine's disk at archive/)."""
    a = make_settings(None)
    b = foreign_home(tmp_path)
    a.home.mkdir(parents=True)
    _xattrs_here(a.home)
    disk_a, disk_b = tmp_path / "disk_a", tmp_path / "disk_b"
    disk_a.mkdir()
    disk_b.mkdir()
    with bind_mounted(disk_a, a.archive_dir):
        assert destination_lost(a, a.archive_dir) is None  # first use: marked, listed
    with bind_mounted(disk_b, b.archive_dir):
        assert destination_lost(b, b.archive_dir) is None
    assert listed(a.home) == {"archive"} and os.getxattr(disk_a, ATTRIBUTE).startswith(b"home=")
    with bind_mounted(disk_b, a.archive_dir):
        why = destination_lost(a, a.archive_dir)
    assert why and "site_b" in why and "os.removexattr" in why and ROOTS_LIST in why
    with bind_mounted(disk_a, a.archive_dir):
        assert destination_lost(a, a.archive_dir) is None  # its own disk back: fine
    quarantine_disk = tmp_path / "disk_q"
    quarantine_disk.mkdir()
    with bind_mounted(quarantine_disk, a.quarantine_dir):
        assert destination_lost(a, a.quarantine_dir) is None
    with bind_mounted(quarantine_disk, a.archive_dir):
        assert "marked as the 'quarantine' folder, not 'archive'" in destination_lost(a, a.archive_dir)


def test_a_home_moved_elsewhere_keeps_its_marks(make_settings, tmp_path):
    """A mark whose home is not on this machine (the home moved with `mv`, a disk from another host) cannot
    be told apart from this home's: it is taken as this home's, not refused."""
    a = make_settings(None)
    a.home.mkdir(parents=True)
    _xattrs_here(a.home)
    assert destination_lost(a, a.archive_dir) is None
    moved = tmp_path / "moved" / "home"
    moved.parent.mkdir()
    os.rename(a.home, moved)
    again = load_settings(profile="demo", env={"BCC_HOME": str(moved)})
    assert destination_lost(again, again.archive_dir) is None
    assert destination_refusal(again, again.archive_dir) is None  # its mark is no other home's (round 25)
    # round 26: the mark now names where the home is, so a new home made at the old path later does not
    # make this one refuse its own archive as that home's
    a.home.mkdir(parents=True)
    (a.home / ".bcc-home").touch()
    assert destination_lost(again, again.archive_dir) is None
    assert destination_refusal(again, again.archive_dir) is None


def test_the_list_of_marked_folders_is_never_read_or_written_through_a_link(make_settings, tmp_path):
    """``.bcc-roots`` as a link to another home's list: before, this home appended its folders to that
    list (and that home then refused its own, never-made archive/ as one that lost its mark). Now the
    list is not followed: the folders are refused with one line naming it, and the other list is as it
    was."""
    a = make_settings(None)
    b = foreign_home(tmp_path)
    a.home.mkdir(parents=True)
    _xattrs_here(a.home)
    (b.home / ROOTS_LIST).write_text("dataset\n")
    os.symlink(b.home / ROOTS_LIST, a.home / ROOTS_LIST)
    why = destination_lost(a, a.archive_dir)
    assert why and ROOTS_LIST in why
    assert (b.home / ROOTS_LIST).read_text() == "dataset\n"
    os.unlink(a.home / ROOTS_LIST)
    os.symlink(tmp_path / "nowhere" / ROOTS_LIST, a.home / ROOTS_LIST)  # dangling: nothing created there
    assert destination_lost(a, a.archive_dir) and not (tmp_path / "nowhere").exists()


def test_the_list_is_read_whole_and_a_name_is_never_glued_to_a_hand_edited_last_line(make_settings):
    """A list longer than any real one (more than 64 KiB) was read in part: a name past the cut counted as
    never marked, and its folder, disk unmounted, was marked anew and written into. Now such a list is a
    refusal. A hand edit that left no newline at the end made the next name join the last line
    (``quarantinedataset``), both dropping out of the list; now every name goes on a line of its own."""
    a = make_settings(None)
    a.home.mkdir(parents=True)
    _xattrs_here(a.home)
    (a.home / ROOTS_LIST).write_text("archive")  # no newline at the end
    a.archive_dir.mkdir()
    os.setxattr(a.archive_dir, ATTRIBUTE, f"home={a.home}\nfolder=archive\n".encode())
    assert destination_lost(a, a.dataset_dir) is None
    assert listed(a.home) == {"archive", "dataset"}
    (a.home / ROOTS_LIST).write_text("#" * 70000 + "\narchive\n")
    assert "larger than" in destination_lost(a, a.archive_dir)


def test_a_list_this_user_cannot_write_is_a_refusal_not_a_silence(make_settings):
    """A ``.bcc-roots`` the running user cannot append to (made by a first run as another user): the
    folder was marked but never listed, so once its disk was gone nothing noticed. Now it is refused with
    one line that names the list. (An immutable file stands in for another user's: tests run as root.)"""
    a = make_settings(None)
    a.home.mkdir(parents=True)
    _xattrs_here(a.home)
    roots = a.home / ROOTS_LIST
    roots.write_text("")
    if subprocess.run(["chattr", "+i", str(roots)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here: no file even root cannot write")
    try:
        why = destination_lost(a, a.dataset_dir)
        assert why and "cannot be written" in why and ROOTS_LIST in why
    finally:
        subprocess.run(["chattr", "-i", str(roots)], check=True)
    assert destination_lost(a, a.dataset_dir) is None and listed(a.home) == {"dataset"}


def test_a_copied_home_is_accepted_by_following_its_refusal_to_the_letter(make_settings, tmp_path):
    """A home copied with ``cp -a`` (its folders' marks copied too, naming the original, which is still
    here) is refused; the refusal's instruction, pasted into a shell as printed, then the line taken out
    of the list, makes the copy's folder its own. Before, the printed command was a SyntaxError."""
    a = make_settings(None)
    a.home.mkdir(parents=True)
    _xattrs_here(a.home)
    assert destination_lost(a, a.archive_dir) is None
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(a.home), str(copy)], check=True)
    b = load_settings(profile="demo", env={"BCC_HOME": str(copy)})
    why = destination_lost(b, b.archive_dir)
    command = why.split("copied on purpose: ", 1)[1].split(", then take the line", 1)[0]
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (copy / ROOTS_LIST).write_text("")
    assert destination_lost(b, b.archive_dir) is None and destination_lost(a, a.archive_dir) is None


def test_bcc_status_says_which_folders_every_run_refuses_and_changes_nothing(
    make_settings, tmp_path, monkeypatch, capsys
):
    """Round 22: in a home copied with `cp -a`, scoring and intake refused its folders with one line each,
    while `bcc status` said nothing. It warns now, naming each folder, and marks or lists nothing itself
    (a home whose folders were never used stays as it is)."""
    from bcc_pipeline.cli import main
    from bcc_pipeline.store import dispose_engine

    a = make_settings(None)
    a.home.mkdir(parents=True)
    _xattrs_here(a.home)
    for folder in (a.archive_dir, a.quarantine_dir):
        assert destination_lost(a, folder) is None
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(a.home), str(copy)], check=True)
    monkeypatch.setenv("BCC_HOME", str(copy))
    monkeypatch.delenv("BCC_DATABASE_URL", raising=False)
    assert main(["db", "upgrade"]) == 0
    listed_before = listed(copy)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("folders         WARNING")]
    assert len(warnings) == 2 and "archive" in warnings[0] and "quarantine" in warnings[1]
    assert listed(copy) == listed_before and not (copy / "dataset").exists()  # looked at, not made
    dispose_engine(f"sqlite:///{copy / 'bcc.db'}")


def test_a_run_folder_copied_into_landing_or_another_inbox_is_never_taken(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Round 27: only `archive/` itself was marked, so `cp -a archive/<run> landing/benign/` had the run's
    scored images taken in as benign (the run id as their patient), exit 0; and another home's run folder
    moved into an allowed inbox was scored and moved. A run's folders in `archive/` and `quarantine/` are
    marked too."""
    import shutil

    from bcc_pipeline import scoring
    from bcc_pipeline.intake import intake
    from tests.support import fill_inbox, scoring_settings

    s = scoring_settings(make_settings, sqlite_url, inbox_roots=f"{tmp_path / 'home' / 'inbox'}")
    _xattrs_here(tmp_path)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)
    assert scoring.score_inbox(s, run_id="r1")["scored"] == 3
    run_folder = s.archive_dir / "r1"
    assert os.getxattr(run_folder, ATTRIBUTE).decode().endswith("folder=archive/r1\n")
    copied = s.landing_dir / "benign" / "r1"
    copied.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(run_folder), str(copied)], check=True)
    r = intake(s, run_id="in1")
    assert r.accepted == 0 and [u["path"] for u in r.unreachable] == ["benign/r1"]
    assert "this home's archive/r1/" in r.unreachable[0]["error"]
    # another home's run folder moved into this inbox: that home's, refused
    from bcc_pipeline.config import load_settings

    b = foreign_home(tmp_path)
    b = load_settings(profile="demo", env={"BCC_HOME": str(b.home), "BCC_SETTLE_SECONDS": "0"})
    register_champion(b)
    png_writer(b.inbox_dir / "scored.png", seed=9)
    assert scoring.score_inbox(b, run_id="rb")["scored"] == 1
    shutil.move(str(b.archive_dir / "rb"), str(s.inbox_dir / "from-b"))
    with pytest.raises(scoring.InboxRefused, match="marked as archive/rb/ of the BCC home"):
        scoring.discover(s)


def test_runs_linked_into_another_home_is_never_written(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Round 28: this home's `runs/` a link to another home's: scoring wrote its plan, results and shard
    locks into that home's `runs/`, and `--run-id` of one of its runs loaded its plan and rewrote its
    lock. `runs/` is refused like `archive/` and `quarantine/` then (no retry), and nothing of B changes."""
    from bcc_pipeline import scoring
    from bcc_pipeline.config import load_settings
    from tests.support import fill_inbox, scoring_settings

    b = foreign_home(tmp_path)
    b = load_settings(profile="demo", env={"BCC_HOME": str(b.home), "BCC_SETTLE_SECONDS": "0"})
    register_champion(b)
    png_writer(b.inbox_dir / "theirs.png", seed=9)
    scoring.plan_shards(b, "b-run", 1)
    before = {p: p.read_bytes() for p in b.runs_dir.rglob("*") if p.is_file()}
    s = scoring_settings(make_settings, sqlite_url)
    register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 2)
    s.runs_dir.parent.mkdir(parents=True, exist_ok=True)
    s.runs_dir.symlink_to(b.runs_dir)
    with pytest.raises(scoring.InboxRefused, match=r"refusing to use .*runs for scoring runs: .*BCC home"):
        scoring.plan_shards(s, "a-run", 1)
    with pytest.raises(scoring.InboxRefused, match="for scoring runs"):
        scoring.score_shard(s, "b-run", 0)
    assert {p: p.read_bytes() for p in b.runs_dir.rglob("*") if p.is_file()} == before
    assert len(list(s.inbox_dir.rglob("*.png"))) == 2
