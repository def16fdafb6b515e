"""What a file is, and where it may be reached and found again: the rules of :mod:`bcc_pipeline.moving`
that do not move anything.

A file is known by its :data:`Identity` (device, inode, size, mtime), taken from the descriptor it was
read through; :func:`change_time` adds what a rewrite in place cannot set back. No folder between a
managed root and a file may be a symbolic link (:func:`require_real_folders`, :func:`make_real_folders`,
:func:`require_resolved`). :func:`find_moved` finds where a move that was never recorded put its file;
:func:`found_by_identity` finds a file under a name it was given since (a folder renamed).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .files import candidate_names

__all__ = [
    "FoundBy",
    "Identity",
    "LinkedFolderError",
    "SourceChangedError",
    "Taken",
    "change_time",
    "files_below",
    "find_moved",
    "found_by_identity",
    "identity",
    "identity_from_text",
    "identity_text",
    "same_file",
    "sha256_of",
    "make_real_folders",
    "linked_folder",
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


def linked_folder(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> str | None:
    """The first folder from ``root`` (excluded) down to ``path``'s parent that is a symbolic link, or
    None (a missing folder, or a file in the way, is no link: nothing was moved through it)."""
    try:
        require_real_folders(root, path)
    except LinkedFolderError as exc:
        return exc.filename if os.path.islink(exc.filename) else None
    except OSError:
        return None
    return None


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


def same_file(st: os.stat_result, ident: Identity) -> bool:
    """Whether ``st`` is the file ``ident`` was taken of: the same identity, or, for a symbolic link, the
    same device, inode and size (a link's target cannot change in place: ``touch -h`` changes only its
    times, so a link touched since is still the link that was read)."""
    if identity(st) == tuple(ident):
        return True
    return stat.S_ISLNK(st.st_mode) and (st.st_dev, st.st_ino, st.st_size) == tuple(ident[:3])


def _expect(st: os.stat_result, expect: Identity | None, src: Path) -> None:
    if expect is not None and not same_file(st, expect):
        raise SourceChangedError(errno.ESTALE, "the file changed after it was read", os.fspath(src))


def find_moved(
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    ident: Identity | None = None,
    taken: Taken | None = None,
) -> Path | None:
    """Where a move to ``dest`` that was never recorded put its file: ``dest``, or ``dest~N`` when that
    name was taken at the time. Each name in turn (up to the first that does not exist) is compared with
    what the file was: the same inode (a move on one filesystem), else the same size and mtime (a copy
    keeps them; on the same filesystem only with the content hash), and the same content hash where one
    is known; on another filesystem, which may not hold the time (clamped or rounded), size and hash
    alone, when nothing matched with the time. With neither ``sha256`` nor ``ident`` (rows from before
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
        return sha256 is None or not stat.S_ISREG(st.st_mode) or sha256_of(candidate) == sha256

    if ident is not None:
        # the very inode first (a move on one filesystem keeps it); size and mtime for a copy made across
        # filesystems (another device), or on this one (a file with other names is copied, not linked)
        # where its content hash is known too, so a neighbour with the same times is not taken for it
        for candidate, st in present:
            if (st.st_dev, st.st_ino) == tuple(ident[:2]) and content_ok(candidate, st) and free(candidate):
                return candidate
        for candidate, st in present:
            if (st.st_dev != ident[0] or sha256 is not None) and (st.st_size, st.st_mtime_ns) == tuple(
                ident[2:]
            ):
                if content_ok(candidate, st) and free(candidate):
                    return candidate
        if sha256 is not None:
            # A copy on another filesystem keeps the time only where that filesystem can hold it: ext4
            # clamps a time past 2446 or before 1901, a coarser one rounds it. There the size and the
            # content hash, which were checked as the copy was written, tell it (a copy with another
            # file's time and the same bytes cannot mislabel anything: its prediction is the same).
            for candidate, st in present:
                if st.st_dev != ident[0] and stat.S_ISREG(st.st_mode) and st.st_size == ident[2]:
                    if content_ok(candidate, st) and free(candidate):
                        return candidate
        return None
    for candidate, st in present:
        if stat.S_ISREG(st.st_mode) and sha256_of(candidate) == sha256 and free(candidate):
            return candidate
    return None


def sha256_of(path: str | os.PathLike[str]) -> str | None:
    """The SHA-256 of the regular file at ``path`` (never through a link), or None when it cannot be
    read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | getattr(os, "O_NOFOLLOW", 0))) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def files_below(folder: str | os.PathLike[str]) -> Iterator[str]:
    """Every file (and link) below ``folder``, never through a link; a folder that cannot be listed is
    passed over. Lazy: for :func:`found_by_identity`."""
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(parent, d))]
        yield from (os.path.join(parent, n) for n in names)


FoundBy = Callable[[Identity, "str | None"], Path | None]
"""``(identity, sha256) -> path``: see :func:`found_by_identity`."""


def found_by_identity(
    paths: Iterable[str | os.PathLike[str]], own: Iterable[str | os.PathLike[str]] = ()
) -> FoundBy:
    """``(identity, sha256) -> the one of paths that holds that very file now`` (its device and inode, and
    its size and mtime; or, touched since, a regular file of that size whose content hashes to ``sha256``),
    or None. ``paths`` is looked at (each path's ``lstat``) only when first asked, for callers that rarely
    need to ask (a killed move's file found under a new name).

    ``own``: paths that are files in their own right (each has a record of its own waiting for its move),
    never given as another file's new name: a hard link of the asked-for file is the same inode, and
    would otherwise pass for that file renamed, and be moved (and recorded) as it."""
    index: dict[tuple[int, int], list[tuple[Path, os.stat_result]]] | None = None

    def at(ident: Identity, sha256: str | None = None) -> Path | None:
        nonlocal index
        if index is None:
            index = {}
            folders: dict[str, str] = {}  # each folder resolved once (many files share one)
            skip = {_same_place(p, folders) for p in own}
            for path in paths:
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if _same_place(path, folders) not in skip:
                        index.setdefault((st.st_dev, st.st_ino), []).append((Path(path), st))
        for path, st in index.get((ident[0], ident[1]), ()):
            if same_file(st, ident):
                return path
            if sha256 is not None and stat.S_ISREG(st.st_mode) and st.st_size == ident[2]:
                if sha256_of(path) == sha256:
                    return path
        return None

    return at


def _same_place(path: str | os.PathLike[str], folders: dict[str, str]) -> tuple[str, str]:
    """``path`` as (its folder resolved, its name): two spellings of one folder compare equal.
    ``folders``: the folders resolved so far."""
    parent, name = os.path.split(os.fspath(path))
    if parent not in folders:
        folders[parent] = os.path.realpath(parent)
    return folders[parent], name
