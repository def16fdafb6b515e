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
  destination, the source's path and its device and inode, so two files whose destinations meet never
  share one),
  with the source's mode and times, flushed, and hard-linked into place without replacing anything; only
  then is the source removed, and then the temporary name. A symbolic link is re-created the same way: a
  new link with the same target (``readlink``) under the temporary name, with the source link's times,
  hard-linked into place. A move killed at any point leaves at most one visible copy: the next attempt
  finds the temporary file, and either finishes that move (it was published: only the source is left to
  remove) or throws the unfinished copy away and starts again. (On a destination without hard links the
  copy is renamed into place instead, and a kill between that rename and removing the source leaves both
  copies.)
* A caller that records where each file went can say which names other files' moves already hold
  (``taken``): such a name is never taken for this move's own interrupted attempt (a hard link of the
  source moved there under another name, or an identical copy across filesystems), nor found by
  :func:`find_moved`. A first attempt (``fresh``) has no interrupted attempt to finish at all: a
  destination that already is the source's inode belongs to another name of the file.
* A caller that read the file can pass its identity (device, inode, size, mtime): a source that is no
  longer that file is not moved (:class:`SourceChangedError`), and a hard link that turns out to be of
  another file is undone. A source name that holds another file by the time the source is to be removed
  is left alone (the moved copy is what was read). The one window left is between that last ``lstat``
  and the ``unlink`` right after it.
* A file that cannot be moved stays where it is and the error is raised to the caller (who reports it);
  a half-made destination is removed again.
* Given the roots (``src_root``: the inbox or ``landing/``; ``dest_root``: ``archive/`` or
  ``quarantine/``), no folder between a root and the file may be a symbolic link: a source folder
  swapped for a link after it was listed makes the file count as changed (left alone), and destination
  folders are created one by one, each checked, so a link quarantined earlier (or planted there) never
  leads a move, a folder or a reason file outside the root. The roots themselves may be links (a home on
  another mount). The check runs right before the move; a swap in the instant between that check and the
  system call is the window left (closing it needs every step relative to directory descriptors).
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .files import LINK_UNSUPPORTED, candidate_names, publish_no_clobber, rename_no_replace, write_reason

__all__ = [
    "Identity",
    "LinkedFolderError",
    "SourceChangedError",
    "Taken",
    "find_moved",
    "finish_move",
    "files_below",
    "found_by_identity",
    "FoundBy",
    "change_time",
    "identity",
    "identity_from_text",
    "identity_text",
    "make_real_folders",
    "move_no_clobber",
    "pending_copy",
    "quarantine_file",
    "require_real_folders",
    "require_resolved",
]


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


Taken = Callable[[Path], bool]
"""Whether a destination name is already recorded as where another file went (the caller's ledger)."""

Identity = tuple[int, int, int, int]
"""What a file was when it was read: (st_dev, st_ino, st_size, st_mtime_ns); :func:`identity` of a stat."""


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def change_time(st: os.stat_result) -> int | None:
    """``st``'s inode change time, which nothing can set back (unlike the mtime ``utime`` restores), for
    checking that a file read a moment ago was not rewritten in place since (``rsync --inplace -t``: the
    same size, the mtime put back). None for a file with other names: moving one of them changes it."""
    return st.st_ctime_ns if st.st_nlink == 1 else None


def identity_text(ident: Identity | None) -> str | None:
    """An identity as the database keeps it, ``"dev:ino:size:mtime_ns"``."""
    return None if ident is None else ":".join(str(int(v)) for v in ident)


def identity_from_text(text: str | None) -> Identity | None:
    """The inverse of :func:`identity_text`; None for None or anything else."""
    try:
        dev, ino, size, mtime_ns = (int(v) for v in (text or "").split(":"))
    except ValueError:
        return None
    return (dev, ino, size, mtime_ns)


class SourceChangedError(OSError):
    """The file at the source path is no longer the one the caller read (replaced, or rewritten in
    place): nothing was moved, the path keeps what it holds now."""


class LinkedFolderError(OSError):
    """A folder between a managed root and a file is a symbolic link (or not a folder): nothing is read,
    moved or created through it."""


def _parts_below(root: str | os.PathLike[str], folder: str | os.PathLike[str]) -> list[str]:
    rel = os.path.relpath(os.fspath(folder), os.fspath(root))
    if rel == os.curdir:
        return []
    parts = rel.split(os.sep)
    if os.pardir in parts or os.path.isabs(rel):
        raise LinkedFolderError(errno.EXDEV, "not inside its root", os.fspath(folder))
    return parts


def require_real_folders(
    root: str | os.PathLike[str], path: str | os.PathLike[str], *, resolved_root: bool = False
) -> None:
    """Raise :class:`LinkedFolderError` unless every folder from ``root`` (excluded) down to ``path``'s
    parent is a real folder, not a symbolic link. ``path`` itself is not checked (the caller ``lstat``s
    it). A missing folder raises ``FileNotFoundError``. ``resolved_root``: ``root`` was resolved (no link
    on its way) when it was judged; one that now leads elsewhere (it, or a folder above it, swapped for a
    link since) raises too."""
    cur = os.fspath(root)
    if resolved_root:
        require_resolved(cur)
    for part in _parts_below(root, os.path.dirname(os.fspath(path))):
        cur = os.path.join(cur, part)
        st = os.lstat(cur)
        if not stat.S_ISDIR(st.st_mode):  # lstat: a link to a folder is a link here
            raise LinkedFolderError(
                errno.ELOOP, "a folder on the way is a symbolic link or not a folder", cur
            )


def require_resolved(folder: str) -> None:
    """Raise :class:`LinkedFolderError` when the resolved path ``folder`` no longer resolves to itself (it,
    or a folder above it, swapped for a link to somewhere else since it was judged)."""
    if os.path.realpath(folder) != folder:
        raise LinkedFolderError(errno.ELOOP, "the folder now leads elsewhere through a symbolic link", folder)


def make_real_folders(root: str | os.PathLike[str], folder: str | os.PathLike[str]) -> None:
    """``mkdir -p folder`` below ``root`` (which must exist), one folder at a time, refusing to go through
    a symbolic link (:class:`LinkedFolderError`): unlike ``Path.mkdir(parents=True)``, it never creates a
    folder inside a link's target."""
    cur = os.fspath(root)
    os.makedirs(cur, exist_ok=True)  # the root is the home's own folder (it may itself be a link)
    for part in _parts_below(root, folder):
        cur = os.path.join(cur, part)
        try:
            os.mkdir(cur)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(cur).st_mode):
            raise LinkedFolderError(
                errno.ELOOP, "a folder on the way is a symbolic link or not a folder", cur
            )


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


def _copy_marker(dest: Path, src: Path, source: Identity | os.stat_result) -> Path:
    """The temporary name a cross-filesystem copy of the file ``src`` (its path, and its device and inode,
    ``source``) to ``dest`` is written under (hidden, beside ``dest``). It stays linked to the published copy
    until the source is removed, so an interrupted move is recognised and finished by the next attempt of
    that file's move. Another file whose destination is the same name (``r.reason.txt/a.png`` and
    ``r.reason.txt.d/a.png`` both go to ``r.reason.txt.d/a.png``), another name of the same inode (a hard
    link), or a later file given the same inode number has a marker of its own: it never takes this copy
    for its own, nor removes this marker."""
    dev, ino = (source.st_dev, source.st_ino) if isinstance(source, os.stat_result) else tuple(source[:2])
    where = os.path.join(os.path.realpath(src.parent), src.name)  # one name, whether reached by a link or not
    key = b"\0".join((os.fsencode(dest.name), os.fsencode(where), f"{dev}:{ino}".encode()))
    return dest.with_name(f".bcc-move-{hashlib.sha256(key).hexdigest()[:16]}.tmp")


def _legacy_marker(dest: Path) -> Path:
    """The temporary name versions before 2026-12-05 gave every copy to ``dest`` (shared by all files whose
    destinations met): an interrupted move of theirs is finished only where the bytes show it is this one."""
    return dest.with_name(f".bcc-move-{hashlib.sha256(os.fsencode(dest.name)).hexdigest()[:16]}.tmp")


def _published(dest: Path, marker: Path) -> tuple[Path | None, os.stat_result | None]:
    """The name of ``dest``'s (``dest``, ``dest~N``) that is linked to ``marker``, with the marker's stat."""
    try:
        mst = os.lstat(marker)
    except FileNotFoundError:
        return None, None
    for candidate in candidate_names(dest) if mst.st_nlink > 1 else ():
        try:
            if _same_inode(os.lstat(candidate), mst):
                return candidate, mst
        except FileNotFoundError:
            break
    return None, mst


def _leftover_copy(
    dest: Path,
    src: Path,
    src_st: os.stat_result | None,
    taken: Taken | None = None,
    prior: Identity | None = None,
) -> tuple[Path, Path] | None:
    """What an interrupted cross-filesystem move of ``src`` to ``dest`` left: ``(published copy, marker)``
    when that move got as far as publishing its copy (a name of ``dest``'s linked to the marker) and the copy
    is of the source (a file: the same bytes; a symbolic link: a link with the same target). The marker is
    then kept until the caller has removed the source. ``prior``: the identity the file had when it was
    first moved, when the path may hold a copy of it by now (copied again, another inode). ``src_st`` None
    (the source is gone): the copy of the move of ``prior`` is taken as it is. A copy whose name is
    ``taken`` (recorded as another file's) is never taken."""
    markers: list[tuple[Path, bool]] = []
    if src_st is not None:
        markers.append((_copy_marker(dest, src, src_st), True))
    if prior is not None and (src_st is None or tuple(prior[:2]) != (src_st.st_dev, src_st.st_ino)):
        markers.append((_copy_marker(dest, src, prior), src_st is None))
    if src_st is not None:
        markers.append((_legacy_marker(dest), False))
    for marker, own in markers:
        found = _leftover_of(dest, marker, src, src_st, taken, own)
        if found is not None:
            return found
    if src_st is not None and os.path.lexists(dest):
        # The source's folder may have been renamed, or reached by another way since (a link re-pointed):
        # its marker then has another name. Any marker beside ``dest`` whose published copy holds the
        # source's very bytes finishes this move (only where ``dest`` is taken: rare, so the listing is)
        others: list[Path] = []
        with contextlib.suppress(OSError), os.scandir(dest.parent) as entries:
            others = [
                Path(e.path) for e in entries if e.name.startswith(".bcc-move-") and e.name.endswith(".tmp")
            ]
        for marker in sorted(others):
            found = _leftover_of(dest, marker, src, src_st, taken, False)
            if found is not None:
                return found
    return None


def _leftover_of(
    dest: Path, marker: Path, src: Path, src_st: os.stat_result | None, taken: Taken | None, own: bool
) -> tuple[Path, Path] | None:
    """One marker of :func:`_leftover_copy`. ``own``: the marker is this source's: one that leads to no copy
    of it is stale and removed. Another (``prior``'s, or of the old naming) is left alone unless taken."""
    published, mst = _published(dest, marker)
    if mst is None:
        return None
    if src_st is None:
        same = True
    elif stat.S_IFMT(mst.st_mode) != stat.S_IFMT(src_st.st_mode):
        same = False
    elif stat.S_ISLNK(mst.st_mode):
        same = os.readlink(marker) == os.readlink(src)
    else:
        # the same bytes (a rare path, so compared in full): a file touched since, or copied again, is this
        # content, and a second copy beside it would be an unrecorded orphan; a later file that was given
        # the same inode number (and size, and mtime) is not
        same = published is not None and mst.st_size == src_st.st_size
        same = same and filecmp.cmp(marker, src, shallow=False)
    if published is None or not same or (taken is not None and taken(published)):
        if own:
            os.unlink(marker)
        return None
    return published, marker


def find_moved(
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    ident: Identity | None = None,
    taken: Taken | None = None,
) -> Path | None:
    """Where a move to ``dest`` that was never recorded put its file: ``dest``, or ``dest~N`` when that
    name was taken at the time. Each name in turn (up to the first that does not exist) is compared with
    what the file was: the same inode (a move on one filesystem), else, on another filesystem, the same
    size and mtime (a copy keeps them), and the same content hash where one is known. With neither ``sha256`` nor ``ident`` (rows from before
    migration 0008 refused unread), ``dest`` is taken when it exists. A name that is ``taken`` (recorded as
    another file's place) is never the answer: two files with the same bytes and times copied across
    filesystems, or two names of one inode, are told apart by which names are left. None: none of them is
    the file."""
    dest = Path(dest)
    present: list[tuple[Path, os.stat_result]] = []
    for candidate in candidate_names(dest):
        try:
            present.append((candidate, os.lstat(candidate)))
        except FileNotFoundError:
            break

    def free(candidate: Path) -> bool:  # asked only of a match: ``taken`` may be a database query
        return taken is None or not taken(candidate)

    if sha256 is None and ident is None:
        return dest if present and free(dest) else None

    def content_ok(candidate: Path, st: os.stat_result) -> bool:
        return sha256 is None or not stat.S_ISREG(st.st_mode) or _sha256_of(candidate) == sha256

    if ident is not None:
        # the very inode first (a move on one filesystem keeps it); size and mtime only for a copy made
        # across filesystems (another device), where a neighbour on the same one cannot be mistaken for it
        for candidate, st in present:
            if (st.st_dev, st.st_ino) == tuple(ident[:2]) and content_ok(candidate, st) and free(candidate):
                return candidate
        for candidate, st in present:
            if st.st_dev != ident[0] and (st.st_size, st.st_mtime_ns) == tuple(ident[2:]):
                if content_ok(candidate, st) and free(candidate):
                    return candidate
        return None
    for candidate, st in present:
        if stat.S_ISREG(st.st_mode) and _sha256_of(candidate) == sha256 and free(candidate):
            return candidate
    return None


def _sha256_of(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | getattr(os, "O_NOFOLLOW", 0))) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def pending_copy(dest: str | os.PathLike[str], src: str | os.PathLike[str], ident: Identity) -> Path | None:
    """The copy across filesystems that a move of the file ``src`` (``ident``) to ``dest`` published before
    it was interrupted (its temporary name still linked to it: the source was never removed), or None.
    Looks only; changes nothing."""
    return _published(Path(dest), _copy_marker(Path(dest), Path(src), ident))[0]


def finish_move(
    dest: str | os.PathLike[str],
    src: str | os.PathLike[str],
    ident: Identity | None,
    *,
    taken: Taken | None = None,
) -> Path | None:
    """After the source ``src`` is gone: tidy what an interrupted move across filesystems of that file
    (``ident``, its identity when it was read) to ``dest`` left. Returns where its copy was published (or
    None; so when that name is ``taken``, or the identity is unknown); its temporary name is removed either
    way. A temporary name of the old naming (shared by every file to ``dest``) goes only when its copy is
    this file's by size and mtime."""
    dest, src = Path(dest), Path(src)
    if ident is None or not dest.parent.is_dir():
        return None
    left = _leftover_copy(dest, src, None, taken, ident)
    _copy_marker(dest, src, ident).unlink(missing_ok=True)
    if left is None:
        legacy = _legacy_marker(dest)
        published, mst = _published(dest, legacy)
        if mst is not None and published is not None and (mst.st_size, mst.st_mtime_ns) == tuple(ident[2:]):
            if taken is None or not taken(published):
                legacy.unlink(missing_ok=True)
                return published
    return None if left is None else left[0]


def files_below(folder: str | os.PathLike[str]) -> Iterator[str]:
    """Every file (and link) below ``folder``, never through a link; a folder that cannot be listed is
    passed over. Lazy: for :func:`found_by_identity`."""
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(parent, d))]
        yield from (os.path.join(parent, n) for n in names)


FoundBy = Callable[[Identity, "str | None"], Path | None]
"""``(identity, sha256) -> path``: see :func:`found_by_identity`."""


def found_by_identity(paths: Iterable[str | os.PathLike[str]]) -> FoundBy:
    """``(identity, sha256) -> the one of paths that holds that very file now`` (its device and inode, and
    its size and mtime; or, touched since, a regular file of that size whose content hashes to ``sha256``),
    or None. ``paths`` is looked at (each path's ``lstat``) only when first asked, for callers that rarely
    need to ask (a killed move's file found under a new name)."""
    index: dict[tuple[int, int], tuple[Path, os.stat_result]] | None = None

    def at(ident: Identity, sha256: str | None = None) -> Path | None:
        nonlocal index
        if index is None:
            index = {}
            for path in paths:
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    index[(st.st_dev, st.st_ino)] = (Path(path), st)
        found = index.get((ident[0], ident[1]))
        if found is None:
            return None
        path, st = found
        if identity(st) == tuple(ident):
            return path
        if sha256 is not None and stat.S_ISREG(st.st_mode) and st.st_size == ident[2]:
            return path if _sha256_of(path) == sha256 else None
        return None

    return at


COPY_SPARE_BYTES = 256 << 20
"""Free space a copy across filesystems leaves on the destination's filesystem (the database, the
models and the runs' files may share it); a twentieth of it on a filesystem smaller than 5 GiB."""


def _require_room(folder: Path, size: int) -> None:
    """Refuse (``ENOSPC``, before writing anything) a copy of ``size`` bytes that would leave less than
    :data:`COPY_SPARE_BYTES` free where it goes: a sparse file refused as too large (1 TiB apparent, no
    blocks) would otherwise be written out in full, filling the disk the database lives on."""
    vfs = os.statvfs(folder)
    free = vfs.f_bavail * vfs.f_frsize
    spare = min(COPY_SPARE_BYTES, vfs.f_blocks * vfs.f_frsize // 20)
    if size > free - spare:
        raise OSError(
            errno.ENOSPC,
            f"no room for a copy of {size} bytes ({free} free, {spare} kept spare)",
            os.fspath(folder),
        )


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
            _require_room(marker.parent, before.st_size)
            try:
                out_fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow | cloexec, 0o600)
            except FileExistsError:  # not "the destination is taken": another move to it is under way
                raise OSError(
                    errno.EBUSY, "another move to this destination is under way", str(marker)
                ) from None
            with os.fdopen(out_fd, "wb") as out:
                while chunk := inp.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fchmod(out.fileno(), stat.S_IMODE(before.st_mode) & 0o777)  # no setuid/setgid/sticky
                os.utime(out.fileno(), ns=(before.st_atime_ns, before.st_mtime_ns))
                os.fsync(out.fileno())
            _expect(os.fstat(inp.fileno()), identity(before), src)  # not rewritten while copied
        publish_no_clobber(marker, candidate)  # no-clobber; FileExistsError when taken
        published = True
        _fsync_dir(candidate.parent)
    finally:
        if not published and not _linked(marker, candidate):
            marker.unlink(missing_ok=True)
    return marker


def _linked(marker: Path, candidate: Path) -> bool:
    """Whether ``candidate`` is a name of ``marker``'s (published, whatever interrupted the caller between
    the link and noting it: an exception raised by a signal handler, Airflow's timeout): the marker then
    stays, so the next attempt finishes that move rather than leaving an unrecorded copy."""
    try:
        return _same_inode(os.lstat(marker), os.lstat(candidate))
    except OSError:
        return False


def _copy_link_across(src: Path, src_st: os.stat_result, candidate: Path, marker: Path) -> Path:
    """Re-create the symbolic link ``src`` (its target read with ``readlink``, never opened) as a new link
    at ``marker`` with the source link's times, then give it the name ``candidate`` without replacing
    anything (FileExistsError when taken). ``marker`` stays linked to it (the caller removes it after the
    source), so a move killed before the source is removed is finished by the next attempt, not repeated
    as ``name~1``; a failed copy is removed."""
    target = os.readlink(src)
    try:
        os.symlink(target, marker)
    except FileExistsError:  # not "the destination is taken": another move to it is under way
        raise OSError(errno.EBUSY, "another move to this destination is under way", str(marker)) from None
    published = False
    try:
        with contextlib.suppress(OSError, NotImplementedError):  # the times are kept where links have them
            os.utime(marker, ns=(src_st.st_atime_ns, src_st.st_mtime_ns), follow_symlinks=False)
        publish_no_clobber(marker, candidate)  # the link itself, no-clobber; FileExistsError when taken
        published = True
        _fsync_dir(candidate.parent)
    finally:
        if not published and not _linked(marker, candidate):
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


def move_no_clobber(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    expect: Identity | None = None,
    before_unlink: Callable[[Path, Path], None] | None = None,
    src_root: str | os.PathLike[str] | None = None,
    dest_root: str | os.PathLike[str] | None = None,
    taken: Taken | None = None,
    fresh: bool = False,
    prior: Identity | None = None,
    expect_ctime: int | None = None,
) -> Path:
    """Move ``src`` (a regular file, or a symlink itself) to ``dest``, or ``dest~N`` when that is taken.

    Never overwrites and never follows a link. Returns where the file is now. Raises
    ``FileNotFoundError`` when ``src`` is gone and ``OSError`` when it cannot be moved (it then stays
    where it was).

    ``expect``: the :data:`Identity` the source had when the caller read it. A source that is no longer
    that file raises :class:`SourceChangedError` and stays; checked right before the move, and on the hard
    link itself (undone when it differs). ``before_unlink(src, where)`` runs once the file is at ``where``,
    before the source is removed (a named point where tests interrupt a move).

    ``src_root``/``dest_root``: the managed folders ``src`` and ``dest`` lie in. No folder between a root
    and its file may be a link: a linked source folder raises :class:`SourceChangedError` (the file is
    left alone), a linked destination folder :class:`LinkedFolderError`; destination folders are created
    one at a time below ``dest_root``, never through a link.

    ``taken``: names recorded as other files' places (see the module's rules); ``fresh``: this is the first
    attempt of this move, so no destination name can be an interrupted attempt of it. Two hard links of
    one file moved to colliding destinations then get two names, not one. ``prior``: the identity the
    file had when an earlier attempt moved it, where the path may hold a copy of it by now (the same bytes
    under another inode): that attempt's copy across filesystems is finished instead of copied again.
    ``expect_ctime``: the source's :func:`change_time` when it was read (a first attempt only): a source
    rewritten in place since, its size and mtime put back, raises :class:`SourceChangedError` too.
    """
    src, dest = Path(src), Path(dest)
    if dest_root is not None:
        make_real_folders(dest_root, dest.parent)
    if src_root is not None:
        try:
            require_real_folders(src_root, src)
        except FileNotFoundError:
            pass  # the source is gone: as below
        except LinkedFolderError as exc:
            raise SourceChangedError(errno.ELOOP, f"{exc.strerror}: {exc.filename}", os.fspath(src)) from exc
    try:
        src_st = os.lstat(src)
    except FileNotFoundError:
        for ident in (expect, prior):
            if (published := finish_move(dest, src, ident, taken=taken)) is not None:
                return published
        raise
    dest.parent.mkdir(parents=True, exist_ok=True)
    left = _leftover_copy(dest, src, src_st, taken, prior)
    if left is not None:  # an interrupted cross-filesystem move got as far as publishing its copy
        published, marker = left
        _remove_source(src, published, expect, shared_inode=False)
        marker.unlink(missing_ok=True)
        return published
    _expect(src_st, expect, src)
    if expect_ctime is not None and change_time(src_st) not in (expect_ctime, None):
        raise SourceChangedError(errno.ESTALE, "the file was rewritten after it was read", os.fspath(src))
    for candidate in candidate_names(dest):
        try:
            cst = os.lstat(candidate)
        except FileNotFoundError:
            cst = None
        if cst is not None:
            if _same_inode(cst, src_st) and not fresh and not (taken is not None and taken(candidate)):
                # an earlier attempt linked it there and was interrupted (not another name of this inode
                # that was moved there: that one is recorded, ``taken``)
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
                    if stat.S_ISLNK(src_st.st_mode):  # readlink never touches the target
                        marker = _copy_link_across(src, src_st, candidate, _copy_marker(dest, src, src_st))
                    else:
                        marker = _copy_file_across(src, candidate, _copy_marker(dest, src, src_st), expect)
                except FileExistsError:
                    continue
            elif exc.errno in LINK_UNSUPPORTED:
                # no hard links here (or not allowed for this file): a rename that refuses a taken name
                try:
                    rename_no_replace(src, candidate)
                except FileExistsError:
                    continue
                if expect is not None and identity(os.lstat(candidate)) != tuple(expect):
                    back = move_no_clobber(candidate, src)  # not what was read: put it back
                    raise SourceChangedError(
                        errno.ESTALE, "the file changed after it was read", os.fspath(back)
                    ) from None
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
