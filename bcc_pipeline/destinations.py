"""Whether ``archive/``, ``quarantine/`` and ``dataset/`` are still the folders this home has put files into.

Each of them carries a mark, written when the pipeline first uses it: an extended attribute of the folder
itself (``user.bcc.folder``, naming this home and the folder), so that it sits on the disk mounted there,
and no file is added to the folder. The home lists the folders it marked (``<home>/.bcc-roots``, one name
per line). A listed folder that has lost its mark is not that folder: the disk mounted there is not
mounted (the bare mount point shows), or the folder was renamed or replaced (``cp -r`` without ``-a``
drops extended attributes too). Whatever was moved into it before would be looked for where it is not: an
interrupted move would be taken for a file that left, a stored copy written where the disk, once mounted
again, hides it (its ``images`` row pointing at nothing, the landing original already removed). So nothing
is moved or written there until it is back: scoring refuses to plan or run a shard, intake takes nothing
in, the holdout and the development split are not changed, each with one line naming the folder. A
filesystem that keeps no extended attributes (vfat, NFS before 4.2) cannot be marked: such a folder is
never listed, and not checked.

Why by hand: a mount point's identity (device numbers) is not stable across reboots, and a folder's inode
does not tell a replaced folder on a new disk from the old one; only something written on that disk does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import stat
from pathlib import Path

from .display import display_path, path_from_display
from .errors import DatasetError
from .settings import Settings

__all__ = [
    "ATTRIBUTE",
    "ROOTS_LIST",
    "DestinationLost",
    "destination_lost",
    "listed",
    "mark_run_folder",
    "require_destination",
]

#: The home's list of the folders it marked (:func:`destination_lost`).
ROOTS_LIST = ".bcc-roots"
_LIST_MAX = 1 << 16
#: The extended attribute that marks a destination folder.
ATTRIBUTE = "user.bcc.folder"


class DestinationLost(DatasetError):
    """``archive/``, ``quarantine/`` or ``dataset/`` is not the folder this home has put files into."""


def _mark_text(home: Path, name: str) -> bytes:
    return f"home={display_path(os.path.abspath(home))}\nfolder={name}\n".encode("utf-8", "surrogateescape")


def _mark_of(folder: Path) -> dict[str, str] | None:
    """The mark's fields (``home``, ``folder``), or None: no mark (ENODATA), no folder, a filesystem
    without attributes."""
    try:
        raw = os.getxattr(folder, ATTRIBUTE, follow_symlinks=True)
    except OSError:
        return None
    fields = {}
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def _not_ours(home: Path, name: str, mark: dict[str, str]) -> str | None:
    """Why a marked folder is not this home's ``name`` folder, or None: its mark names another of this
    home's folders, or another home that is here (not the same folder as this one, however reached). A mark
    whose home is not on this machine (a disk from another host, or this home moved) is taken as ours:
    whose it is cannot be told."""
    if mark.get("folder") != name:
        return f"it is marked as the {mark.get('folder')!r} folder, not {name!r}"
    try:
        theirs = path_from_display(mark.get("home", ""))
    except ValueError:
        return "its mark names no home that can be read"
    if not os.path.isdir(theirs):
        return None
    try:
        same = os.path.samefile(theirs, home)
    except OSError:
        same = False
    return None if same else f"it is marked as {name}/ of the BCC home {display_path(theirs)}"


def _names_this_home(home: Path, mark: dict[str, str]) -> bool:
    try:
        return os.path.samefile(path_from_display(mark.get("home", "")), home)
    except (OSError, ValueError):
        return False


def _open(home: Path, flags: int) -> int:
    # never through a link: a list that leads into another home would be read, and written, as this one's
    return os.open(home / ROOTS_LIST, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)


def listed(home: str | os.PathLike[str]) -> set[str]:
    """The folders the home marked (its ``.bcc-roots``); empty before the first. ``OSError`` when it cannot
    be read, or is a symbolic link (``ELOOP``)."""
    try:
        fd = _open(Path(home), os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return set()
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        raw = fh.read(_LIST_MAX + 1)
    if len(raw) > _LIST_MAX:  # a few names at most: never read in part (a name past the cut would be lost)
        raise OSError(errno.EFBIG, f"larger than {_LIST_MAX} bytes")
    return {line.strip() for line in raw.decode("utf-8", "replace").splitlines() if line.strip()}


def _list(home: Path, name: str) -> None:
    # one short line appended (O_APPEND): two runs listing the same folder at once leave it twice, harmless
    fd = _open(home, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"\n{name}\n".encode())  # on a line of its own, whatever a hand edit left last
        os.fsync(fd)
    finally:
        os.close(fd)


def destination_lost(settings: Settings, folder: Path, *, look_only: bool = False) -> str | None:
    """Why ``folder`` (``archive/``, ``quarantine/`` or ``dataset/`` of ``settings.home``) is not the folder
    this home has put files into, or None. One used for the first time is made, marked and listed here; one
    that cannot be made or marked is left for the moves and writes there to fail (and be reported).
    ``look_only``: nothing is made, marked or listed (what `bcc status` reports)."""
    home, name = Path(settings.home), folder.name
    try:
        known = name in listed(home)
    except OSError as exc:
        return f"{display_path(home / ROOTS_LIST)} cannot be read ({exc.strerror or exc})"
    if (mark := _mark_of(folder)) is not None:
        if (why := _not_ours(home, name, mark)) is not None:  # another home's disk mounted here, say
            return (
                f"{display_path(folder)} is not the folder this home has put files into: {why}; nothing is "
                f"moved or written there (if this home was copied on purpose: {_accept(home, folder)})"
            )
        if not look_only and not _names_this_home(home, mark):
            # taken as ours (its home is not on this machine: this home moved): marked with where it is now,
            # or a new home made at the old path would later make this one refuse its own folder
            with contextlib.suppress(OSError):
                os.setxattr(folder, ATTRIBUTE, _mark_text(home, name), follow_symlinks=True)
        if not known:  # marked by a run killed before it listed the folder
            return None if look_only else _listing_failed(home, name)
        return None
    if known:
        return (
            f"{display_path(folder)} is not the folder this home has put files into: its mark "
            f"({ATTRIBUTE}) is gone (the disk mounted there is not mounted? the folder was renamed or "
            "replaced?), so nothing is moved or written there until it is back; if it was replaced on "
            f"purpose, take the line '{name}' out of {display_path(home / ROOTS_LIST)}"
        )
    if look_only:  # used for the first time by the next run
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.setxattr(folder, ATTRIBUTE, _mark_text(home, name), follow_symlinks=True)
    except OSError:  # cannot be made or marked here (no attributes): every move or write there fails or
        return None  # goes on unchecked, as before folders were marked
    return _listing_failed(home, name)


def _listing_failed(home: Path, name: str) -> str | None:
    """List the marked folder ``name``; why that failed, or None. A folder marked but not listed would not
    be missed once its disk is gone, so a list this user cannot write is a refusal, not a silence."""
    try:
        _list(home, name)
    except OSError as exc:
        return (
            f"{display_path(home / ROOTS_LIST)}, the list of the folders this home marked, cannot be written "
            f"({exc.strerror or exc}): let every user that runs BCC write it (see Permissions in the README)"
        )
    return None


def _accept(home: Path, folder: Path) -> str:
    """What makes ``folder`` this home's again, as one instruction."""
    code = f"import os; os.removexattr({str(folder)!r}, {ATTRIBUTE!r})"  # shell-quoted whole: runs as printed
    return f"python3 -c {shlex.quote(code)}, then take the line '{folder.name}' out of {display_path(home / ROOTS_LIST)}"


def mark_run_folder(settings: Settings, folder: Path) -> None:
    """Mark a run's folder in ``archive/`` or ``quarantine/`` (``archive/<run>/``) as this home's, as the
    folders themselves are: a run folder copied (``cp -a``) or moved into a label folder of ``landing/`` is
    then not taken in under that label, nor one of another home's scored in this inbox. Nothing when it
    is not there (nothing moved), is not a real folder, or already carries a mark; a filesystem without
    attributes goes unmarked, as ever."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode) or _mark_of(folder) is not None:
            return
        name = f"{folder.parent.name}/{folder.name}"
        os.setxattr(folder, ATTRIBUTE, _mark_text(Path(settings.home), name), follow_symlinks=False)
    except OSError:
        return


def require_destination(settings: Settings, folder: Path) -> None:
    """:func:`destination_lost` as an error (:class:`DestinationLost`)."""
    if (problem := destination_lost(settings, folder)) is not None:
        raise DestinationLost(problem)
