"""Intake after the commit: each file's outcome is committed first (:mod:`bcc_pipeline.intake`); then a
stored file is removed from ``landing/`` and a refused one moved to ``quarantine/<run>/landing/...`` with
its reason, and the move recorded (``rejections.moved_to``). :func:`finish_interrupted` (run first by
every intake) finishes the moves that earlier, killed or failed runs recorded but did not complete, or
records one that reached its destination.

Every removal and move happens only while the path still holds the file that was checked (its
:data:`bcc_pipeline.moving.Identity`), never through a folder that became a link, and never to a name
another rejection is recorded at (:func:`bcc_pipeline.store.place_recorded`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update

from . import images
from .config import Settings
from .files import (
    PATH_MAX,
    display_path,
    fit_path,
    one_line,
    path_from_display,
    quarantine_rel,
    read_once,
    reason_path,
    safe_dirname,
    write_reason,
)
from .moving import (
    FoundBy,
    Identity,
    LinkedFolderError,
    SourceChangedError,
    Taken,
    change_time,
    files_below,
    find_moved,
    finish_move,
    found_by_identity,
    identity,
    identity_from_text,
    identity_text,
    linked_folder,
    move_no_clobber,
    pending_copy,
    require_real_folders,
    root_id,
    same_file,
    sha256_of,
    still_named,
)
from .store import Rejection, place_recorded

if TYPE_CHECKING:
    from .intake import IntakeReport

__all__ = ["Then", "carry_out", "changed", "finish_interrupted", "quarantine_dest"]

log = logging.getLogger(__name__)

_SWEEP_LIMIT = 10_000  # interrupted moves finished per run (the rest next run)
_REPLACED = "replaced by other content before it was moved; that content is taken in anew"
_GONE = "left landing/ before it was moved"


@dataclass(frozen=True)
class Then:
    """What happens to a file once its outcome is committed: removed (its content is stored) or moved."""

    dest: Path | None = None  # None: remove from landing
    reason: str = ""
    ident: Identity | None = (
        None  # what the path held when it was checked; removed or moved only while it does
    )
    ctime: int | None = None  # its change time then (moving.change_time): not rewritten in place since
    sha256: str | None = None  # the content that was read (None: refused unread): hashed again before it goes


def quarantine_dest(quarantine_root: Path, rel: Path) -> Path:
    """Where a rejected ``landing/<rel>`` goes: ``quarantine/<run>/landing/<rel>``, with a hashed folder
    when that path would not fit (:func:`bcc_pipeline.files.fit_path`, as scoring's destinations), and
    folders named like reason files renamed (:func:`bcc_pipeline.files.quarantine_rel`)."""
    return fit_path(quarantine_root, quarantine_rel(rel))


def _mark(session, run_id: str, shown: str, **values: Any) -> None:
    session.execute(
        update(Rejection)
        .where(Rejection.run_id == run_id, Rejection.stage == "intake", Rejection.path == shown)
        .values(**values)
    )
    session.commit()


def _write_reason(path: Path, reason: str) -> None:
    try:
        write_reason(path, reason)
    except OSError as exc:
        log.warning("could not write the reason file beside %s: %s", display_path(path), one_line(str(exc)))


def changed(report: IntakeReport, shown: str) -> None:
    report.changed += 1
    log.warning("%s changed after it was read: left in landing, the next run takes it in", shown)


_QUARANTINE_PIN: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "bcc_quarantine_pin", default=None
)
DATASET_PIN: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "bcc_dataset_pin", default=None
)


@contextlib.contextmanager
def pinned_roots(settings: Settings) -> Iterator[None]:
    """For one intake run: ``quarantine/`` and ``dataset/`` as they are when the run begins (made first,
    then pinned by device and inode). A mount made over either while the run goes on, or the folder
    swapped for a link, is never moved or written into (``dest_root_id`` of
    :func:`bcc_pipeline.moving.move_no_clobber`, ``root_pin`` of
    :func:`bcc_pipeline.content_store.store_copy`). Context variables, so the pins reach every move and
    write of the run without being handed through each function between ``intake()`` and them."""
    for folder in (settings.quarantine_dir, settings.dataset_dir):
        with contextlib.suppress(OSError):  # cannot be made: every move or write there fails, reported
            folder.mkdir(parents=True, exist_ok=True)
    tokens = (
        _QUARANTINE_PIN.set(root_id(settings.quarantine_dir)),
        DATASET_PIN.set(root_id(settings.dataset_dir)),
    )
    try:
        yield
    finally:
        _QUARANTINE_PIN.reset(tokens[0])
        DATASET_PIN.reset(tokens[1])


def _move(
    session,
    run_id: str,
    shown: str,
    src: Path,
    dest: Path,
    reason: str,
    report: IntakeReport,
    *,
    expect: Identity | None,
    roots: tuple[Path, Path],
    again: bool = False,
    fresh: bool = False,
    prior: Identity | None = None,
    sha256: str | None = None,
) -> str:
    """Move a rejected file to its recorded destination and record where it went, only while ``src`` is
    still the file that was checked (``expect``). Returns ``"moved"``; ``"changed"`` when ``src`` holds
    another file (it stays in landing, the row says so and the next run takes it in anew); ``"failed"``
    when it cannot be moved (reported, recorded as ``move_error``, the file still in landing; with
    ``again``, an earlier attempt failed too: listed in ``persistent_move_failures``). ``fresh``: the first
    attempt (no interrupted one to finish); ``prior``: the identity an earlier attempt moved the file with.
    A name another file is recorded at is never given again. ``sha256``: the content that was read, hashed
    again before the landing name goes (a rewrite in place in the middle of the move)."""
    try:
        moved = move_no_clobber(
            src,
            dest,
            expect=expect,
            src_root=roots[0],
            dest_root=roots[1],
            taken=_taken(session, run_id),
            fresh=fresh,
            prior=prior,
            expect_sha256=sha256,
            dest_root_id=_QUARANTINE_PIN.get(),
        )
    except SourceChangedError:
        _mark(session, run_id, shown, dest=None, move_error=_REPLACED)
        changed(report, shown)
        return "changed"
    except FileNotFoundError:  # taken by someone else since (another intake run): not a failed move
        row = session.execute(
            select(Rejection.moved_to).where(
                Rejection.run_id == run_id, Rejection.stage == "intake", Rejection.path == shown
            )
        ).scalar()
        if row is not None:  # another run finished this very move and recorded it on this row
            log.info("%s was quarantined for this run by another one", shown)
            return "moved"
        if fresh and _quarantined_by_another_run(session, run_id, shown, expect, report.rejections_mark):
            _withdraw(session, run_id, shown, report)
            return "withdrawn"
        _mark(session, run_id, shown, dest=None, move_error=_GONE)
        log.info("%s left landing/ before it was moved", shown)
        return "gone"
    except OSError as exc:
        error = one_line(f"cannot move to {display_path(dest)}: {exc.strerror or exc}")
        _mark(session, run_id, shown, move_error=error)
        report.failed.append({"path": shown, "error": error})
        report.move_failed += 1
        if again:
            report.persistent_move_failures.append({"path": shown, "error": error, "run_id": run_id})
        log.error("could not quarantine %s (left in landing): %s", shown, error)
        return "failed"
    _write_reason(moved, reason)
    _mark(session, run_id, shown, moved_to=display_path(moved), move_error=None)
    return "moved"


def _quarantined_by_another_run(session, run_id: str, shown: str, ident: Identity | None, after: int) -> bool:
    """Whether an intake run interleaved with this one (its rejection written after the row id ``after``,
    the newest when this run started; row ids, not clocks) refused this very file (the same identity) and
    quarantined it where its row says."""
    if ident is None:
        return False
    places = session.execute(
        select(Rejection.moved_to).where(
            Rejection.stage == "intake",
            Rejection.path == shown,
            Rejection.run_id != run_id,
            Rejection.src_identity == identity_text(ident),
            Rejection.moved_to.is_not(None),
            Rejection.id > after,
        )
    ).scalars()
    return any(find_moved(Path(path_from_display(p)), ident=ident) is not None for p in places)


def _withdraw(session, run_id: str, shown: str, report: IntakeReport) -> None:
    """Take back this run's rejection of a file another run quarantined first: the file has that run's."""
    session.execute(
        delete(Rejection).where(
            Rejection.run_id == run_id, Rejection.stage == "intake", Rejection.path == shown
        )
    )
    session.commit()
    report.rejected -= 1
    report.rejections[:] = [x for x in report.rejections if x["path"] != shown]
    log.info("%s was quarantined by another intake run meanwhile: not this run's rejection", shown)


def _taken(session, run_id: str) -> Taken:
    """Whether a quarantine name of ``run_id`` is recorded as another file's place (each move is recorded
    right after it, so the database knows every name this run gave)."""
    return lambda path: place_recorded(session, run_id, display_path(path))


def _remove_stored(shown: str, path: Path, then: Then, report: IntakeReport, landing: Path) -> None:
    """Remove a file whose content is stored and committed, unless the path holds another file by now, or
    leads through a folder that became a link (checked right before the ``unlink``; the one window left
    is between the two, as in :mod:`bcc_pipeline.moving`): that file was never stored, it stays for the
    next run (``changed``)."""
    try:
        require_real_folders(landing, path)
        now = path.lstat()
        if then.ident is not None and identity(now) != tuple(then.ident):
            changed(report, shown)
            return
        if then.ctime is not None and change_time(now) not in (then.ctime, None):
            changed(report, shown)  # rewritten in place, its size and mtime put back: never stored
            return
        if then.sha256 is not None and sha256_of(path) != then.sha256:
            changed(report, shown)  # the same, where the change time cannot tell (hard links, one tick)
            return
        path.unlink()
    except FileNotFoundError:
        pass
    except LinkedFolderError:
        changed(report, shown)
    except OSError as exc:
        error = one_line(f"stored, but cannot be removed from landing: {exc.strerror or exc}")
        report.failed.append({"path": shown, "error": error})
        # every run would store it again and fail again, green: somebody has to look (read-only landing)
        report.unreachable.append(report.failed[-1])
        log.error("%s: %s", shown, error)


def carry_out(
    settings: Settings, session, run_id: str, shown: str, path: Path, then: Then, report: IntakeReport
) -> None:
    """After the commit: quarantine a rejected file, or remove a stored one from landing."""
    if then.dest is not None:
        _move(
            session,
            run_id,
            shown,
            path,
            then.dest,
            then.reason,
            report,
            expect=then.ident,
            roots=_roots(settings),
            fresh=True,
            sha256=then.sha256,
        )
    else:
        _remove_stored(shown, path, then, report, settings.landing_dir)


def _roots(settings: Settings) -> tuple[Path, Path]:
    """Where intake's moves start and end: no folder below these may be a link (:mod:`.moving`)."""
    return settings.landing_dir, settings.quarantine_dir


def finish_interrupted(settings: Settings, session, report: IntakeReport) -> set[str]:
    """Finish the quarantine moves that earlier runs committed but did not complete (killed, or the move
    failed). Returns the paths (as displayed) whose move still fails: they stay in landing, and this run
    leaves them alone."""
    rows = session.execute(
        select(
            Rejection.run_id,
            Rejection.path,
            Rejection.sha256,
            Rejection.reason,
            Rejection.dest,
            Rejection.move_error,
            Rejection.src_identity,
        )
        .where(Rejection.stage == "intake", Rejection.dest.is_not(None), Rejection.moved_to.is_(None))
        .order_by(Rejection.id)
        .limit(_SWEEP_LIMIT)
    ).all()
    # a refused file that waits for its own move is never another row's file renamed (a hard link of it)
    renamed = found_by_identity(files_below(settings.landing_dir), own=_landing_paths(settings, rows))
    unfinished = {r.path for r in rows if _finish_one(settings, session, r, report, renamed) == "failed"}
    if report.recovered:
        log.info("intake: finished %d quarantine move(s) of interrupted runs", report.recovered)
    return unfinished


def _landing_paths(settings: Settings, rows: Iterable[Any]) -> Iterator[Path]:
    for r in rows:
        with contextlib.suppress(ValueError):
            yield settings.landing_dir / path_from_display(r.path)


def _finish_one(settings: Settings, session, r: Any, report: IntakeReport, renamed: FoundBy) -> str:
    """Finish one recorded move (see :func:`finish_interrupted`); returns what became of it.

    The file is moved only while the path holds the file that was refused: by its recorded identity (rows
    from before migration 0008 have none), or, touched or copied again since, by its content where a hash
    was taken; never through a folder that has become a link. Otherwise, or when the path is empty, the
    move may have happened before the process was killed: its copy is looked for (and recorded) first;
    the path's new file, if any, is taken in anew by the walk."""
    try:
        rel = path_from_display(r.path)
        src, dest = settings.landing_dir / rel, Path(path_from_display(r.dest))
    except ValueError:
        return "skipped"
    if (link := linked_folder(settings.quarantine_dir, dest)) is not None:  # never looked for through it
        # the row stays open and the run red, as when its move fails (the moves never go through a link)
        why = f"cannot look for it in quarantine: {display_path(link)} is a symbolic link, not a folder"
        _mark(session, r.run_id, r.path, move_error=why)
        report.failed.append({"path": r.path, "error": why})
        report.unreachable.append(report.failed[-1])
        if r.move_error is not None:
            report.persistent_move_failures.append({**report.failed[-1], "run_id": r.run_id})
        return "failed"
    ident = identity_from_text(r.src_identity)
    if not os.path.lexists(src) and ident is not None and (now_at := renamed(ident, r.sha256)) is not None:
        # its very file under another name (its folder renamed since the run that refused it was killed):
        # that move is finished from there, not the file refused again under its new name
        if _still_refused(settings, session, now_at, r, ident) is not None:
            log.info("intake: finishing the move of %s, found renamed to %s", r.path, display_path(now_at))
            src = now_at
    if os.path.lexists(src):
        expect = _still_refused(settings, session, src, r, ident)
        if expect is not None:
            dest = _fitted(settings, session, r, rel, dest)
            outcome = _move(
                session,
                r.run_id,
                r.path,
                src,
                dest,
                r.reason,
                report,
                expect=expect,
                roots=_roots(settings),
                again=r.move_error is not None,
                prior=ident,
                sha256=r.sha256,
            )
            if outcome == "moved":
                report.recovered += 1
            return outcome
    # moved, but killed before that was recorded: to dest, or beside it (~N) when dest was taken (a
    # copy's temporary name, when one is left, is tidied first)
    finish_move(dest, src, ident, taken=_taken(session, r.run_id))
    found = find_moved(dest, sha256=r.sha256, ident=ident, taken=_taken(session, r.run_id))
    if found is not None and os.path.lexists(src) and ident is not None:
        # the path holds another file, and the refused one may still be in landing under another name
        # (two files exchanged after the kill): that interrupted move never finished; it is dropped and
        # the file is refused once, from its new name
        if still_named(found, ident, settings.landing_dir):
            log.info("intake: %s is still in landing under another name; moved from there", r.path)
            found.unlink()
            found = None
    if found is not None:
        if not os.path.lexists(reason_path(found)):
            _write_reason(found, r.reason)
        _mark(session, r.run_id, r.path, moved_to=display_path(found), move_error=None)
        report.recovered += 1
        return "moved"
    if os.path.lexists(src):
        _mark(session, r.run_id, r.path, dest=None, move_error=_REPLACED)
        changed(report, r.path)  # counted and logged: the refused file is no longer at its path
        return "replaced"
    _mark(session, r.run_id, r.path, dest=None, move_error=_GONE)
    return "gone"


def _still_refused(settings: Settings, session, src: Path, r: Any, ident: Identity | None) -> Identity | None:
    """The identity ``src`` has now when it is still the refused file of row ``r``, else None: the very
    file (its device and inode; a file refused unread, which has no hash, also its size and mtime), or,
    where the content was hashed, the same bytes under another inode (copied again, as a sync tool
    re-creates a file) while the interrupted move never removed the source (its copy is pending), or when
    no copy of the refused file was made at all."""
    try:
        require_real_folders(settings.landing_dir, src)
    except (LinkedFolderError, FileNotFoundError):
        return None
    if r.sha256 is None:
        try:
            st = src.lstat()
        except OSError:
            return None
        return identity(st) if ident is None or same_file(st, ident) else None  # a link touched since too
    held = _content_identity(src, r.sha256, images.max_file_bytes(settings.max_pixels))
    if held is None or ident is None or tuple(held[:2]) == tuple(ident[:2]):
        return held
    dest = Path(path_from_display(r.dest))
    if pending_copy(dest, src, ident) is not None:
        return held
    moved = find_moved(dest, sha256=r.sha256, ident=ident, taken=_taken(session, r.run_id))
    return None if moved is not None else held


def _lstat(path: Path) -> Identity | None:
    try:
        return identity(path.lstat())
    except OSError:
        return None


def _fitted(settings: Settings, session, r: Any, rel: str, dest: Path) -> Path:
    """``dest``, or, when it is longer than any path can be (recorded before destinations were shortened;
    its move fails on every run and nothing can ever have reached it), the shortened destination, which is
    recorded first."""
    if len(os.fsencode(dest)) < PATH_MAX:
        return dest
    short = quarantine_dest(settings.quarantine_dir / safe_dirname(r.run_id) / "landing", Path(rel))
    _mark(session, r.run_id, r.path, dest=display_path(short))
    return short


def _content_identity(path: Path, sha: str, max_bytes: int) -> Identity | None:
    """The identity of the file at ``path`` when it holds content ``sha`` (read once, never through a
    link, never blocking on a FIFO), else None."""
    try:
        data, st = read_once(path, max_bytes)
    except OSError:
        return None
    if data is None or images.sha256_bytes(data) != sha:
        return None
    return identity(st)
