"""Discovery and the managed folders (bcc_pipeline.scoring.inbox): what in the inbox is scored, ignored
or skipped, and that no folder the pipeline manages is ever scored."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from bcc_pipeline import scoring
from bcc_pipeline.errors import ConfigError
from tests.support import bind_mounted, foreign_home, inbox_files


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


def test_inbox_at_home_or_in_a_managed_folder_is_refused(make_settings, png_writer, tmp_path):
    """``bcc score --inbox $BCC_HOME`` would move the dataset, the models and earlier results: refused (even
    with every folder allowed), as is every folder inside one the pipeline manages (archive, quarantine,
    runs, models, dataset, landing and the embedded Airflow home)."""
    s = make_settings(None, settle_seconds=0, inbox_roots=str(tmp_path))
    assert s.home / "airflow" in s.managed_dirs
    png_writer(s.dataset_dir / "benign" / "a.png")
    with pytest.raises(scoring.InboxRefused, match="contains .*the BCC home"):
        scoring.discover(s, s.home)
    with pytest.raises(scoring.InboxRefused, match="contains"):
        scoring.discover(s, tmp_path)
    for managed in s.managed_dirs:
        with pytest.raises(ConfigError, match="manages"):
            scoring.discover(s, managed / "sub")
    assert (s.dataset_dir / "benign" / "a.png").exists()


def test_only_folders_in_the_allowed_roots_are_scored(make_settings, png_writer, tmp_path):
    s = make_settings(None, settle_seconds=0)
    usr = tmp_path / "usr"  # a system folder full of images
    png_writer(usr / "share" / "icons" / "a.png")
    with pytest.raises(scoring.InboxRefused, match="not inside an allowed inbox root") as refused:
        scoring.discover(s, usr)
    assert "\n" not in str(refused.value) and "BCC_INBOX_ROOTS" in str(refused.value)
    with pytest.raises(scoring.InboxRefused):
        scoring.discover(s, s.inbox_dir / ".." / ".." / "usr")  # no way out through ..
    png_writer(s.inbox_dir / "ward_1" / "b.png")
    assert scoring.discover(s, s.inbox_dir / "ward_1")["pending"] == ["b.png"]  # a subfolder of the root
    wider = make_settings(None, settle_seconds=0, inbox_roots=f"{usr}{os.pathsep}{s.inbox_dir}")
    assert scoring.discover(wider, usr)["pending"] == ["share/icons/a.png"]
    assert scoring.discover(wider)["pending"] == ["ward_1/b.png"]


def test_an_inbox_asked_for_by_name_that_is_not_a_folder_is_refused(
    make_settings, sqlite_url, register_champion, tmp_path, monkeypatch, capsys
):
    """``bcc score --inbox`` (the DAG's ``inbox``) naming a path in an allowed root that is not there (a
    typo, a share not mounted) or is a file used to give a green run that scored nothing, its only trace an
    INFO line; a relative root and inbox from a folder without it the same. Now each is one refusal line
    (the CLI exits 1, the DAG's plan fails without retrying). The default inbox of a home that has none
    yet is still just empty."""
    from bcc_pipeline import cli

    s = make_settings(sqlite_url, settle_seconds=0)
    assert scoring.discover(s)["pending"] == []  # no inbox/ yet: nothing to score
    s.inbox_dir.mkdir(parents=True)
    (s.inbox_dir / "notes.png").write_bytes(b"a file, not a folder")
    for name, why in [("ward_9", "no such folder"), ("notes.png", "not a folder")]:
        with pytest.raises(scoring.InboxRefused, match=why) as refused:
            scoring.discover(s, s.inbox_dir / name)
        assert "\n" not in str(refused.value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    register_champion(s)
    monkeypatch.setenv("BCC_INBOX_ROOTS", "inbox")
    assert cli.main(["score", "--inbox", "inbox"]) == 1
    assert "refusing to score the inbox" in capsys.readouterr().err


@pytest.mark.parametrize(
    "marked",
    ["marked", "unmarked", "unmarked-postgresql"],
    ids=["marked", "set-up-before-homes-were-marked", "set-up-before-homes-were-marked-on-postgresql"],
)
def test_a_foreign_bcc_home_is_never_scored(make_settings, png_writer, tmp_path, marked):
    """Another deployment's home (marked by ``bcc db upgrade``; or, set up before homes were marked and not
    marked by a run since, known by its ``bcc.db`` beside ``dataset/``, or, its database on PostgreSQL, by
    ``models/`` beside ``dataset/``) is refused as an inbox, inside an allowed root, below one, and as one of
    its managed folders; nothing of it is touched."""
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.store import upgrade

    shared = tmp_path / "shared"
    s = make_settings(None, settle_seconds=0, inbox_roots=str(shared))
    other = load_settings(env={"BCC_HOME": str(shared / "site_b" / "home")})
    upgrade(other.database_url, home=other.home)
    assert other.home_marker.is_file() and (other.home / "bcc.db").is_file()
    if marked != "marked":
        other.home_marker.unlink()
    if marked == "unmarked-postgresql":  # its database lives elsewhere: no bcc.db, but its models/
        (other.home / "bcc.db").unlink()  # beside its dataset store's manifests
        other.models_dir.mkdir(parents=True)
        (other.dataset_dir / "manifests").mkdir(parents=True)
    png_writer(other.dataset_dir / "benign" / "a.png")
    png_writer(other.inbox_dir / "b.png")
    before = sorted(p for p in other.home.rglob("*"))
    with pytest.raises(scoring.InboxRefused, match="is a BCC home"):
        scoring.discover(s, other.home)
    with pytest.raises(scoring.InboxRefused, match="contains the BCC home"):
        scoring.discover(s, shared)
    with pytest.raises(scoring.InboxRefused, match="a folder of the BCC home"):
        scoring.discover(s, other.dataset_dir / "benign")
    assert sorted(p for p in other.home.rglob("*")) == before


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_home_that_lost_its_marker_or_a_folder_it_marked_is_never_scored(
    make_settings, png_writer, tmp_path, database
):
    """Round 25: home B's `.bcc-home` renamed; B only ever scored, so it had no `dataset/` and was not
    known as a home (`bcc.db` beside `dataset/` was the sign). A, allowed a root above both, scored B's
    archive, quarantine, landing and B itself into its own archive, green. A home is now also known by
    `.bcc-roots`, by `bcc.db` beside any folder the pipeline makes, or by scoring's three folders (its
    database elsewhere); and a folder B marked (`user.bcc.folder`) is B's wherever it is now."""
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.destinations import ROOTS_LIST, destination_lost
    from bcc_pipeline.store import upgrade

    shared = tmp_path / "shared"
    s = make_settings(None, settle_seconds=0, inbox_roots=str(shared))
    other = load_settings(env={"BCC_HOME": str(shared / "site_b" / "home")})
    upgrade(other.database_url, home=other.home)
    for folder in (other.archive_dir, other.quarantine_dir):
        folder.mkdir(parents=True)
        try:
            os.setxattr(folder, "user.bcc.probe", b"1")
        except OSError as exc:
            pytest.skip(f"this filesystem keeps no extended attributes: {exc}")
        assert destination_lost(other, folder) is None  # marked, as a run marks them
    png_writer(other.archive_dir / "run-1" / "scored.png")
    png_writer(other.quarantine_dir / "run-1" / "bad.png")
    png_writer(other.landing_dir / "benign" / "p1" / "labelled.png")
    (other.runs_dir / "run-1").mkdir(parents=True)
    other.home_marker.rename(other.home / ".bcc-home.renamed")  # its marker lost
    if database == "postgresql":  # its database elsewhere: no bcc.db, and its list of marked folders lost
        (other.home / "bcc.db").unlink()
        (other.home / ROOTS_LIST).unlink()
    before = sorted(p for p in other.home.rglob("*"))
    for inbox in (
        other.home,
        other.archive_dir,
        other.quarantine_dir / "run-1",
        other.landing_dir,
        other.runs_dir,
    ):
        with pytest.raises(scoring.InboxRefused, match="BCC home"):
            scoring.discover(s, inbox)
    with pytest.raises(scoring.InboxRefused, match="contains the BCC home"):
        scoring.discover(s, shared)
    # B's archive moved (or its disk mounted) where A may score: its mark says whose it is
    scans = shared / "scans"
    other.archive_dir.rename(scans)
    with pytest.raises(
        scoring.InboxRefused, match=r"it is marked as archive/ of the BCC home .*os.removexattr"
    ):
        scoring.discover(s, scans)
    with pytest.raises(scoring.InboxRefused, match="marked as archive/ of the BCC home"):
        scoring.discover(s, scans / "run-1")
    scans.rename(other.archive_dir)
    assert sorted(p for p in other.home.rglob("*")) == before


def test_a_scanner_folder_with_names_a_home_has_is_scored(make_settings, png_writer, tmp_path):
    """Round 26: folders in the inbox that hold `dataset/` and `models/`, or `archive/`, `quarantine/` and
    `runs/`, or `runs/` and a file named `bcc.db`, were each called "the BCC home": nothing in the inbox
    was scored, on every run. A home is known by what only the pipeline makes, not by names."""
    s = make_settings(None, settle_seconds=0)
    layouts = {
        "ml-project": ("dataset/a.png", "models/m.png"),
        "scanner": ("archive/a.png", "quarantine/b.png", "runs/r1/c.png"),
        "notes": ("runs/d.png", "bcc.db"),
    }
    for name, files in layouts.items():
        for i, f in enumerate(files):
            path = s.inbox_dir / name / f
            if f.endswith(".png"):
                png_writer(path, seed=len(f) + i)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("a note, not a database")
    found = scoring.discover(s)
    assert len(found["pending"]) == 6 and not found.get("unreachable"), found
    # what only the pipeline makes still says "a home": the refusal names it, and the way out (round 28)
    (s.inbox_dir / "ml-project" / "dataset" / "manifests").mkdir()
    with pytest.raises(
        scoring.InboxRefused, match=r"known as one by its dataset/manifests/ beside models/.*rename"
    ):
        scoring.discover(s)


def test_no_folder_of_a_foreign_home_is_scored(make_settings, png_writer, tmp_path):
    """Inside another deployment's home every folder is refused, its ``inbox/`` (files waiting for that
    deployment) and folders the pipeline does not manage (``exports/``) too. This home's own folders that
    the pipeline does not manage (a drop folder beside its inbox) may be scored."""
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.files import mark_home
    from bcc_pipeline.store import upgrade

    shared = tmp_path / "shared"
    s = make_settings(None, settle_seconds=0, inbox_roots=f"{shared}{os.pathsep}{tmp_path / 'home'}")
    mark_home(s.home)
    other = load_settings(env={"BCC_HOME": str(shared / "site_b" / "home")})
    upgrade(other.database_url, home=other.home)
    png_writer(other.inbox_dir / "waiting.png")
    png_writer(other.home / "exports" / "e.png")
    png_writer(s.home / "exports" / "mine.png")
    png_writer(s.inbox_dir / "c.png")
    for folder in (other.inbox_dir, other.home / "exports"):
        with pytest.raises(scoring.InboxRefused, match="another deployment's"):
            scoring.discover(s, folder)
    assert scoring.discover(s, s.home / "exports")["pending"] == ["mine.png"]
    assert scoring.discover(s, s.inbox_dir)["pending"] == ["c.png"]


def test_a_foreign_homes_landing_that_lives_elsewhere_is_never_scored(make_settings, png_writer, tmp_path):
    """Deployment B keeps ``landing/`` on a shared scanner mount (a link to ``scans/landing-B``); this
    deployment may score anything in ``scans/``. No home marker lies above ``landing-B``: B marks the folder
    itself when it sets its home up, and scoring refuses ``scans/`` (which contains it) and ``landing-B``
    (and any folder in it); B's images stay where they are."""
    from bcc_pipeline.config import MANAGED_MARKER, load_settings
    from bcc_pipeline.files import mark_home

    scans = tmp_path / "scans"
    png_writer(scans / "landing-B" / "benign" / "b1.png")
    png_writer(scans / "new" / "n1.png")
    other = load_settings(env={"BCC_HOME": str(tmp_path / "site_b")})
    other.home.mkdir()
    other.landing_dir.symlink_to(scans / "landing-B")
    mark_home(other.home)
    assert (scans / "landing-B" / MANAGED_MARKER).is_file()
    s = make_settings(None, settle_seconds=0, inbox_roots=str(scans))
    with pytest.raises(
        scoring.InboxRefused, match="contains .*landing-B, a folder the BCC home .*site_b manages"
    ):
        scoring.discover(s, scans)
    for inbox in (scans / "landing-B", scans / "landing-B" / "benign"):
        with pytest.raises(scoring.InboxRefused, match="a folder the BCC home .*site_b manages"):
            scoring.discover(s, inbox)
    # B's landing/ leads nowhere here (the mount path of B's host): its marker cannot be checked, and holds
    other.landing_dir.unlink()
    other.landing_dir.symlink_to(tmp_path / "mnt-of-b's-host" / "scans" / "landing-B")
    with pytest.raises(scoring.InboxRefused, match="a folder the BCC home .*site_b manages"):
        scoring.discover(s, scans)
    # B's landing/ re-pointed elsewhere: the marker left behind is stale, and scans/ may be scored again
    other.landing_dir.unlink()
    other.landing_dir.mkdir()
    assert scoring.discover(s, scans)["pending"] == ["landing-B/benign/b1.png", "new/n1.png"]
    assert scoring.discover(s, scans / "new")["pending"] == ["n1.png"]
    assert (scans / "landing-B" / "benign" / "b1.png").is_file()


def _foreign_home(tmp_path):
    """Settings of a second deployment whose home lies inside this one's allowed inbox root, with a
    database migrated without marking the home (as a test fixture, or an older version, would)."""
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.store import upgrade

    home = tmp_path / "shared" / "site_b" / "home"
    other = load_settings(profile="demo", overrides={"settle_seconds": 0}, env={"BCC_HOME": str(home)})
    upgrade(other.database_url)
    assert not other.home_marker.exists()
    return other


def test_a_home_set_up_by_bcc_demo_is_never_scored(make_settings, png_writer, tmp_path):
    """``bcc demo`` marks its home: a demo home inside an allowed root is refused, its files untouched."""
    from bcc_pipeline.cli.models import prepare_demo_home
    from bcc_pipeline.store import dispose_engine

    s = make_settings(None, settle_seconds=0, inbox_roots=str(tmp_path / "shared"))
    other = _foreign_home(tmp_path)
    try:
        png_writer(other.landing_dir / "benign" / "a.png")  # images to train on: none are generated
        prepare_demo_home(other)
        assert other.home_marker.is_file()
        before = sorted(other.home.rglob("*"))
        with pytest.raises(scoring.InboxRefused, match="contains the BCC home"):
            scoring.discover(s, tmp_path / "shared")
        with pytest.raises(scoring.InboxRefused, match="a folder of the BCC home"):
            scoring.discover(s, other.landing_dir)
        assert sorted(other.home.rglob("*")) == before
    finally:
        dispose_engine(other.database_url)


def test_a_demo_home_whose_empty_landing_is_a_link_still_gets_demo_images(tmp_path, monkeypatch):
    """``bcc demo`` with ``landing/`` a link to an empty folder: the ``.bcc-managed`` marker written there is
    not an image to train on, so the demo images are generated."""
    import bcc_pipeline.demo_data as demo_data
    from bcc_pipeline.cli.models import prepare_demo_home
    from bcc_pipeline.config import MANAGED_MARKER
    from bcc_pipeline.store import dispose_engine

    other = _foreign_home(tmp_path)
    (tmp_path / "scans").mkdir()
    other.landing_dir.symlink_to(tmp_path / "scans")
    calls = []
    monkeypatch.setattr(demo_data, "generate", lambda *a, **kw: calls.append(a))
    try:
        prepare_demo_home(other)
    finally:
        dispose_engine(other.database_url)
    assert (tmp_path / "scans" / MANAGED_MARKER).is_file() and len(calls) == 1


def test_a_home_whose_folders_the_pipeline_created_is_never_scored(make_settings, png_writer, tmp_path):
    """Intake creating a home's dataset store, and scoring planning a run in it, mark that home (even where
    its database was migrated without ``bcc db upgrade``): another deployment never scores it."""
    from bcc_pipeline.pipelines import intake_step
    from bcc_pipeline.store import dispose_engine

    s = make_settings(None, settle_seconds=0, inbox_roots=str(tmp_path / "shared"))
    other = _foreign_home(tmp_path)
    try:
        png_writer(other.landing_dir / "benign" / "a.png")
        assert intake_step(other)["accepted"] == 1
        stored = [p for p in other.dataset_dir.rglob("*.png")]
        assert len(stored) == 1 and other.home_marker.is_file()
        with pytest.raises(scoring.InboxRefused, match="contains the BCC home"):
            scoring.discover(s, tmp_path / "shared")
        with pytest.raises(scoring.InboxRefused, match="a folder of the BCC home"):
            scoring.discover(s, stored[0].parent)
        assert stored[0].is_file()
    finally:
        dispose_engine(other.database_url)


def test_a_modification_time_in_the_future_is_settled_with_a_warning(make_settings, png_writer, caplog):
    """A clock that is wrong somewhere must not leave a file in the inbox forever."""
    from bcc_pipeline.images import max_file_bytes
    from bcc_pipeline.scoring.loader import Item, MemoryBudget, load_file

    s = make_settings(None, settle_seconds=0)
    future = png_writer(s.inbox_dir / "future.png")
    t = time.time() + 3600
    os.utime(future, (t, t))
    with caplog.at_level("WARNING"):
        assert scoring.discover(s)["pending"] == ["future.png"]
    assert "clock" in caplog.text
    item = load_file(
        Item.of("future.png"),
        str(future),
        size=32,
        max_pixels=s.max_pixels,
        min_side=s.min_side,
        settle=0,
        max_bytes=max_file_bytes(s.max_pixels),
        budget=MemoryBudget(1 << 30),
    )
    assert item.kind == "ok"
    # within the settle time of now (either side) a file is still being written; beyond it, settled
    patient = make_settings(None, settle_seconds=60)
    soon = png_writer(s.inbox_dir / "soon.png")
    os.utime(soon, (time.time() + 30, time.time() + 30))
    found = scoring.discover(patient)
    assert found["pending"] == ["future.png"] and found["skipped"] == ["soon.png"]


def test_a_destination_too_long_for_path_max_is_shortened(make_settings):
    from bcc_pipeline.scoring.inbox import PATH_MAX, destination

    s = make_settings(None)
    short = destination(s, "run-1", "scored", "a/b.png")
    assert short == s.archive_dir / "run-1" / "a" / "b.png"
    rel = "/".join(["d" * 250] * 16) + "/x.png"
    long_a, long_b = destination(s, "run-1", "scored", rel), destination(s, "run-1", "scored", "e" + rel)
    assert len(os.fsencode(long_a)) < PATH_MAX - 32 and long_a.name == "x.png" and long_a != long_b
    assert long_a.parent.parent == s.archive_dir / "run-1" and long_a.parent.name.startswith("#")
    assert destination(s, "run-1", "rejected", rel).parent.parent == s.quarantine_dir / "run-1"


def test_this_homes_landing_through_a_bind_mount_is_never_scored(make_settings, png_writer, tmp_path):
    """``landing/`` bind-mounted into an allowed inbox root has another path but is the same folder (the
    same device and inode): refused, and its labelled images stay where they are."""
    shared = tmp_path / "shared"
    s = make_settings(None, settle_seconds=0, inbox_roots=str(shared))
    png_writer(s.landing_dir / "benign" / "p" / "mine.png")
    with bind_mounted(s.landing_dir, shared / "view") as view:
        for inbox in (view, view / "benign"):
            with pytest.raises(scoring.InboxRefused, match="a bind mount of it"):
                scoring.discover(s, inbox)
        assert (s.landing_dir / "benign" / "p" / "mine.png").is_file()


def test_another_homes_folders_through_a_bind_mount_are_never_scored(make_settings, png_writer, tmp_path):
    """Deployment B's ``landing/`` (no ``.bcc-managed`` marker: it is no link) bind-mounted into an allowed
    root, as the inbox or as a folder inside it, and this home's ``landing/`` bind-mounted into its own
    inbox: the kernel's mount table shows the folder's other path, inside a home, so the inbox is refused
    and nothing is moved. A bind mount of a plain folder is scored as any folder."""

    shared = tmp_path / "shared"
    s = make_settings(
        None, settle_seconds=0, inbox_roots=f"{shared}{os.pathsep}{tmp_path / 'home' / 'inbox'}"
    )
    other = foreign_home(tmp_path)
    png_writer(other.landing_dir / "malignant" / "p1" / "theirs.png")
    png_writer(s.landing_dir / "benign" / "p2" / "mine.png")
    plain = png_writer(tmp_path / "scanner" / "out" / "scan.png").parent

    def files():
        return sorted(p for d in (other.home, s.landing_dir, plain) for p in d.rglob("*"))

    before = files()
    with bind_mounted(other.landing_dir, shared / "scans") as view:
        for inbox in (view, view / "malignant"):
            with pytest.raises(scoring.InboxRefused, match="reached through a bind mount.*BCC home"):
                scoring.discover(s, inbox)
    with bind_mounted(other.landing_dir, shared / "drop" / "scans"):
        with pytest.raises(scoring.InboxRefused, match="contains .*scans.*reached through a bind mount"):
            scoring.discover(s, shared / "drop")
    with bind_mounted(s.landing_dir, s.inbox_dir / "mine"):
        with pytest.raises(scoring.InboxRefused, match="contains .*mine.*reached through a bind mount"):
            scoring.discover(s)
    assert files() == before
    with bind_mounted(plain, shared / "plain"):
        assert scoring.discover(s, shared)["pending"] == ["plain/scan.png"]


def test_a_bind_mount_made_after_planning_is_refused_by_the_shard(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """The DAG plans a run, then its shards run: deployment B's ``landing/`` bind-mounted over an inbox
    folder in between is refused by the shard (one line, no retry) before anything is read or moved; B's
    images and this inbox's own file stay where they are."""
    from tests.support import count_rows

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "x.png", seed=1)
    mine = png_writer(s.inbox_dir / "ward" / "x.png", seed=2)
    png_writer(s.inbox_dir / "y.png", seed=3)
    scoring.plan_shards(s, "r1", 1)
    with bind_mounted(other.landing_dir / "malignant" / "p1", s.inbox_dir / "ward"):
        with pytest.raises(scoring.InboxRefused, match="ward.*reached through a bind mount.*since the run"):
            scoring.score_shard(s, "r1", 0)
        assert theirs.is_file()
    assert mine.is_file() and (s.inbox_dir / "y.png").is_file()
    from bcc_pipeline.store import Prediction

    assert count_rows(sqlite_url, Prediction) == 0


def test_a_bind_mount_made_while_a_shard_runs_is_refused_before_anything_read_through_it_moves(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """Deployment B's ``landing/`` bind-mounted over an inbox folder in the middle of a shard (after its
    first batch was committed): the mount table's change is seen (``poll`` on ``/proc/self/mountinfo``),
    the folders are judged again, and the shard is refused before its next commit or move. B's image is
    never scored nor moved; once the mount is gone the next run scores this inbox's own files."""
    import contextlib

    from bcc_pipeline.store import Prediction
    from tests.support import count_rows

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "x.png", seed=1)
    for name, seed in (("a.png", 2), ("b.png", 3), ("c.png", 4)):
        png_writer(s.inbox_dir / name, seed=seed)
    mine = png_writer(s.inbox_dir / "ward" / "x.png", seed=5)
    scoring.plan_shards(s, "r1", 1)
    mounted = []
    with contextlib.ExitStack() as stack:

        def mount_over_ward(paths):
            if not mounted:  # once, after the first batch's commit
                view = bind_mounted(other.landing_dir / "malignant" / "p1", s.inbox_dir / "ward")
                mounted.append(stack.enter_context(view))

        hooks = scoring.Hooks(on_batch_committed=mount_over_ward)
        with pytest.raises(scoring.InboxRefused, match="ward.*reached through a bind mount"):
            scoring.score_shard(s, "r1", 0, batch_size=1, hooks=hooks)
        assert mounted, "the hook never ran"
        assert theirs.is_file() and theirs.read_bytes() == (s.inbox_dir / "ward" / "x.png").read_bytes()
    from bcc_pipeline.images import sha256_file
    from bcc_pipeline.store import session_scope

    def predicted():
        with session_scope(sqlite_url) as db:
            return {p.image_sha256 for p in db.query(Prediction)}

    # a.png, and b.png when its read (one batch ahead) was over before the mount was made
    assert 1 <= count_rows(sqlite_url, Prediction) <= 2 and sha256_file(theirs) not in predicted()
    assert theirs.is_file() and mine.is_file()
    r = scoring.score_inbox(s, run_id="r2")
    assert r["status"] == "finished" and inbox_files(s.inbox_dir) == []
    assert theirs.is_file() and count_rows(sqlite_url, Prediction) == 4
    assert sha256_file(theirs) not in predicted()


def test_a_home_reached_through_a_bind_mount_of_a_folder_above_it_scores_its_inbox(
    register_champion, png_writer, tmp_path
):
    """A plain setup: ``/data`` bind-mounted at ``/srv`` and the home used at ``/srv/bcc``. The mount table
    shows the inbox also as ``/data/bcc/inbox``, inside a home that is this very home (the same folder):
    not another deployment's. Before, every run was refused."""
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.store import dispose_engine, upgrade

    real, view = tmp_path / "data", tmp_path / "srv"
    real.mkdir()
    with bind_mounted(real, view):
        s = load_settings(
            profile="demo", overrides={"settle_seconds": 0}, env={"BCC_HOME": str(view / "bcc")}
        )
        upgrade(s.database_url, home=s.home)
        register_champion(s)
        png_writer(s.inbox_dir / "ward" / "a.png", seed=1)
        try:
            r = scoring.score_inbox(s, run_id="r1")
            assert r["status"] == "finished" and r["scored"] == 1 and inbox_files(s.inbox_dir) == []
        finally:
            dispose_engine(s.database_url)  # the database lives in the mount: let it go before unmounting


def test_a_file_read_through_a_mount_that_is_gone_again_is_never_scored(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, monkeypatch
):
    """Deployment B's ``landing/`` bind-mounted over an inbox folder for just the moment one of its files
    is read, and unmounted right after: by the next judgement the folders look fine. Before, B's image was
    scored (a prediction for B's content recorded under this inbox path). The mount table's count moved
    during the read, so the file is left for the next run (``changed``), which scores the inbox's own."""
    import bcc_pipeline.scoring.loader as loader_module
    from bcc_pipeline.images import sha256_file
    from bcc_pipeline.store import Prediction, session_scope

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "x.png", seed=1)
    mine = png_writer(s.inbox_dir / "ward" / "x.png", seed=2)
    real_read, done = loader_module.read_once, []

    def read_through_a_passing_mount(path, *args, **kwargs):
        if str(path).endswith("ward/x.png") and not done:
            done.append(path)
            with bind_mounted(theirs.parent, mine.parent):
                return real_read(path, *args, **kwargs)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(loader_module, "read_once", read_through_a_passing_mount)
    r1 = scoring.score_inbox(s, run_id="r1")
    assert done and r1["changed"] == 1 and r1["scored"] == 0
    r2 = scoring.score_inbox(s, run_id="r2")
    assert r2["scored"] == 1 and inbox_files(s.inbox_dir) == [] and theirs.is_file()
    with session_scope(sqlite_url) as db:
        predicted = {p.image_sha256 for p in db.query(Prediction)}
    assert sha256_file(theirs) not in predicted and len(predicted) == 1


def test_a_bind_mount_of_a_folder_this_user_cannot_check_is_refused(make_settings, png_writer, tmp_path):
    """Deployment B's home kept private (``BCC_UMASK=077``, another owner) and its ``landing/`` bind-mounted
    into an allowed root: the scoring user cannot look at B's path of the folder, so it cannot tell whether
    the folder is B's. It refuses (fails closed) instead of scoring B's labelled images."""
    import json
    import shutil
    import sys

    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv here to run as a user without the right to read every folder")
    shared = tmp_path / "shared"
    s = make_settings(None, settle_seconds=0, inbox_roots=str(shared))
    s.home.mkdir(parents=True)
    other = foreign_home(tmp_path)
    png_writer(other.landing_dir / "malignant" / "p1" / "theirs.png")
    os.chown(other.home, 1234, 1234)
    os.chmod(other.home, 0o700)
    code = (
        "import json, sys\n"
        "from bcc_pipeline import scoring\n"
        "from bcc_pipeline.config import load_settings\n"
        f"s = load_settings(env={{'BCC_HOME': {str(s.home)!r}, 'BCC_INBOX_ROOTS': {str(shared)!r}, "
        "'BCC_SETTLE_SECONDS': '0'})\n"
        "out = {}\n"
        f"for inbox in ({str(shared / 'scans')!r}, {str(shared)!r}):\n"
        "    try:\n"
        "        out[inbox] = scoring.discover(s, inbox)['pending']\n"
        "    except scoring.InboxRefused as exc:\n"
        "        out[inbox] = str(exc)\n"
        "print(json.dumps(out))\n"
    )
    try:
        with bind_mounted(other.landing_dir / "malignant", shared / "scans"):
            done = subprocess.run(
                [
                    "setpriv",
                    "--bounding-set=-dac_override,-dac_read_search",
                    "--",
                    sys.executable,
                    "-c",
                    code,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
    finally:
        os.chown(other.home, os.getuid(), os.getgid())
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"cannot drop the right to read every folder here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for inbox, result in out.items():
        assert isinstance(result, str) and "cannot be checked" in result, (inbox, result)
    assert (other.landing_dir / "malignant" / "p1" / "theirs.png").is_file()


def test_a_system_filesystem_mounted_into_the_inbox_is_never_scored(make_settings, png_writer, tmp_path):
    """``/proc`` bind-mounted into the inbox (or as it): what is there is the system's (thousands of links a
    run would "reject" and move, had the kernel allowed it; under ``/dev``, root may), so the inbox is
    refused with one line and nothing is read or moved."""
    shared = tmp_path / "shared"
    s = make_settings(None, settle_seconds=0, inbox_roots=str(shared))
    png_writer(shared / "drop" / "a.png")
    with bind_mounted(Path("/proc"), shared / "drop" / "proc"):
        with pytest.raises(scoring.InboxRefused, match="proc.*where the system's proc filesystem is mounted"):
            scoring.discover(s, shared / "drop")
        with pytest.raises(scoring.InboxRefused, match="on the system's proc filesystem"):
            scoring.discover(s, shared / "drop" / "proc")
    assert scoring.discover(s, shared / "drop")["pending"] == ["a.png"]


def test_a_bind_mount_of_a_foreign_folder_whose_home_is_covered_is_refused(
    make_settings, png_writer, tmp_path
):
    """Deployment B's ``landing/malignant/p1`` bind-mounted into an allowed root, then a tmpfs mounted over
    B's home: the path the kernel shows the folder under is covered, so it cannot be checked for a home.
    Refused (fail closed), as the inbox and inside it; B's images are never read."""
    from tests.support import tmpfs_mounted

    shared = tmp_path / "shared"
    s = make_settings(None, settle_seconds=0, inbox_roots=str(shared))
    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "x.png", seed=1)
    png_writer(shared / "drop" / "a.png", seed=2)
    with (
        bind_mounted(other.landing_dir / "malignant" / "p1", shared / "drop" / "scans"),
        tmpfs_mounted(other.home),
    ):
        with pytest.raises(scoring.InboxRefused, match="scans.*another mount covers"):
            scoring.discover(s, shared / "drop")
        with pytest.raises(scoring.InboxRefused, match="another mount covers"):
            scoring.discover(s, shared / "drop" / "scans")
    assert theirs.is_file() and scoring.discover(s, shared / "drop")["pending"] == ["a.png"]


def test_an_overlay_of_another_homes_landing_is_never_scored(make_settings, png_writer, tmp_path):
    """An overlay filesystem mounted into an allowed root whose lower folder is deployment B's
    ``landing/malignant``: its files have another device and inode than B's, so no bind-mount check sees
    them; the overlay's layers (the mount's ``lowerdir=``) do. Refused as the inbox and inside it; B's
    image is never read or copied."""
    from tests.support import overlay_mounted

    shared = tmp_path / "shared"
    s = make_settings(None, settle_seconds=0, inbox_roots=str(shared))
    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "x.png", seed=1)
    png_writer(shared / "drop" / "a.png", seed=2)
    with overlay_mounted(other.landing_dir / "malignant", shared / "drop" / "scans", tmp_path / "ov"):
        assert (shared / "drop" / "scans" / "p1" / "x.png").read_bytes() == theirs.read_bytes()
        with pytest.raises(scoring.InboxRefused, match="scans.*overlay of .*site_b/home/landing/malignant"):
            scoring.discover(s, shared / "drop")
        with pytest.raises(scoring.InboxRefused, match="overlay of .*site_b/home/landing/malignant/p1"):
            scoring.discover(s, shared / "drop" / "scans" / "p1")
    assert theirs.is_file() and scoring.discover(s, shared / "drop")["pending"] == ["a.png"]


def test_a_single_file_bind_mounted_into_the_inbox_is_never_scored(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path
):
    """One image of deployment B's ``landing/`` bind-mounted over a file of the inbox: nothing about the
    file says whose it is, and a mount point cannot be moved. It is never read nor moved, and the run is
    red (``unreachable``) naming it, on every run until somebody unmounts it; so also when the mount is
    made after the run was planned (the shard refuses)."""
    from bcc_pipeline.store import Prediction
    from tests.support import count_rows, file_bind_mounted

    s = make_settings(sqlite_url, settle_seconds=0)
    register_champion(s)
    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "x.png", seed=1)
    png_writer(s.inbox_dir / "a.png", seed=2)
    with file_bind_mounted(theirs, s.inbox_dir / "ward" / "x.png"):
        r = scoring.score_inbox(s, run_id="r1")
        assert r["scored"] == 1  # a.png
        assert [u["path"] for u in r["unreachable"]] == ["ward/x.png"]  # bcc score exits 1, the DAG fails
        assert "a file mounted here" in r["unreachable"][0]["reason"]
        assert count_rows(sqlite_url, Prediction) == 1 and theirs.is_file()
    (s.inbox_dir / "ward" / "x.png").unlink()
    png_writer(s.inbox_dir / "ward" / "y.png", seed=3)
    scoring.plan_shards(s, "r2", 1)
    with file_bind_mounted(theirs, s.inbox_dir / "ward" / "y.png"):
        with pytest.raises(scoring.InboxRefused, match="ward/y.png, a file mounted here"):
            scoring.score_shard(s, "r2", 0)
    assert theirs.is_file() and count_rows(sqlite_url, Prediction) == 1


def test_the_mount_table_is_read_with_its_escapes(tmp_path):
    """mountinfo writes a space, tab, newline or backslash in a path as an octal escape; a bind mount's
    root is the folder of its filesystem it shows."""
    from bcc_pipeline.mounts import Mount, mount_table, other_paths

    table = tmp_path / "mountinfo"
    table.write_bytes(
        b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        b"90 27 254:0 /srv/b\\040home/landing /srv/in\\011box/scans rw - ext4 /dev/vda rw\n"
        b"91 27 0:23 / /dev/shm rw - tmpfs tmpfs rw\n"
    )
    assert mount_table(str(table))[1] == Mount(
        b"254:0", b"/srv/b home/landing", b"/srv/in\tbox/scans", b"ext4", b"rw"
    )
    assert [m.fstype for m in mount_table(str(table))] == [b"ext4", b"ext4", b"tmpfs"]
    assert mount_table(str(tmp_path / "missing")) == []
    # the live table: an ordinary folder has no other path
    assert other_paths(str(tmp_path)) == []


def test_a_folder_moved_out_of_the_inbox_while_it_is_listed_is_not_unreachable(
    make_settings, png_writer, tmp_path, monkeypatch
):
    """Round 23 (as for intake): a folder moved away between the listing of its parent and its own listing
    made the run red ("cannot list this folder", unreachable) though nothing was left to reach."""
    import contextlib

    from bcc_pipeline.scoring import inbox as inbox_module

    s = make_settings(None, settle_seconds=0)
    png_writer(s.inbox_dir / "a" / "x.png", seed=1)
    png_writer(s.inbox_dir / "b" / "y.png", seed=2)
    real, moved = os.scandir, []

    @contextlib.contextmanager
    def listed_then_moved(path):  # `b/` listed in its parent, then moved away while `a/` is listed
        with real(path) as it:
            entries = list(it)
        if os.fspath(path) == str(s.inbox_dir / "a") and not moved:
            os.rename(s.inbox_dir / "b", tmp_path / "b")
            moved.append(path)
        yield iter(entries)

    monkeypatch.setattr(inbox_module.os, "scandir", listed_then_moved)
    found = scoring.discover(s)
    monkeypatch.undo()
    assert moved and found["pending"] == ["a/x.png"]
    assert inbox_module.unreachable(found["ignored"]) == []


def test_a_system_folder_is_never_an_inbox_whatever_the_roots_allow(make_settings, tmp_path):
    """Round 24: `BCC_INBOX_ROOTS=/etc:/tmp bcc score --inbox /etc` (a root listed by mistake) scored /etc and
    moved its links and rejected files, `/etc/passwd` among them, to quarantine. The operating system's
    folders, `/` and every folder directly under it are refused with one line, whatever the roots say;
    nothing there is read or moved."""
    s = make_settings(
        None, settle_seconds=0, inbox_roots=os.pathsep.join(["/", "/etc", "/usr", "/var", str(tmp_path)])
    )
    before = sorted(os.listdir("/etc"))
    for folder, why in [
        ("/etc", "directly under it"),
        ("/etc/ssl", "inside /etc"),
        ("/usr/share", "inside /usr"),
        ("/var/lib", "inside /var/lib"),
        ("/var", "directly under it"),
        ("/", "it is / or"),
    ]:
        with pytest.raises(scoring.InboxRefused, match=why) as refused:
            scoring.discover(s, folder)
        assert "\n" not in str(refused.value)
    assert sorted(os.listdir("/etc")) == before
    (tmp_path / "scans").mkdir()
    assert scoring.discover(s, tmp_path / "scans")["pending"] == []  # a folder of its own is fine
    # a RAM disk's folder is nobody's system file, nor a removable disk's
    assert scoring.inbox._system_folder("/dev/shm/scans") is None
    assert scoring.inbox._system_folder("/run/media/ward/USB") is None
    assert scoring.inbox._system_folder("/dev/disk") is not None
