"""What processes killed mid-write leave behind, and its removal.

Every temporary the pipeline makes (:data:`bcc_pipeline.files.TEMP_PREFIX`, ``.bcc-tmp-``: an atomic
write's file, a model conversion's folder) is removed by whoever made it; a process killed (SIGKILL) first
leaves it behind. :func:`sweep_stale_temporaries` removes those whose maker is gone (the process named in
the temporary's name, of this machine's process table, is no longer alive:
:func:`bcc_pipeline.temp_names.temp_owner_gone`; so a rerun right after a kill leaves nothing behind) and those
older than :data:`STALE_TEMP_SECONDS` (made elsewhere, or before names carried their maker) from the
folders only the pipeline writes in (scoring calls it when it plans a run, intake when it starts). It
touches nothing else: not a name without that prefix, not a link, not a fresh one (a live writer's), not a
move's ``.bcc-move-*`` marker (that one finishes an interrupted move), and nothing in ``landing/`` or
``inbox/`` (those files are somebody's, whatever their names).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .files import display_path
from .temp_names import TEMP_PREFIX, temp_owner_gone

__all__ = ["STALE_TEMP_SECONDS", "sweep_stale_temporaries", "sweep_temporaries"]

log = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 3600.0
"""A temporary older than this (last modified an hour ago) belongs to a process that was killed: no writer
keeps one that long without writing to it."""


def _newest_mtime(path: str, st: os.stat_result) -> float:
    """The latest modification time of ``path`` and, for a folder, of anything in it (no links followed)."""
    newest = st.st_mtime
    if stat.S_ISDIR(st.st_mode):
        for folder, dirs, names in os.walk(path, onerror=lambda exc: None):
            for name in dirs + names:
                try:
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
                except OSError:
                    pass
    return newest


def sweep_temporaries(
    folders: Iterable[str | os.PathLike[str]],
    *,
    shallow: Iterable[str | os.PathLike[str]] = (),
    older_than: float = STALE_TEMP_SECONDS,
    now: float | None = None,
) -> list[Path]:
    """Remove the temporaries (:data:`TEMP_PREFIX` names: files, or folders with what they hold) that
    were last modified more than ``older_than`` seconds ago, anywhere below ``folders`` and directly in
    the ``shallow`` ones. Returns what was removed (each logged).

    A temporary whose maker is gone (:func:`bcc_pipeline.temp_names.temp_owner_gone`) goes whatever its age.
    Nothing else is touched: names without the prefix, symbolic links (never followed either), temporaries
    written to within ``older_than`` whose maker may be alive (it may still publish them), and anything that cannot be
    removed (left, logged) are kept. A missing folder is skipped."""
    cutoff = (time.time() if now is None else now) - older_than
    removed: list[Path] = []

    def visit(folder: str, recursive: bool) -> None:
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            return
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            if entry.name.startswith(TEMP_PREFIX):
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    continue
                if not temp_owner_gone(entry.name) and _newest_mtime(entry.path, st) >= cutoff:
                    continue
                try:
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("cannot remove the stale temporary %s: %s", display_path(entry.path), exc)
                    continue
                log.info(
                    "removed the stale temporary %s (left by a killed process)", display_path(entry.path)
                )
                removed.append(Path(entry.path))
            elif recursive and stat.S_ISDIR(st.st_mode):
                visit(entry.path, True)

    for folder in folders:
        visit(os.fspath(folder), True)
    for folder in shallow:
        visit(os.fspath(folder), False)
    return removed


def sweep_stale_temporaries(settings: Any, *, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """:func:`sweep_temporaries` over the folders of ``settings``' home that only the pipeline writes in:
    ``runs/``, ``models/`` (with the converted-model caches), ``dataset/`` and ``quarantine/`` (every
    level), and the home itself (its top level only: the home marker). ``landing/`` and ``inbox/`` belong
    to the people and scanners that drop files there: whatever is named there, it is never deleted (a
    ``.bcc-tmp-`` file that ``bcc demo-data`` left when killed is a hidden file, which intake and scoring
    ignore). ``archive/`` gets no temporaries (moves use their own ``.bcc-move-*`` markers).
    Scoring calls it when it plans a run; intake, every holdout change and the split when they start."""
    return sweep_temporaries(
        [
            settings.runs_dir,
            settings.models_dir,
            settings.dataset_dir,
            settings.quarantine_dir,
        ],
        shallow=[settings.home],
        older_than=older_than,
    )
