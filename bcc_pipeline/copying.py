"""Moves across filesystems: copy to a marked temporary name, publish without replacing anything, and
finish (or throw away) what a move killed halfway left; the rules are :mod:`bcc_pipeline.moving`'s.

The temporary name (``.bcc-move-<hash>.tmp`` beside the destination, fixed by the destination, the
source's path and its device and inode) stays linked to the published copy until the source is removed:
it is how the next attempt tells "published, only the source is left to remove" from "half-copied".
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import hashlib
import logging
import os
import stat
from pathlib import Path

from .display import display_path
from .files import candidate_names, publish_no_clobber
from .identities import Identity, SourceChangedError, Taken, _expect, _same_inode, identity

__all__ = ["COPY_SPARE_BYTES", "drop_marker", "finish_move", "pending_copy", "require_room"]

log = logging.getLogger(__name__)


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


def drop_marker(marker: Path) -> None:
    """Remove a copy's temporary name once the move is done or given up. Where that fails (the
    destination's filesystem turned read-only, or forbids deletes), the move stands as it is: the name is
    only a second link to the published copy (or a half copy nobody will read), so a warning names it
    instead of the move being reported as failed with its file already gone from the source."""
    try:
        marker.unlink(missing_ok=True)
    except OSError as exc:
        log.warning(
            "could not remove the temporary name %s (%s); the move is done, remove it when you can",
            display_path(marker),
            exc.strerror or exc,
        )


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
    drop_marker(_copy_marker(dest, src, ident))
    if left is None:
        legacy = _legacy_marker(dest)
        published, mst = _published(dest, legacy)
        if mst is not None and published is not None and (mst.st_size, mst.st_mtime_ns) == tuple(ident[2:]):
            if taken is None or not taken(published):
                legacy.unlink(missing_ok=True)
                return published
    return None if left is None else left[0]


COPY_SPARE_BYTES = 256 << 20
"""Free space a copy across filesystems leaves on the destination's filesystem (the database, the
models and the runs' files may share it); a twentieth of it on a filesystem smaller than 5 GiB."""


def require_room(folder: Path, size: int) -> None:
    """Refuse (``ENOSPC``, before writing anything) a copy of ``size`` bytes that would leave less than
    :data:`COPY_SPARE_BYTES` free where it goes: a sparse file refused as too large (1 TiB apparent, no
    blocks) would otherwise be written out in full, filling the disk the database lives on; so would a
    landing batch bigger than the dataset store's disk (:func:`bcc_pipeline.content_store.store_copy`)."""
    vfs = os.statvfs(folder)
    free = vfs.f_bavail * vfs.f_frsize
    spare = min(COPY_SPARE_BYTES, vfs.f_blocks * vfs.f_frsize // 20)
    if size > free - spare:
        raise OSError(
            errno.ENOSPC,
            f"no room for a copy of {size} bytes ({free} free, {spare} kept spare)",
            os.fspath(folder),
        )


def _copy_file_across(
    src: Path, candidate: Path, marker: Path, expect: Identity | None, sha256: str | None = None
) -> Path:
    """Copy ``src`` to ``marker`` (a new file: the source's bytes, mode and times, flushed), then give it the
    name ``candidate`` without replacing anything (FileExistsError when taken). ``marker`` stays linked
    to the copy (the caller removes it after the source); a failed copy is removed. ``sha256``: what the
    copied bytes must hash to (the content that was read): other bytes (the file rewritten in place since,
    or while it was copied) are never published (:class:`SourceChangedError`)."""
    nofollow, cloexec = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_CLOEXEC", 0)
    in_fd = os.open(src, os.O_RDONLY | nofollow | cloexec)
    published = False
    try:
        with os.fdopen(in_fd, "rb") as inp:
            before = os.fstat(inp.fileno())
            _expect(before, expect, src)
            require_room(marker.parent, before.st_size)
            try:
                out_fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow | cloexec, 0o600)
            except FileExistsError:  # not "the destination is taken": another move to it is under way
                raise OSError(
                    errno.EBUSY, "another move to this destination is under way", str(marker)
                ) from None
            digest = hashlib.sha256()
            with os.fdopen(out_fd, "wb") as out:
                while chunk := inp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                out.flush()
                os.fchmod(out.fileno(), stat.S_IMODE(before.st_mode) & 0o777)  # no setuid/setgid/sticky
                os.utime(out.fileno(), ns=(before.st_atime_ns, before.st_mtime_ns))
                os.fsync(out.fileno())
            _expect(os.fstat(inp.fileno()), identity(before), src)  # not rewritten while copied
            if sha256 is not None and digest.hexdigest() != sha256:  # rewritten, its size and mtime put back
                raise SourceChangedError(
                    errno.ESTALE, "the file was rewritten after it was read", os.fspath(src)
                )
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
