"""Moving scored files out of the inbox, recording where they went, and finishing interrupted runs.

Files move only after their batch is committed: to ``archive/<run>/<rel>`` or ``quarantine/<run>/<rel>``
with ``<name>.reason.txt`` (:func:`bcc_pipeline.moving.move_no_clobber`: nothing is ever overwritten, an
interrupted move is finished by the next attempt); then the ledger gets ``moved_to``. A run killed
anywhere is finished by the next one: a rerun of the same run id moves what its ledger says is done and
scores the rest; a new run finds an interrupted run's unmoved ledger row for a file and moves it where
that run meant it to go (*recovered*, counted only when that move succeeds);
:func:`bcc_pipeline.scoring.sweep.sweep_interrupted` records moves that were done but never written down.

A file is moved only while it is still the file that was read (:data:`bcc_pipeline.moving.Identity`,
taken from the descriptor that was hashed): a path that holds other content by then is left in the inbox
and counted as *changed* (the next run scores what is there); no content without a prediction is ever
archived under another's. A name is given to one file only: a move found or finished later never takes a
name the ledger (or this shard, before it records its batch) gives another file, so two hard links of one
file, or two identical copies, each keep their own name. A file that cannot be moved stays in the inbox and is tried again by later
runs; after :data:`MAX_MOVE_ATTEMPTS` failed attempts it goes to quarantine with the reason instead.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from ..config import Settings
from ..destinations import destination_lost
from ..files import display_path, path_from_display, reason_path, write_reason
from ..homes import destination_refusal
from ..moving import (
    Identity,
    LinkedFolderError,
    SourceChangedError,
    Taken,
    find_moved,
    finish_move,
    identity_from_text,
    identity_text,
    linked_folder,
    move_no_clobber,
    pending_copy,
    require_resolved,
    root_id,
    still_named,
)
from . import ledger
from .inbox import destination
from .loader import Item, clean_reason

__all__ = [
    "MAX_MOVE_ATTEMPTS",
    "MOVE_ERROR_CHARS",
    "MoveFile",
    "Mover",
    "Tally",
    "require_own_destinations",
]

log = logging.getLogger(__name__)
MoveFile = Callable[..., Path]
"""How a file is moved: ``(source, destination, *, expect, before_unlink) -> where it went``
(:func:`moving.move_no_clobber`, whose keyword arguments it takes)."""
MAX_MOVE_ATTEMPTS = 3
"""Failed attempts (over all runs) after which a file that cannot be archived goes to quarantine."""
_UNMOVABLE = f"could not be moved to the archive in {MAX_MOVE_ATTEMPTS} attempts"
MOVE_ERROR_CHARS = 16000
"""Characters of a move error kept (the whole OS error with both paths, even near PATH_MAX)."""
Move = tuple[Item, str, str, "str | None", int]
"""(item, status, run id, reason, failed attempts so far) of one file to move."""


@dataclass
class Tally:
    """What a shard did: counts by outcome, the files it could not move, the files it left for later."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    move_failures: list[dict[str, str]] = field(default_factory=list)
    skipped_paths: list[str] = field(default_factory=list)


def _try_write_reason(path: Path, reason: str) -> None:
    try:
        write_reason(path, reason)
    except OSError as exc:
        log.warning("could not write the reason file beside %s: %s", path, exc)


class Mover:
    """Moves the files of one run's shard and records the moves in the ledger."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        run_id: str,
        inbox: str,
        tally: Tally,
        move_file: MoveFile = move_no_clobber,
        before_unlink: Callable[[Path, Path], None] | None = None,
    ):
        self.s, self.engine, self.run_id, self.inbox, self.tally = settings, engine, run_id, inbox, tally
        self.move_file, self.before_unlink = move_file, before_unlink
        # archive/ and quarantine/ as they are now (made first: a folder that does not exist yet cannot be
        # pinned): one mounted over later is never moved into
        self._pins = require_own_destinations(settings)
        self._placed: set[str] = set()  # names this shard gave files (its batch records them afterwards)

    def taken(self, run_id: str) -> Taken:
        """Whether a name under ``run_id``'s folders is another file's: given by this shard, or recorded."""

        def taken(path: Path) -> bool:
            shown = display_path(path)
            return shown in self._placed or ledger.place_recorded(self.engine, run_id, shown)

        return taken

    def _move_one(
        self, it: Item, dest: Path, run_id: str, fresh: bool = False, prior: Identity | None = None
    ) -> Path:
        # Never through a folder that is a link, on either side (a source folder swapped for one since the
        # plan, a link quarantined earlier in archive/ or quarantine/): see bcc_pipeline.moving.
        dest_root = self.s.quarantine_dir if _inside(dest, self.s.quarantine_dir) else self.s.archive_dir
        try:  # the inbox itself swapped for a link since (to another home's landing/, say): not ours
            require_resolved(self.inbox)
        except LinkedFolderError as exc:
            raise SourceChangedError(exc.errno, exc.strerror, exc.filename) from exc
        where = self.move_file(
            os.path.join(self.inbox, it.rel),
            dest,
            expect=it.ident,
            before_unlink=self.before_unlink,
            src_root=self.inbox,
            dest_root=dest_root,
            taken=self.taken(run_id),
            fresh=fresh,
            prior=prior,
            expect_ctime=it.ctime if fresh else None,
            expect_sha256=it.sha,
            dest_root_id=self._pins.get(dest_root),
        )
        return where

    def move(
        self, moves: Iterable[Move], *, fresh: bool = False, prior: Identity | None = None
    ) -> list[dict[str, Any]]:
        """Move each (item, status, run id, reason, attempts) to that run's archive/quarantine folder and
        record it; returns the outcomes ({..., moved_to, error, failed}). ``fresh``: files this shard has
        just committed, which no earlier attempt can have started to move. ``prior``: the identity an
        earlier attempt read the (one) file with (its ledger row's), whose copy may be half-finished."""
        outcomes = []
        counts = self.tally.counts
        for it, status, run_id, reason, attempts in moves:
            dest = destination(self.s, run_id, status, it.rel)
            moved, error, failed = None, None, False
            if not fresh and (half := self._half_quarantined(it, status, run_id, attempts, prior)):
                dest, status, error = half, "rejected", f"quarantined: {_UNMOVABLE}"
                reason = f"{_UNMOVABLE} (its move to quarantine was finished by a later attempt)"
                counts["quarantined_unmovable"] += 1
            try:
                moved_path = self._move_one(it, dest, run_id, fresh, prior)
                self._placed.add(display_path(moved_path))
                if status == "rejected":
                    _try_write_reason(moved_path, reason or "rejected")
                moved = display_path(moved_path)
            except SourceChangedError:
                error = ledger.CHANGED
                counts["changed"] += 1
                log.warning("%s changed after it was read: not moved, the next run scores it", it.path)
            except FileNotFoundError:
                # another run (taking this run for an interrupted one) may have moved it, and recorded
                # that on this very row: kept as it is
                done = ledger.recorded_place(self.engine, run_id, it.key)
                done = done and Path(path_from_display(done))
                done = done or find_moved(dest, sha256=it.sha, ident=it.ident, taken=self.taken(run_id))
                if done is not None:  # someone else (a recovering run) finished this very move
                    moved = display_path(done)
                    self._placed.add(moved)
                elif fresh and self._taken_by_another_run(it, run_id):
                    ledger.withdraw(self.engine, run_id, it.key, it.path)
                    counts["not_claimed"] += 1
                    log.info("%s was taken and moved by another run meanwhile: not this run's", it.path)
                    continue
                else:
                    error = ledger.VANISHED
                    counts["missing"] += 1
            except OSError as exc:
                error = clean_reason(f"cannot move to {display_path(dest)}: {exc}", MOVE_ERROR_CHARS)
                moved, error, failed = self._after_failure(it, status, run_id, error, attempts + 1)
            outcomes.append(
                {
                    "run_id": run_id,
                    "key": it.key,
                    "path": it.path,
                    "rejected": status == "rejected",
                    "moved_to": moved,
                    "error": error,
                    "failed": failed,
                }
            )
        ledger.record_moves(self.engine, outcomes)
        return outcomes

    def _half_quarantined(
        self, it: Item, status: str, run_id: str, attempts: int, prior: Identity | None
    ) -> Path | None:
        """The quarantine destination of a file that could not be archived, when the attempt that was
        quarantining it (:meth:`_after_failure`) was killed halfway: the file linked there, or its copy
        across filesystems published, and still in the inbox. That move is finished, not another one to
        the archive begun (which would leave the quarantined copy unrecorded)."""
        if status == "rejected" or attempts < MAX_MOVE_ATTEMPTS - 1:
            return None
        qdest = destination(self.s, run_id, "rejected", it.rel)
        src = os.path.join(self.inbox, it.rel)
        for ident in (it.ident, prior):
            if ident is not None and pending_copy(qdest, src, ident) is not None:
                return qdest
        if it.ident is None:
            return None
        found = find_moved(qdest, ident=it.ident, taken=self.taken(run_id))  # the very inode comes first
        if found is not None and os.lstat(found).st_dev == it.ident[0]:
            return qdest
        return None

    def _taken_by_another_run(self, it: Item, run_id: str) -> bool:
        """Whether a run interleaved with this one claimed this very file (the same identity) and moved it
        where its row says, after this run had read it and before this run's move."""
        for place in ledger.places_elsewhere(
            self.engine, run_id, it.key, identity_text(it.ident), it.ledger_mark
        ):
            try:
                where = Path(path_from_display(place))
            except ValueError:
                continue
            if find_moved(where, sha256=it.sha, ident=it.ident) is not None:
                return True
        return False

    def _after_failure(
        self, it: Item, status: str, run_id: str, error: str, attempts: int
    ) -> tuple[str | None, str, bool]:
        """A failed move: after :data:`MAX_MOVE_ATTEMPTS` attempts, quarantine the file with the reason;
        otherwise (or when that fails too) it stays in the inbox and is reported."""
        if status != "rejected" and attempts >= MAX_MOVE_ATTEMPTS:
            why = f"could not be moved to the archive in {attempts} attempts: {error}"
            try:
                moved_path = self._move_one(it, destination(self.s, run_id, "rejected", it.rel), run_id)
                self._placed.add(display_path(moved_path))
                _try_write_reason(moved_path, why)
                self.tally.counts["quarantined_unmovable"] += 1
                log.error("quarantined %s: %s", it.path, why)
                return display_path(moved_path), clean_reason(f"quarantined: {why}", MOVE_ERROR_CHARS), True
            except OSError as exc:
                error = clean_reason(f"{error}; and cannot quarantine it either: {exc}", MOVE_ERROR_CHARS)
        self.tally.counts["move_failed"] += 1
        self.tally.move_failures.append(
            {"path": it.path, "error": error, "run_id": run_id, "attempts": attempts}
        )
        log.error("could not move %s (it stays in the inbox; attempt %d): %s", it.path, attempts, error)
        return None, error, True

    def _mark_moved(self, row: Any, dest: Path) -> None:
        self._placed.add(display_path(dest))
        ledger.mark_moved(self.engine, row.id, str(dest), _explain_found(self.s, row, dest))

    def resolve_known(self, it: Item) -> bool:
        """A file with ledger rows already: finish what an interrupted attempt started. True when
        handled (nothing more to do for this file in this run)."""
        own = [r for r in it.rows if r.run_id == self.run_id]
        others = [r for r in it.rows if r.run_id != self.run_id and r.moved_to is None]
        counts = self.tally.counts

        def matches(r: Any) -> bool:
            if it.kind == "missing" or it.kind == "skipped":
                return False
            if r.sha256 is not None:
                # the same bytes; under another inode (copied again) only while the interrupted move never
                # removed the source (its copy is pending), or no copy was made: else the row's file was
                # moved and this is a new file with the same content
                ident = identity_from_text(r.src_identity)
                if r.sha256 != it.sha or ident is None or it.ident is None or ident[:2] == it.ident[:2]:
                    return r.sha256 == it.sha
                src = os.path.join(self.inbox, it.rel)
                if pending_copy(destination(self.s, r.run_id, r.status, it.rel), src, ident) is not None:
                    return True
                return _moved_to(self.s, r, self.inbox, it.rel, self.taken(r.run_id)) is None
            # refused unread (a link, a file too large): the same file only while the path holds what it
            # held then (rows from before migration 0008 have no identity); a link touched since is the
            # same link (its target cannot change in place)
            ident = identity_from_text(r.src_identity)
            if r.src_identity is not None and r.src_identity != identity_text(it.ident):
                if not (
                    it.is_link and ident is not None and it.ident is not None and ident[:3] == it.ident[:3]
                ):
                    return False
            return r.status == "rejected" and (it.is_link or it.kind == "rejected")

        for r in own:  # this run took the file on, and did not record the move
            if matches(r):
                prior = identity_from_text(r.src_identity)
                if self.move([(it, r.status, r.run_id, r.reason, r.move_attempts)], prior=prior)[0][
                    "moved_to"
                ]:
                    counts["already_done"] += 1
                return True
            held = it.kind != "missing"  # the path holds another file now
            found = _moved_to(self.s, r, self.inbox, it.rel, self.taken(r.run_id), elsewhere=held)
            if found is not None:
                self._mark_moved(r, found)
            if it.kind == "missing":
                if found is None:
                    ledger.mark_vanished(self.engine, r.id)
                    counts["missing"] += 1
                else:
                    counts["already_done"] += 1
            else:
                counts["skipped"] += 1  # new content at a path this run already handled: next run
                self.tally.skipped_paths.append(it.path)
            return True
        for r in others:  # an interrupted earlier run took the file on and never moved it
            if matches(r):
                prior = identity_from_text(r.src_identity)
                if self.move([(it, r.status, r.run_id, r.reason, r.move_attempts)], prior=prior)[0][
                    "moved_to"
                ]:
                    counts["recovered"] += 1
                    log.info("recovered %s for interrupted run %s", it.path, r.run_id)
                return True
            held = it.kind != "missing"
            found = _moved_to(self.s, r, self.inbox, it.rel, self.taken(r.run_id), elsewhere=held)
            if found is not None:
                self._mark_moved(r, found)
        return False


def require_own_destinations(settings: Settings) -> dict[Path, tuple[int, int] | None]:
    """Refuse (:class:`InboxRefused`, no retry) to move anything while ``archive/`` or ``quarantine/`` is
    another deployment's folder (a link or a mount there: :func:`bcc_pipeline.homes.destination_refusal`):
    what is moved there would become that home's files (its ``landing/malignant``: training images under a
    label), or is not the folder this home has moved files into (its marker gone: a disk not mounted,
    :func:`bcc_pipeline.destinations.destination_lost`): an interrupted move would be taken for a file that
    left. Otherwise make them if missing and return their pins (device and inode) for the moves."""
    from .inbox import InboxRefused

    pins: dict[Path, tuple[int, int] | None] = {}
    for folder in (settings.archive_dir, settings.quarantine_dir):
        if problem := destination_refusal(settings, folder):
            raise InboxRefused(f"refusing to move files into {display_path(folder)}: {problem}")
        if problem := destination_lost(settings, folder):  # made and marked when new
            raise InboxRefused(f"refusing to move files: {problem}")
        pins[folder] = root_id(folder)
    return pins


def _moved_to(
    settings: Settings, r: Any, inbox: str, rel: str, taken: Taken, *, elsewhere: bool = False
) -> Path | None:
    """Where the file of ledger row ``r`` went when a move was not recorded: its destination, or a
    ``~N`` name beside it when that was taken, whichever holds this row's file (by content hash or the
    identity it was loaded with; :func:`bcc_pipeline.moving.find_moved`), never merely another file there,
    nor a name another file holds (``taken``). A file that could not be archived in
    :data:`MAX_MOVE_ATTEMPTS` attempts may have gone to quarantine instead: looked for there too. What a
    move across filesystems killed after removing the source left (its temporary name) is tidied first.

    ``elsewhere``: the row's path holds another file now. When the row's file still has a name in the inbox
    (two files exchanged after a kill in the middle of the move: the link at the destination has another
    name, or, across filesystems, the file is named below the inbox), the interrupted move never finished:
    its link or copy is dropped (None), and the file is moved once, from its new name, by the run that
    plans it there. Recorded, it would be archived a second time from there."""
    ident = identity_from_text(r.src_identity)
    statuses = [r.status]
    if r.status != "rejected" and (r.move_attempts or 0) >= MAX_MOVE_ATTEMPTS - 1:
        statuses.append("rejected")
    for status in statuses:
        dest = destination(settings, r.run_id, status, rel)
        _require_own_folders(settings, dest)
        finish_move(dest, os.path.join(inbox, rel), ident, taken=taken)
        found = find_moved(dest, sha256=r.sha256, ident=ident, taken=taken)
        if found is not None and elsewhere and ident is not None and still_named(found, ident, inbox):
            log.info("%s: its file is still in the inbox under another name; moved from there", r.path)
            found.unlink()
            return None
        if found is not None:
            return found
    return None


def _require_own_folders(settings: Settings, dest: Path) -> None:
    """Refuse (:class:`InboxRefused`, no retry) to look for a file, or finish its move, through a folder
    below ``archive/`` or ``quarantine/`` that is a symbolic link, as the moves themselves never go through
    one: a file with the same bytes found there (another home's ``landing/malignant``) would be recorded as
    this file's archived copy, and none found would write the file off as gone, while its real copy lies
    in the folder that the link replaced. The row stays open until the folder is put back."""
    from .inbox import InboxRefused

    root = settings.quarantine_dir if _inside(dest, settings.quarantine_dir) else settings.archive_dir
    if (link := linked_folder(root, dest)) is not None:
        raise InboxRefused(
            f"refusing to look for files moved into {display_path(link)}: it is a symbolic link, not the "
            f"folder of {display_path(root)} they were moved into; put that folder back"
        )


def _explain_found(settings: Settings, r: Any, found: Path) -> str | None:
    """Write the reason file beside a quarantined file whose move a later run records (the move was
    killed before it); returns the ``move_error`` to record with it (a file quarantined because it could
    not be archived says so, as :meth:`Mover._after_failure` records it)."""
    if not _inside(found, settings.quarantine_dir):
        return None
    why = None
    if r.status == "rejected":
        reason = r.reason or "rejected"
    else:
        why = _UNMOVABLE
        reason = f"{why} (its move to quarantine was recorded by a later run)"
    if not os.path.lexists(reason_path(found)):
        _try_write_reason(found, reason)
    return None if why is None else f"quarantined: {why}"


def _inside(path: Path, folder: Path) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)
