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
  A file with other names (hard links: another inbox path, a scanner's own link) is copied instead, as
  across filesystems, so no name outside the archive can change an archived file's bytes.
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
  is left alone (the moved copy is what was read), unless the file that was read still has a name of its
  own there (two files that swapped names mid-move): then the move is undone, so no archived file shares
  its inode with an inbox name and the next run moves the file once, from its new name. With the hash of what was read (``expect_sha256``)
  the bytes are checked too: a copy across filesystems must hash to it as it is written, and the source
  is hashed again right before it is removed, so a rewrite in place in the middle of the move that puts
  size and mtime back (``rsync --inplace -t``; a hard link's change time says nothing) undoes a hard
  link, or leaves the source, new content, where it is. The one window left is between that last check
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
import os
import stat
from collections.abc import Callable
from pathlib import Path

from . import mounts
from .copying import (
    _copy_file_across,
    _copy_link_across,
    _copy_marker,
    _leftover_copy,
    drop_marker,
    finish_move,
    pending_copy,
)
from .files import LINK_UNSUPPORTED, candidate_names, rename_no_replace, write_reason
from .identities import (
    FoundBy,
    Identity,
    LinkedFolderError,
    SourceChangedError,
    Taken,
    _expect,
    _same_inode,
    change_time,
    files_below,
    find_moved,
    found_by_identity,
    identity,
    identity_from_text,
    identity_text,
    linked_folder,
    make_real_folders,
    require_real_folders,
    require_resolved,
    same_file,
    sha256_of,
)

__all__ = [
    "FoundBy",
    "Identity",
    "LinkedFolderError",
    "SourceChangedError",
    "Taken",
    "change_time",
    "files_below",
    "find_moved",
    "finish_move",
    "found_by_identity",
    "identity",
    "identity_from_text",
    "identity_text",
    "make_real_folders",
    "move_no_clobber",
    "named_below",
    "still_named",
    "pending_copy",
    "quarantine_file",
    "root_id",
    "linked_folder",
    "require_real_folders",
    "require_resolved",
    "same_file",
    "sha256_of",
]


def named_below(root: Path, ident: Identity) -> bool:
    """Whether the file ``ident`` (its device and inode) has a name below ``root`` (never through a link).
    A walk of the whole folder: asked only when a source name turned out to hold another file mid-move."""
    dev, ino = tuple(ident)[:2]
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.inode() == ino and entry.stat(follow_symlinks=False).st_dev == dev:
                            return True
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                    except OSError:
                        continue
        except OSError:
            continue
    return False


def still_named(found: str | os.PathLike[str], ident: Identity, root: str | os.PathLike[str] | None) -> bool:
    """Whether the file ``ident`` that a move took to ``found`` (a hard link, or a copy across
    filesystems) still has a name of its own: the link there has another name, or, for a copy, the file is
    named below ``root`` (the inbox, ``landing/``; never, without one). Its move then never finished."""
    st = os.lstat(found)
    if (st.st_dev, st.st_ino) == tuple(ident[:2]):
        return st.st_nlink > 1
    return root is not None and named_below(Path(root), ident)


def _remove_source(
    src: Path,
    where: Path,
    expect: Identity | None,
    *,
    shared_inode: bool,
    sha256: str | None = None,
    src_root: Path | None = None,
) -> None:
    """Remove ``src`` after its content reached ``where``. With ``expect``: a source path that now holds
    another file is left alone (that file was never read: it stays for the next run); a source rewritten
    in place after the hard link (one inode, ``shared_inode``) undoes the move (SourceChangedError).
    With ``sha256`` (the content that was read) the bytes are hashed too, right before the source goes:
    a rewrite in place that put the size and mtime back (``rsync --inplace -t``) in the middle of the move
    is caught as well. Across filesystems the copy holds what was read (hashed as it was written), so it
    is kept and the source, now other content, stays.

    A source name that holds another file while the file that was read still has a name of its own
    elsewhere (two inbox files exchanged by ``renameat2(RENAME_EXCHANGE)``, or renamed in turn, between the
    link and here) undoes the move too: kept, a hard link would share the archived file with a name
    outside the archive (whose edits would change archived bytes under their prediction), and the file,
    still in the inbox under its new name, would be archived a second time by the next run. On one
    filesystem any other name counts (the link's count); across two, a name below ``src_root``."""
    st = os.lstat(src) if expect is not None or sha256 is not None else None
    if expect is not None:
        if (st.st_dev, st.st_ino) != tuple(expect)[:2]:
            if still_named(where, expect, src_root):
                os.unlink(where)
                raise SourceChangedError(
                    errno.ESTALE, "the file was renamed while it was moved", os.fspath(src)
                )
            return
        if not same_file(st, expect):
            if shared_inode:
                os.unlink(where)
                raise SourceChangedError(errno.ESTALE, "the file changed while it was moved", os.fspath(src))
            return  # the copy holds what was read; the new content stays at the source
    if sha256 is not None and stat.S_ISREG(st.st_mode) and sha256_of(src) != sha256:
        if shared_inode:
            os.unlink(where)
            raise SourceChangedError(
                errno.ESTALE, "the file was rewritten while it was moved", os.fspath(src)
            )
        return
    os.unlink(src)


def root_id(folder: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The device and inode of the folder ``folder`` (followed, as a root may be a link), or None: what a
    mover pins when it starts, so a mount made over ``archive/`` itself meanwhile is seen."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _require_unmounted(
    dest_root: str | os.PathLike[str], folder: Path, pinned: tuple[int, int] | None
) -> None:
    """Refuse (:class:`LinkedFolderError`) a destination that something is mounted inside of (below the
    root, at or above ``folder``), or whose root is no longer the folder pinned when the mover started
    (``pinned``: mounted over since). What is moved there would land wherever that mount leads (another
    deployment's ``landing/malignant``), and be gone from here once it is unmounted."""
    if (point := mounts.mounted_between(dest_root, folder)) is not None:
        raise LinkedFolderError(
            errno.EXDEV, "something is mounted inside the folder files are moved to", point
        )
    if pinned is not None and root_id(dest_root) != pinned:
        raise LinkedFolderError(
            errno.EXDEV,
            "the folder files are moved to has changed since the run began (a mount?)",
            os.fspath(dest_root),
        )


def _require_placed(
    dest_root: str | os.PathLike[str],
    candidate: Path,
    marker: Path | None,
    src_st: os.stat_result,
    pinned: tuple[int, int] | None,
) -> None:
    """After the link or copy, when the mount table changed meanwhile: the file must be where it was put
    (``candidate`` is its link, or the copy still linked to ``marker``) with nothing mounted in the way.
    Else the link or copy went into a mount, or is hidden under one: a link or copy of ours that the path
    shows is removed again (it may sit in another deployment's folder), and the move fails with the source
    where it was (:class:`LinkedFolderError`; a hidden one is finished by a later attempt)."""
    try:
        _require_unmounted(dest_root, candidate.parent, pinned)
        return
    except LinkedFolderError:
        with contextlib.suppress(OSError):
            st = os.lstat(candidate)
            ours = marker is not None and _same_inode(os.lstat(marker), st)
            if ours or (marker is None and _same_inode(st, src_st)):
                os.unlink(candidate)
                if marker is not None:
                    marker.unlink()
        raise


def open_for_writing(path: str | os.PathLike[str]) -> bool:
    """Whether a process holds the regular file ``path`` open for writing: the kernel grants a read lease
    (Linux ``F_SETLEASE``) only when none does. False where that cannot be told (neither the file's owner
    nor CAP_LEASE, a filesystem without leases, a file that cannot be opened): moved as before. The lease is
    let go at once; a lease break meanwhile is announced with SIGURG, ignored by default, never with SIGIO,
    whose default would end this process."""
    import fcntl
    import signal

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno == errno.EAGAIN  # EAGAIN: open for writing; EACCES, EINVAL: cannot be told
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
    return False


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
    expect_sha256: str | None = None,
    dest_root_id: tuple[int, int] | None = None,
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
    ``expect_sha256``: the hash of the content that was read. A copy across filesystems must hash to it
    as it is written (else it is dropped: :class:`SourceChangedError`), and the source is hashed again
    right before it is removed (see :func:`_remove_source`): a rewrite in place in the middle of the move
    is never archived under the content that was read, nor lost. It costs one more read of each file
    (from the page cache, as a rule: the file was read moments before).
    """
    src, dest = Path(src), Path(dest)
    root = Path(src_root) if src_root is not None else None
    generation = mounts.table_generation() if dest_root is not None else None
    if dest_root is not None:
        _require_unmounted(dest_root, dest.parent, dest_root_id)  # no folder made inside a mount either
        make_real_folders(dest_root, dest.parent)
        _require_unmounted(dest_root, dest.parent, dest_root_id)
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
        _remove_source(src, published, expect, shared_inode=False, sha256=expect_sha256)
        drop_marker(marker)
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
                _remove_source(src, candidate, expect, shared_inode=True, sha256=expect_sha256, src_root=root)
                return candidate
            continue
        marker = None
        try:
            if stat.S_ISREG(src_st.st_mode) and (src_st.st_nlink > 1 or open_for_writing(src)):
                # other names of this file remain (in the inbox, or a scanner's own link), or a process
                # holds it open for writing (round 27: it wrote on after the move): through them the
                # archived bytes could change under their prediction. Copied (and hashed), as across
                # filesystems, so the archive never shares a file with anything that is not ours.
                raise OSError(
                    errno.EXDEV,
                    "the file has other names or is open for writing: copied, not linked",
                    os.fspath(src),
                )
            os.link(src, candidate, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                try:
                    if stat.S_ISLNK(src_st.st_mode):  # readlink never touches the target
                        marker = _copy_link_across(src, src_st, candidate, _copy_marker(dest, src, src_st))
                    else:
                        marker = _copy_file_across(
                            src, candidate, _copy_marker(dest, src, src_st), expect, expect_sha256
                        )
                except FileExistsError:
                    continue
            elif exc.errno in LINK_UNSUPPORTED:
                # no hard links here (or not allowed for this file): a rename that refuses a taken name
                try:
                    rename_no_replace(src, candidate)
                except FileExistsError:
                    continue
                if (expect is not None and identity(os.lstat(candidate)) != tuple(expect)) or (
                    expect_sha256 is not None and sha256_of(candidate) != expect_sha256
                ):
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
        if generation is not None and mounts.table_generation() != generation:
            _require_placed(dest_root, candidate, marker, src_st, dest_root_id)
        if before_unlink is not None:
            before_unlink(src, candidate)
        try:
            _remove_source(
                src,
                candidate,
                expect,
                shared_inode=marker is None,
                sha256=expect_sha256,
                src_root=root,
            )
        except FileNotFoundError:
            # Someone else moved the same file meanwhile (to another name): keep theirs, drop our
            # extra link, and say the source is gone.
            if marker is None and os.lstat(candidate).st_nlink > 1:
                os.unlink(candidate)
                raise
            # Across filesystems: renamed within the source folder (another inbox or landing name) in the
            # middle of the move. Kept, the copy would be a second one once that name is moved in turn:
            # dropped, and the file is moved once, from its new name.
            if marker is not None and expect is not None and root is not None and named_below(root, expect):
                os.unlink(candidate)
                raise
        except SourceChangedError:
            raise
        except OSError:
            os.unlink(candidate)  # leave things as they were: the file stays in the source folder
            raise
        finally:
            if marker is not None:
                drop_marker(marker)
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
