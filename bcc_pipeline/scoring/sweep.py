"""Finishing, when a run is planned or finalized, the moves interrupted runs made without recording them
(:func:`sweep_interrupted`): a ledger row whose file reached its destination gets ``moved_to``, a file
found renamed in the inbox is moved from there, and a row whose file is nowhere is recorded as gone.
Each move follows the rules of :mod:`bcc_pipeline.scoring.moves`."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from ..config import Settings
from ..files import display_path, one_line, path_from_display
from ..moving import FoundBy, Taken, found_by_identity, identity, identity_from_text, move_no_clobber
from . import ledger
from .inbox import destination, path_key
from .moves import _explain_found, _moved_to, require_own_destinations

__all__ = ["sweep_interrupted"]

log = logging.getLogger(__name__)


def _kind_at(path: str) -> str | None:
    """What ``path`` holds: ``"file"`` (a regular file or a link, which a plan lists), ``"other"`` (a
    folder, FIFO, socket or device), or None (nothing)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError:
        return "file"  # cannot tell: leave it to the run that plans it
    return "file" if stat.S_ISREG(mode) or stat.S_ISLNK(mode) else "other"


def _finish_renamed(
    settings: Settings,
    r: Any,
    rel: str,
    at: FoundBy,
    taken: Taken,
    pins: dict[Path, tuple[int, int] | None] | None = None,
) -> Path | None:
    """Row ``r``'s path is gone, but its very file (device, inode, size, mtime) is listed under another
    name: its folder, or the inbox itself, was renamed after the run that read it was killed. Whatever
    that run's move had done (nothing yet, a hard link at its destination, a copy across filesystems
    published), it is finished from the new name, so the file is recorded once, under the row that holds
    its prediction, and not scored again under its new name and archived twice. Returns where it went."""
    ident = identity_from_text(r.src_identity)
    if ident is None or (now_at := at(ident, r.sha256)) is None:
        return None
    if os.path.realpath(now_at.parent) != str(now_at.parent):
        return None  # never through a folder that is a link (the listing is of the resolved inbox)
    dest = destination(settings, r.run_id, r.status, rel)
    dest_root = settings.quarantine_dir if r.status == "rejected" else settings.archive_dir
    try:
        now = identity(os.lstat(now_at))  # touched since, perhaps: the same inode and bytes
        where = move_no_clobber(
            now_at,
            dest,
            expect=now,
            dest_root=dest_root,
            taken=taken,
            prior=ident,
            dest_root_id=(pins or {}).get(dest_root),
        )
    except OSError as exc:  # left in the inbox: the run that plans it scores it under its new name
        log.warning("could not finish the move of %s from %s: %s", r.path, display_path(now_at), exc)
        return None
    log.info("finished the move of %s, whose file was found renamed to %s", r.path, display_path(now_at))
    return where


def _own_paths(
    rows: Sequence[Any], inbox_for: Callable[[str], str | None], planned_of: Callable[[str], Iterable[str]]
) -> Iterator[str]:
    """The inbox paths of ledger rows, and every path their runs planned (lazily: asked for only when a
    renamed file is looked for)."""
    for r in rows:
        inbox = inbox_for(r.run_id)
        with contextlib.suppress(ValueError):
            if inbox is not None:
                yield os.path.join(inbox, path_from_display(r.path))
    for run_id in dict.fromkeys(r.run_id for r in rows):
        if (inbox := inbox_for(run_id)) is not None:
            yield from (os.path.join(inbox, rel) for rel in planned_of(run_id))


def sweep_interrupted(
    settings: Settings,
    engine: Engine,
    inbox_of: Callable[[str], str | None],
    only_run: str | None = None,
    listed: Iterable[str] = (),
    planned_of: Callable[[str], Iterable[str]] = lambda run_id: (),
) -> int:
    """Ledger rows whose file reached its destination but whose ``moved_to`` was never written (the
    process died between the move and the update) get ``moved_to``. ``inbox_of(run_id)`` is the inbox a
    run was planned for (None: unknown, its rows are left alone). A row whose path holds a file (or a
    link) is left to the run that plans it; one whose path is empty, or now holds a folder or a FIFO
    (which no run plans as that path), is looked for, and recorded as having left the inbox when it is
    nowhere (never left unsettled). ``listed``: the files in the calling run's inbox (full paths): a row
    whose path is gone and whose very file is among them under another name (a folder renamed) has its
    move finished from there (:func:`_finish_renamed`); never from a path that has a row of its own or
    that a run planned (``planned_of(run_id)``: its files, relative to its inbox), such as another hard
    link of the file. Returns how many rows were fixed."""
    pins = require_own_destinations(settings)  # before any recovery move: never into another home
    rows = ledger.unmoved_rows(engine, only_run)
    inboxes: dict[str, str | None] = {}

    def inbox_for(run_id: str) -> str | None:
        if run_id not in inboxes:
            inboxes[run_id] = inbox_of(run_id)
        return inboxes[run_id]

    # a file that waits for its own move is never another row's file renamed (a hard link of it)
    renamed = found_by_identity(listed, own=_own_paths(rows, inbox_for, planned_of))
    fixed: list[tuple[int, str, str | None]] = []
    placed: set[str] = set()  # names given to rows here (recorded together at the end)
    gone: list[int] = []

    def taken_in(run_id: str) -> Taken:
        return lambda p: display_path(p) in placed or ledger.place_recorded(engine, run_id, display_path(p))

    for r in rows:
        try:
            rel = path_from_display(r.path)  # the ledger shows paths in the reversible display form
        except ValueError:
            continue
        if path_key(rel) != r.path_key:
            continue
        inbox = inbox_for(r.run_id)
        held = None if inbox is None else _kind_at(os.path.join(inbox, rel))
        if inbox is None or held == "file":  # still there: the run that plans it finishes it
            continue
        found = None
        try:
            if held is None:
                found = _finish_renamed(settings, r, rel, renamed, taken_in(r.run_id), pins)
            found = found or _moved_to(settings, r, inbox, rel, taken_in(r.run_id))
        except OSError as exc:  # its destination cannot be looked at or tidied now (read-only, no access)
            log.warning(
                "cannot settle the interrupted move of %s yet (a later run tries again): %s",
                r.path,
                one_line(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)),
            )
            continue
        if found is not None:
            placed.add(display_path(found))
            fixed.append((r.id, str(found), _explain_found(settings, r, found)))
        else:  # gone (deleted, or a folder or FIFO took the name): no run will ever plan that file there
            gone.append(r.id)
    for row_id in gone:
        ledger.mark_vanished(engine, row_id)
    ledger.record_swept(engine, fixed)
    if fixed:
        log.info("recorded %d file move(s) that interrupted runs had finished", len(fixed))
    return len(fixed)
