import errno
import os
import shutil
import unicodedata
from pathlib import Path

import pytest

from bcc_pipeline import copying, files, leftovers, moving, temp_names


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

    calls = _no_hard_links(
        monkeypatch, on_link=lambda: appear(dest) if rename_path == "exclusive-copy" else None
    )
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

    moved = moving.move_no_clobber(src, dest)

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
        assert moving.move_no_clobber(src, out / "x.png") == out / f"x~{i + 1}.png"
        assert not src.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        "x.png": b"first",
        "x~1.png": b"new0",
        "x~2.png": b"new1",
        "x~3.png": b"new2",
    }


def test_atomic_write_exclusive_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename_path: str
) -> None:
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
    moved = moving.move_no_clobber(src_dir / "x.png", dest_dir / "a" / "x.png")
    assert moved.name == "x~1.png" and moved.read_bytes() == b"new"
    assert (dest_dir / "a" / "x.png").read_bytes() == b"old" and not (src_dir / "x.png").exists()


def test_move_finishes_an_interrupted_move(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    src, dest = tmp_path / "in" / "x.png", tmp_path / "out" / "x.png"
    src.write_bytes(b"data")
    os.link(src, dest)  # the first half of a move, then "SIGKILL"
    assert moving.move_no_clobber(src, dest) == dest
    assert not src.exists() and dest.read_bytes() == b"data"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]


def test_move_moves_a_symlink_as_a_link_and_never_touches_its_target(tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("do not touch")
    before = os.stat(target)
    (tmp_path / "in").mkdir()
    link = tmp_path / "in" / "evil.png"
    link.symlink_to(target)
    moved = moving.quarantine_file(link, tmp_path / "q", Path("evil.png"), "symbolic link")
    assert moved.is_symlink() and os.readlink(moved) == str(target)
    assert not os.path.lexists(link)
    after = os.stat(target)
    assert target.read_text() == "do not touch"
    assert (after.st_mtime_ns, after.st_ino, after.st_mode) == (
        before.st_mtime_ns,
        before.st_ino,
        before.st_mode,
    )
    assert (tmp_path / "q" / "evil.png.reason.txt").read_text().strip() == "symbolic link"


def test_long_names_stay_within_the_name_limit(tmp_path):
    name = "é" * 120 + ".png"  # 244 bytes: the reason file needs a shorter stem
    assert len(os.fsencode(name)) == 244
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(b"x")
    moved = moving.quarantine_file(tmp_path / "in" / name, tmp_path / "q", Path(name), "why")
    assert moved.name == name
    reasons = [p for p in (tmp_path / "q").iterdir() if p.name.endswith(".reason.txt")]
    assert len(reasons) == 1 and len(os.fsencode(reasons[0].name)) <= 255
    assert files.reason_path(moved) == reasons[0]
    assert reasons[0].read_text() == "why\n"  # 255 bytes: it fits
    # round 22: a reason name shortened with a hash no longer says whose it is, so its text does
    longer = "a" * 247 + ".png"
    (tmp_path / "in" / longer).write_bytes(b"y")
    moved = moving.quarantine_file(tmp_path / "in" / longer, tmp_path / "q", Path(longer), "why")
    assert "#" in files.reason_path(moved).name
    assert files.reason_path(moved).read_text() == f"reason for {longer}: why\n"
    assert len(os.fsencode(files.fit_name("a" * 300, "~12.png"))) == 255


def test_reason_file_never_replaces_a_quarantined_link(tmp_path):
    q = tmp_path / "q"
    q.mkdir()
    (q / "x.png.reason.txt").symlink_to("/etc/hostname")
    (q / "x.png").write_bytes(b"x")
    written = files.write_reason(q / "x.png", "why")
    assert (q / "x.png.reason.txt").is_symlink() and written.read_text() == "reason for x.png: why\n"


def test_display_path_escapes_invalid_utf8():
    raw = os.fsdecode(b"bad\xffname.png")
    assert files.display_path(raw) == "bad\\xffname.png"


# -- a source that is no longer the file that was read ------------------------------------------
def test_move_refuses_a_source_that_changed_since_it_was_read(tmp_path):
    (tmp_path / "in").mkdir()
    src, dest = tmp_path / "in" / "x.png", tmp_path / "out" / "x.png"
    src.write_bytes(b"read and scored")
    read = moving.identity(os.stat(src))
    (tmp_path / "in" / "new").write_bytes(b"swapped in later")
    os.replace(tmp_path / "in" / "new", src)
    with pytest.raises(moving.SourceChangedError):
        moving.move_no_clobber(src, dest, expect=read)
    assert src.read_bytes() == b"swapped in later" and not dest.exists()
    # the same file, rewritten in place (same inode): also not what was read
    read = moving.identity(os.stat(src))
    src.write_bytes(b"rewritten!")
    with pytest.raises(moving.SourceChangedError):
        moving.move_no_clobber(src, dest, expect=read)
    assert not dest.exists()
    assert moving.move_no_clobber(src, dest, expect=moving.identity(os.stat(src))) == dest


# -- one name per file ---------------------------------------------------------------------------
def test_two_hard_links_moved_to_one_destination_get_a_name_each(tmp_path):
    """``a`` and ``b`` are one inode. ``a`` moves to ``x.png``; ``b``'s move to ``x.png`` finds that name
    already is its inode. A first attempt (``fresh``), or a name recorded as another file's (``taken``),
    is not an interrupted attempt of this move: ``b`` gets ``x~1.png``, not ``a``'s name."""
    (tmp_path / "in").mkdir()
    a, b = tmp_path / "in" / "a.png", tmp_path / "in" / "b.png"
    a.write_bytes(b"one file, two names")
    os.link(a, b)
    dest = tmp_path / "out" / "x.png"
    assert moving.move_no_clobber(a, dest, fresh=True) == dest
    assert moving.move_no_clobber(b, dest, fresh=True) == dest.with_name("x~1.png")
    assert not b.exists() and sorted(p.name for p in dest.parent.iterdir()) == ["x.png", "x~1.png"]
    # a retry (not fresh) that knows x.png is recorded as a's: the same
    c = tmp_path / "in" / "c.png"
    os.link(dest, c)
    held = {dest, dest.with_name("x~1.png")}
    assert moving.move_no_clobber(c, dest, taken=held.__contains__) == dest.with_name("x~2.png")
    # and a retry with nothing recorded is taken for an interrupted attempt (its link was made, then killed)
    d = tmp_path / "in" / "d.png"
    os.link(dest.with_name("x~2.png"), d)
    assert moving.move_no_clobber(d, dest.with_name("x~2.png")) == dest.with_name("x~2.png")
    assert not d.exists() and dest.with_name("x~2.png").stat().st_nlink == 1


def test_a_file_with_other_names_is_copied_so_no_other_name_can_change_the_archived_bytes(tmp_path):
    """A hard link would leave the archived file one inode with names that are not ours (another inbox
    path, a scanner's own link): rewriting one of them in place would change the archived bytes under
    their prediction. Such a file is copied (its mode and times kept); a file with one name is linked."""
    (tmp_path / "in").mkdir()
    src, scanner = tmp_path / "in" / "a.png", tmp_path / "scanner-copy.png"
    src.write_bytes(b"what was scored")
    os.link(src, scanner)
    read = moving.identity(os.stat(src))
    sha = files.sha256_file(src)
    where = moving.move_no_clobber(
        src, tmp_path / "out" / "a.png", expect=read, expect_sha256=sha, fresh=True
    )
    assert not src.exists() and where.stat().st_ino != scanner.stat().st_ino
    assert where.stat().st_mtime_ns == scanner.stat().st_mtime_ns
    with open(scanner, "r+b") as fh:  # the scanner rewrites its own copy in place
        fh.write(b"something else!")
    assert where.read_bytes() == b"what was scored"
    assert moving.find_moved(tmp_path / "out" / "a.png", sha256=sha, ident=read) == where  # found again
    (tmp_path / "in" / "b.png").write_bytes(b"one name only")
    ino = (tmp_path / "in" / "b.png").stat().st_ino
    assert moving.move_no_clobber(tmp_path / "in" / "b.png", tmp_path / "out" / "b.png").stat().st_ino == ino


def test_find_moved_never_gives_a_name_another_file_holds(tmp_path):
    """Two copies with the same bytes and times (nothing tells them apart but which names are left): the
    name recorded as the first file's is never the second's."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("x.png", "x~1.png"):
        (out / name).write_bytes(b"same bytes")
        os.utime(out / name, ns=(1_700_000_000 * 10**9,) * 2)
    sha = files.sha256_file(out / "x.png")
    assert moving.find_moved(out / "x.png", sha256=sha) == out / "x.png"
    held = {out / "x.png"}
    assert moving.find_moved(out / "x.png", sha256=sha, taken=held.__contains__) == out / "x~1.png"
    held.add(out / "x~1.png")
    assert moving.find_moved(out / "x.png", sha256=sha, taken=held.__contains__) is None


# -- moves across filesystems -------------------------------------------------------------------
def test_move_across_filesystems_keeps_mode_and_times(tmp_path, other_fs):
    src, dest = other_fs / "x.png", tmp_path / "archive" / "x.png"
    src.write_bytes(b"pixels" * 1000)
    os.chmod(src, 0o640)
    os.utime(src, ns=(1_700_000_000_123_456_789, 1_600_000_000_987_654_321))
    assert moving.move_no_clobber(src, dest, expect=moving.identity(os.stat(src))) == dest
    st = os.stat(dest)
    assert (oct(st.st_mode & 0o7777), st.st_mtime_ns) == (oct(0o640), 1_600_000_000_987_654_321)
    assert not src.exists() and dest.read_bytes() == b"pixels" * 1000
    assert os.listdir(dest.parent) == ["x.png"]  # no temporary file left


def test_a_copy_across_filesystems_drops_setuid_setgid_and_sticky_bits(tmp_path, other_fs):
    """An inbox file with setuid/setgid bits (someone else's executable dropped there) is copied with its
    permission bits only: nothing in the archive runs as its owner."""
    src, dest = other_fs / "x.png", tmp_path / "archive" / "x.png"
    src.write_bytes(b"pixels")
    os.chmod(src, 0o6755)
    moving.move_no_clobber(src, dest)
    assert oct(os.stat(dest).st_mode & 0o7777) == oct(0o755)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def kill(source, where):
    """A ``before_unlink`` hook: killed with the file at its destination, the source not removed yet."""
    raise Killed


def test_move_across_filesystems_interrupted_is_finished_with_one_copy(tmp_path, other_fs):
    src, dest = other_fs / "x.png", tmp_path / "archive" / "x.png"
    src.write_bytes(b"only once")

    with pytest.raises(Killed):  # the copy is in place, the source not removed yet
        moving.move_no_clobber(src, dest, before_unlink=kill)
    assert src.exists() and dest.read_bytes() == b"only once"
    assert moving.move_no_clobber(src, dest) == dest  # the next attempt finishes it
    assert not src.exists() and os.listdir(dest.parent) == ["x.png"]  # no x~1.png, no temporary file

    # killed right after the source was removed: the next look (the source is gone) only tidies up
    src.write_bytes(b"second")
    dest2 = tmp_path / "archive" / "y.png"
    read = moving.identity(os.lstat(src))

    def remove_then_kill(source, where):
        os.unlink(source)
        raise Killed

    with pytest.raises(Killed):
        moving.move_no_clobber(src, dest2, before_unlink=remove_then_kill)
    assert moving.finish_move(dest2, src, read) == dest2
    assert sorted(os.listdir(dest2.parent)) == ["x.png", "y.png"] and dest2.read_bytes() == b"second"


def _same_looking(folder: Path, names_and_bytes: dict[str, bytes]) -> list[Path]:
    """Files of the same size and times (as tar or rsync -a leave them), with the given bytes."""
    out = []
    for name, data in names_and_bytes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        os.utime(folder / name, ns=(1_700_000_000 * 10**9,) * 2)
        out.append(folder / name)
    return out


def test_a_move_never_takes_another_files_interrupted_copy_for_its_own(tmp_path, other_fs):
    """``a`` and ``b`` differ in their bytes only; both go to ``x.png`` on another filesystem. ``a``'s move is
    killed with its copy published; ``b``'s move must not take that copy for an interrupted attempt of its
    own (it would remove ``b``, whose bytes would then be nowhere): ``b`` gets ``x~1.png``, and ``a``'s next
    attempt finishes at ``x.png``."""
    a, b = _same_looking(other_fs, {"a.png": b"AAAA bytes", "b.png": b"BBBB bytes"})
    dest = tmp_path / "q" / "x.png"

    with pytest.raises(Killed):
        moving.move_no_clobber(a, dest, before_unlink=kill)
    assert moving.move_no_clobber(b, dest, fresh=True) == dest.with_name("x~1.png")
    assert moving.move_no_clobber(a, dest) == dest
    assert dest.read_bytes() == b"AAAA bytes" and dest.with_name("x~1.png").read_bytes() == b"BBBB bytes"
    assert sorted(os.listdir(dest.parent)) == ["x.png", "x~1.png"] and os.listdir(other_fs) == []


def test_tidying_one_files_move_leaves_another_files_interrupted_move_alone(tmp_path, other_fs):
    """``a`` went to ``x.png``; ``b``'s move to ``x.png`` (so ``x~1.png``) is killed before ``b`` is removed.
    Tidying up after ``a`` (its source is gone) keeps ``b``'s temporary name, so ``b``'s next attempt
    finishes at ``x~1.png`` instead of copying again to ``x~2.png``."""
    a, b = _same_looking(other_fs, {"a.png": b"AAAA bytes", "b.png": b"BBBB bytes"})
    read_a = moving.identity(os.lstat(a))
    dest = tmp_path / "q" / "x.png"

    assert moving.move_no_clobber(a, dest) == dest
    with pytest.raises(Killed):
        moving.move_no_clobber(b, dest, before_unlink=kill)
    assert moving.finish_move(dest, a, read_a) is None
    assert moving.move_no_clobber(b, dest) == dest.with_name("x~1.png")
    assert sorted(os.listdir(dest.parent)) == ["x.png", "x~1.png"] and os.listdir(other_fs) == []


def test_an_interrupted_copy_of_a_file_copied_again_since_is_finished(tmp_path, other_fs):
    """Killed with its copy published; then the source is copied again (the same bytes, another inode). The
    attempt that knows the first identity (``prior``) finishes with the published copy: one copy, no
    temporary name."""
    (a,) = _same_looking(other_fs, {"a.png": b"AAAA bytes"})
    first = moving.identity(os.lstat(a))
    dest = tmp_path / "q" / "x.png"

    with pytest.raises(Killed):
        moving.move_no_clobber(a, dest, before_unlink=kill)
    shutil.copy2(a, other_fs / "copy")
    os.replace(other_fs / "copy", a)
    assert moving.move_no_clobber(a, dest, prior=first) == dest
    assert os.listdir(dest.parent) == ["x.png"] and os.listdir(other_fs) == []


def test_a_later_file_given_the_same_inode_never_takes_an_interrupted_copy(tmp_path, other_fs):
    """``a``'s move across filesystems is killed with its copy published; ``a`` is deleted and a file with
    other bytes, the same size and mtime is written at the same path (ext4 gives it ``a``'s inode number
    again). Its move compares bytes: it gets a copy of its own, and ``a``'s copy keeps ``a``'s bytes."""
    (src,) = _same_looking(tmp_path / "in", {"a.png": b"AAAA bytes"})
    dest = other_fs / "q" / "x.png"

    with pytest.raises(Killed):
        moving.move_no_clobber(src, dest, before_unlink=kill)
    src.unlink()
    _same_looking(tmp_path / "in", {"a.png": b"BBBB bytes"})
    assert moving.move_no_clobber(src, dest, fresh=True) == dest.with_name("x~1.png")
    assert dest.read_bytes() == b"AAAA bytes" and dest.with_name("x~1.png").read_bytes() == b"BBBB bytes"


def test_two_names_of_one_inode_moved_across_filesystems_keep_their_own_interrupted_copies(
    tmp_path, other_fs
):
    """Two hard links of one file whose destinations meet: the first moved, the second's move killed with
    its copy at ``x~1.png``. Tidying after the first (its name is gone) leaves the second's temporary name,
    so the second's next attempt finishes at ``x~1.png``, not ``x~2.png``."""
    (a,) = _same_looking(tmp_path / "in", {"a.png": b"one inode"})
    b = tmp_path / "in" / "b.png"
    os.link(a, b)
    read = moving.identity(os.lstat(a))
    dest = other_fs / "q" / "x.png"

    assert moving.move_no_clobber(a, dest, fresh=True) == dest
    with pytest.raises(Killed):
        moving.move_no_clobber(b, dest, fresh=True, before_unlink=kill)
    assert moving.finish_move(dest, a, read) is None
    assert moving.move_no_clobber(b, dest) == dest.with_name("x~1.png")
    assert sorted(os.listdir(dest.parent)) == ["x.png", "x~1.png"]


def test_an_interrupted_copy_under_the_old_temporary_name_is_finished(tmp_path, other_fs):
    """A copy published by an earlier version (its temporary name fixed by the destination alone) is
    finished by the next attempt when its bytes are the source's: one copy, no temporary name left."""
    import hashlib

    (a,) = _same_looking(tmp_path / "in", {"a.png": b"AAAA bytes"})
    dest = other_fs / "q" / "x.png"
    dest.parent.mkdir()
    shutil.copy2(a, dest)
    os.link(dest, dest.with_name(f".bcc-move-{hashlib.sha256(b'x.png').hexdigest()[:16]}.tmp"))
    assert moving.move_no_clobber(a, dest) == dest
    assert os.listdir(dest.parent) == ["x.png"] and not a.exists()


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_copy_interrupted_right_after_it_was_published_keeps_its_temporary_name(
    tmp_path, other_fs, monkeypatch, kind
):
    """An exception (a signal handler's, Airflow's timeout) arriving just after the copy got its name,
    before the move noted it: the temporary name is kept, so the next attempt finishes that move (one
    copy) instead of leaving the published copy behind as an unrecorded second one."""
    src, dest = other_fs / "a.png", tmp_path / "q" / "x.png"
    if kind == "file":
        src.write_bytes(b"AAAA bytes")
    else:
        src.symlink_to("/etc/hostname")
    real = copying.publish_no_clobber

    def publish_then_interrupted(tmp, where):
        real(tmp, where)
        raise Killed

    monkeypatch.setattr(copying, "publish_no_clobber", publish_then_interrupted)
    with pytest.raises(Killed):
        moving.move_no_clobber(src, dest)
    monkeypatch.setattr(copying, "publish_no_clobber", real)
    assert moving.move_no_clobber(src, dest) == dest
    assert os.listdir(dest.parent) == ["x.png"] and not os.path.lexists(src)


def test_a_copy_across_filesystems_with_no_room_is_refused_before_writing(tmp_path, other_fs):
    """A sparse 1 TiB file (no blocks: refused as too large, then quarantined) is never written out on the
    other filesystem: the move fails at once with ENOSPC, nothing is left there, the source stays."""
    src = tmp_path / "in" / "huge.png"
    src.parent.mkdir()
    with open(src, "wb") as fh:
        fh.truncate(1 << 40)
    dest = other_fs / "q" / "huge.png"
    with pytest.raises(OSError) as info:
        moving.move_no_clobber(src, dest)
    assert info.value.errno == errno.ENOSPC and "no room" in str(info.value)
    assert os.listdir(dest.parent) == [] and src.stat().st_size == 1 << 40


def test_an_interrupted_copy_is_finished_after_the_source_folder_was_renamed(tmp_path, other_fs):
    """Killed with its copy published; the source's folder is then renamed (a share remounted, a landing
    link re-pointed). The next attempt, from the new path, still finishes that move: one copy, no
    temporary name left."""
    (a,) = _same_looking(tmp_path / "share", {"a.png": b"AAAA bytes"})
    dest = other_fs / "q" / "x.png"

    with pytest.raises(Killed):
        moving.move_no_clobber(a, dest, before_unlink=kill)
    (tmp_path / "share").rename(tmp_path / "share-renamed")
    assert moving.move_no_clobber(tmp_path / "share-renamed" / "a.png", dest) == dest
    assert os.listdir(dest.parent) == ["x.png"] and os.listdir(tmp_path / "share-renamed") == []


def test_a_link_moved_across_filesystems_and_interrupted_is_finished_as_one_link(tmp_path, other_fs):
    """A symbolic link re-created on the other filesystem, the move killed before the inbox link is removed:
    the next attempt recognises its own copy and only removes the source (one link, no ``evil~1.png``)."""
    src, dest = other_fs / "evil.png", tmp_path / "quarantine" / "evil.png"
    src.symlink_to("/etc/hostname")

    with pytest.raises(Killed):  # the link is at its destination, the inbox link not removed yet
        moving.move_no_clobber(src, dest, before_unlink=kill)
    assert os.path.islink(src) and os.readlink(dest) == "/etc/hostname"
    assert moving.move_no_clobber(src, dest) == dest  # the rerun finishes that move
    assert not os.path.lexists(src) and os.readlink(dest) == "/etc/hostname"
    assert os.listdir(dest.parent) == ["evil.png"]  # no evil~1.png, no temporary name
    # a link already at the destination that no interrupted move made is another file: kept, not taken over
    src.symlink_to("/etc/hostname")
    moved = moving.move_no_clobber(src, dest)
    assert moved.name == "evil~1.png" and os.readlink(moved) == "/etc/hostname"
    assert sorted(os.listdir(dest.parent)) == ["evil.png", "evil~1.png"] and not os.path.lexists(src)


# -- temporaries a killed process leaves -----------------------------------------------------------
def _age(path: Path, seconds: float) -> None:
    then = os.lstat(path).st_mtime - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_sweep_removes_only_our_stale_temporaries(tmp_path):
    runs = tmp_path / "runs" / "r1"
    runs.mkdir(parents=True)
    stale = runs / ".bcc-tmp-plan.json.k3j2h1.tmp"
    stale.write_text('{"half')
    stale_dir = tmp_path / "runs" / ".bcc-tmp-openvino-0123.x8y7"  # a conversion's temporary folder
    stale_dir.mkdir()
    (stale_dir / "model.bin").write_bytes(b"half a model")
    fresh = runs / ".bcc-tmp-shard-0.json.a1b2c3.tmp"  # a live writer's
    fresh.write_text("{}")
    foreign = runs / ".plan.json.k3j2h1.tmp"  # not our prefix: someone else's
    foreign.write_text("x")
    move_marker = runs / ".bcc-move-0123456789abcdef.tmp"  # finishes an interrupted move: never swept
    move_marker.write_text("x")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    link = runs / ".bcc-tmp-link"
    link.symlink_to(outside)
    busy_dir = tmp_path / "runs" / ".bcc-tmp-onnx-4567.q1w2"  # old folder, but still written to
    busy_dir.mkdir()
    (busy_dir / "model.onnx").write_bytes(b"being written")
    for p in (stale, stale_dir / "model.bin", stale_dir, foreign, move_marker, outside, link, busy_dir):
        _age(p, 7200)
    shallow_stale = tmp_path / ".bcc-tmp-.bcc-home.z9.tmp"
    shallow_stale.write_text("x")
    _age(shallow_stale, 7200)
    removed = leftovers.sweep_temporaries([tmp_path / "runs", tmp_path / "missing"], shallow=[tmp_path])
    assert sorted(removed) == sorted([stale, stale_dir, shallow_stale])
    assert not os.path.lexists(stale) and not stale_dir.exists() and not shallow_stale.exists()
    for kept in (fresh, foreign, move_marker, busy_dir / "model.onnx", outside):
        assert kept.exists(), kept
    assert link.is_symlink()
    assert leftovers.sweep_temporaries([tmp_path / "runs"], shallow=[tmp_path]) == []


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from bcc_pipeline.files import atomic_write

def write(tmp: Path) -> None:
    tmp.write_bytes(b"half of it")
    print(tmp.name, flush=True)
    time.sleep(60)

atomic_write(Path(sys.argv[1]), write)
"""


def test_a_temporary_left_by_a_killed_atomic_write_is_swept(make_settings, tmp_path):
    """SIGKILL inside ``atomic_write`` (a reason file, a plan, a model being written) leaves its temporary.
    Its name carries its maker (process id and machine), so the next sweep (a rerun right after the kill)
    removes it at once; a live writer's is kept, and so is one whose maker cannot be told (another
    machine's, or a name without a maker) until it is an hour old."""
    import signal
    import subprocess
    import sys

    s = make_settings(None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}

    def writer(target: Path):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env
        )
        return proc, target.parent / proc.stdout.readline().strip()

    def kill(proc):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    # names that imitate a maker's tag (a file's own name is anyone's): they neither hide the real maker
    # (the killed writer's temporary still goes at once) nor pass a live writer's for a dead one's
    killed, left = writer(s.quarantine_dir / "r1" / ("a" * 28 + ".p1-00000000.png.reason.txt"))
    kill(killed)
    live, writing = writer(
        s.runs_dir / "r1" / f"{files.TEMP_PREFIX}p{killed.pid}-{temp_names._machine_key()}.json"
    )
    try:
        assert left.name.startswith(files.TEMP_PREFIX) and left.read_bytes() == b"half of it"
        elsewhere = s.runs_dir / "r1" / f"{files.TEMP_PREFIX}plan.json.p{killed.pid}-00000000.ab12cd.tmp"
        elsewhere.write_text("another machine's")
        unsigned = s.runs_dir / "r1" / f"{files.TEMP_PREFIX}plan.json.ab12cd.tmp"
        unsigned.write_text("before names carried their maker")
        assert leftovers.sweep_stale_temporaries(s) == [left]  # its maker is gone: no need to wait
        assert writing.exists() and elsewhere.exists() and unsigned.exists()
        assert not (s.quarantine_dir / "r1" / "x.png.reason.txt").exists()
    finally:
        kill(live)
    for p in (elsewhere, unsigned):
        _age(p, leftovers.STALE_TEMP_SECONDS + 60)
    assert sorted(leftovers.sweep_stale_temporaries(s)) == sorted([writing, elsewhere, unsigned])
    assert os.listdir(s.runs_dir / "r1") == []


# -- the one display form of a path ---------------------------------------------------------------
_HOSTILE_NAMES = [
    b"plain.png",
    "caf\u00e9/\u00fcber.png".encode(),
    b"bad\xffname.png",
    b"bad\\xffname.png",
    b"a\\b",
    b"a\\\\b",
    b"\\",
    b"\\x",
    b"\\xzz",
    b"new\nline.png",
    b"cr\rtab\t.png",
    b"\x00nul",
    b"\x1b[31mred",
    b"del\x7f",
    "c1\u0085nel".encode(),
    "sep\u2028\u2029".encode(),
    b"\xed\xa0\x80surrogate",
    b"\xc3",
    b"\xc3(",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
    "\U0001f600.png".encode(),
    b"\\n",
    b"\\\n",
    b"\\u00e9",
    b"%ff",
    b"",
]


def _random_names(n: int, seed: int = 12) -> list[bytes]:
    import random

    rng = random.Random(seed)
    alphabet = [
        b"\\",
        b"x",
        b"f",
        b"F",
        b"0",
        b"n",
        b"a",
        b"/",
        b".",
        b"\n",
        b"\x00",
        b"\xff",
        b"\xc3",
        b"\xa9",
        b"\xe2\x80\xa8",
        b"\xed\xa0\x80",
        "\u00e9".encode(),
        b"\x85",
        b"\xc2\x85",
    ]
    out = []
    for _ in range(n):
        parts = [
            rng.choice(alphabet) if rng.random() < 0.7 else bytes([rng.randrange(256)])
            for _ in range(rng.randrange(1, 12))
        ]
        out.append(b"".join(parts))
    return out


def test_display_path_round_trips_every_byte_string_and_never_collides() -> None:
    names = sorted(set(_HOSTILE_NAMES + _random_names(3000)))
    shown = {}
    for raw in names:
        text = files.display_path(raw)
        text.encode("utf-8")  # valid UTF-8: databases and JSON accept it
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in text), text
        assert os.fsencode(files.path_from_display(text)) == raw
        assert files.display_path(os.fsdecode(raw)) == text  # str (surrogateescape) and bytes agree
        assert shown.setdefault(text, raw) == raw, f"{raw!r} and {shown[text]!r} display the same"


def test_display_path_keeps_ordinary_names_and_escapes_the_ambiguous_ones() -> None:
    assert files.display_path("benign/patient 7/caf\u00e9 (1).png") == "benign/patient 7/caf\u00e9 (1).png"
    assert files.display_path(Path("a/b.png")) == "a/b.png"
    assert files.display_path(b"bad\xffname.png") == "bad\\xffname.png"
    assert files.display_path(b"bad\\xffname.png") == "bad\\\\xffname.png"
    assert files.display_path(b"one\ntwo") == "one\\ntwo"
    assert files.display_path(b"\x1b[0m") == "\\x1b[0m"


def test_display_path_never_shows_invisible_or_blank_characters_raw() -> None:
    """A right-to-left override makes ``scan<RLO>gnp.tiff`` read as ``scanffit.png``; zero-width spaces and
    joiners, variation selectors, Hangul fillers and no-break spaces make two names read alike: every
    format character (category Cf) and space other than U+0020 (Zs) the interpreter knows, every
    default-ignorable code point and the blank braille pattern are shown as their bytes, in paths and in
    log lines, and the name still comes back whole."""
    invisible = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) in ("Cf", "Zs")]
    invisible.remove(" ")
    invisible += ["\u034f", "\u115f", "\u1160", "\u17b4", "\u180b", "\u3164", "\ufe0f", "\uffa0"]
    invisible += ["\U00016fe4", "\U000e0100", "\u2800"]
    assert len(invisible) > 160
    for ch in invisible:
        name = f"scan{ch}gnp.tiff"
        shown = files.display_path(name)
        assert ch not in shown and ch not in files.one_line(f"cannot read {name}"), f"U+{ord(ch):04X}"
        assert files.path_from_display(shown) == name
    assert files.display_path("scan\u202egnp.tiff") == "scan\\xe2\\x80\\xaegnp.tiff"
    # letters are shown as they are, accents composed or not (their bytes differ, so do their rows)
    assert files.display_path("caf\u00e9.png") != files.display_path("cafe\u0301.png")
    assert files.display_path("\u0430.png") == "\u0430.png"


@pytest.mark.parametrize("text", ["a\\", "a\\q", "\\x4", "\\u00e9", "lone\udcff"])
def test_path_from_display_refuses_what_no_path_displays_as(text: str) -> None:
    with pytest.raises(ValueError, match="not a displayed path"):
        files.path_from_display(text)


def test_read_once_never_follows_a_link_and_never_blocks_on_a_fifo(tmp_path):
    """The one reader scoring and intake share: the bytes and the identity of the very descriptor they
    came from; a link is refused (ELOOP), a FIFO or a folder is not read (and opening it never blocks)."""
    from bcc_pipeline.moving import identity

    plain = tmp_path / "a.png"
    plain.write_bytes(b"content")
    data, st = files.read_once(plain, 1 << 20)
    assert data == b"content" and identity(st) == identity(os.lstat(plain))
    (tmp_path / "link.png").symlink_to(plain)
    with pytest.raises(OSError) as refused:
        files.read_once(tmp_path / "link.png", 1 << 20)
    assert refused.value.errno == errno.ELOOP
    os.mkfifo(tmp_path / "fifo.png")
    assert files.read_once(tmp_path / "fifo.png", 1 << 20)[0] is None  # returns at once: nobody writes
    assert files.read_once(tmp_path, 1 << 20)[0] is None


def test_a_file_stamped_a_moment_ahead_is_settled_without_a_clock_skew_warning(caplog):
    """Round 25: with no settle time, a file written this instant (its mtime a fraction of a second ahead of
    `time.time()`) was logged as "modified 0 s in the future (clock skew?)". A second or more ahead is still
    warned about; either way the file is settled."""
    import logging

    with caplog.at_level(logging.WARNING):
        assert files.settled("a.png", mtime=100.4, now=100.0, settle=0)
    assert "clock skew" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert files.settled("b.png", mtime=103.0, now=100.0, settle=0)
        assert not files.settled("c.png", mtime=99.5, now=100.0, settle=30)
    assert "b.png was modified 3 s in the future (clock skew?)" in caplog.text and "c.png" not in caplog.text
