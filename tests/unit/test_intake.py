"""Intake's integrity guarantees: hostile file names, a kill between commit and move, hostile run ids,
folders it cannot list."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from bcc_pipeline import files, leftovers
from bcc_pipeline.intake import intake
from bcc_pipeline.store import ImageRecord, Rejection, session_scope, upgrade
from tests.support import exchange, foreign_home

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(make_settings, migrated_url):
    return make_settings(migrated_url, settle_seconds=0)


def _bytes_path(folder: Path, name: bytes) -> bytes:
    os.makedirs(folder, exist_ok=True)
    return os.path.join(os.fsencode(folder), name)


def _all_files(root: Path) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_names_that_are_not_utf8_are_taken_in_each_under_its_own_name(home, png_writer, caplog):
    """A name with the byte 0xff and one with the four characters ``\\xff`` are two files, two rows;
    intake neither dies on them nor on the rerun."""
    benign = home.landing_dir / "benign"
    good = {b"bad\xffname.png": 1, b"bad\\xffname.png": 2, b"caf\xc3\xa9.png": 3}
    for name, seed in good.items():
        png_writer(Path(os.fsdecode(_bytes_path(benign, name))), seed=seed)
    broken = [b"x\xff.png", b"x\\xff.png", b"new\nline.png", b"\x1b[31mred.png"]
    for name in broken:
        with open(_bytes_path(benign, name), "wb") as fh:
            fh.write(b"not an image at all")

    with caplog.at_level(logging.INFO):
        r = intake(home, run_id="names")
    assert (r.accepted, r.rejected, r.failed) == (3, 4, [])
    shown = sorted(x["path"] for x in r.rejections)
    assert len(set(shown)) == 4
    assert sorted(os.fsencode(files.path_from_display(p)) for p in shown) == sorted(
        b"benign/" + n for n in broken
    )
    assert all("\n" not in rec.getMessage() and "\x1b" not in rec.getMessage() for rec in caplog.records)
    with session_scope(home.database_url) as s:
        rows = s.scalars(select(Rejection)).all()
        assert sorted(x.path for x in rows) == shown and all(x.moved_to for x in rows)
        sources = sorted(s.scalars(select(ImageRecord.source_path)).all())
    assert sorted(os.fsencode(files.path_from_display(p)) for p in sources) == sorted(
        b"benign/" + n for n in good
    )
    q = os.fsencode(home.quarantine_dir / "names" / "landing" / "benign")
    assert sorted(n for n in os.listdir(q) if not n.endswith(b".reason.txt")) == sorted(broken)
    assert os.listdir(os.fsencode(benign)) == []

    again = intake(home, run_id="names-again")
    assert (again.accepted, again.rejected, again.duplicates, again.failed) == (0, 0, 0, [])


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.intake import intake

    def hook(path):
        if path == sys.argv[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    intake(load_settings(), run_id="killed", on_committed=hook)
""")


@pytest.mark.parametrize("victim", ["malignant/conflict.png", "malignant/broken.png", "benign/a.png"])
def test_a_kill_between_commit_and_move_loses_nothing(home, png_writer, victim):
    """SIGKILL right after a file's outcome is committed and before the file moves; the rerun finishes the
    move: one row, one copy, the label conflict still excluded, nothing left in landing."""
    land = home.landing_dir
    png_writer(land / "benign" / "a.png", seed=1)
    png_writer(land / "malignant" / "conflict.png", seed=1)  # the same content under the other label
    (land / "malignant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BCC_HOME": str(home.home),
        "BCC_PROFILE": "demo",
        "BCC_DATABASE_URL": home.database_url,
        "BCC_SETTLE_SECONDS": "0",
    }
    child = subprocess.run([sys.executable, "-c", _CHILD, victim], env=env, capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert (land / victim).exists()  # committed, not yet moved

    r = intake(home, run_id="rerun")
    assert r.failed == []
    assert _all_files(land) == []
    with session_scope(home.database_url) as s:
        rejections = s.scalars(select(Rejection)).all()
        records = s.scalars(select(ImageRecord)).all()
    assert sorted(x.path for x in rejections) == ["malignant/broken.png", "malignant/conflict.png"]
    assert all(x.moved_to and x.move_error is None for x in rejections)
    assert len(records) == 1 and "both benign and malignant" in (records[0].excluded_reason or "")
    quarantined = [p for p in _all_files(home.quarantine_dir) if not p.endswith(".reason.txt")]
    assert sorted(Path(p).name for p in quarantined) == ["broken.png", "conflict.png"]
    assert sorted(x.moved_to for x in rejections) == sorted(quarantined)
    assert all(Path(files.reason_path(Path(p))).is_file() for p in quarantined)
    stored = [p for p in _all_files(home.dataset_dir) if "manifests" not in p]
    assert len(stored) == 1
    if victim != "benign/a.png":
        assert r.recovered == 1 and all("/killed/" in x.moved_to for x in rejections if x.path == victim)


def test_a_failed_move_is_retried_by_the_next_run_without_a_second_row(home, png_writer):
    (home.landing_dir / "benign" / "bad.png").parent.mkdir(parents=True)
    (home.landing_dir / "benign" / "bad.png").write_bytes(b"not an image at all")
    home.quarantine_dir.parent.mkdir(parents=True, exist_ok=True)
    home.quarantine_dir.write_text("a file where the quarantine folder should be")
    first = intake(home, run_id="first")
    assert [f["path"] for f in first.failed] == ["benign/bad.png"]
    second = intake(home, run_id="second")  # still blocked: reported again, no new row
    assert [f["path"] for f in second.failed] == ["benign/bad.png"] and second.rejected == 0
    home.quarantine_dir.unlink()
    third = intake(home, run_id="third")
    assert (third.recovered, third.rejected, third.failed) == (1, 0, [])
    with session_scope(home.database_url) as s:
        rows = s.scalars(select(Rejection)).all()
    assert len(rows) == 1 and rows[0].run_id == "first" and rows[0].moved_to and rows[0].move_error is None
    assert Path(rows[0].moved_to).read_bytes() == b"not an image at all"


@pytest.mark.parametrize(
    "run_id", ["..", "../x", "/abs", "", "x/../../..", "r" * 5000, "тест-δ", "a\x00b", "."]
)
def test_hostile_run_ids_keep_quarantine_under_quarantine(make_settings, sqlite_url, tmp_path, run_id):
    upgrade(sqlite_url)
    s = make_settings(sqlite_url, settle_seconds=0)
    (s.landing_dir / "benign").mkdir(parents=True)
    (s.landing_dir / "benign" / "bad.png").write_bytes(b"not an image at all")
    sentinel = tmp_path / "x"
    sentinel.write_text("not ours")
    before = len(_all_files(tmp_path))
    r = intake(s, run_id=run_id)
    assert r.rejected == 1 and r.failed == []
    with session_scope(sqlite_url) as session:
        moved = Path(session.scalars(select(Rejection.moved_to)).one())
    assert moved.resolve().is_relative_to(s.quarantine_dir.resolve()) and moved.read_bytes()
    assert len(moved.relative_to(s.quarantine_dir).parts[0]) <= 130  # one folder, a bounded name
    assert sentinel.read_text() == "not ours"
    # the file moved (+ its reason file, and the home's list of the folders it marked); nothing deleted
    assert len(_all_files(tmp_path)) == before + 2 and (s.home / ".bcc-roots").is_file()


def test_a_folder_intake_cannot_list_is_reported_and_the_run_goes_on(home, png_writer, monkeypatch, capsys):
    """A folder whose path is longer than the system allows (ENAMETOOLONG) cannot be listed, even by root:
    the other files are taken in, the folder is reported, and, as its files are never taken in as things
    are, ``bcc intake`` exits 1 naming it (the retraining DAG's intake task fails), on every run."""
    from bcc_pipeline.cli import main
    from tests.support import deeper_than_path_max

    png_writer(home.landing_dir / "benign" / "ok.png", seed=1)
    deeper_than_path_max(home.landing_dir / "benign")
    r = intake(home, run_id="deep")
    assert r.accepted == 1
    assert len(r.failed) == 1 and "cannot list this folder" in r.failed[0]["error"]
    assert r.failed[0]["path"].startswith("benign/" + "d" * 250)
    assert r.unreachable == r.failed
    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert main(["intake"]) == 1
    assert "not taken in as things are" in capsys.readouterr().err


def test_a_hidden_landing_folder_is_left_alone_and_reported(home, png_writer):
    """A hidden patient folder (``.patient_7/``) is not taken in, as scoring leaves hidden files alone, but
    it is reported as ignored on every run, never passed over in silence."""
    png_writer(home.landing_dir / "benign" / "ok.png", seed=1)
    png_writer(home.landing_dir / "benign" / ".patient_7" / "a.png", seed=2)
    for run in ("h1", "h2"):
        r = intake(home, run_id=run)
        assert "benign/.patient_7" in r.ignored_paths and r.failed == []
    assert (home.landing_dir / "benign" / ".patient_7" / "a.png").is_file()


def test_migration_0003_down_and_up_and_an_old_schema_is_named(make_settings, migrated_url, png_writer):
    from sqlalchemy import inspect

    from bcc_pipeline import store
    from bcc_pipeline.errors import StoreError

    assert store.downgrade(migrated_url, "0002") == "0002"
    cols = {c["name"] for c in inspect(store.get_engine(migrated_url)).get_columns("rejections")}
    assert "dest" not in cols and "move_error" not in cols
    s = make_settings(migrated_url, settle_seconds=0)
    png_writer(s.landing_dir / "benign" / "a.png")
    with pytest.raises(StoreError, match="bcc db upgrade"):
        intake(s)
    assert (s.landing_dir / "benign" / "a.png").exists()
    assert store.upgrade(migrated_url, "0003") == "0003"
    store.upgrade(migrated_url)
    store.dispose_engine(migrated_url)
    assert intake(s).accepted == 1


def test_a_group_folder_whose_displayed_name_is_long_still_fits(home, png_writer):
    """255 bytes that are not UTF-8 display as 1020 characters; the group id column holds 255."""
    for name, seed in ((b"\xff" * 255, 1), (b"\xfe" * 255, 2)):
        png_writer(
            Path(os.fsdecode(_bytes_path(home.landing_dir / "benign" / os.fsdecode(name), b"a.png"))),
            seed=seed,
        )
    r = intake(home, run_id="groups")
    assert r.accepted == 2 and r.failed == []
    with session_scope(home.database_url) as s:
        groups = s.scalars(select(ImageRecord.group_id)).all()
    assert len(set(groups)) == 2 and all(len(g) <= 255 for g in groups)


# -- a file swapped while intake works on it ---------------------------------------------------------
def _swap(path: Path, how: str, png_writer, seed: int) -> bytes:
    """Put other content at ``path`` the way a scanner does: a new file renamed over it (``replace``) or
    the same file rewritten in place (``rewrite``). Returns the new bytes."""
    was = path.stat()
    if how == "replace":
        tmp = path.with_name(".incoming.png")  # hidden: intake leaves it alone
        png_writer(tmp, seed=seed, size=56)
        os.replace(tmp, path)
    elif how == "rewrite-with-its-size-and-times":  # rsync --inplace -t: only the change time tells
        png_writer(path, seed=seed)
        assert path.stat().st_size == was.st_size
        os.utime(path, ns=(was.st_atime_ns, was.st_mtime_ns))
    else:
        png_writer(path, seed=seed, size=56)  # another size: the same inode, another size and mtime
    return path.read_bytes()


@pytest.mark.parametrize("how", ["replace", "rewrite", "rewrite-with-its-size-and-times"])
def test_a_file_swapped_after_it_was_stored_is_left_in_landing(home, png_writer, how):
    """X is stored and committed; before X is removed from landing, the path holds Y. Y is never deleted:
    it stays in landing (``changed``) and the next run takes it in."""
    x = png_writer(home.landing_dir / "benign" / "x.png", seed=1)
    x_sha = files.sha256_file(x)
    swapped: list[bytes] = []

    def swap(shown: str) -> None:
        swapped.append(_swap(home.landing_dir / shown, how, png_writer, seed=2))

    r = intake(home, run_id="swap", on_committed=swap)
    assert x.read_bytes() == swapped[0]  # Y is still there
    assert (r.accepted, r.changed, r.failed) == (1, 1, [])
    with session_scope(home.database_url) as s:
        assert s.scalars(select(ImageRecord.sha256)).all() == [x_sha]
    again = intake(home, run_id="after-swap")
    assert (again.accepted, again.changed) == (1, 0) and not x.exists()
    with session_scope(home.database_url) as s:
        stored = {Path(p).read_bytes() for p in s.scalars(select(ImageRecord.stored_path))}
    assert swapped[0] in stored and len(stored) == 2


def test_a_hard_linked_file_rewritten_in_place_after_it_was_stored_is_left_in_landing(
    home, png_writer, tmp_path
):
    """As above, ``rsync --inplace -t`` on a file with another name (a hard link outside landing, a scanner's
    own copy): its change time says nothing (moving that other name changes it too), so the bytes are
    hashed again before the landing name goes. The new content stays in landing and is taken in next."""
    x = png_writer(home.landing_dir / "benign" / "x.png", seed=1)
    os.link(x, tmp_path / "scanner-copy.png")
    swapped: list[bytes] = []

    def swap(shown: str) -> None:
        swapped.append(_swap(home.landing_dir / shown, "rewrite-with-its-size-and-times", png_writer, seed=2))

    r = intake(home, run_id="swap", on_committed=swap)
    assert (r.accepted, r.changed, r.failed) == (1, 1, []) and x.read_bytes() == swapped[0]
    again = intake(home, run_id="after-swap")
    assert (again.accepted, again.changed) == (1, 0) and not x.exists()
    with session_scope(home.database_url) as s:
        stored = {Path(p).read_bytes() for p in s.scalars(select(ImageRecord.stored_path))}
    assert swapped[0] in stored and len(stored) == 2


@pytest.mark.parametrize("how", ["replace", "rewrite"])
def test_a_rejected_file_swapped_before_its_move_is_not_quarantined_under_its_reason(home, png_writer, how):
    """X is rejected and the rejection committed; before X moves, the path holds a good image Y. Y is not
    quarantined under X's reason and sha: it stays in landing (``changed``), X's row says why it did not
    move, and the next run takes Y in."""
    bad = home.landing_dir / "benign" / "x.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    swapped: list[bytes] = []

    def swap(shown: str) -> None:
        swapped.append(_swap(home.landing_dir / shown, how, png_writer, seed=3))

    r = intake(home, run_id="swap", on_committed=swap)
    assert bad.read_bytes() == swapped[0] and _all_files(home.quarantine_dir) == []
    assert (r.rejected, r.changed, r.failed) == (1, 1, [])
    with session_scope(home.database_url) as s:
        row = s.scalars(select(Rejection)).one()
        assert row.moved_to is None and row.dest is None and "replaced by other content" in row.move_error
    again = intake(home, run_id="after-swap")
    assert (again.accepted, again.rejected, again.failed) == (1, 0, []) and not bad.exists()


@pytest.mark.parametrize("swap_in", ["symlink", "fifo"])
def test_a_link_or_fifo_swapped_in_after_the_checks_is_never_followed_or_read(
    home, png_writer, tmp_path, monkeypatch, swap_in
):
    """Between intake's checks (``lstat``, settle time) and its read, the path becomes a link to an image
    elsewhere or a FIFO. The link is rejected as a link (the image it points to is never taken in as
    training data), the FIFO is left alone; intake never blocks."""
    import threading

    from bcc_pipeline import images

    outside = png_writer(tmp_path / "elsewhere" / "secret.png", seed=9)
    target = png_writer(home.landing_dir / "benign" / "x.png", seed=1)
    real_max_file_bytes = images.max_file_bytes

    def swap_then_size_limit(max_pixels):  # intake's size check: after the lstat, before the read
        if not os.path.islink(target) and os.path.isfile(target):
            target.unlink()
            if swap_in == "symlink":
                target.symlink_to(outside)
            else:
                os.mkfifo(target)
        return real_max_file_bytes(max_pixels)

    monkeypatch.setattr(images, "max_file_bytes", swap_then_size_limit)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(intake(home, run_id="swap-in")), daemon=True)
    worker.start()
    worker.join(120)
    assert done, "intake blocked on the swapped-in file"
    r = done[0]
    with session_scope(home.database_url) as s:
        assert s.scalars(select(ImageRecord)).all() == []  # nothing from outside landing/
    assert outside.exists()
    if swap_in == "symlink":
        assert r.rejected == 1 and "symbolic link" in r.rejections[0]["reason"]
        moved = home.quarantine_dir / "swap-in" / "landing" / "benign" / "x.png"
        assert moved.is_symlink() and not os.path.lexists(target)
    else:
        assert (r.accepted, r.rejected, r.ignored) == (0, 0, 1) and os.path.lexists(target)


# -- settle time, long paths, moves that keep failing -------------------------------------------------
def test_a_future_mtime_is_taken_in_with_a_clock_skew_warning(
    make_settings, migrated_url, png_writer, caplog
):
    """A clock that is wrong somewhere must not leave a landing file there forever, even with no settle
    time; within the settle time of now (either side) a file is still being written."""
    import time

    s = make_settings(migrated_url, settle_seconds=0)
    future = png_writer(s.landing_dir / "benign" / "future.png", seed=1)
    t = time.time() + 3600
    os.utime(future, (t, t))
    with caplog.at_level(logging.WARNING):
        r = intake(s, run_id="skew")
    assert (r.accepted, r.skipped) == (1, 0) and "clock skew" in caplog.text and not future.exists()

    patient = make_settings(migrated_url, settle_seconds=60)
    far = png_writer(patient.landing_dir / "benign" / "far.png", seed=2)
    soon = png_writer(patient.landing_dir / "benign" / "soon.png", seed=3)
    os.utime(far, (t, t))
    os.utime(soon, (time.time() + 30, time.time() + 30))
    r = intake(patient, run_id="skew-60")
    assert (r.accepted, r.skipped) == (1, 1) and not far.exists() and soon.exists()


def _path_of_length(base: Path, total: int, name: str) -> Path:
    """``base/<folders>/name`` of exactly ``total`` bytes (folders of at most 200 bytes)."""
    path = base
    while len(os.fsencode(path / name)) + 201 <= total:
        path = path / ("d" * 200)
    rest = total - len(os.fsencode(path / name)) - 1
    return (path / ("e" * rest) if rest > 0 else path) / name


def test_a_landing_path_too_long_under_quarantine_goes_under_a_hashed_folder(home):
    """A path that fits under landing/ but not under quarantine/<run>/landing/ (ENAMETOOLONG on every
    run) is quarantined under a hashed folder, with its reason file."""
    bad = _path_of_length(home.landing_dir / "benign", 4060, "bad.png")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image at all")
    run_id = "long-" + "r" * 100
    r = intake(home, run_id=run_id)
    assert (r.rejected, r.failed) == (1, [])
    with session_scope(home.database_url) as s:
        moved = Path(s.scalars(select(Rejection.moved_to)).one())
    root = home.quarantine_dir / run_id / "landing"
    assert moved.parent.parent == root and moved.parent.name.startswith("#") and moved.name == "bad.png"
    assert moved.read_bytes() == b"not an image at all" and files.reason_path(moved).is_file()
    assert _all_files(home.landing_dir) == []


def test_a_recorded_destination_longer_than_any_path_is_shortened_and_the_move_finished(home):
    """A rejection recorded (by an earlier version) with a destination no path can have: the next run
    records the shortened one and moves the file there, instead of failing on every run."""
    bad = _path_of_length(home.landing_dir / "benign", 4090, "bad.png")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image at all")
    rel = bad.relative_to(home.landing_dir)
    too_long = home.quarantine_dir / "old" / "landing" / rel
    assert len(os.fsencode(too_long)) >= 4096
    with session_scope(home.database_url) as s:
        s.add(
            Rejection(
                run_id="old",
                stage="intake",
                path=files.display_path(rel),
                sha256=None,
                reason="not an image",
                dest=files.display_path(too_long),
                move_error="cannot move: File name too long",
            )
        )
    r = intake(home, run_id="new")
    assert (r.recovered, r.rejected, r.failed) == (1, 0, [])
    with session_scope(home.database_url) as s:
        row = s.scalars(select(Rejection)).one()
    assert row.moved_to and Path(row.moved_to).parent.name.startswith("#") and row.move_error is None
    assert Path(row.moved_to).read_bytes() == b"not an image at all" and not os.path.lexists(bad)


def test_a_quarantine_move_that_fails_again_is_persistent_and_bcc_intake_exits_1(home, monkeypatch, capsys):
    """The first failed quarantine move is reported (``move_failed``; exit 0 with a warning); when the next
    run cannot move it either, ``persistent_move_failures`` names it and ``bcc intake`` exits 1."""
    from bcc_pipeline.cli import main

    (home.landing_dir / "benign").mkdir(parents=True)
    (home.landing_dir / "benign" / "bad.png").write_bytes(b"not an image at all")
    home.quarantine_dir.parent.mkdir(parents=True, exist_ok=True)
    home.quarantine_dir.write_text("a file where the quarantine folder should be")
    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert main(["intake"]) == 0
    first = capsys.readouterr()
    assert "1 could not be quarantined" in first.out and "warning" in first.err
    assert main(["intake"]) == 1
    second = capsys.readouterr()
    assert "more than one attempt" in second.err and "benign/bad.png" in second.err
    r = intake(home, run_id="third")
    assert r.move_failed == 1 and [f["path"] for f in r.persistent_move_failures] == ["benign/bad.png"]
    assert (home.landing_dir / "benign" / "bad.png").exists()


def test_a_damaged_store_copy_of_the_same_size_is_rewritten_not_trusted(home, png_writer):
    """The dataset store already holds a file at an image's content address, of the same size but other
    bytes (damaged, or replaced). Intake rewrites it from the landing file before removing that file:
    training reads the image's own bytes."""
    from bcc_pipeline.images import sha256_bytes

    src = png_writer(home.landing_dir / "benign" / "a.png", seed=3, size=40)
    data = src.read_bytes()
    sha = sha256_bytes(data)
    stored = home.dataset_dir / sha[:2] / f"{sha}.png"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(bytes(len(data)))  # same size, other bytes
    r = intake(home, run_id="i1")
    assert r.accepted == 1 and not src.exists()
    with session_scope(home.database_url) as s:
        (where,) = s.scalars(select(ImageRecord.stored_path)).all()
    assert Path(where).read_bytes() == data


def test_intake_sweeps_stale_temporaries(make_settings, sqlite_url):
    """A temporary an intake killed inside an atomic write left in the dataset store is removed by the
    next intake once stale; a fresh one (perhaps a live writer's) and other names are kept."""
    s = make_settings(sqlite_url)
    upgrade(sqlite_url)
    s.dataset_dir.mkdir(parents=True)
    stale = s.dataset_dir / f"{files.TEMP_PREFIX}abc123.png.tmp"
    fresh = s.dataset_dir / f"{files.TEMP_PREFIX}def456.png.tmp"
    other = s.dataset_dir / ".keep-me"
    for p in (stale, fresh, other):
        p.write_bytes(b"half of it")
    old = os.stat(stale).st_mtime - leftovers.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    # a file in landing/ is somebody's, whatever its name: never swept, however old
    theirs = s.landing_dir / "benign" / "patient_1" / f"{files.TEMP_PREFIX}scan-0001.png"
    spool = s.landing_dir / "benign" / f"{files.TEMP_PREFIX}scanner-spool" / "slide.png"
    for p in (theirs, spool):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"a scanner's file")
        os.utime(p, (old, old))
    os.utime(spool.parent, (old, old))
    intake(s)
    assert not stale.exists() and fresh.exists() and other.exists()
    assert theirs.read_bytes() == spool.read_bytes() == b"a scanner's file"


def test_a_second_file_rejected_at_the_same_path_in_a_rerun_of_the_same_run_keeps_both_records(home):
    """A retried Airflow task reuses its run id. When another rejected file has landed at a path that the
    run already quarantined, the first file's record (its reason, content hash and quarantined copy) is
    never overwritten: the new file stays in landing, reported, and the next run takes it."""
    bad = home.landing_dir / "benign" / "ward_1" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image at all")
    first = intake(home, run_id="retried")
    assert first.rejected == 1
    bad.write_bytes(b"\x89PNG\r\n\x1a\n then nothing that decodes")  # another file, the same name
    again = intake(home, run_id="retried")
    assert again.rejected == 0 and [f["path"] for f in again.failed] == ["benign/ward_1/bad.png"]
    assert "already" in again.failed[0]["error"] and bad.exists()
    with session_scope(home.database_url) as s:
        rows = s.scalars(select(Rejection)).all()
    assert len(rows) == 1 and Path(rows[0].moved_to).read_bytes() == b"not an image at all"
    later = intake(home, run_id="next-night")  # the next run quarantines it under its own record
    assert later.rejected == 1 and not bad.exists()
    with session_scope(home.database_url) as s:
        rows = {r.run_id: r for r in s.scalars(select(Rejection)).all()}
    assert Path(rows["retried"].moved_to).read_bytes() == b"not an image at all"
    assert Path(rows["next-night"].moved_to).read_bytes().startswith(b"\x89PNG")
    assert rows["retried"].sha256 != rows["next-night"].sha256


class _Killed(BaseException):
    """Stands for a SIGKILL right after a commit (raised from intake's on_committed hook)."""


def test_a_refused_file_replaced_before_its_interrupted_move_is_not_quarantined_under_its_reason(
    home, png_writer
):
    """A link is refused without its bytes being read (no content hash). Interrupted after the commit, then
    replaced by a good image: the next run's sweep compares the recorded identity, leaves the image in
    landing and takes it in, instead of quarantining it as a "symbolic link"."""
    link = home.landing_dir / "benign" / "ward_2" / "scan.png"
    link.parent.mkdir(parents=True)
    os.symlink("/etc/hostname", link)

    def killed(shown):
        raise _Killed(shown)

    with pytest.raises(_Killed):
        intake(home, run_id="killed", on_committed=killed)
    with session_scope(home.database_url) as s:
        row = s.scalars(select(Rejection)).one()
    assert row.sha256 is None and row.src_identity and row.moved_to is None
    link.unlink()
    png_writer(link, seed=4)
    r = intake(home, run_id="after")
    assert (r.accepted, r.rejected, r.recovered, r.failed) == (1, 0, 0, [])
    with session_scope(home.database_url) as s:
        row = s.scalars(select(Rejection)).one()
        records = s.scalars(select(ImageRecord)).all()
    assert row.moved_to is None and row.dest is None and row.move_error
    assert [x.source_path for x in records] == ["benign/ward_2/scan.png"]
    assert _all_files(home.landing_dir) == []
    assert not [p for p in _all_files(home.quarantine_dir) if "scan.png" in p]
    # the refused link itself, interrupted the same way, is still quarantined by the next run
    os.symlink("/etc/hostname", home.landing_dir / "benign" / "other.png")
    with pytest.raises(_Killed):
        intake(home, run_id="killed-2", on_committed=killed)
    r = intake(home, run_id="after-2")
    assert (r.recovered, r.rejected) == (1, 0)
    assert (home.quarantine_dir / "killed-2" / "landing" / "benign" / "other.png").is_symlink()


def test_migration_0008_keeps_older_rejections_and_an_old_schema_is_named(home, migrated_url):
    """A rejection committed before migration 0008 (no identity) is still finished by the sweep after the
    upgrade; a database still at 0007 is refused with the command that fixes it."""
    from bcc_pipeline import store
    from bcc_pipeline.errors import StoreError

    assert store.downgrade(migrated_url, "0007") == "0007"
    bad = home.landing_dir / "malignant" / "old.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"refused before the upgrade")
    with pytest.raises(StoreError, match="0008.*bcc db upgrade"):
        intake(home, run_id="refused")
    from bcc_pipeline.scoring import db as scoring_db

    with pytest.raises(StoreError, match="0008.*bcc db upgrade"):  # scoring writes the ledger's identity
        scoring_db.require_schema(migrated_url)
    dest = home.quarantine_dir / "old-run" / "landing" / "malignant" / "old.png"
    with store.get_engine(migrated_url).begin() as conn:  # what an interrupted 0007-era run left
        conn.execute(
            Rejection.__table__.insert().values(
                run_id="old-run",
                stage="intake",
                path="malignant/old.png",
                reason="not an image",
                dest=str(dest),
                rejected_at=store.utcnow(),
            )
        )
    assert store.upgrade(migrated_url) == "0009"
    store.dispose_engine(migrated_url)
    r = intake(home, run_id="after-upgrade")
    assert (r.recovered, r.rejected, r.failed) == (1, 0, [])
    assert dest.read_bytes() == b"refused before the upgrade" and _all_files(home.landing_dir) == []


def test_a_patient_folder_swapped_for_a_link_during_the_walk_is_never_read_through(
    home, png_writer, tmp_path
):
    """A folder replaced by a link to somebody else's folder while intake walks it: their file is not
    read, not taken in as a training image and not deleted."""
    p1 = home.landing_dir / "benign" / "patient_1"
    png_writer(p1 / "a.png", seed=1)
    png_writer(p1 / "b.png", seed=2)
    outside = tmp_path / "not-ours"
    theirs = png_writer(outside / "b.png", seed=3)

    def swap(shown):
        if shown.endswith("a.png"):
            os.rename(p1, tmp_path / "patient_1-away")
            os.symlink(outside, p1)

    r = intake(home, run_id="walk", on_committed=swap)
    assert r.accepted == 1 and theirs.exists() and os.listdir(outside) == ["b.png"]
    with session_scope(home.database_url) as s:
        assert [x.source_path for x in s.scalars(select(ImageRecord))] == ["benign/patient_1/a.png"]


def test_a_retry_never_quarantines_through_a_folder_link_it_quarantined(home, tmp_path):
    """A patient folder that was a link is quarantined as a link; the retried run (same run id) finds a
    real folder there with a bad file: its quarantine path would lead through the quarantined link, into
    the link's target. It stays in landing instead, reported, and when that happens again the run turns
    red naming it (a person has to look); nothing ever reaches the link's target."""
    victim = tmp_path / "victim"
    victim.mkdir()
    ward = home.landing_dir / "benign" / "ward_1"
    ward.parent.mkdir(parents=True)
    os.symlink(victim, ward)
    assert intake(home, run_id="retried").rejected == 1
    assert (home.quarantine_dir / "retried" / "landing" / "benign" / "ward_1").is_symlink()
    ward.mkdir()
    (ward / "y.png").write_bytes(b"not an image")
    again = intake(home, run_id="retried")
    assert os.listdir(victim) == [] and (ward / "y.png").exists()
    assert [f["path"] for f in again.failed] == ["benign/ward_1/y.png"]
    later = intake(home, run_id="next")
    assert os.listdir(victim) == [] and (ward / "y.png").exists()
    assert [f["path"] for f in later.persistent_move_failures] == ["benign/ward_1/y.png"]
    assert "symbolic link" in later.persistent_move_failures[0]["error"]


def test_a_landing_folder_named_like_a_reason_file_never_blocks_a_quarantine(home):
    bad = home.landing_dir / "benign" / "x.png"
    (home.landing_dir / "benign" / "x.png.reason.txt").mkdir(parents=True)
    bad.write_bytes(b"not an image")
    (bad.parent / "x.png.reason.txt" / "y.png").write_bytes(b"not an image either")
    r = intake(home, run_id="reasons")
    assert (r.rejected, r.failed) == (2, []) and _all_files(home.landing_dir) == []
    q = home.quarantine_dir / "reasons" / "landing" / "benign"
    assert files.reason_path(q / "x.png").is_file()
    assert (q / "x.png.reason.txt.d" / "y.png").read_bytes() == b"not an image either"


def test_a_run_id_like_a_temporary_never_gets_quarantined_files_swept(home):
    """A run id starting with ``.bcc-tmp-`` (or any dot) gets a visible folder: the stale-temporary sweep
    of a later run never deletes a quarantined file or its reason. A hidden link in landing is ignored
    (as scoring does), so no reason file named like a temporary is ever written."""
    bad = home.landing_dir / "benign" / "p1" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")
    os.symlink("/etc/hostname", bad.parent / f"{files.TEMP_PREFIX}scan.png")
    r = intake(home, run_id=f"{files.TEMP_PREFIX}nightly")
    assert (r.rejected, r.ignored) == (1, 1)
    assert not files.safe_dirname(f"{files.TEMP_PREFIX}nightly").startswith(".")
    assert all(not files.safe_dirname(x).startswith(".") for x in (".", "..", ".x", "..."))
    kept = _all_files(home.quarantine_dir)
    assert len(kept) == 2  # the file and its reason
    old = os.stat(kept[0]).st_mtime - 2 * leftovers.STALE_TEMP_SECONDS
    for p in [*home.quarantine_dir.rglob("*"), home.quarantine_dir]:
        os.utime(p, (old, old), follow_symlinks=False)
    intake(home, run_id="next")
    assert _all_files(home.quarantine_dir) == kept


def test_a_scoring_run_committing_the_same_content_mid_intake_does_not_stop_intake(
    home, png_writer, register_champion, monkeypatch
):
    """Intake reads a file's images row, then a scoring run commits a row for the same content before
    intake inserts its own: intake decides again with that row (the image gets its label) and goes on
    with the next file, instead of the whole run dying on a unique violation."""
    import shutil
    import threading

    import bcc_pipeline.intake as intake_module
    from bcc_pipeline import scoring

    register_champion(home)
    for i, name in enumerate("abc"):
        png_writer(home.landing_dir / "benign" / "p1" / f"{name}.png", seed=i + 1)
    home.inbox_dir.mkdir(parents=True)
    shutil.copy(home.landing_dir / "benign" / "p1" / "b.png", home.inbox_dir / "b.png")
    real, calls = intake_module.perceptual_hash, []

    def phash_while_scoring_commits(rgb):
        calls.append(1)
        if len(calls) == 2:  # intake is at b.png: looked up (no row yet), not inserted
            t = threading.Thread(target=lambda: scoring.score_inbox(home, run_id="s1"))
            t.start()
            t.join()
        return real(rgb)

    monkeypatch.setattr(intake_module, "perceptual_hash", phash_while_scoring_commits)
    r = intake(home, run_id="i1")
    assert (r.accepted, r.failed) == (3, []) and _all_files(home.landing_dir) == []
    with session_scope(home.database_url) as s:
        rows = s.scalars(select(ImageRecord)).all()
    assert len(rows) == 3 and all(x.label == "benign" and x.stored_path for x in rows)


def test_an_interrupted_quarantine_move_is_recorded_where_the_file_really_went(home, monkeypatch):
    """As in scoring: two rejected files whose quarantine names meet (the second goes to ``a~1.png``), the
    process killed after the second move and before its reason and record; the next run records it at
    ``a~1.png`` with its own reason, not at the first file's place."""
    import bcc_pipeline.intake_moves as moves_module

    base = home.landing_dir / "benign" / "p1"
    (base / "x.png.reason.txt").mkdir(parents=True)
    (base / "x.png.reason.txt.d").mkdir()
    (base / "x.png.reason.txt" / "a.png").write_bytes(b"")
    (base / "x.png.reason.txt.d" / "a.png").write_bytes(b"GIF89a broken")
    real, calls = moves_module._write_reason, []

    def reason_then_die_on_the_second(path, reason):
        calls.append(path)
        if len(calls) == 2:
            raise _Killed(path)
        return real(path, reason)

    monkeypatch.setattr(moves_module, "_write_reason", reason_then_die_on_the_second)
    with pytest.raises(_Killed):
        intake(home, run_id="i1")
    monkeypatch.setattr(moves_module, "_write_reason", real)
    r = intake(home, run_id="i2")
    assert r.recovered == 1 and _all_files(home.landing_dir) == []
    with session_scope(home.database_url) as s:
        rows = s.scalars(select(Rejection)).all()
    assert len(rows) == 2 and len({x.moved_to for x in rows}) == 2
    for x in rows:
        where = Path(files.path_from_display(x.moved_to))
        assert where.read_bytes() == (b"" if "x.png.reason.txt/" in x.path else b"GIF89a broken")
        assert files.reason_path(where).read_text().strip() == x.reason


def test_two_landing_links_with_equal_times_are_each_recorded_where_they_went(home, monkeypatch):
    """As in scoring: two links refused unread, the same size and mtime, meeting at one quarantine name;
    killed after the second move and before its record, the next run finds each by its inode."""
    import bcc_pipeline.intake_moves as moves_module

    base = home.landing_dir / "benign"
    for d, target in (("r.reason.txt", "/nowhere/target-1"), ("r.reason.txt.d", "/nowhere/target-2")):
        (base / d).mkdir(parents=True)
        os.symlink(target, base / d / "a.png")
        os.utime(base / d / "a.png", ns=(1_700_000_000 * 10**9,) * 2, follow_symlinks=False)
    real = _move_then_die(moves_module, monkeypatch, 2)
    with pytest.raises(_Killed):
        intake(home, run_id="in1")
    monkeypatch.setattr(moves_module, "move_no_clobber", real)
    assert intake(home, run_id="in2").recovered == 1
    with session_scope(home.database_url) as s:
        rows = {x.path: x.moved_to for x in s.scalars(select(Rejection))}
    targets = {p: os.readlink(files.path_from_display(m)) for p, m in rows.items()}
    assert targets == {
        "benign/r.reason.txt/a.png": "/nowhere/target-1",
        "benign/r.reason.txt.d/a.png": "/nowhere/target-2",
    }


def test_an_image_another_intake_labels_meanwhile_is_a_conflict_not_relabelled(
    home, png_writer, register_champion, monkeypatch
):
    """Content known from scoring (no label) is taken in as benign while another intake commits it as
    malignant: the label is set only while the row is still unlabelled, so this run sees the other label,
    records the conflict and excludes the content, instead of overwriting one label with the other."""
    from sqlalchemy import update

    import bcc_pipeline.intake as intake_module
    from bcc_pipeline import scoring
    from bcc_pipeline.store import get_engine

    register_champion(home)
    seen = png_writer(home.inbox_dir / "seen.png", seed=3)
    data = seen.read_bytes()
    scoring.score_inbox(home, run_id="s1")
    (home.landing_dir / "benign").mkdir(parents=True)
    (home.landing_dir / "benign" / "x.png").write_bytes(data)
    real = intake_module.perceptual_hash

    def another_intake_commits_malignant(rgb):
        t = ImageRecord.__table__
        with get_engine(home.database_url).begin() as conn:
            conn.execute(update(t).where(t.c.label.is_(None)).values(label="malignant", source_path="y.png"))
        return real(rgb)

    monkeypatch.setattr(intake_module, "perceptual_hash", another_intake_commits_malignant)
    r = intake(home, run_id="i1")
    assert (r.accepted, r.conflicts, r.rejected) == (0, 1, 1)
    with session_scope(home.database_url) as s:
        row = s.scalars(select(ImageRecord)).one()
    assert row.label == "malignant" and "both malignant and benign" in row.excluded_reason


def test_a_rejected_file_taken_by_another_run_before_its_move_is_not_a_failed_move(home):
    """Another intake run (or a person) takes the rejected file away between this run's commit and its
    move: recorded as gone, not reported as a failed quarantine move."""
    bad = home.landing_dir / "benign" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")

    def taken(shown):
        bad.unlink()

    r = intake(home, run_id="i1", on_committed=taken)
    assert (r.rejected, r.move_failed, r.failed) == (1, 0, [])
    with session_scope(home.database_url) as s:
        row = s.scalars(select(Rejection)).one()
    assert row.moved_to is None and row.move_error == "left landing/ before it was moved"
    assert intake(home, run_id="i2").failed == []


def _a_name_each(home, n: int) -> None:
    """Every rejection is recorded at its own quarantined copy, with its reason; nothing else is quarantined."""
    with session_scope(home.database_url) as s:
        rows = s.scalars(select(Rejection)).all()
    places = sorted(x.moved_to for x in rows)
    assert len(rows) == n and len(set(places)) == n
    for x in rows:
        assert files.reason_path(Path(files.path_from_display(x.moved_to))).read_text().strip() == x.reason
    copies = [p for p in home.quarantine_dir.rglob("*") if p.is_file() and not p.name.endswith(".reason.txt")]
    assert sorted(map(str, copies)) == sorted(files.path_from_display(m) for m in places)


def test_a_255_byte_landing_folder_named_like_a_reason_file_is_quarantined_under_a_shortened_name(home):
    """As in scoring: no room for ``.d`` after a 255-byte folder name ending in ``.reason.txt``; the bad
    file in it is quarantined at once under a shortened folder name, not left failing to move."""
    folder = home.landing_dir / "benign" / ("r" * (255 - len(".reason.txt")) + ".reason.txt")
    folder.mkdir(parents=True)
    (folder / "bad.png").write_bytes(b"not an image")
    r = intake(home, run_id="i1")
    assert (r.rejected, r.failed) == (1, []) and _all_files(home.landing_dir) == []
    _a_name_each(home, 1)
    (copy,) = list(home.quarantine_dir.rglob("bad.png"))
    assert copy.parent.name.endswith(".d") and len(os.fsencode(copy.parent.name)) <= 255


def test_two_hard_links_whose_quarantine_names_meet_keep_a_name_each(home):
    """As in scoring: two landing names of one inode, refused, meeting at one quarantine name; the second
    is not taken for an interrupted attempt of its own move: each rejection has its own name."""
    base = home.landing_dir / "benign"
    for d in ("r.reason.txt", "r.reason.txt.d"):
        (base / d).mkdir(parents=True)
    (base / "r.reason.txt" / "a.png").write_bytes(b"not an image")
    os.link(base / "r.reason.txt" / "a.png", base / "r.reason.txt.d" / "a.png")
    r = intake(home, run_id="i1")
    assert r.rejected == 2 and _all_files(home.landing_dir) == []
    _a_name_each(home, 2)


def test_identical_files_copied_across_filesystems_and_killed_keep_a_name_each(home, monkeypatch, other_fs):
    """``landing/`` on another filesystem; two refused files with the same bytes and times meet at one
    quarantine name; killed after the second move, before its record. The next run records it at the
    ``~1`` copy it made, not at the first file's (recorded) name."""
    import bcc_pipeline.intake_moves as moves_module

    _landing_on(home, other_fs)
    base = home.landing_dir / "benign"
    for d in ("r.reason.txt", "r.reason.txt.d"):
        (base / d).mkdir(parents=True)
        (base / d / "a.png").write_bytes(b"not an image")
        os.utime(base / d / "a.png", ns=(1_700_000_000 * 10**9,) * 2)
    real = _move_then_die(moves_module, monkeypatch, 2)
    with pytest.raises(_Killed):
        intake(home, run_id="i1")
    monkeypatch.setattr(moves_module, "move_no_clobber", real)
    assert intake(home, run_id="i2").recovered == 1
    assert _all_files(other_fs) == []
    _a_name_each(home, 2)


def _landing_on(home, folder: Path) -> None:
    """``landing/`` becomes a link to ``folder`` (on another filesystem, as a scanner mount)."""
    home.landing_dir.parent.mkdir(parents=True, exist_ok=True)
    if home.landing_dir.is_dir():
        home.landing_dir.rmdir()
    home.landing_dir.symlink_to(folder)


def _move_then_die(moves_module, monkeypatch, n: int = 1, **extra):
    """Intake's move, dying after the ``n``-th move (before it is recorded); ``extra`` goes to the move."""
    real, done = moves_module.move_no_clobber, {"moves": 0}

    def move(src, dest, **kw):
        where = real(src, dest, **kw, **extra)
        done["moves"] += 1
        if done["moves"] == n:
            raise _Killed(where)
        return where

    monkeypatch.setattr(moves_module, "move_no_clobber", move)
    return real


def _killed_before_unlink(home, moves_module, monkeypatch) -> None:
    """Intake run ``in1`` killed in the middle of its first quarantine move: the file at its destination,
    its landing name not removed yet."""

    def die(source, where):
        raise _Killed(where)

    real = _move_then_die(moves_module, monkeypatch, before_unlink=die)
    with pytest.raises(_Killed):
        intake(home, run_id="in1")
    monkeypatch.setattr(moves_module, "move_no_clobber", real)


def test_a_quarantine_move_unrecorded_when_killed_is_recorded_though_the_path_holds_a_new_file(
    home, monkeypatch
):
    """Killed after the quarantine move, before its record; then a scanner drops another file at the same
    landing path. The next run records where the first file went (it is not left as an unrecorded copy
    without a reason) and takes the new file in under its own row."""
    import bcc_pipeline.intake_moves as moves_module

    bad = home.landing_dir / "benign" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png at all, first file")
    real = _move_then_die(moves_module, monkeypatch)
    with pytest.raises(_Killed):
        intake(home, run_id="r1")
    monkeypatch.setattr(moves_module, "move_no_clobber", real)
    bad.write_bytes(b"second file, also not a png, different")
    r = intake(home, run_id="r2")
    assert (r.recovered, r.rejected) == (1, 1) and _all_files(home.landing_dir) == []
    with session_scope(home.database_url) as s:
        rows = {x.run_id: x for x in s.scalars(select(Rejection))}
    first = Path(files.path_from_display(rows["r1"].moved_to))
    assert first.read_bytes() == b"not a png at all, first file"
    assert files.reason_path(first).read_text().strip() == rows["r1"].reason
    assert Path(files.path_from_display(rows["r2"].moved_to)).read_bytes().startswith(b"second file")
    _a_name_each(home, 2)


def _killed_with_the_copy_published(
    home, monkeypatch, other_fs: Path | None, rel: str, link_to: str | None = None
) -> Path:
    """``landing/`` (on another filesystem, ``other_fs``, unless None) holding a refused ``rel`` (a link to
    ``link_to`` when given); intake run ``in1`` is killed with the file at its quarantine destination and
    the landing name not yet removed. Returns the landing file."""
    import bcc_pipeline.intake_moves as moves_module

    if other_fs is not None:
        _landing_on(home, other_fs)
    bad = (other_fs or home.landing_dir) / rel
    bad.parent.mkdir(parents=True)
    if link_to is None:
        bad.write_bytes(b"not an image, a text file")
    else:
        os.symlink(link_to, bad)

    _killed_before_unlink(home, moves_module, monkeypatch)
    return bad


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_two_refused_files_exchanged_in_the_middle_of_a_move_are_each_quarantined_once(
    home, monkeypatch, other_fs, fs
):
    """Two refused landing files in two folders swap names (``renameat2(RENAME_EXCHANGE)``) after the first
    is linked (or copied) into quarantine, before its landing name is removed. The move is undone (the
    quarantined copy would share the file with a landing name, and the next run would quarantine it
    again); the next run quarantines each file once, each copy a file of its own."""
    import bcc_pipeline.intake_moves as moves_module

    landing = other_fs if fs == "other-filesystem" else home.landing_dir
    if fs == "other-filesystem":
        _landing_on(home, other_fs)
    (landing / "benign").mkdir(parents=True)
    (landing / "malignant").mkdir(parents=True)
    x, y = landing / "benign" / "x.png", landing / "malignant" / "y.png"
    x.write_bytes(b"not an image, the first text file")
    y.write_bytes(b"not an image either, the second text file")
    contents = sorted([x.read_bytes(), y.read_bytes()])
    swapped = []

    def exchange_first(source, where):
        if not swapped:
            swapped.append(source)
            exchange(x, y)

    real = moves_module.move_no_clobber
    monkeypatch.setattr(
        moves_module,
        "move_no_clobber",
        lambda src, dest, **kw: real(src, dest, **kw, before_unlink=exchange_first),
    )
    r1 = intake(home, run_id="in1")
    monkeypatch.setattr(moves_module, "move_no_clobber", real)
    assert swapped and r1.changed >= 1

    def quarantined():
        return [
            p for p in home.quarantine_dir.rglob("*") if p.is_file() and not p.name.endswith(".reason.txt")
        ]

    assert all(os.lstat(p).st_nlink == 1 for p in quarantined())  # none shares a landing name
    r2 = intake(home, run_id="in2")
    assert r2.failed == [] and _all_files(landing) == []
    assert sorted(p.read_bytes() for p in quarantined()) == contents  # each file quarantined once
    with session_scope(home.database_url) as s:
        rows = [x for x in s.scalars(select(Rejection)) if x.moved_to]
    assert len(rows) == 2
    for row in rows:
        copy = Path(files.path_from_display(row.moved_to))
        assert files.reason_path(copy).read_text().strip() == row.reason


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_a_refused_file_renamed_within_landing_mid_move_is_quarantined_once(home, monkeypatch, other_fs, fs):
    """A refused file renamed to another landing folder after its quarantine copy (across filesystems) or
    link was made, before its landing name was removed. Before, across filesystems the copy was kept and
    recorded, and the file was refused again under its new name: two quarantined copies of one file. Now
    the copy is dropped and the file is quarantined once, from its new name."""
    import bcc_pipeline.intake_moves as moves_module

    landing = other_fs if fs == "other-filesystem" else home.landing_dir
    if fs == "other-filesystem":
        _landing_on(home, other_fs)
    bad = landing / "benign" / "p1" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image, a text file")
    renamed = landing / "malignant" / "q1" / "renamed.png"
    moved = []

    def rename_away(source, where):
        if not moved:
            renamed.parent.mkdir(parents=True)
            os.rename(bad, renamed)
            moved.append(renamed)

    real = moves_module.move_no_clobber
    monkeypatch.setattr(
        moves_module,
        "move_no_clobber",
        lambda src, dest, **kw: real(src, dest, **kw, before_unlink=rename_away),
    )
    intake(home, run_id="in1")
    monkeypatch.setattr(moves_module, "move_no_clobber", real)
    assert moved
    r2 = intake(home, run_id="in2")
    assert r2.failed == [] and _all_files(landing) == []
    copies = [p for p in home.quarantine_dir.rglob("*") if p.is_file() and not p.name.endswith(".reason.txt")]
    assert [p.read_bytes() for p in copies] == [b"not an image, a text file"]  # quarantined once
    with session_scope(home.database_url) as s:
        placed = [x.moved_to for x in s.scalars(select(Rejection)) if x.moved_to]
    assert [Path(files.path_from_display(m)) for m in placed] == copies


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_a_refused_file_killed_mid_move_then_exchanged_is_quarantined_once(home, monkeypatch, other_fs, fs):
    """Intake killed in the middle of a refused file's quarantine move; then that file swaps names with
    another refused landing file before the rerun. The interrupted move is not recorded at its link or
    copy while the file is still in landing under the other name (it would be quarantined twice): each
    file is quarantined once."""
    import bcc_pipeline.intake_moves as moves_module

    landing = other_fs if fs == "other-filesystem" else home.landing_dir
    if fs == "other-filesystem":
        _landing_on(home, other_fs)
    x, y = landing / "benign" / "p0" / "x.png", landing / "malignant" / "p1" / "y.png"
    for path, text in ((x, b"not an image, the first"), (y, b"not an image either, the second")):
        path.parent.mkdir(parents=True)
        path.write_bytes(text)
    contents = sorted([x.read_bytes(), y.read_bytes()])

    _killed_before_unlink(home, moves_module, monkeypatch)
    exchange(x, y)
    r = intake(home, run_id="in2")
    assert r.failed == [] and _all_files(landing) == []
    copies = [p for p in home.quarantine_dir.rglob("*") if p.is_file() and not p.name.endswith(".reason.txt")]
    assert sorted(p.read_bytes() for p in copies) == contents  # each file quarantined once
    assert all(os.lstat(p).st_nlink == 1 for p in copies)


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_two_refused_hard_links_killed_mid_move_are_each_quarantined_once(home, monkeypatch, other_fs, fs):
    """``x.png`` and ``y.png`` are one refused inode; intake is killed in the middle of the second one's
    move (the first moved, its landing name gone). The next run never takes the waiting link for the
    first file renamed (the same device and inode): each is quarantined once, under its own row."""
    import bcc_pipeline.intake_moves as moves_module

    landing = other_fs if fs == "other-filesystem" else home.landing_dir
    if fs == "other-filesystem":
        _landing_on(home, other_fs)
    (landing / "benign").mkdir(parents=True)
    (landing / "benign" / "x.png").write_bytes(b"not an image, a text file")
    os.link(landing / "benign" / "x.png", landing / "benign" / "y.png")
    calls = []

    def die_second(source, where):
        calls.append(where)
        if len(calls) == 2:
            raise _Killed(where)

    real = moves_module.move_no_clobber
    monkeypatch.setattr(
        moves_module,
        "move_no_clobber",
        lambda src, dest, **kw: real(src, dest, **kw, before_unlink=die_second),
    )
    with pytest.raises(_Killed):
        intake(home, run_id="in1")
    monkeypatch.setattr(moves_module, "move_no_clobber", real)
    assert len(_all_files(landing)) == 1
    r = intake(home, run_id="in2")
    assert r.failed == [] and _all_files(landing) == []
    _a_name_each(home, 2)
    with session_scope(home.database_url) as s:
        names = {x.path: Path(files.path_from_display(x.moved_to)).name for x in s.scalars(select(Rejection))}
    assert names == {"benign/x.png": "x.png", "benign/y.png": "y.png"}


def test_a_landing_link_killed_with_its_copy_published_then_touched_is_quarantined_once(
    home, monkeypatch, other_fs
):
    """As in scoring: a link in ``landing/`` on another filesystem, intake killed with its quarantine copy
    published, then the link touched (``touch -h``): still the same link (its target cannot change in
    place), so the move is finished with that copy: one rejection, one quarantined link."""
    link = _killed_with_the_copy_published(home, monkeypatch, other_fs, "benign/link.png", "/nowhere/target")
    os.utime(link, ns=(1_800_000_000 * 10**9,) * 2, follow_symlinks=False)
    for run in ("in2", "in3"):
        assert intake(home, run_id=run).rejected == 0
    assert not os.path.lexists(link)
    with session_scope(home.database_url) as s:
        rows = s.scalars(select(Rejection)).all()
    assert len(rows) == 1 and rows[0].moved_to
    copies = [p for p in home.quarantine_dir.rglob("*") if p.is_symlink()]
    assert [str(p) for p in copies] == [files.path_from_display(rows[0].moved_to)]


@pytest.mark.parametrize("how", ["touched", "copied-again"])
def test_a_quarantine_copy_across_filesystems_killed_then_the_file_touched_is_finished_once(
    home, monkeypatch, other_fs, how
):
    """``landing/`` on another filesystem; intake killed with the quarantine copy published and the landing
    name not yet removed; then the file is touched, or copied again (another inode, as a sync tool
    re-creates it). The next run finishes that move with the published copy: one quarantined copy,
    recorded once, no temporary name left (as scoring does)."""
    bad = _killed_with_the_copy_published(home, monkeypatch, other_fs, "benign/bad.png")
    if how == "touched":
        os.utime(bad, ns=(1_800_000_000 * 10**9,) * 2)
    else:
        data = bad.read_bytes()
        bad.unlink()
        bad.write_bytes(data)
    r = intake(home, run_id="in2")
    assert (r.recovered, r.rejected) == (1, 0) and _all_files(other_fs) == []
    _a_name_each(home, 1)
    assert not [p for p in home.quarantine_dir.rglob(".bcc-move-*")]


@pytest.mark.parametrize("fs", ["same-filesystem", "other-filesystem"])
def test_a_quarantine_move_killed_then_its_folder_renamed_is_finished_once(home, monkeypatch, other_fs, fs):
    """Intake killed with the file at its quarantine destination (hard-linked, or, ``landing/`` on another
    filesystem, its copy published) and the landing name not yet removed; then the file's folder is
    renamed and the file touched. The next run finds the file under its new name and finishes that move: one rejection, one
    quarantined copy, not the file refused again."""
    landing = other_fs if fs == "other-filesystem" else None
    bad = _killed_with_the_copy_published(home, monkeypatch, landing, "benign/batch1/bad.png")
    bad.parent.rename(bad.parent.with_name("batch1-renamed"))
    os.utime(bad.parent.with_name("batch1-renamed") / bad.name, ns=(1_800_000_000 * 10**9,) * 2)  # touched
    r = intake(home, run_id="in2")
    assert (r.recovered, r.rejected) == (1, 0) and _all_files(landing or home.landing_dir) == []
    _a_name_each(home, 1)
    assert not [p for p in home.quarantine_dir.rglob(".bcc-move-*")]


def test_two_intake_runs_interleaved_record_a_rejected_file_once(home, monkeypatch):
    """Intake run B runs whole after run A has read ``bad.png`` and before A commits it: B quarantines it.
    A then finds it moved by B and withdraws its own rejection: one rejection, at one place."""
    import bcc_pipeline.intake as intake_module

    bad = home.landing_dir / "benign" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image at all")
    real, done = intake_module.read_landing_file, []

    def read_then_let_b_run(settings, path, rel, report, now_ts):
        out = real(settings, path, rel, report, now_ts)
        if report.run_id == "A" and not done:
            done.append(intake(home, run_id="B"))
        return out

    monkeypatch.setattr(intake_module, "read_landing_file", read_then_let_b_run)
    a = intake(home, run_id="A")
    assert (a.rejected, done[0].rejected) == (0, 1) and _all_files(home.landing_dir) == []
    _a_name_each(home, 1)


def test_a_rejection_another_run_moved_for_this_one_keeps_its_record(home):
    """Intake run A runs between run B's commit and B's move, and finishes B's committed quarantine move as
    an interrupted one (recording it on B's row). B's own move then finds the file gone and keeps that
    record, instead of marking it as having left landing/."""
    bad = home.landing_dir / "benign" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image at all")
    done = []

    def let_a_run(shown):
        if not done:
            done.append(intake(home, run_id="A"))

    intake(home, run_id="B", on_committed=let_a_run)
    with session_scope(home.database_url) as s:
        row = s.scalars(select(Rejection)).one()
    assert row.run_id == "B" and row.move_error is None and row.dest is not None
    assert Path(files.path_from_display(row.moved_to)).read_bytes() == b"not an image at all"


def test_a_quarantine_copy_whose_time_the_other_filesystem_changed_is_recorded_where_it_went(
    home, monkeypatch, other_fs
):
    """``landing/`` on another filesystem; intake killed after a quarantine move, before its record. The
    quarantine's filesystem kept another modification time than the landing file's (ext4 clamps a time
    past 2446 or before 1901; a coarser filesystem rounds it). The next run still records the move where
    the copy is, with its reason (by size and content hash), instead of calling the file gone and leaving
    its copy unrecorded."""
    import bcc_pipeline.intake_moves as moves_module

    _landing_on(home, other_fs)
    bad = other_fs / "benign" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image, a text file")
    os.utime(bad, ns=(10**20,) * 2)  # the year 5138: tmpfs keeps it
    real = _move_then_die(moves_module, monkeypatch)
    with pytest.raises(_Killed):
        intake(home, run_id="in1")
    monkeypatch.setattr(moves_module, "move_no_clobber", real)
    (copy,) = [p for p in home.quarantine_dir.rglob("bad.png")]
    os.utime(copy, ns=(15_032_385_535 * 10**9,) * 2)  # what ext4 makes of it
    r = intake(home, run_id="in2")
    assert r.recovered == 1 and _all_files(other_fs) == []
    _a_name_each(home, 1)


def test_one_folder_bind_mounted_under_both_labels_is_not_taken_in(home, png_writer):
    """``malignant/p1`` bind-mounted at ``benign/p1``: one folder under two labels. Its images' label cannot
    be told (the label walked first would win: malignant images stored as benign, no conflict recorded), so
    neither path is taken in: both are reported and the images stay in ``landing/``."""
    from tests.support import bind_mounted

    src = home.landing_dir / "malignant" / "p1"
    for i in range(2):
        png_writer(src / f"m{i}.png", seed=i)
    png_writer(home.landing_dir / "benign" / "p2" / "b.png", seed=9)
    with bind_mounted(src, home.landing_dir / "benign" / "p1"):
        r = intake(home, run_id="in1")
        assert r.accepted == 1  # benign/p2/b.png
        failed = {f["path"]: f["error"] for f in r.failed}
        assert set(failed) == {"benign/p1", "malignant/p1"}
        assert all("which label its images have cannot be told" in e for e in failed.values())
    assert sorted(p.name for p in src.iterdir()) == ["m0.png", "m1.png"]
    with session_scope(home.database_url) as s:
        assert [x.label for x in s.scalars(select(ImageRecord))] == ["benign"]


def test_a_folder_bind_mounted_under_the_other_label_while_intake_runs_is_not_taken_in(home, png_writer):
    """``malignant/p1`` bind-mounted at ``benign/p1`` in the middle of a run, after the folders were judged
    (right after ``benign/a.png`` was committed; the walk lists ``benign/p1`` after that). Before, its
    malignant images were stored as benign and removed from ``landing/``. Now the mount table's change is
    seen once a file is read, the folders are judged again, and neither path is taken in; after the mount
    is gone the next run takes them in as malignant."""
    import contextlib

    from tests.support import bind_mounted

    src = home.landing_dir / "malignant" / "p1"
    for i in range(2):
        png_writer(src / f"m{i}.png", seed=i)
    png_writer(home.landing_dir / "benign" / "a.png", seed=9)
    (home.landing_dir / "benign" / "p1").mkdir()
    mounted = []
    with contextlib.ExitStack() as stack:

        def mount_after_the_first(shown):
            if not mounted:
                mounted.append(stack.enter_context(bind_mounted(src, home.landing_dir / "benign" / "p1")))

        r = intake(home, run_id="in1", on_committed=mount_after_the_first)
        assert mounted and r.accepted == 1  # benign/a.png
        assert {f["path"] for f in r.unreachable} == {"benign/p1", "malignant/p1"}
    assert sorted(p.name for p in src.iterdir()) == ["m0.png", "m1.png"]
    with session_scope(home.database_url) as s:
        assert [x.label for x in s.scalars(select(ImageRecord))] == ["benign"]
    r2 = intake(home, run_id="in2")
    assert r2.accepted == 2 and r2.unreachable == []
    with session_scope(home.database_url) as s:
        assert sorted(x.label for x in s.scalars(select(ImageRecord))) == ["benign", "malignant", "malignant"]


def test_a_bind_mounted_twin_whose_other_path_is_covered_is_not_taken_in(home, png_writer, tmp_path):
    """``malignant/p1`` bind-mounted at ``benign/p1``, then a tmpfs mounted over ``malignant/p1`` (or over
    deployment B's home, for B's folder bind-mounted at ``benign/scans``): the path the mount table shows
    the folder under is covered, so no path shows the twin, or B's home, any more. Before, the malignant
    images were stored as benign (and B's taken in here) and deleted from landing. Whose folder it is
    cannot be checked: neither is taken in, both are reported."""
    from tests.support import bind_mounted, tmpfs_mounted

    src = home.landing_dir / "malignant" / "p1"
    for i in range(3):
        png_writer(src / f"m{i}.png", seed=i)
    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p9" / "t.png", seed=7)
    benign = home.landing_dir / "benign"
    with (
        bind_mounted(src, benign / "p1"),
        bind_mounted(other.landing_dir / "malignant" / "p9", benign / "scans"),
        tmpfs_mounted(src),
        tmpfs_mounted(other.home),
    ):
        r = intake(home, run_id="in1")
        reasons = {u["path"]: u["error"] for u in r.unreachable}
    assert set(reasons) == {"benign/p1", "benign/scans"}
    assert all("another mount covers" in e for e in reasons.values())
    assert r.accepted == 0
    assert sorted(p.name for p in src.iterdir()) == ["m0.png", "m1.png", "m2.png"] and theirs.is_file()
    r2 = intake(home, run_id="in2")
    with session_scope(home.database_url) as s:
        assert sorted(x.label for x in s.scalars(select(ImageRecord))) == ["malignant"] * 3
    assert r2.unreachable == []


def test_a_file_read_through_a_mount_that_is_gone_again_is_read_again(home, png_writer, monkeypatch):
    """``malignant/p1`` bind-mounted over ``benign/p1`` for just the moment ``benign/p1/x.png`` is read, and
    unmounted right after: by the time anyone judges the folders they look fine. Before, the malignant
    bytes were stored as benign under ``benign/p1/x.png``. The mount table's count moved during the
    read, so the file is judged and read again: each file is stored once, under its own label."""
    import bcc_pipeline.intake_folders as intake_module
    from tests.support import bind_mounted

    malignant = png_writer(home.landing_dir / "malignant" / "p1" / "x.png", seed=1)
    benign = png_writer(home.landing_dir / "benign" / "p1" / "x.png", seed=2)
    contents = {"benign": benign.read_bytes(), "malignant": malignant.read_bytes()}
    real_read, done = intake_module.read_once, []

    def read_through_a_passing_mount(path, *args, **kwargs):
        if Path(path) == benign and not done:
            done.append(path)
            with bind_mounted(malignant.parent, benign.parent):
                return real_read(path, *args, **kwargs)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(intake_module, "read_once", read_through_a_passing_mount)
    r = intake(home, run_id="in1")
    assert done and r.accepted == 2 and r.conflicts == 0 and r.failed == []
    with session_scope(home.database_url) as s:
        rows = {x.label: Path(x.stored_path).read_bytes() for x in s.scalars(select(ImageRecord))}
    assert rows == contents


def test_nothing_is_written_through_a_mount_inside_the_store_or_quarantine(home, png_writer, tmp_path):
    """A folder mounted over ``dataset/<xx>`` (where a labelled image's copy goes) and over
    ``quarantine/<run>/landing/benign`` (where a refused file goes): nothing is written through either (it
    would land wherever the mount leads, and be gone from here once unmounted). Both files stay in landing,
    reported; once the mounts are gone the next run takes them in."""
    from bcc_pipeline.images import sha256_file
    from tests.support import bind_mounted

    good = png_writer(home.landing_dir / "benign" / "g.png", seed=1)
    bad = home.landing_dir / "benign" / "bad.png"
    bad.write_bytes(b"not an image at all")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with (
        bind_mounted(elsewhere, home.dataset_dir / sha256_file(good)[:2]),
        bind_mounted(elsewhere, home.quarantine_dir / "in1" / "landing" / "benign"),
    ):
        r = intake(home, run_id="in1")
    assert list(elsewhere.iterdir()) == []
    assert r.accepted == 0 and good.is_file() and bad.is_file()
    assert {f["path"] for f in r.failed} == {"benign/g.png", "benign/bad.png"}
    r2 = intake(home, run_id="in2")
    assert r2.accepted == 1 and _all_files(home.landing_dir) == []


@pytest.mark.parametrize("how", ["bind-mounted over it", "a link to it"])
def test_another_homes_landing_as_this_landing_is_not_taken_in(home, png_writer, tmp_path, how):
    """Deployment B's ``landing/`` bind-mounted over this home's ``landing/`` (or ``landing/`` set up as a
    link to it). Before, B's images were taken in here and removed from B. Now ``landing/`` itself is
    judged: nothing is taken in, the run is red naming it, and B's images stay where they are."""
    from tests.support import bind_mounted

    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "t.png", seed=1)
    png_writer(other.landing_dir / "benign" / "p2" / "u.png", seed=2)
    if how == "a link to it":
        home.landing_dir.parent.mkdir(parents=True, exist_ok=True)
        home.landing_dir.symlink_to(other.landing_dir)
        r = intake(home, run_id="in1")
    else:
        home.landing_dir.mkdir(parents=True, exist_ok=True)
        with bind_mounted(other.landing_dir, home.landing_dir):
            r = intake(home, run_id="in1")
    assert r.accepted == 0 and [u["path"] for u in r.unreachable] == ["."]
    assert "another deployment's" in r.unreachable[0]["error"] or "manages" in r.unreachable[0]["error"]
    assert theirs.is_file() and (other.landing_dir / "benign" / "p2" / "u.png").is_file()


def test_an_overlay_whose_layer_is_an_alias_of_another_homes_folder_is_not_taken_in(
    home, png_writer, tmp_path
):
    """An overlay at ``benign/p1`` whose lower folder is given by an alias: a bind mount, outside any home,
    of deployment B's ``landing/malignant/p1``. The layer's own path says nothing; the path the mount table
    shows the alias under does. Before, B's malignant image was stored here as benign."""
    from tests.support import bind_mounted, overlay_mounted

    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "m.png", seed=1)
    png_writer(home.landing_dir / "benign" / "p2" / "b.png", seed=2)
    with (
        bind_mounted(other.landing_dir / "malignant" / "p1", tmp_path / "alias"),
        overlay_mounted(tmp_path / "alias", home.landing_dir / "benign" / "p1", tmp_path / "ov"),
    ):
        r = intake(home, run_id="in1")
    assert [u["path"] for u in r.unreachable] == ["benign/p1"] and "site_b" in r.unreachable[0]["error"]
    assert r.accepted == 1 and theirs.is_file()
    with session_scope(home.database_url) as s:
        assert [x.source_path for x in s.scalars(select(ImageRecord))] == ["benign/p2/b.png"]


def test_landing_repointed_while_intake_runs_is_not_followed(home, png_writer, tmp_path):
    """``landing/`` is a link to a scanner share, re-pointed to deployment B's ``landing/`` after the
    first file was committed (no mount: the mount table says nothing). Before, B's image was taken in
    here and deleted from B, the run green. Now where landing/ leads is checked before each read: nothing
    more is taken in, the run is red, B's image stays."""
    share = tmp_path / "share"
    for i in range(2):
        png_writer(share / "benign" / f"p{i}" / "own.png", seed=i)
    home.landing_dir.parent.mkdir(parents=True, exist_ok=True)
    home.landing_dir.symlink_to(share)
    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "benign" / "p1" / "own.png", seed=7)
    done = []

    def repoint(shown):
        if not done:
            done.append(shown)
            tmp = home.landing_dir.with_name("landing.new")
            tmp.symlink_to(other.landing_dir)
            os.replace(tmp, home.landing_dir)

    r = intake(home, run_id="in1", on_committed=repoint)
    assert done and r.accepted == 1 and r.unreachable
    assert theirs.is_file()
    with session_scope(home.database_url) as s:
        assert [x.source_path for x in s.scalars(select(ImageRecord))] == ["benign/p0/own.png"]


def test_the_dataset_store_mounted_over_or_another_homes_is_never_written(home, png_writer, tmp_path):
    """A tmpfs mounted over ``dataset/`` itself after the first file was stored (the store is pinned when
    the run begins: the rest stay in landing, red, and the next run stores them here), and deployment B's
    ``dataset/`` bind-mounted there before a run (refused: nothing taken in)."""
    import contextlib

    from tests.support import bind_mounted, tmpfs_mounted

    for i in range(3):
        png_writer(home.landing_dir / "benign" / f"p{i}" / "x.png", seed=i)
    home.dataset_dir.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        mounted = []

        def mount_over_the_store(shown):
            if not mounted:
                mounted.append(stack.enter_context(tmpfs_mounted(home.dataset_dir)))

        r = intake(home, run_id="in1", on_committed=mount_over_the_store)
    assert r.accepted == 1 and len(r.failed) == 2
    r2 = intake(home, run_id="in2")
    assert r2.accepted == 2 and _all_files(home.landing_dir) == []
    with session_scope(home.database_url) as s:
        assert all(Path(x.stored_path).is_file() for x in s.scalars(select(ImageRecord)))
    other = foreign_home(tmp_path)
    other.dataset_dir.mkdir(parents=True, exist_ok=True)
    png_writer(home.landing_dir / "malignant" / "p9" / "y.png", seed=9)
    with bind_mounted(other.dataset_dir, home.dataset_dir):
        r3 = intake(home, run_id="in3")
    assert r3.accepted == 0 and r3.unreachable and list(other.dataset_dir.iterdir()) == []


def test_an_overlay_whose_layer_was_renamed_after_mounting_is_not_taken_in(home, png_writer, tmp_path):
    """An overlay at ``benign/p1`` whose lower folder was renamed into ``malignant/p1`` after the overlay
    was mounted: the mount table still names the old path, now an empty folder. Before, the malignant
    image was stored as benign. An overlay mounted inside landing/ whose layers cannot be confirmed is
    refused (fail closed)."""
    from tests.support import overlay_mounted

    stage = tmp_path / "stage" / "m"
    png_writer(stage / "m.png", seed=1)
    (home.landing_dir / "malignant").mkdir(parents=True)
    with overlay_mounted(stage, home.landing_dir / "benign" / "p1", tmp_path / "ov"):
        os.rename(stage, home.landing_dir / "malignant" / "p1")
        stage.mkdir()
        r = intake(home, run_id="in1")
    assert "benign/p1" in {u["path"] for u in r.unreachable}
    with session_scope(home.database_url) as s:
        assert [x.label for x in s.scalars(select(ImageRecord))] == ["malignant"]


def test_overlays_and_single_files_mounted_into_landing_are_not_taken_in(home, png_writer, tmp_path):
    """Mounts whose files have a device and inode of their own, so that no bind-mount check sees them:
    an overlay whose lower folder is deployment B's ``landing/malignant`` (at ``benign/scans``), an overlay
    of this landing's own ``malignant/p1`` (at ``benign/p1``: malignant images would be stored as benign),
    and one image of B's bind-mounted over a file of ``benign/``. None is read into the store or labelled;
    each is reported as unreachable, and what they show stays where it is."""
    from tests.support import file_bind_mounted, overlay_mounted

    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p9" / "t.png", seed=1)
    mine = png_writer(home.landing_dir / "malignant" / "p1" / "m.png", seed=2)
    png_writer(home.landing_dir / "benign" / "p2" / "b.png", seed=3)
    benign = home.landing_dir / "benign"
    with (
        overlay_mounted(other.landing_dir / "malignant", benign / "scans", tmp_path / "ov1"),
        overlay_mounted(home.landing_dir / "malignant" / "p1", benign / "p1", tmp_path / "ov2"),
        file_bind_mounted(theirs, benign / "p2" / "x.png"),
    ):
        r = intake(home, run_id="in1")
        reasons = {u["path"]: u["error"] for u in r.unreachable}
    assert set(reasons) == {"benign/scans", "benign/p1", "benign/p2/x.png"}
    assert "overlay of" in reasons["benign/scans"] and "site_b" in reasons["benign/scans"]
    assert "which label its images have cannot be told" in reasons["benign/p1"]
    assert "a file mounted here" in reasons["benign/p2/x.png"]
    assert r.accepted == 2  # benign/p2/b.png, malignant/p1/m.png (under its own label)
    with session_scope(home.database_url) as s:
        labels = {x.source_path: x.label for x in s.scalars(select(ImageRecord))}
    assert labels == {"benign/p2/b.png": "benign", "malignant/p1/m.png": "malignant"}
    assert theirs.is_file() and not mine.exists()  # taken in from its own path, once


def test_another_homes_landing_bind_mounted_into_landing_is_not_taken_in(home, png_writer, tmp_path):
    """Deployment B's ``landing/malignant/p1`` bind-mounted at this home's ``landing/benign/scans``: its
    images are B's (and malignant), so intake refuses the folder (the path the mount table shows it under
    lies in B's home) and leaves B's images where they are; a bind mount of a plain folder is taken in."""
    from tests.support import bind_mounted

    other = foreign_home(tmp_path)
    theirs = png_writer(other.landing_dir / "malignant" / "p1" / "theirs.png", seed=1)
    plain = png_writer(tmp_path / "scanner" / "out" / "scan.png", seed=2).parent
    with bind_mounted(theirs.parent, home.landing_dir / "benign" / "scans"):
        with bind_mounted(plain, home.landing_dir / "benign" / "plain"):
            r = intake(home, run_id="in1")
    assert r.accepted == 1 and theirs.is_file() and not (plain / "scan.png").exists()
    (failed,) = r.failed
    assert failed["path"] == "benign/scans" and "reached through a bind mount" in failed["error"]
    assert "BCC home" in failed["error"]


def test_a_folder_another_home_marked_is_not_taken_in_wherever_it_is(home, png_writer, tmp_path):
    """Round 25: a folder another home marked as its archive/ (`user.bcc.folder`) is that home's files
    wherever it is now (renamed into this landing, its disk mounted there): never taken in under a label,
    reported (`unreachable`), its files where they are; the rest is taken in."""
    from bcc_pipeline.destinations import destination_lost

    other = foreign_home(tmp_path)
    other.archive_dir.mkdir(parents=True)
    try:
        os.setxattr(other.archive_dir, "user.bcc.probe", b"1")
    except OSError as exc:
        pytest.skip(f"this filesystem keeps no extended attributes: {exc}")
    assert destination_lost(other, other.archive_dir) is None  # marked, as B's first run marks it
    theirs = png_writer(other.archive_dir / "run-1" / "scored.png", seed=1)
    png_writer(home.landing_dir / "benign" / "p1" / "ok.png", seed=2)
    moved = home.landing_dir / "malignant" / "p2"
    moved.parent.mkdir(parents=True)
    other.archive_dir.rename(moved)
    r = intake(home, run_id="in1")
    assert (r.accepted, r.rejected) == (1, 0) and (moved / "run-1" / theirs.name).is_file()
    assert [u["path"] for u in r.unreachable] == ["malignant/p2"]
    assert "marked as archive/ of the BCC home" in r.unreachable[0]["error"]
    # round 26: this home's own archive copied whole (`cp -a`, its mark too) into a label folder
    assert destination_lost(home, home.archive_dir) is None
    mine = png_writer(home.archive_dir / "run-2" / "archived.png", seed=3)
    subprocess.run(
        ["cp", "-a", str(home.archive_dir), str(home.landing_dir / "malignant" / "p3")], check=True
    )
    r = intake(home, run_id="in2")
    assert r.accepted == 0 and (home.landing_dir / "malignant" / "p3" / "run-2" / mine.name).is_file()
    assert sorted(u["path"] for u in r.unreachable) == ["malignant/p2", "malignant/p3"]
    assert "this home's archive/" in next(u for u in r.unreachable if u["path"] == "malignant/p3")["error"]


def test_a_system_filesystem_mounted_into_landing_is_not_taken_in(home, png_writer):
    """``/proc`` bind-mounted at ``landing/benign/proc``: nothing of the system's is taken in, rejected or
    moved; the folder is reported (``unreachable``) and the rest is taken in."""
    from tests.support import bind_mounted

    png_writer(home.landing_dir / "benign" / "p1" / "ok.png", seed=1)
    with bind_mounted(Path("/proc"), home.landing_dir / "benign" / "proc"):
        r = intake(home, run_id="in1")
    assert (r.accepted, r.rejected) == (1, 0)
    assert [u["path"] for u in r.unreachable] == ["benign/proc"] and "proc filesystem" in r.unreachable[0][
        "error"
    ]


@pytest.mark.parametrize("folder", ["quarantine", "dataset"])
def test_a_destination_whose_disk_is_not_mounted_is_never_written(home, png_writer, tmp_path, folder):
    """``quarantine/`` or ``dataset/`` on a disk of its own (a bind mount here). A run while that disk is
    not mounted used to write into the bare mount point: a stored copy hidden once the disk was back (its
    ``images`` row pointing at nothing, the landing original removed), green. The folder lost its mark, so
    nothing is taken in and the run is red; once the disk is back, the file is taken in."""
    from tests.support import bind_mounted

    disk, target = tmp_path / "disk", getattr(home, f"{folder}_dir")
    disk.mkdir()
    png_writer(home.landing_dir / "benign" / "a.png", seed=1)
    (home.landing_dir / "malignant").mkdir(parents=True)
    (home.landing_dir / "malignant" / "bad.png").write_bytes(b"not an image")
    with bind_mounted(disk, target):
        first = intake(home, run_id="i1")  # marks the disk's folder
    assert (first.accepted, first.rejected, first.unreachable) == (1, 1, [])
    png_writer(home.landing_dir / "benign" / "b.png", seed=2)
    second = intake(home, run_id="i2")
    assert second.accepted == 0 and len(second.unreachable) == 1
    assert "is not the folder this home has put files into" in second.unreachable[0]["error"]
    assert (home.landing_dir / "benign" / "b.png").is_file() and list(target.iterdir()) == []
    with bind_mounted(disk, target):
        third = intake(home, run_id="i3")
        assert (third.accepted, third.unreachable, third.failed) == (1, [], [])
        with session_scope(home.database_url) as s:
            stored = s.scalars(select(ImageRecord.stored_path)).all()
        assert len(stored) == 2 and all(Path(p).is_file() for p in stored)


def test_a_killed_quarantine_move_is_not_written_off_while_quarantine_is_not_mounted(
    home, tmp_path, monkeypatch
):
    """Killed after a rejected file reached ``quarantine/`` (its own disk) and before its record; the rerun
    while that disk was not mounted found the file neither in landing nor in quarantine and wrote it off
    as having left landing, for good: once the disk was back its quarantined copy had no record. Now that
    rerun takes nothing in (red) and the row stays open; the run after the disk is back records it."""
    import bcc_pipeline.intake_moves as moves_module
    from tests.support import bind_mounted

    disk = tmp_path / "disk"
    disk.mkdir()
    (home.landing_dir / "malignant").mkdir(parents=True)
    (home.landing_dir / "malignant" / "bad.png").write_bytes(b"not an image")

    def die(path, reason):
        raise _Killed(path)

    with bind_mounted(disk, home.quarantine_dir):
        monkeypatch.setattr(moves_module, "_write_reason", die)
        with pytest.raises(_Killed):
            intake(home, run_id="i1")
        monkeypatch.undo()
    second = intake(home, run_id="i2")
    assert second.recovered == 0 and len(second.unreachable) == 1
    with session_scope(home.database_url) as s:
        (row,) = s.scalars(select(Rejection)).all()
        assert row.moved_to is None and row.move_error is None
    with bind_mounted(disk, home.quarantine_dir):
        third = intake(home, run_id="i3")
        assert (third.recovered, third.unreachable, third.failed) == (1, [], [])
        with session_scope(home.database_url) as s:
            (row,) = s.scalars(select(Rejection)).all()
        assert row.moved_to and Path(files.path_from_display(row.moved_to)).read_bytes() == b"not an image"


def test_a_duplicate_whose_stored_copy_is_gone_is_stored_again_before_landing_lets_it_go(home, png_writer):
    """The same image landing again is a duplicate, removed from landing; when the store has lost its copy
    (deleted, a store restored without it) that landing file is the last one: it is written to the store
    again first, and its row points at it."""
    png_writer(home.landing_dir / "benign" / "p1" / "a.png", seed=3)
    assert intake(home, run_id="i1").accepted == 1
    with session_scope(home.database_url) as s:
        (stored,) = s.scalars(select(ImageRecord.stored_path)).all()
    Path(stored).unlink()
    png_writer(home.landing_dir / "benign" / "p2" / "a.png", seed=3)
    r = intake(home, run_id="i2")
    assert (r.duplicates, r.failed) == (1, []) and _all_files(home.landing_dir) == []
    with session_scope(home.database_url) as s:
        (stored,) = s.scalars(select(ImageRecord.stored_path)).all()
    assert files.sha256_file(stored) == files.sha256_file(png_writer(Path(home.home) / "x.png", seed=3))


def test_a_killed_quarantine_move_is_never_looked_for_through_a_linked_folder(home, tmp_path, monkeypatch):
    """Killed after a rejected file reached ``quarantine/i1/landing/malignant/`` and before its record;
    then ``quarantine/i1/landing`` set aside and replaced by a link to another home's ``landing/``. The
    rerun looked for the file through the link and, finding nothing, wrote it off as having left landing,
    for good (the moves never follow such a link). Now the row stays open and the run is red; the other
    home is untouched; once the folder is back the move is recorded where the file is."""
    import bcc_pipeline.intake_moves as moves_module

    other = foreign_home(tmp_path)
    (other.landing_dir / "malignant").mkdir(parents=True)
    (other.landing_dir / "malignant" / "bad.png").write_bytes(b"not an image")  # the same bytes there
    theirs = {p: p.read_bytes() for p in other.landing_dir.rglob("*") if p.is_file()}
    (home.landing_dir / "malignant").mkdir(parents=True)
    (home.landing_dir / "malignant" / "bad.png").write_bytes(b"not an image")

    def die(path, reason):
        raise _Killed(path)

    monkeypatch.setattr(moves_module, "_write_reason", die)
    with pytest.raises(_Killed):
        intake(home, run_id="i1")
    monkeypatch.undo()
    folder = home.quarantine_dir / "i1" / "landing"
    assert (folder / "malignant" / "bad.png").is_file()
    os.rename(folder, tmp_path / "set-aside")
    os.symlink(other.landing_dir, folder)
    second = intake(home, run_id="i2")
    assert (
        second.recovered == 0 and len(second.unreachable) == 1 and "symbolic link" in str(second.unreachable)
    )
    with session_scope(home.database_url) as s:
        (row,) = s.scalars(select(Rejection)).all()
        assert row.moved_to is None and "symbolic link" in row.move_error and row.dest
    assert {p: p.read_bytes() for p in other.landing_dir.rglob("*") if p.is_file()} == theirs
    os.unlink(folder)
    os.rename(tmp_path / "set-aside", folder)
    third = intake(home, run_id="i3")
    assert (third.recovered, third.unreachable, third.failed) == (1, [], [])
    with session_scope(home.database_url) as s:
        (row,) = s.scalars(select(Rejection)).all()
    assert Path(files.path_from_display(row.moved_to)) == folder / "malignant" / "bad.png"


def test_a_refused_intake_never_marks_another_homes_folder(home, png_writer, tmp_path, monkeypatch):
    """This home's ``landing/`` is a link to deployment B's. `bcc intake` here is refused, as before; but
    before refusing it wrote a ``.bcc-managed`` marker into B's ``landing/`` naming this home, and B's own
    intake was refused from then on ("a folder the BCC home ... manages"). Now nothing is written into B,
    and B takes its image in."""
    from bcc_pipeline import cli
    from bcc_pipeline.config import MANAGED_MARKER

    other = foreign_home(tmp_path)
    png_writer(other.landing_dir / "benign" / "p2" / "u.png", seed=2)
    home.landing_dir.parent.mkdir(parents=True, exist_ok=True)
    home.landing_dir.symlink_to(other.landing_dir)
    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert cli.main(["intake"]) == 1
    assert not (other.landing_dir / MANAGED_MARKER).exists()
    monkeypatch.setenv("BCC_HOME", str(other.home))
    monkeypatch.setenv("BCC_DATABASE_URL", other.database_url)
    assert cli.main(["intake"]) == 0
    assert not (other.landing_dir / "benign" / "p2" / "u.png").exists()


def test_a_label_folder_that_is_a_link_is_reported_not_passed_over(home, png_writer, tmp_path):
    """``landing/benign`` as a link to a folder on another disk: links are never followed there (one could
    lead to the other label). Before, it was counted as ignored ("landing/ holds only the folders benign,
    malignant") and the run was green, its images never taken in. Now the run is red, naming it."""
    elsewhere = tmp_path / "scanner" / "benign"
    png_writer(elsewhere / "p1" / "b.png", seed=1)
    png_writer(home.landing_dir / "malignant" / "p2" / "m.png", seed=2)
    (home.landing_dir / "benign").symlink_to(elsewhere)
    r = intake(home, run_id="in1")
    assert r.accepted == 1 and [u["path"] for u in r.unreachable] == ["benign"]
    assert "symbolic link" in r.unreachable[0]["error"] and (elsewhere / "p1" / "b.png").is_file()


def test_a_store_that_cannot_take_a_file_and_a_label_folder_in_another_case_turn_the_run_red(
    home, png_writer, monkeypatch, capsys
):
    """Round 21. (a) The dataset store cannot take a file (full, failing; here a folder sits where its
    copy goes): before, every run left it in landing with exit 0 and a green DAG task. (b) `Malignant/`
    beside `benign/`: before, counted as ignored with exit 0 on every run while its images waited. Both
    are now `unreachable`: `bcc intake` exits 1 naming them, and the file stays in landing."""
    from bcc_pipeline import images
    from bcc_pipeline.cli import main

    a = png_writer(home.landing_dir / "benign" / "p1" / "a.png", seed=1)
    sha = images.sha256_bytes(a.read_bytes())
    (home.dataset_dir / sha[:2] / f"{sha}.png").mkdir(parents=True)  # (a)
    png_writer(home.landing_dir / "Malignant" / "p2" / "b.png", seed=2)  # (b)
    png_writer(home.landing_dir / "benign" / "p1" / "c.png", seed=3)
    r = intake(home, run_id="i1")
    assert r.accepted == 1 and a.exists()
    assert [u["path"] for u in r.unreachable] == ["Malignant", "benign/p1/a.png"]
    assert "rename it to malignant/" in r.unreachable[0]["error"]
    assert f"dataset/{sha[:2]}/" in r.unreachable[1]["error"]  # where in the store it could not be written
    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert main(["intake"]) == 1
    assert "2 path(s) in landing are not taken in" in capsys.readouterr().err
    assert a.exists() and (home.landing_dir / "Malignant" / "p2" / "b.png").exists()


def test_intake_never_fills_the_dataset_stores_disk(home, png_writer):
    """Round 22: intake wrote the store until its disk had 0 bytes free (the disk the database, models and
    runs may share). Now, as a move across filesystems does, it leaves a twentieth of a small disk (at most
    256 MiB) free: what does not fit is refused before it is written, and stays in landing (red)."""
    import numpy as np
    from PIL import Image

    from tests.support import _mounted

    landing = home.landing_dir / "benign" / "p1"
    landing.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):  # about 1 MiB each (noise does not compress): 10 MiB for an 8 MiB disk
        Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(landing / f"n{i}.png")
    home.dataset_dir.mkdir(parents=True)
    with _mounted(["-t", "tmpfs", "-o", "size=8m", "none"], home.dataset_dir, "a small tmpfs"):
        r = intake(home, run_id="full")
        vfs = os.statvfs(home.dataset_dir)
        free, size = vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize
        assert 0 < r.accepted < 10 and len(r.unreachable) == 10 - r.accepted
        assert all("no room for a copy" in u["error"] for u in r.unreachable)
        assert free >= size // 20  # the spare room is left
        assert len(list(landing.iterdir())) == 10 - r.accepted  # refused files stay in landing


def test_a_patient_folder_moved_to_the_other_label_while_intake_walks_is_not_reported_unreadable(
    home, png_writer
):
    """Round 23: a person moves `benign/p2/` to `malignant/p2/` while intake walks `benign/`: the walk could
    no longer list it, and the run was red ("cannot list this folder", unreachable) although the same run
    then took its image in under malignant/. A folder that is gone is not unreadable."""
    from bcc_pipeline import images

    png_writer(home.landing_dir / "benign" / "p1" / "x.png", seed=1)
    y = png_writer(home.landing_dir / "benign" / "p2" / "y.png", seed=2)
    sha = images.sha256_bytes(y.read_bytes())
    (home.landing_dir / "malignant").mkdir()

    def move_p2(shown):
        if shown == "benign/p1/x.png":
            os.rename(home.landing_dir / "benign" / "p2", home.landing_dir / "malignant" / "p2")

    r = intake(home, run_id="walk", on_committed=move_p2)
    assert (r.accepted, r.unreachable, r.failed) == (2, [], [])
    with session_scope(home.database_url) as s:
        assert s.get(ImageRecord, sha).label == "malignant"


def test_a_stored_file_that_cannot_leave_landing_turns_the_run_red(home, png_writer):
    """Round 23: a file stored in the dataset whose landing name cannot be removed (a read-only or
    immutable landing folder) was reported under `failed` on every run, each run green. It is
    `unreachable` now: `bcc intake` exits 1 and the DAG's intake task fails, naming it."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root for chattr +i")
    a = png_writer(home.landing_dir / "benign" / "p1" / "a.png", seed=1)
    if subprocess.run(["chattr", "+i", str(a.parent)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem takes no immutable flag")
    try:
        for run in ("i1", "i2"):
            r = intake(home, run_id=run)
            assert [u["path"] for u in r.unreachable] == ["benign/p1/a.png"] and a.exists()
            assert "stored, but cannot be removed from landing" in r.unreachable[0]["error"]
    finally:
        subprocess.run(["chattr", "-i", str(a.parent)], check=True)
    assert intake(home, run_id="i3").unreachable == [] and not a.exists()


def test_an_image_scored_before_it_was_labelled_is_named_by_where_it_landed(
    home, png_writer, register_champion
):
    """Round 24: content scored first (an `images` row named by its inbox path) and then taken in under a
    label kept the inbox name, so a later conflict sent the operator to look in landing/ for a name that was
    never there. It is named by the landing path it was labelled at now."""
    import shutil

    from bcc_pipeline import scoring

    register_champion(home)
    scan = png_writer(home.inbox_dir / "ward" / "scan.png", seed=5)
    data = scan.read_bytes()
    scoring.score_inbox(home)
    (home.landing_dir / "benign" / "p1").mkdir(parents=True)
    (home.landing_dir / "benign" / "p1" / "x.png").write_bytes(data)
    assert intake(home, run_id="i1").accepted == 1
    (home.landing_dir / "malignant" / "p2").mkdir(parents=True)
    shutil.copyfile(
        home.archive_dir.rglob("scan.png").__next__(), home.landing_dir / "malignant" / "p2" / "y.png"
    )
    r = intake(home, run_id="i2")
    assert r.conflicts == 1 and "(benign/p1/x.png)" in r.rejections[0]["reason"]
