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

from bcc_pipeline import files
from bcc_pipeline.intake import intake
from bcc_pipeline.store import ImageRecord, Rejection, session_scope, upgrade

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
    assert len(_all_files(tmp_path)) == before + 1  # the file moved (+ its reason file); nothing deleted


def test_a_folder_intake_cannot_list_is_reported_and_the_run_goes_on(home, png_writer):
    """A folder whose path is longer than the system allows (ENAMETOOLONG) cannot be listed, even by root."""
    png_writer(home.landing_dir / "benign" / "ok.png", seed=1)
    fd = os.open(home.landing_dir / "benign", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):  # 20 × 251 bytes > PATH_MAX
            os.mkdir("d" * 250, dir_fd=fd)
            nxt = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(b"not reachable by path")
    finally:
        os.close(fd)
    r = intake(home, run_id="deep")
    assert r.accepted == 1
    assert len(r.failed) == 1 and "cannot list this folder" in r.failed[0]["error"]
    assert r.failed[0]["path"].startswith("benign/" + "d" * 250)


def test_migration_0003_down_and_up_and_an_old_schema_is_named(make_settings, migrated_url, png_writer):
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from bcc_pipeline import store
    from bcc_pipeline.errors import StoreError

    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / "bcc_pipeline" / "migrations"))
    cfg.set_main_option("sqlalchemy.url", migrated_url.replace("%", "%%"))
    with store.get_engine(migrated_url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    store.dispose_engine(migrated_url)
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
