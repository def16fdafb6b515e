"""Which folders belong to a BCC home: the home itself (its ``.bcc-home`` marker, or the signs of a home set
up before homes were marked), the folders it manages (also where they live elsewhere: a ``.bcc-managed``
marker naming the home), and those folders reached through a bind mount (:mod:`bcc_pipeline.mounts`).
Scoring refuses them as inboxes (:mod:`bcc_pipeline.scoring.inbox`); intake refuses another home's folders
mounted into ``landing/``."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

from . import mounts
from .config import HOME_MARKER, MANAGED_MARKER, Settings
from .destinations import ATTRIBUTE, _mark_of
from .display import path_from_display
from .files import display_path, managing_home

__all__ = [
    "STALE_HINT",
    "cannot_tell",
    "destination_refusal",
    "folder_refusal",
    "foreign_above",
    "foreign_home_above",
    "home_above",
    "inside",
    "is_home",
    "marked_by_another",
    "overlay_refusal",
]

STALE_HINT = f"its {MANAGED_MARKER} says so; delete that file if no home manages the folder any more"


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_home(folder: str) -> bool:
    """Whether ``folder`` is a BCC home: its ``.bcc-home`` marker, or, for a home set up before homes were
    marked or one that lost its marker (deleted, renamed), what only the pipeline makes there
    (:func:`_home_signs`)."""
    if os.path.lexists(os.path.join(folder, HOME_MARKER)):
        return True
    return _home_signs(folder) is not None


def _known_by(folder: str) -> str:
    """How the home ``folder`` was known, for a refusal: nothing for its marker; else the sign, and what an
    honest folder that only looks like a home can do (round 28: the refusal named no sign)."""
    if os.path.lexists(os.path.join(folder, HOME_MARKER)) or (sign := _home_signs(folder)) is None:
        return ""
    return f" (no {HOME_MARKER}, but known as one by its {sign}: if it is no BCC home, rename that)"


_SQLITE_HEADER = b"SQLite format 3\x00"


def _is(path: str, kind: int) -> bool:
    try:
        return stat.S_IFMT(os.lstat(path).st_mode) == kind
    except OSError:
        return False


def _home_signs(folder: str) -> str | None:
    """What ``folder`` holds that only the pipeline makes in a home (said for a refusal), or None; each is enough: the list of folders it
    marked (``.bcc-roots``, a file); its ``archive/``, ``quarantine/`` or ``dataset/`` marked as such
    (:data:`bcc_pipeline.destinations.ATTRIBUTE`, by any home); the default SQLite database (``bcc.db``,
    an SQLite file) beside a folder the pipeline makes; the dataset store's ``manifests/`` beside
    ``models/``; a scoring run's ``runs/<run>/plan.json`` beside ``archive/`` or ``quarantine/`` (a home
    whose database is elsewhere that only scores). Names alone are not enough: an honest scanner folder
    may hold a ``runs/`` and a ``models/`` (round 26)."""

    def at(*names: str) -> str:
        return os.path.join(folder, *names)

    if _is(at(".bcc-roots"), stat.S_IFREG):
        return ".bcc-roots file"
    for name in ("archive", "quarantine", "dataset"):
        if _is(at(name), stat.S_IFDIR) and (_mark_of(Path(at(name))) or {}).get("folder") == name:
            return f"{name}/ marked as a home's ({ATTRIBUTE})"
    made = [n for n in ("archive", "quarantine", "runs", "models", "dataset") if _is(at(n), stat.S_IFDIR)]
    if not made:
        return None
    if _is(at("bcc.db"), stat.S_IFREG):
        try:
            with open(at("bcc.db"), "rb") as fh:
                if fh.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER:
                    return f"SQLite bcc.db beside {made[0]}/"
        except OSError:
            pass
    if "models" in made and _is(at("dataset", "manifests"), stat.S_IFDIR):
        return "dataset/manifests/ beside models/"
    if "runs" in made and ("archive" in made or "quarantine" in made):
        try:
            with os.scandir(at("runs")) as entries:
                for n, entry in enumerate(entries):
                    if n >= 64:
                        break
                    if entry.is_dir(follow_symlinks=False) and _is(
                        at("runs", entry.name, "plan.json"), stat.S_IFREG
                    ):
                        return f"runs/{entry.name}/plan.json beside archive/ or quarantine/"
        except OSError:
            pass
    return None


def marked_by_another(
    home: str | os.PathLike[str], folder: str, *, absent_is_another: bool = True
) -> str | None:
    """Why ``folder`` is another home's ``archive/``, ``quarantine/`` or ``dataset/`` ("marked as ...") by its own mark
    (:data:`bcc_pipeline.destinations.ATTRIBUTE`, on the folder, so on the disk mounted there: found
    wherever the folder is now, whatever became of its home's marker), or None: no mark, or this home's.
    ``absent_is_another``: a mark whose home is not on this machine is another's (an inbox: the safe side);
    False, it is taken as this home's (a home that moved keeps its marks: :mod:`.destinations`)."""
    mark = _mark_of(Path(folder))
    if mark is None:
        return None
    try:
        theirs = path_from_display(mark.get("home", ""))
    except ValueError:
        theirs = ""
    if theirs and _same_folder(theirs, os.fspath(home)):
        return None
    if not absent_is_another and not (theirs and os.path.isdir(theirs)):
        return None  # its home is not here (this home moved, a disk from another host): taken as ours
    code = f"import os; os.removexattr({display_path(folder)!r}, {ATTRIBUTE!r})"
    return (
        f"marked as {mark.get('folder', '?')}/ of the BCC home "
        f"{display_path(theirs) if theirs else '(one its mark does not name)'} (if no home uses it any more: "
        f"python3 -c {shlex.quote(code)})"
    )


def home_above(settings: Settings, real: str) -> str | None:
    """Why ``real`` (a resolved path) is a BCC home's or lies inside a folder some home manages (this one
    or another deployment's), or None."""
    home = os.path.realpath(settings.home)
    for m in settings.managed_dirs:
        if inside(real, os.path.realpath(m)):
            return f"it lies inside {m}, which the pipeline manages"
    managed_names = {os.path.relpath(m, settings.home).split(os.sep)[0] for m in settings.managed_dirs}
    folder, marked = real, None
    while True:
        if (owner := managing_home(folder)) is not None:  # one that lives elsewhere (a link's target)
            return f"it lies inside {folder}, a folder the BCC home {owner} manages ({STALE_HINT})"
        if marked is None and (problem := marked_by_another(home, folder)) is not None:
            marked = f"it lies inside {folder}, {problem}" if folder != real else f"it is {problem}"
        if is_home(folder):
            if folder == real:
                return f"it is a BCC home{_known_by(folder)}"
            first = os.path.relpath(real, folder).split(os.sep)[0]
            if first in managed_names:
                return f"it lies inside {os.path.join(folder, first)}, a folder of the BCC home {folder}"
            if not _same_folder(folder, home):  # its inbox, exports, anything: that deployment's files
                return (
                    f"it lies inside the BCC home {folder}, another deployment's (only that home scores "
                    f"it){_known_by(folder)}"
                )
        parent = os.path.dirname(folder)
        if parent == folder:
            return marked  # a folder another home marked, away from any home (its disk mounted here)
        folder = parent


def foreign_home_above(settings: Settings, path: str) -> str | None:
    """Why ``path`` (a resolved path) lies in another deployment's home or in a folder another home manages
    (this home, reached by any path, is not another's), or None."""
    return foreign_above(settings.home, path)


def foreign_above(home: str | os.PathLike[str], path: str) -> str | None:
    """:func:`foreign_home_above` for the home at ``home``."""
    folder, marked = path, None
    while True:
        owner = managing_home(folder)
        if owner is not None and not _same_folder(owner, os.fspath(home)):
            return f"it lies inside {folder}, a folder the BCC home {owner} manages ({STALE_HINT})"
        # this home's own folders are judged here too (destination_refusal): a mark whose home is not on
        # this machine is taken as ours, as destinations does
        if marked is None and (problem := marked_by_another(home, folder, absent_is_another=False)):
            marked = f"it lies inside {folder}, {problem}" if folder != path else f"it is {problem}"
        if is_home(folder) and not _same_folder(folder, os.fspath(home)):
            return f"it lies inside the BCC home {folder}, another deployment's{_known_by(folder)}"
        parent = os.path.dirname(folder)
        if parent == folder:
            return marked  # a folder another home marked, away from any home (its disk mounted here)
        folder = parent


def destination_refusal(settings: Settings, folder: str | os.PathLike[str]) -> str | None:
    """Why the folder ``folder`` (``archive/``, ``quarantine/``, ``dataset/``; ``landing/``, which intake
    takes from) is not this home's to write into, or None: it is another deployment's folder, reached by a link or a mount (the path the mount
    table shows it under lies in that home). What the pipeline moved there would be that home's (its
    ``landing/malignant``: training data under a label). A plain filesystem mounted there is fine."""
    real = os.path.realpath(folder)
    try:
        paths = [real, *mounts.other_paths(real)]
    except mounts.CannotTell as exc:
        return cannot_tell(exc)
    for path in paths:
        if problem := foreign_home_above(settings, path):
            return f"it is {display_path(path)}, and {problem}"
    return None


def overlay_refusal(settings: Settings, real: str, table: list[mounts.Mount] | None = None) -> str | None:
    """Why the folder ``real`` (a resolved path), on an overlay filesystem, shows a home's files (a layer
    of the overlay lies in a home, or a folder one manages: :func:`bcc_pipeline.mounts.overlay_layers`),
    or None."""
    try:
        layers = mounts.overlay_layers(real, table)
    except mounts.CannotTell as exc:
        return f"it is an overlay, and {cannot_tell(exc)}"
    for layer in layers:
        if problem := home_above(settings, layer):
            return f"it is an overlay of {display_path(layer)}, and {problem}"
    if (point := mounts.overlay_point(real, table)) not in (None, "/"):
        return f"it is on an overlay filesystem mounted at {display_path(point)}: {mounts.OVERLAY_UNCHECKED}"
    return None


def _same_folder(a: str, b: str) -> bool:
    """Whether two paths are one folder: the same path, or the same device and inode (this home reached
    through a bind mount of a folder above it: ``/data/bcc`` shown at ``/srv/bcc``)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def cannot_tell(exc: mounts.CannotTell) -> str:
    return (
        f"whether it is {display_path(exc.filename)} reached through a bind mount cannot be checked "
        f"({exc.why}), so it may be another deployment's folder"
    )


def folder_refusal(settings: Settings, folder: str, table: list[mounts.Mount]) -> str | None:
    """Why the folder ``folder`` inside an inbox may not be scored ("<folder>, which is ..."), or None:
    another deployment's home, a folder a home manages that lives elsewhere (its ``.bcc-managed``
    marker), or a home's folder bind-mounted here (the path the mount table shows it under elsewhere)."""
    if is_home(folder):  # another deployment's
        return f"the BCC home {display_path(folder)}{_known_by(folder)}"
    if (fstype := mounts.system_filesystem(os.path.realpath(folder), table)) is not None:
        return f"{display_path(folder)}, where the system's {fstype} filesystem is mounted"
    if (owner := managing_home(folder)) is not None:
        return f"{display_path(folder)}, a folder the BCC home {owner} manages ({STALE_HINT})"
    if (problem := marked_by_another(settings.home, folder)) is not None:
        return f"{display_path(folder)}, {problem}"
    try:
        others = mounts.other_paths(os.path.realpath(folder), table)
    except mounts.CannotTell as exc:
        return f"{display_path(folder)}, and {cannot_tell(exc)}"
    for other in others:
        if problem := home_above(settings, other):  # a bind mount of a home's folder
            return f"{display_path(folder)}, which is {display_path(other)} reached through a bind mount, and {problem}"
    if problem := overlay_refusal(settings, os.path.realpath(folder), table):
        return f"{display_path(folder)}, where {problem}"
    return None
