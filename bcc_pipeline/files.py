"""Moving files out of ``inbox/`` and ``landing/`` without ever losing or overwriting one.

The rules every move in the pipeline follows:

* A symbolic link is moved as a link: the link itself is renamed (or re-created), its target is never
  opened, read, moved or changed. Only ``os.lstat``/``os.readlink`` ever look at a link.
* Nothing is overwritten. A taken destination name gets a suffix, ``name~1.png``, ``name~2.png``, ...
  Every step that gives a file its final name refuses to replace one that is there, whenever it
  appeared: a hard link, ``renameat2(RENAME_NOREPLACE)``, ``symlink`` or an ``O_EXCL`` create. No
  step checks for the name first and then renames.
* A move is idempotent. It hard-links the source to its destination (``link`` fails instead of replacing
  an existing name) and then removes the source; a move interrupted between the two steps (even by
  SIGKILL) is finished by the next attempt, which finds the destination is the same inode as the source.
* Where hard links are unavailable (a filesystem without them, or not allowed for this file) the move
  is one ``renameat2(..., RENAME_NOREPLACE)`` (Linux; atomic, fails when the name is taken). Where that
  is unavailable too, the bytes are copied into a new file created with ``O_EXCL``, flushed, and only
  then is the source removed; an interruption there leaves both copies, never none.
* When the destination is on another filesystem (an inbox mounted from elsewhere) the bytes are copied
  to a hidden temporary file beside the destination (``.bcc-move-<hash>.tmp``, a name fixed by the
  destination), with the source's mode and times, flushed, and hard-linked into place without
  replacing anything; only then is the source removed, and then the temporary name. A move killed at any
  point leaves at most one visible copy: the next attempt finds the temporary file, and either finishes
  that move (it was published: only the source is left to remove) or throws the unfinished copy away
  and starts again. (On a destination without hard links the copy is renamed into place instead, and a
  kill between that rename and removing the source leaves both copies.)
* A caller that read the file can pass its identity (device, inode, size, mtime): a source that is no
  longer that file is not moved (:class:`SourceChangedError`), and a hard link that turns out to be of
  another file is undone.
* A file that cannot be moved stays where it is and the error is raised to the caller (who reports it);
  a half-made destination is removed again.

Names are kept within the 255-byte limit of a file name: a clash suffix or a ``.reason.txt`` added to a
very long name shortens its stem (with a short hash of the full name, so shortened names stay distinct).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "NAME_MAX",
    "REASON_SUFFIX",
    "SYSTEM_NAMES",
    "atomic_write",
    "display_path",
    "Identity",
    "SourceChangedError",
    "finish_move",
    "fit_name",
    "identity",
    "move_no_clobber",
    "quarantine_file",
    "reason_path",
    "rename_no_replace",
    "renameat2",
    "safe_dirname",
    "sha256_file",
    "write_reason",
]

NAME_MAX = 255
REASON_SUFFIX = ".reason.txt"
_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
# renameat2 errors that mean "this filesystem or kernel cannot do RENAME_NOREPLACE", not "this rename failed"
_NOREPLACE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


renameat2 = _load_renameat2()
"""The C library's ``renameat2``, or ``None`` where there is none (then :func:`rename_no_replace` copies
with ``O_EXCL``). Tests set it to ``None`` to exercise that fallback."""


SYSTEM_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})
"""Names (lower case) of files operating systems leave behind; intake and scoring ignore them like
hidden files and leave them where they are."""


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as valid UTF-8 text for databases, JSON and logs.

    File names on Linux are bytes; bytes that are not UTF-8 arrive in Python as lone surrogates, which
    neither PostgreSQL nor SQLite accept. They are shown as ``\\xNN`` escapes instead.
    """
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def fit_name(stem: str, tail: str = "") -> str:
    """``stem + tail`` when it fits in :data:`NAME_MAX` bytes; otherwise the stem is shortened and
    ``#<8 hex of the full stem>`` is added before ``tail``."""
    raw, tail_b = os.fsencode(stem), os.fsencode(tail)
    if len(raw) + len(tail_b) <= NAME_MAX:
        return stem + tail
    digest = "#" + hashlib.sha256(raw).hexdigest()[:8]
    keep = max(1, NAME_MAX - len(tail_b) - len(digest))
    cut = raw[:keep]
    # do not end inside a multi-byte UTF-8 character
    while cut and (cut[-1] & 0xC0) == 0x80:
        cut = cut[:-1]
    if cut and cut[-1] >= 0xC0:
        cut = cut[:-1]
    return os.fsdecode(cut or raw[:1]) + digest + tail


def _candidates(dest: Path) -> Iterator[Path]:
    name = dest.name
    suffix = Path(name).suffix if len(Path(name).suffix) <= 16 else ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    yield dest.with_name(fit_name(stem, suffix))
    n = 1
    while True:
        yield dest.with_name(fit_name(stem, f"~{n}{suffix}"))
        n += 1


def reason_path(path: Path) -> Path:
    """Where the reason file of a quarantined ``path`` goes: ``<name>.reason.txt`` beside it."""
    return path.with_name(fit_name(path.name, REASON_SUFFIX))


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[Path], object], *,
                 exclusive: bool = False, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` all or nothing: a temporary file in the same folder (fsynced),
    then ``os.replace``. A crash leaves the old file or the new one, never half of one.

    ``data``: bytes, text (UTF-8), or a function that writes the file at the path it is given, for
    libraries that only write to a path (Keras' ``Model.save``, matplotlib's ``savefig``); that
    temporary path ends in ``path``'s suffix.
    ``exclusive``: never replace an existing file; the temporary file is hard-linked (or, without hard
    links, renamed with :func:`rename_no_replace`) into place, and ``FileExistsError`` is raised when
    ``path`` is already there (whoever wrote first wins).
    The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{path.suffix}" if callable(data) else ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=suffix, dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            data(Path(tmp))
            if fsync:
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
        else:
            raw = data.encode("utf-8", errors="backslashreplace") if isinstance(data, str) else data
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
                if fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        if exclusive:
            _publish(Path(tmp), path)  # fails instead of replacing
        else:
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def safe_dirname(name: str) -> str:
    """A single, harmless folder name for a run id (or any text): ASCII letters, digits and ``-_.+``;
    anything else becomes ``_``. A name that had to be changed (or is empty, ``.`` or ``..``) gets a
    short hash of the original, so different ids stay different folders."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.+") else "_" for c in name)[:120]
    if safe != name or safe in ("", ".", ".."):
        safe = f"{safe}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return safe


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks. ``OSError`` propagates."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_reason(path: Path, reason: str) -> Path:
    """Write (atomically, replacing an older one) the reason file beside ``path``.

    A quarantined *link* that happens to carry that name is never replaced: the reason then goes to
    ``<name>.reason~N.txt``.
    """
    target = reason_path(path)
    if os.path.islink(target):
        target = next(c for c in _candidates(target) if not os.path.islink(c))
    return atomic_write(target, reason.rstrip() + "\n", fsync=False)


def _copy_no_replace(src: Path, dst: Path) -> None:
    """Copy ``src`` (a link as a link) to a new ``dst``: ``FileExistsError`` when ``dst`` exists. The copy
    is flushed to disk before this returns; a failed copy is removed again."""
    src_st = os.lstat(src)
    if stat.S_ISLNK(src_st.st_mode):
        os.symlink(os.readlink(src), dst)  # fails when dst exists; readlink never touches the target
        return
    nofollow, cloexec = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_CLOEXEC", 0)
    in_fd = os.open(src, os.O_RDONLY | nofollow | cloexec)
    with os.fdopen(in_fd, "rb") as inp:
        out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow | cloexec,
                         stat.S_IMODE(src_st.st_mode))
        try:
            with os.fdopen(out_fd, "wb") as out:
                while chunk := inp.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.utime(dst, ns=(src_st.st_atime_ns, src_st.st_mtime_ns))
        except BaseException:
            os.unlink(dst)
            raise


def rename_no_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` (a file, or a symlink itself) to ``dst`` unless ``dst`` exists: then
    ``FileExistsError``, and both stay as they are.

    One ``renameat2(..., RENAME_NOREPLACE)`` call where the C library and the filesystem support it (the
    check and the rename are one atomic step in the kernel). Elsewhere the bytes are copied into a new
    ``dst`` created with ``O_EXCL`` and flushed, and then ``src`` is removed.
    """
    src, dst = Path(src), Path(dst)
    fn = renameat2
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NOREPLACE_UNSUPPORTED:
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    _copy_no_replace(src, dst)
    os.unlink(src)


def _publish(tmp: Path, dest: Path) -> None:
    """Give the complete file ``tmp`` the name ``dest`` without replacing anything (``FileExistsError``
    when taken): a hard link (``tmp`` is then the caller's to remove), or without hard links a
    :func:`rename_no_replace`."""
    try:
        os.link(tmp, dest)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in _LINK_UNSUPPORTED:
            raise
        rename_no_replace(tmp, dest)


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


Identity = tuple[int, int, int, int]
"""What a file was when it was read: (st_dev, st_ino, st_size, st_mtime_ns); :func:`identity` of a stat."""


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SourceChangedError(OSError):
    """The file at the source path is no longer the one the caller read (replaced, or rewritten in
    place): nothing was moved, the path keeps what it holds now."""


def _expect(st: os.stat_result, expect: Identity | None, src: Path) -> None:
    if expect is not None and identity(st) != tuple(expect):
        raise SourceChangedError(errno.ESTALE, "the file changed after it was read", os.fspath(src))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_marker(dest: Path) -> Path:
    """The temporary name a cross-filesystem copy to ``dest`` is written under (hidden, beside ``dest``).
    It stays linked to the published copy until the source is removed, so an interrupted move is
    recognised and finished by the next attempt instead of copied a second time."""
    return dest.with_name(f".bcc-move-{hashlib.sha256(os.fsencode(dest.name)).hexdigest()[:16]}.tmp")


def _leftover_copy(dest: Path, src_st: os.stat_result | None) -> Path | None:
    """What an interrupted cross-filesystem move to ``dest`` left. Returns the published copy (a name of
    ``dest``'s linked to the marker) when that move got that far and the copy has the source's size and
    mtime (the marker is then kept until the caller has removed the source); else the marker is removed."""
    marker = _copy_marker(dest)
    try:
        mst = os.lstat(marker)
    except FileNotFoundError:
        return None
    published = None
    for candidate in _candidates(dest) if mst.st_nlink > 1 else ():
        try:
            if _same_inode(os.lstat(candidate), mst):
                published = candidate
                break
        except FileNotFoundError:
            break
    same = src_st is None or (mst.st_size, mst.st_mtime_ns) == (src_st.st_size, src_st.st_mtime_ns)
    if published is None or not same:
        os.unlink(marker)
        return None
    return published


def finish_move(dest: str | os.PathLike[str]) -> Path | None:
    """After the source is gone: tidy what an interrupted move across filesystems to ``dest`` left. Returns
    where its copy was published (or None); the temporary name is removed either way."""
    dest = Path(dest)
    published = _leftover_copy(dest, None) if dest.parent.is_dir() else None
    _copy_marker(dest).unlink(missing_ok=True)
    return published


def _copy_file_across(src: Path, candidate: Path, marker: Path, expect: Identity | None) -> Path:
    """Copy ``src`` to ``marker`` (a new file: the source's bytes, mode and times, flushed), then give it the
    name ``candidate`` without replacing anything (FileExistsError when taken). ``marker`` stays linked
    to the copy (the caller removes it after the source); a failed copy is removed."""
    nofollow, cloexec = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_CLOEXEC", 0)
    in_fd = os.open(src, os.O_RDONLY | nofollow | cloexec)
    published = False
    try:
        with os.fdopen(in_fd, "rb") as inp:
            before = os.fstat(inp.fileno())
            _expect(before, expect, src)
            try:
                out_fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow | cloexec, 0o600)
            except FileExistsError:  # not "the destination is taken": another move to it is under way
                raise OSError(errno.EBUSY, "another move to this destination is under way", str(marker)) from None
            with os.fdopen(out_fd, "wb") as out:
                while chunk := inp.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fchmod(out.fileno(), stat.S_IMODE(before.st_mode))
                os.utime(out.fileno(), ns=(before.st_atime_ns, before.st_mtime_ns))
                os.fsync(out.fileno())
            _expect(os.fstat(inp.fileno()), identity(before), src)  # not rewritten while copied
        _publish(marker, candidate)  # no-clobber; FileExistsError when taken
        published = True
        _fsync_dir(candidate.parent)
    finally:
        if not published:
            marker.unlink(missing_ok=True)
    return marker


def _remove_source(src: Path, where: Path, expect: Identity | None, *, shared_inode: bool) -> None:
    """Remove ``src`` after its content reached ``where``. With ``expect``: a source path that now holds
    another file is left alone (that file was never read: it stays for the next run); a source rewritten
    in place after the hard link (one inode, ``shared_inode``) undoes the move (SourceChangedError)."""
    if expect is not None:
        st = os.lstat(src)
        if (st.st_dev, st.st_ino) != tuple(expect)[:2]:
            return
        if identity(st) != tuple(expect):
            if shared_inode:
                os.unlink(where)
                raise SourceChangedError(errno.ESTALE, "the file changed while it was moved", os.fspath(src))
            return  # the copy holds what was read; the new content stays at the source
    os.unlink(src)


def move_no_clobber(src: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                    expect: Identity | None = None,
                    before_unlink: Callable[[Path, Path], None] | None = None) -> Path:
    """Move ``src`` (a regular file, or a symlink itself) to ``dest``, or ``dest~N`` when that is taken.

    Never overwrites and never follows a link. Returns where the file is now. Raises
    ``FileNotFoundError`` when ``src`` is gone and ``OSError`` when it cannot be moved (it then stays
    where it was).

    ``expect``: the :data:`Identity` the source had when the caller read it. A source that is no longer
    that file raises :class:`SourceChangedError` and stays; checked right before the move, and on the hard
    link itself (undone when it differs). ``before_unlink(src, where)`` runs once the file is at ``where``,
    before the source is removed (a named point where tests interrupt a move).
    """
    src, dest = Path(src), Path(dest)
    try:
        src_st = os.lstat(src)
    except FileNotFoundError:
        if (published := finish_move(dest)) is None:
            raise
        return published
    dest.parent.mkdir(parents=True, exist_ok=True)
    published = _leftover_copy(dest, src_st)
    if published is not None:  # an interrupted cross-filesystem move got as far as publishing its copy
        _remove_source(src, published, expect, shared_inode=False)
        _copy_marker(dest).unlink(missing_ok=True)
        return published
    _expect(src_st, expect, src)
    for candidate in _candidates(dest):
        try:
            cst = os.lstat(candidate)
        except FileNotFoundError:
            cst = None
        if cst is not None:
            if _same_inode(cst, src_st):  # an earlier attempt linked it there and was interrupted
                _remove_source(src, candidate, expect, shared_inode=True)
                return candidate
            continue
        marker = None
        try:
            os.link(src, candidate, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                try:
                    if stat.S_ISLNK(src_st.st_mode):
                        os.symlink(os.readlink(src), candidate)  # readlink never touches the target
                    else:
                        marker = _copy_file_across(src, candidate, _copy_marker(dest), expect)
                except FileExistsError:
                    continue
            elif exc.errno in _LINK_UNSUPPORTED:
                # no hard links here (or not allowed for this file): a rename that refuses a taken name
                try:
                    rename_no_replace(src, candidate)
                except FileExistsError:
                    continue
                if expect is not None and identity(os.lstat(candidate)) != tuple(expect):
                    back = move_no_clobber(candidate, src)  # not what was read: put it back
                    raise SourceChangedError(errno.ESTALE, "the file changed after it was read",
                                             os.fspath(back)) from None
                return candidate
            else:
                raise
        else:
            if expect is not None and identity(os.lstat(candidate)) != tuple(expect):
                os.unlink(candidate)  # the name held another file by the time it was linked
                raise SourceChangedError(errno.ESTALE, "the file changed after it was read", os.fspath(src))
        if before_unlink is not None:
            before_unlink(src, candidate)
        try:
            _remove_source(src, candidate, expect, shared_inode=marker is None)
        except FileNotFoundError:
            # Someone else moved the same file meanwhile (to another name): keep theirs, drop our
            # extra link, and say the source is gone.
            if marker is None and os.lstat(candidate).st_nlink > 1:
                os.unlink(candidate)
                raise
        except SourceChangedError:
            raise
        except OSError:
            os.unlink(candidate)  # leave things as they were: the file stays in the source folder
            raise
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def quarantine_file(src: Path, dest_root: Path, rel: Path, reason: str) -> Path:
    """Move ``src`` (a file or a symlink itself, never its target) to ``dest_root/rel``.

    A clashing name gets a numeric suffix (``name~1.png``). A ``<name>.reason.txt`` is written beside
    it. Returns where the file went.
    """
    moved = move_no_clobber(src, Path(dest_root) / rel)
    write_reason(moved, reason)
    return moved
