import errno
import os
from pathlib import Path

import pytest

from bcc_pipeline import files


@pytest.fixture(params=["renameat2", "exclusive-copy"])
def rename_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a rename refuses a taken name: the kernel's RENAME_NOREPLACE, and (where the C library
    has no renameat2) an O_EXCL copy."""
    if request.param == "renameat2":
        if files.renameat2 is None:
            pytest.skip("this C library has no renameat2")
    else:
        monkeypatch.setattr(files, "renameat2", None)
    return request.param


def _no_hard_links(monkeypatch: pytest.MonkeyPatch, on_link=None) -> list[str]:
    """Make every ``os.link`` fail with EPERM, as on a filesystem without hard links; ``on_link`` runs first."""
    calls: list[str] = []

    def refuse(src, dst, *args, **kwargs):
        calls.append(os.fspath(dst))
        if on_link is not None:
            on_link()
        raise PermissionError(errno.EPERM, "Operation not permitted (hard links disabled)", os.fspath(src))

    monkeypatch.setattr(os, "link", refuse)
    return calls


def test_rename_no_replace_moves_and_refuses_a_taken_name(tmp_path: Path, rename_path: str) -> None:
    src, dst = tmp_path / "a.png", tmp_path / "b.png"
    src.write_bytes(b"mine")
    os.utime(src, (1_000_000, 1_000_000))
    files.rename_no_replace(src, dst)
    assert not src.exists() and dst.read_bytes() == b"mine"
    assert dst.stat().st_mtime == 1_000_000

    src.write_bytes(b"other")
    with pytest.raises(FileExistsError):
        files.rename_no_replace(src, dst)
    assert src.read_bytes() == b"other" and dst.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no leftovers


def test_rename_no_replace_moves_a_symlink_as_a_link(tmp_path: Path, rename_path: str) -> None:
    target = tmp_path / "secret.txt"
    target.write_text("do not touch")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    files.rename_no_replace(link, tmp_path / "moved.png")
    assert os.readlink(tmp_path / "moved.png") == str(target)
    assert not os.path.lexists(link) and target.read_text() == "do not touch"


def test_move_without_hard_links_never_overwrites_a_file_created_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename_path: str
) -> None:
    """The destination appears after move_no_clobber looked for it, at the last moment before the file
    gets its name: right before the rename call itself (``renameat2`` or a plain ``os.rename``), or,
    without renameat2, at the failing hard link just before the exclusive copy."""
    src = tmp_path / "inbox" / "a.png"
    src.parent.mkdir()
    src.write_bytes(b"incoming")
    dest = tmp_path / "archive" / "a.png"
    appeared: list[str] = []

    def appear(name) -> None:
        if not appeared and os.fsdecode(name) == str(dest):
            appeared.append(str(dest))
            dest.write_bytes(b"already archived")

    calls = _no_hard_links(monkeypatch, on_link=lambda: appear(dest) if rename_path == "exclusive-copy" else None)
    real_rename, real_renameat2 = os.rename, files.renameat2

    def rename_after_appearing(a, b, *args, **kwargs):
        appear(b)
        return real_rename(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename_after_appearing)
    if real_renameat2 is not None:
        def renameat2_after_appearing(dfd1, a, dfd2, b, flags):
            appear(b)
            return real_renameat2(dfd1, a, dfd2, b, flags)

        monkeypatch.setattr(files, "renameat2", renameat2_after_appearing)

    moved = files.move_no_clobber(src, dest)

    assert calls and appeared, "the test did not exercise the moment it is about"
    assert dest.read_bytes() == b"already archived"
    assert moved == dest.with_name("a~1.png") and moved.read_bytes() == b"incoming"
    assert not os.path.lexists(src)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.png", "a~1.png"]


def test_move_without_hard_links_suffixes_and_keeps_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename_path: str
) -> None:
    _no_hard_links(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").write_bytes(b"first")
    for i in range(3):
        src = tmp_path / f"in{i}" / "x.png"
        src.parent.mkdir()
        src.write_bytes(f"new{i}".encode())
        assert files.move_no_clobber(src, out / "x.png") == out / f"x~{i + 1}.png"
        assert not src.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        "x.png": b"first", "x~1.png": b"new0", "x~2.png": b"new1", "x~3.png": b"new2"}


def test_atomic_write_exclusive_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   rename_path: str) -> None:
    _no_hard_links(monkeypatch)
    target = tmp_path / "report.json"
    files.atomic_write(target, "{}", exclusive=True)
    with pytest.raises(FileExistsError):
        files.atomic_write(target, "[1]", exclusive=True)
    assert target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_atomic_write_with_a_writer_function(tmp_path: Path) -> None:
    target = tmp_path / "model.keras"
    target.write_bytes(b"old")
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"new")

    assert files.atomic_write(target, write) == target
    assert target.read_bytes() == b"new"
    assert seen[0].parent == tmp_path and seen[0].suffix == ".keras" and not seen[0].exists()

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, fail)
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


# -- moves, reason files and names (what scoring relies on) -----------------------------------
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


# -- a source that is no longer the file that was read ------------------------------------------
def test_move_refuses_a_source_that_changed_since_it_was_read(tmp_path):
    (tmp_path / "in").mkdir()
    src, dest = tmp_path / "in" / "x.png", tmp_path / "out" / "x.png"
    src.write_bytes(b"read and scored")
    read = files.identity(os.stat(src))
    (tmp_path / "in" / "new").write_bytes(b"swapped in later")
    os.replace(tmp_path / "in" / "new", src)
    with pytest.raises(files.SourceChangedError):
        files.move_no_clobber(src, dest, expect=read)
    assert src.read_bytes() == b"swapped in later" and not dest.exists()
    # the same file, rewritten in place (same inode): also not what was read
    read = files.identity(os.stat(src))
    src.write_bytes(b"rewritten!")
    with pytest.raises(files.SourceChangedError):
        files.move_no_clobber(src, dest, expect=read)
    assert not dest.exists()
    assert files.move_no_clobber(src, dest, expect=files.identity(os.stat(src))) == dest


# -- moves across filesystems -------------------------------------------------------------------
@pytest.fixture
def other_fs(tmp_path: Path):
    """A folder on another filesystem than ``tmp_path``: /dev/shm where it is a separate tmpfs."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm: no second filesystem to move across")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test folder: no second filesystem")
    folder = Path(tempfile.mkdtemp(prefix="bcc-test-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_move_across_filesystems_keeps_mode_and_times(tmp_path, other_fs):
    src, dest = other_fs / "x.png", tmp_path / "archive" / "x.png"
    src.write_bytes(b"pixels" * 1000)
    os.chmod(src, 0o640)
    os.utime(src, ns=(1_700_000_000_123_456_789, 1_600_000_000_987_654_321))
    assert files.move_no_clobber(src, dest, expect=files.identity(os.stat(src))) == dest
    st = os.stat(dest)
    assert (oct(st.st_mode & 0o7777), st.st_mtime_ns) == (oct(0o640), 1_600_000_000_987_654_321)
    assert not src.exists() and dest.read_bytes() == b"pixels" * 1000
    assert os.listdir(dest.parent) == ["x.png"]  # no temporary file left


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def test_move_across_filesystems_interrupted_is_finished_with_one_copy(tmp_path, other_fs):
    src, dest = other_fs / "x.png", tmp_path / "archive" / "x.png"
    src.write_bytes(b"only once")

    def kill(source, where):
        raise Killed

    with pytest.raises(Killed):  # the copy is in place, the source not removed yet
        files.move_no_clobber(src, dest, before_unlink=kill)
    assert src.exists() and dest.read_bytes() == b"only once"
    assert files.move_no_clobber(src, dest) == dest  # the next attempt finishes it
    assert not src.exists() and os.listdir(dest.parent) == ["x.png"]  # no x~1.png, no temporary file

    # killed right after the source was removed: the next look (the source is gone) only tidies up
    src.write_bytes(b"second")
    dest2 = tmp_path / "archive" / "y.png"

    def remove_then_kill(source, where):
        os.unlink(source)
        raise Killed

    with pytest.raises(Killed):
        files.move_no_clobber(src, dest2, before_unlink=remove_then_kill)
    assert files.finish_move(dest2) == dest2
    assert sorted(os.listdir(dest2.parent)) == ["x.png", "y.png"] and dest2.read_bytes() == b"second"
