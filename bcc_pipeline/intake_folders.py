"""Which folders below ``landing/<label>/`` intake takes files in from: judged before the walk, and again
whenever the mount table changes while intake runs (:class:`bcc_pipeline.mounts.MountWatch`).

A folder's label is the label folder it lies in. A bind mount shows one folder under two paths, so a
folder reached by two paths (``malignant/p1`` mounted at ``benign/p1``) cannot be labelled, and another
deployment's folder (or this home's own ``dataset/``) mounted into ``landing/`` is not this intake's to
take (:mod:`bcc_pipeline.homes`). Such folders are refused, their files left in ``landing/`` and reported
as unreachable. A mount made in the middle of a run (after the folders were judged, before or while a file
under it is read) is judged as well: each file is checked once it is read, before its outcome is staged.

A landing file is read once, from one descriptor (:func:`read_landing_file`): links, FIFOs and devices are
never opened, files still being written wait for the next run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import images, mounts
from .config import Settings
from .destinations import _mark_of
from .files import REASON_SUFFIX, SYSTEM_NAMES, display_path, one_line, read_once, settled
from .homes import cannot_tell, destination_refusal, home_above, marked_by_another
from .intake_moves import changed
from .moving import Identity, LinkedFolderError, change_time, identity, require_real_folders, root_id

if TYPE_CHECKING:
    from .intake import IntakeReport

__all__ = [
    "FolderJudge",
    "Refused",
    "blocked_folders",
    "ignore",
    "is_ignored_name",
    "landing_refusal",
    "not_taken_in",
    "read_landing_file",
    "walk",
]

log = logging.getLogger(__name__)

#: Why a landing file that is itself a mount point (a bind mount of one file from elsewhere) is not taken in.
FILE_MOUNTED = (
    "a file mounted here (a bind mount of one file): whose image it is, and its label, cannot be told"
)


def blocked_folders(settings: Settings, label_dirs: list[Path]) -> dict[str, str]:
    """The folders below the label folders whose files may not be taken in, with why: one folder reached
    by two paths (a bind mount of ``malignant/p1`` at ``benign/p1``: which label its images have cannot be
    told, and the first walked would win), and a folder that is another deployment's, or a folder of this
    home other than ``landing/``, reached through a bind mount (the path the kernel's mount table shows it
    under elsewhere; :mod:`bcc_pipeline.homes`), or one whose other path cannot be looked at. Their files
    stay in ``landing/``."""
    table = mounts.mount_table()
    landing_real = os.path.realpath(settings.landing_dir)
    try:
        landing_st = os.stat(landing_real)
        landing_id = (landing_st.st_dev, landing_st.st_ino)
    except OSError:
        landing_id = None

    def in_landing(
        other: str,
    ) -> bool:  # under landing/ itself, by this path or another (its mount seen twice)
        folder = other
        while True:
            with contextlib.suppress(OSError):
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) == landing_id:
                    return True
            parent = os.path.dirname(folder)
            if parent == folder:
                return False
            folder = parent

    seen: dict[tuple[int, int], list[str]] = {}
    blocked: dict[str, str] = {}
    for label_dir in label_dirs:
        for dirpath, dirnames, _ in os.walk(label_dir, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            with contextlib.suppress(OSError):
                st = os.stat(dirpath, follow_symlinks=False)
                seen.setdefault((st.st_dev, st.st_ino), []).append(dirpath)
            if (fstype := mounts.system_filesystem(os.path.realpath(dirpath), table)) is not None:
                blocked[dirpath] = f"the system's {fstype} filesystem is mounted here"
                dirnames[:] = []
                continue
            if (problem := marked_by_another(settings.home, dirpath)) is not None:
                blocked[dirpath] = f"it is {problem}"  # another home's archive/, moved or its disk mounted
                dirnames[:] = []
                continue
            if (mark := _mark_of(Path(dirpath))) is not None:  # this home's own: a copy (cp -a), or moved
                blocked[dirpath] = (
                    f"it is marked as this home's {mark.get('folder', '?')}/ (copied or moved here): a whole "
                    "archive, quarantine or dataset store is not labelled by where it is put; label its images "
                    "one by one (copy them into a patient folder)"
                )
                dirnames[:] = []
                continue
            try:
                others = mounts.other_paths(os.path.realpath(dirpath), table)
            except mounts.CannotTell as exc:
                blocked[dirpath] = cannot_tell(exc)
                continue
            for other in others:
                if not in_landing(other) and (problem := home_above(settings, other)):
                    blocked[dirpath] = (
                        f"it is {display_path(other)} reached through a bind mount, and {problem}"
                    )
                    break
            else:
                try:
                    layers = mounts.overlay_layers(os.path.realpath(dirpath), table)
                except mounts.CannotTell as exc:
                    blocked[dirpath] = f"it is an overlay, and {cannot_tell(exc)}"
                    continue
                for layer in layers:
                    if in_landing(layer):  # landing's own images under a second path, maybe another label
                        blocked[dirpath] = (
                            f"it is an overlay of {display_path(layer)}, a folder of landing/: which label "
                            "its images have cannot be told"
                        )
                        break
                    if problem := home_above(settings, layer):
                        blocked[dirpath] = f"it is an overlay of {display_path(layer)}, and {problem}"
                        break
                else:
                    point = mounts.overlay_point(os.path.realpath(dirpath), table)
                    if point not in (None, "/"):
                        blocked[dirpath] = (
                            f"it is on an overlay filesystem mounted at {display_path(point)}: "
                            f"{mounts.OVERLAY_UNCHECKED}"
                        )
    for paths in seen.values():
        if len(paths) > 1:
            for path in paths:
                twins = ", ".join(
                    display_path(os.path.relpath(p, settings.landing_dir)) for p in paths if p != path
                )
                blocked.setdefault(
                    path,
                    f"it is the same folder as {twins} (a bind mount): which label its images have cannot be told",
                )
    return blocked


def landing_refusal(settings: Settings) -> str | None:
    """Why ``landing/`` itself is not this home's to take in from, or None: it leads (a link) into another
    deployment's home, or another home's folder is mounted over it (the check of the folders the pipeline
    writes into: :func:`bcc_pipeline.homes.destination_refusal`). Its files would be that deployment's
    images, taken in here and removed there."""
    problem = destination_refusal(settings, settings.landing_dir)
    return None if problem is None else f"landing/: {problem}"


def not_taken_in(report: IntakeReport, landing: Path, folder: str, why: str) -> None:
    """Report the folder ``folder`` as not taken in (its files stay in landing): under ``failed`` and
    ``unreachable`` (somebody has to look: ``bcc intake`` exits 1, the DAG task fails)."""
    where = display_path(Path(folder).relative_to(landing))
    report.failed.append({"path": where, "error": one_line(f"not taken in: {why}")})
    report.unreachable.append(report.failed[-1])
    log.error("intake: not taking in %s: %s (its files stay in landing)", where, one_line(why))


def ignore(report: IntakeReport, rel: Path) -> None:
    """Count ``rel`` (relative to ``landing/``) as ignored: left where it is, listed in the report."""
    report.ignored += 1
    report.ignored_paths.append(display_path(rel))


def walk(
    root: Path, landing: Path, report: IntakeReport, blocked: dict[str, str] | None = None
) -> Iterator[Path]:
    """Regular files and symlinks below ``root`` without following links, sorted. A folder that cannot
    be listed, or is ``blocked`` (:func:`blocked_folders`), is reported in ``report.failed`` (its files stay
    in landing) and the walk goes on; a hidden folder (``.patient_7/``) is left alone and reported as
    ignored, as scoring does."""

    def unreadable(exc: OSError) -> None:
        if isinstance(exc, FileNotFoundError):  # moved or removed since it was listed (to the other label,
            # say, where this walk finds it): nothing of it is here to report
            log.info("intake: %s left landing while it was walked", display_path(exc.filename or root))
            return
        try:
            where = display_path(Path(exc.filename).relative_to(landing))
        except (TypeError, ValueError):
            where = display_path(root.relative_to(landing))
        error = one_line(f"cannot list this folder: {exc.strerror or exc}")
        report.failed.append({"path": where, "error": error})
        report.unreachable.append({"path": where, "error": error})
        log.error("intake: %s: %s (its files stay in landing)", where, error)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable):
        if blocked and (why := blocked.get(dirpath)) is not None:
            not_taken_in(report, landing, dirpath, why)
            dirnames[:] = []
            continue
        for hidden in sorted(d for d in dirnames if d.startswith(".")):
            ignore(report, (Path(dirpath) / hidden).relative_to(landing))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield Path(dirpath) / name
        # symlinks to directories show up in dirnames; report them as files (they are rejected)
        for d in list(dirnames):
            try:
                link = (Path(dirpath) / d).is_symlink()
            except OSError:  # listing it fails too, and is reported then
                continue
            if link:
                dirnames.remove(d)
                yield Path(dirpath) / d


class FolderJudge:
    """The folders intake may not take in from (``blocked``: folder path -> why, as the walk writes folder
    paths), kept up to date while intake runs: judged again whenever the mount table changed
    (:class:`bcc_pipeline.mounts.MountWatch`). A file is taken in only when it was read within one
    generation of the table that was judged (:meth:`current` before the read, :meth:`unchanged_since`
    after it): a mount made and removed again while the file was read is seen too."""

    def __init__(self, settings: Settings, label_dirs: list[Path], watch: mounts.MountWatch):
        self.settings, self.label_dirs, self.watch = settings, label_dirs, watch
        self.blocked: dict[str, str] = {}
        self.points: frozenset[str] = frozenset()
        self.generation: int | None = None
        self._tops = {str(d) for d in label_dirs}
        self._reported: set[str] = set()
        self._landing = self._where_landing_leads()
        self._judge()

    def _where_landing_leads(self) -> tuple[str, tuple[int, int] | None]:
        landing = self.settings.landing_dir
        return os.path.realpath(landing), root_id(landing)

    def _judge(self) -> None:
        def judge() -> tuple[dict[str, str], frozenset[str]]:
            landing = os.path.realpath(self.settings.landing_dir)
            if (why := landing_refusal(self.settings)) is not None:  # mounted over since intake began
                return {str(d): why for d in self.label_dirs}, frozenset()
            return blocked_folders(self.settings, self.label_dirs), mounts.mount_points_below(landing)

        (blocked, points), self.generation = self.watch.stable(judge)
        self.blocked.clear()  # the walk holds this very dict: folders it enters later are judged anew
        self.blocked.update(blocked)
        self.points = points

    def current(self) -> int | None:
        """The generation of the mount table the folders are judged in, judged again first when the table
        changed since; None when it kept changing (nothing read now can be trusted)."""
        if self.generation is None or self.watch.generation() != self.generation:
            log.warning("intake: the mount table changed while intake runs; judging landing's folders again")
            self._judge()
        if self._where_landing_leads() != self._landing:  # a link re-pointed, a folder renamed: no mount
            why = "landing/ leads elsewhere than when this run began (a link re-pointed, or a folder renamed)"
            self.blocked.clear()
            self.blocked.update({str(d): why for d in self.label_dirs})
        return self.generation

    def unchanged_since(self, generation: int | None) -> bool:
        """Whether the mount table is still in ``generation`` (what was read since was read as judged)."""
        return generation is not None and self.watch.generation() == generation

    def refuses(self, path: Path, report: IntakeReport) -> bool:
        """Whether the file ``path`` lies in a folder not to take in from (or is a mount point itself), as
        judged in the current generation. Such a folder is reported once, as the walk reports the folders
        it finds blocked; its files stay in landing."""
        if self.points and os.path.join(os.path.realpath(path.parent), path.name) in self.points:
            not_taken_in(report, self.settings.landing_dir, str(path), FILE_MOUNTED)
            return True
        folder = str(path.parent)
        while True:
            if (why := self.blocked.get(folder)) is not None:
                if folder not in self._reported:
                    self._reported.add(folder)
                    not_taken_in(report, self.settings.landing_dir, folder, why)
                return True
            parent = os.path.dirname(folder)
            if folder in self._tops or parent == folder:
                return False
            folder = parent


class Refused(Exception):
    """A file refused before its bytes were checked: the reason, and the identity of what the path held."""

    def __init__(self, reason: str, ident: Identity | None):
        super().__init__(reason)
        self.reason, self.ident = reason, ident


def is_ignored_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES or name.endswith(REASON_SUFFIX)


def lstat_identity(path: Path) -> Identity | None:
    try:
        return identity(path.lstat())
    except OSError:
        return None


def read_landing_file(
    settings: Settings, path: Path, rel: Path, report: IntakeReport, now_ts: float
) -> tuple[bytes, Identity, int | None] | None:
    """The bytes of one landing file and the identity of the descriptor they were read from, or None when
    there is nothing to take in now (ignored, still being written, gone; counted here). Raises
    :class:`Refused` for a link, a file too big to be an image, and one that cannot be read."""
    try:
        require_real_folders(settings.landing_dir, path)
    except LinkedFolderError:  # a folder of it became a link since the walk: never read through it
        changed(report, display_path(rel))
        return None
    except FileNotFoundError:
        log.info("%s left landing before it was read", display_path(rel))
        return None
    if is_ignored_name(path.name):  # hidden and system files, links among them, are left alone (as scoring)
        ignore(report, rel)
        return None
    if path.is_symlink():
        raise Refused("symbolic link: links are never followed", lstat_identity(path))
    if path.suffix.lower() not in images.IMAGE_EXTENSIONS:
        ignore(report, rel)
        return None
    st = None
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end: never open it
            ignore(report, rel)
            return None
        if not settled(display_path(rel), st.st_mtime, now_ts, settings.settle_seconds):
            report.skipped += 1  # still being written; next run takes it
            return None
        max_bytes = images.max_file_bytes(settings.max_pixels)
        if st.st_size > max_bytes:
            raise Refused(
                f"file of {st.st_size} bytes is larger than any image within the "
                f"pixel limit ({settings.max_pixels}) can be",
                identity(st),
            )
        data, st = read_once(path, max_bytes)
    except FileNotFoundError:
        log.info("%s left landing before it was read", display_path(rel))
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise Refused("symbolic link: links are never followed", lstat_identity(path)) from None
        ident = identity(st) if st is not None else None  # what the checks saw, if they got that far
        raise Refused(f"unreadable file: {exc.strerror or exc}", ident) from None
    if data is None:  # replaced by a FIFO or device since the lstat, or changed while it was read
        if stat.S_ISREG(st.st_mode):
            report.skipped += 1
        else:
            ignore(report, rel)
        return None
    if len(data) > max_bytes:  # grew since the lstat
        raise Refused(f"file of more than {max_bytes} bytes is larger than any image can be", identity(st))
    return data, identity(st), change_time(st)
