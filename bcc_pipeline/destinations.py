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
import os
from pathlib import Path

from .display import display_path
from .errors import DatasetError
from .settings import Settings

__all__ = ["ATTRIBUTE", "ROOTS_LIST", "DestinationLost", "destination_lost", "listed", "require_destination"]

#: The home's list of the folders it marked (:func:`destination_lost`).
ROOTS_LIST = ".bcc-roots"
#: The extended attribute that marks a destination folder.
ATTRIBUTE = "user.bcc.folder"


class DestinationLost(DatasetError):
    """``archive/``, ``quarantine/`` or ``dataset/`` is not the folder this home has put files into."""


def _mark_text(home: Path, name: str) -> bytes:
    return f"home={display_path(os.path.abspath(home))}\nfolder={name}\n".encode("utf-8", "surrogateescape")


def _marked(folder: Path) -> bool:
    try:
        os.getxattr(folder, ATTRIBUTE, follow_symlinks=True)
    except OSError:  # ENODATA: no mark; ENOENT: no folder; ENOTSUP: a filesystem without attributes
        return False
    return True


def listed(home: str | os.PathLike[str]) -> set[str]:
    """The folders the home marked (its ``.bcc-roots``); empty before the first."""
    try:
        text = Path(home, ROOTS_LIST).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return set()
    return {line.strip() for line in text.splitlines() if line.strip()}


def _list(home: Path, name: str) -> None:
    # one short line appended (O_APPEND): two runs listing the same folder at once leave it twice, harmless
    fd = os.open(home / ROOTS_LIST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, f"{name}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def destination_lost(settings: Settings, folder: Path) -> str | None:
    """Why ``folder`` (``archive/``, ``quarantine/`` or ``dataset/`` of ``settings.home``) is not the folder
    this home has put files into, or None. One used for the first time is made, marked and listed here; one
    that cannot be made or marked is left for the moves and writes there to fail (and be reported)."""
    home, name = Path(settings.home), folder.name
    try:
        known = name in listed(home)
    except OSError as exc:
        return f"{display_path(home / ROOTS_LIST)} cannot be read ({exc.strerror or exc})"
    if _marked(folder):
        if not known:  # marked by a run killed before it listed the folder
            with contextlib.suppress(OSError):
                _list(home, name)
        return None
    if known:
        return (
            f"{display_path(folder)} is not the folder this home has put files into: its mark "
            f"({ATTRIBUTE}) is gone (the disk mounted there is not mounted? the folder was renamed or "
            "replaced?), so nothing is moved or written there until it is back; if it was replaced on "
            f"purpose, take the line '{name}' out of {display_path(home / ROOTS_LIST)}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.setxattr(folder, ATTRIBUTE, _mark_text(home, name), follow_symlinks=True)
        _list(home, name)
    except OSError:  # cannot be made or marked here (no attributes): every move or write there fails or
        pass  # goes on unchecked, as before folders were marked
    return None


def require_destination(settings: Settings, folder: Path) -> None:
    """:func:`destination_lost` as an error (:class:`DestinationLost`)."""
    if (problem := destination_lost(settings, folder)) is not None:
        raise DestinationLost(problem)
