"""The inbox: which folder may be scored, what in it is scored, and where each file goes afterwards.

Discovery (:func:`discover`) walks the inbox without following links. Hidden and system files, non-image
extensions, folders (even one named ``x.png``) and special files are *ignored* and left where they are;
files modified within ``settle_seconds`` are *skipped* (still being written; the next run takes them);
symbolic links are listed apart, to be rejected (moved to quarantine as links, the target never touched).

Which folders may be scored at all (:func:`inbox_root`): only folders in the allowed roots
(``BCC_INBOX_ROOTS``, by default ``$BCC_HOME/inbox``), and never one that is a BCC home (recognised by
the ``.bcc-home`` marker that ``bcc db upgrade``, ``bcc demo``, intake, training and scoring write), lies
inside a folder a home manages (:attr:`Settings.managed_dirs`), or contains a home or a managed folder:
such an inbox is refused (:class:`InboxRefused`) before anything is listed or moved.

A file whose modification time lies further in the future than the settle time (a clock that is wrong
somewhere) counts as settled, with a warning: it would otherwise be skipped forever
(:func:`bcc_pipeline.files.settled`, the rule intake follows too).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import images, mounts
from ..config import Settings
from ..errors import ConfigError
from ..files import (
    PATH_MAX,
    REASON_SUFFIX,
    SYSTEM_NAMES,
    display_path,
    fit_path,
    quarantine_rel,
    safe_dirname,
    settled,
)
from ..homes import cannot_tell, folder_refusal, home_above, inside, overlay_refusal

__all__ = ["PATH_MAX", "InboxRefused", "destination", "discover", "inbox_root", "path_key", "settled"]

log = logging.getLogger(__name__)
#: How discovery's ``ignored`` entries start for what cannot be reached at all (a folder it cannot list, a
#: path longer than the system allows): never scored, so the run is red (:func:`unreachable`).
UNREACHABLE = ("cannot list this folder", "cannot inspect", "a file mounted here")
#: Why a file that is itself a mount point is never read or moved (a bind mount of one file from
#: elsewhere: another deployment's image, a system file). It cannot be moved either (the mount holds it).
FILE_MOUNTED = (
    "a file mounted here (a bind mount of one file): never read or moved; unmount it, or copy the image "
    "into the inbox"
)
InboxArg = str | os.PathLike[str] | None


class InboxRefused(ConfigError):
    """A folder that may not be scored (outside the allowed roots, a BCC home, or a folder one manages)."""


def path_key(rel: str) -> str:
    """The ledger's key of an inbox path: the sha256 of its exact bytes (names may be long or not UTF-8)."""
    return hashlib.sha256(os.fsencode(rel)).hexdigest()


def destination(settings: Settings, run_id: str, status: str, rel: str) -> Path:
    """Where a file a run took on goes: ``quarantine/<run>/<rel>`` when rejected, else ``archive/<run>/<rel>``.
    A path that would not fit in :data:`PATH_MAX` becomes ``<root>/<run>/#<hash of rel's folder>/<name>``
    (:func:`bcc_pipeline.files.fit_path`)."""
    if status == "rejected":  # a folder named like a reason file never meets one
        return fit_path(settings.quarantine_dir / safe_dirname(run_id), quarantine_rel(rel))
    # too long under archive/<run>/: the folders become one hashed name
    return fit_path(settings.archive_dir / safe_dirname(run_id), rel)


#: Folders of the operating system: never an inbox, nor inside one, whatever ``BCC_INBOX_ROOTS`` allows. A
#: root listed by mistake (`/etc`) had its links and rejected files moved to quarantine, `/etc/passwd` among
#: them (round 24). `/` and every folder directly under it (`/etc`, `/var`, `/home`, `/run`) are refused too;
#: a folder in `/dev/shm` (a RAM disk) or `/run/media` (removable disks) is not a system folder.
SYSTEM_TREES = (
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/spool",
)


def _system_folder(real: str) -> str | None:
    """Why the resolved folder ``real`` is the operating system's (see :data:`SYSTEM_TREES`), or None."""
    if real == os.sep or os.path.dirname(real) == os.sep:
        return "it is / or a folder directly under it; scan into a folder of its own"
    if inside(real, "/dev/shm"):  # a RAM disk of the system's: a folder made in it is nobody's system file
        return None
    for tree in SYSTEM_TREES:
        if inside(real, tree):
            return f"it is inside {tree}, a folder of the operating system"
    return None


def _refusal(settings: Settings, real: str, table: list[mounts.Mount] | None = None) -> str | None:
    """Why the folder ``real`` (a resolved path) may not be scored, or None."""
    if problem := _system_folder(real):  # before anything else: no setting allows it
        return problem
    home = os.path.realpath(settings.home)
    managed = [os.path.realpath(m) for m in settings.managed_dirs]
    # this home and its managed folders by device and inode: reached through a bind mount, they have
    # another path but are the same folders
    own = {}
    for m in [settings.home, *settings.managed_dirs]:
        with contextlib.suppress(OSError):
            st = os.stat(m)
            own[(st.st_dev, st.st_ino)] = m
    folder = real
    while True:
        with contextlib.suppress(OSError):
            st = os.stat(folder)
            if (mine := own.get((st.st_dev, st.st_ino))) is not None and os.path.realpath(mine) != folder:
                return f"it lies inside {folder}, which is {mine} (a bind mount of it)"
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if problem := home_above(settings, real):
        return problem
    if (fstype := mounts.system_filesystem(real, table)) is not None:
        return f"it is on the system's {fstype} filesystem"
    # another deployment's folder bind-mounted here: the same folder under the path the kernel knows
    try:
        others = mounts.other_paths(real, table)
    except mounts.CannotTell as exc:
        return cannot_tell(exc)
    for other in others:
        if problem := home_above(settings, other):
            return f"it is {display_path(other)} reached through a bind mount, and {problem}"
    if problem := overlay_refusal(settings, real, table):
        return problem
    for m in [home, *managed]:
        if inside(m, real):
            return f"it contains {m}, {'the BCC home' if m == home else 'a folder the pipeline manages'}"
    roots = [os.path.realpath(r) for r in settings.allowed_inbox_roots]
    if not any(inside(real, r) for r in roots):
        return (
            f"it is not inside an allowed inbox root ({os.pathsep.join(roots)}); "
            "set BCC_INBOX_ROOTS to allow it"
        )
    return None


def require_folders_still_allowed(settings: Settings, inbox: str, rels: Iterable[str]) -> None:
    """Judge again, when a shard starts, the inbox and every folder between it and the files ``rels``
    (paths relative to it) the way the run was judged when it was planned: a bind mount made since (another
    deployment's ``landing/`` mounted over an inbox folder) is refused (:class:`InboxRefused`, no retry)
    before anything is read or moved. A shard calls it again whenever the mount table changes while it
    runs (:class:`bcc_pipeline.mounts.MountWatch`)."""
    rels = list(rels)
    table = mounts.mount_table()
    if problem := _refusal(settings, os.path.realpath(inbox), table):
        raise InboxRefused(f"refusing to score the inbox {display_path(inbox)}: {problem}")
    below = set()
    for rel in {os.path.dirname(rel) for rel in rels}:
        while rel:
            below.add(rel)
            rel = os.path.dirname(rel)
    for rel in sorted(below):
        if problem := folder_refusal(settings, os.path.join(inbox, rel), table):
            raise InboxRefused(
                f"refusing to score the inbox {display_path(inbox)}: it contains {problem} (since the run "
                "was planned)"
            )
    points = mounts.mount_points_below(os.path.realpath(inbox), table)
    for rel in sorted(rels) if points else ():
        if os.path.join(os.path.realpath(inbox), rel) in points:
            raise InboxRefused(
                f"refusing to score the inbox {display_path(inbox)}: it contains {display_path(rel)}, "
                f"{FILE_MOUNTED} (since the run was planned)"
            )


def inbox_root(settings: Settings, inbox: InboxArg = None) -> Path:
    """The inbox folder (``inbox`` or ``settings.inbox_dir``); :class:`InboxRefused` (one line) when it
    may not be scored: outside :attr:`Settings.allowed_inbox_roots`, a BCC home, inside a folder a home
    manages, or containing a home or a managed folder; and one given by name (``inbox``) that is not a
    folder, or not there. Scoring such a folder would move files that are
    not ours (training data, models, another deployment's store, system images) into ``archive/``."""
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(inbox)))) if inbox else settings.inbox_dir
    problem = _refusal(settings, os.path.realpath(root))
    if problem is None and not root.is_dir() and (inbox or os.path.lexists(root)):
        # a folder asked for by name that is not there (a typo, a share not mounted) would be a green run
        # that scored nothing; only the default inbox of a home that has none yet is simply empty
        problem = (
            "it is not a folder"
            if os.path.lexists(root)
            else "there is no such folder (a typo? not mounted?)"
        )
    if problem:
        raise InboxRefused(f"refusing to score the inbox {display_path(root)}: {problem}")
    return root


def discover(settings: Settings, inbox: InboxArg = None) -> dict[str, Any]:
    """Walk the inbox (recursively, never following links) and sort what is there.

    Returns ``{"inbox", "pending", "links", "ignored", "skipped"}``: ``pending`` are image files ready to
    score and ``links`` symbolic links to reject (paths relative to the inbox, sorted); ``ignored`` is a
    list of ``{"path", "reason"}`` left where they are; ``skipped`` files were modified within
    ``settle_seconds`` (still being written). Nothing is opened or read.
    """
    root = inbox_root(settings, inbox)
    out: dict[str, Any] = {"inbox": str(root), "pending": [], "links": [], "ignored": [], "skipped": []}
    if not root.is_dir():
        log.info("no inbox folder at %s; nothing to score", root)
        return out
    managed = {os.path.realpath(p) for p in settings.managed_dirs}
    table = mounts.mount_table()
    points = mounts.mount_points_below(os.path.realpath(root), table)
    now = time.time()
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        dir_abs, prefix = stack.pop()
        try:
            with os.scandir(dir_abs) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:  # moved or removed since its parent was listed: nothing here to report
            log.info("%s left the inbox while it was listed", display_path(prefix or "."))
            continue
        except OSError as exc:
            out["ignored"].append(
                {
                    "path": display_path(prefix or "."),
                    "reason": f"cannot list this folder: {exc.strerror or exc}",
                }
            )
            continue
        subdirs = []
        real_dir = os.path.realpath(dir_abs) if points else dir_abs
        for entry in entries:
            rel = os.path.join(prefix, entry.name) if prefix else entry.name
            name = entry.name
            ext = os.path.splitext(name)[1].lower()
            if name.startswith(".") or name.lower() in SYSTEM_NAMES:
                out["ignored"].append({"path": display_path(rel), "reason": "hidden or system file"})
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                out["ignored"].append(
                    {"path": display_path(rel), "reason": f"cannot inspect: {exc.strerror or exc}"}
                )
                continue
            mode = st.st_mode
            if not stat.S_ISDIR(mode) and os.path.join(real_dir, name) in points:
                out["ignored"].append({"path": display_path(rel), "reason": FILE_MOUNTED})
            elif stat.S_ISLNK(mode):
                out["links"].append(rel)
            elif stat.S_ISDIR(mode):
                if os.path.realpath(entry.path) in managed:
                    continue
                if problem := folder_refusal(settings, entry.path, table):
                    raise InboxRefused(
                        f"refusing to score the inbox {display_path(root)}: it contains {problem}"
                    )
                if ext in images.IMAGE_EXTENSIONS:
                    out["ignored"].append(
                        {
                            "path": display_path(rel),
                            "reason": "a folder, not an image file (what it holds is scored)",
                        }
                    )
                subdirs.append((entry.path, rel))
            elif not stat.S_ISREG(mode):
                out["ignored"].append(
                    {"path": display_path(rel), "reason": "not a regular file (pipe, socket or device)"}
                )
            elif ext not in images.IMAGE_EXTENSIONS or name.endswith(REASON_SUFFIX):
                out["ignored"].append({"path": display_path(rel), "reason": "not an image file extension"})
            elif not settled(display_path(rel), st.st_mtime, now, settings.settle_seconds):
                out["skipped"].append(display_path(rel))
            else:
                out["pending"].append(rel)
        stack.extend(reversed(subdirs))
    out["pending"].sort()
    out["links"].sort()
    return out


def unreachable(ignored: list[dict[str, str]]) -> list[dict[str, str]]:
    """The entries of discovery's ``ignored`` list that no run can score as things are (:data:`UNREACHABLE`):
    somebody has to look, so ``bcc score`` exits 1 and the DAG run fails, naming them."""
    return [i for i in ignored if i["reason"].startswith(UNREACHABLE)]
