"""Intake: labelled images from ``landing/`` into the content-addressed dataset store and ``images``.

Intake reads ``landing/<label>/[<group>/]...`` (label ``benign`` or ``malignant``; the first folder
under the label, when there is one, is the patient/slide group). Every accepted file is copied into
``dataset/<sha[:2]>/<sha><ext>`` and recorded in ``images``. Content seen under both labels is excluded
from training and reported. Unreadable files go to ``quarantine/<run>/landing/...`` with a reason file;
nothing is dropped silently.

Commit, then move. Each file's outcome is committed first: its ``images`` row, or its ``rejections`` row
together with where the file is to go (``dest``) and, for a label conflict, the exclusion of the content
from training. Only then is the file removed from ``landing/`` (its content is stored) or moved to
quarantine, and the move recorded (``moved_to``). A process killed in between loses nothing: the next
intake first finishes every recorded move whose file is still in ``landing/`` (or records one that
reached its destination), and only then looks for new files, so a file never gets a second row.

Paths in the report, the database and the log are shown in the one reversible form of
:func:`bcc_pipeline.files.display_path` (names that are not valid UTF-8 included).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, select, update

from . import images
from .config import Settings
from .errors import ImageError, StoreError
from .files import (
    REASON_SUFFIX,
    SYSTEM_NAMES,
    atomic_write,
    display_path,
    one_line,
    path_from_display,
    reason_path,
    safe_dirname,
    sha256_file,
    write_reason,
)
from .model import CLASS_NAMES
from .moving import move_no_clobber
from .neardup import perceptual_hash
from .store import ImageRecord, Rejection, get_engine, insert_rows, session_scope, utcnow

__all__ = ["PROGRESS_EVERY", "IntakeReport", "intake"]

log = logging.getLogger(__name__)

PROGRESS_EVERY = 50  # intake reports progress each time this many more files are stored
_SWEEP_LIMIT = 10_000  # interrupted moves finished per run (the rest next run)
_GROUP_MAX = 255  # images.group_id is VARCHAR(255)


@dataclass
class IntakeReport:
    run_id: str
    accepted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0
    ignored: int = 0
    skipped: int = 0
    recovered: int = 0  # moves of earlier, interrupted runs finished by this one
    rejections: list[dict[str, str]] = field(default_factory=list)
    ignored_paths: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # could not be handled; still in landing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Then:
    """What happens to a file once its outcome is committed: removed (its content is stored) or moved."""

    dest: Path | None = None  # None: remove from landing
    reason: str = ""


def _is_ignored_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES or name.endswith(REASON_SUFFIX)


def _store_copy(data: bytes, sha: str, ext: str, dataset_dir: Path) -> Path:
    """Write the content-addressed copy atomically; an existing complete copy is kept."""
    dest = dataset_dir / sha[:2] / f"{sha}{ext}"
    if dest.is_file() and dest.stat().st_size == len(data):
        return dest
    return atomic_write(dest, data)


def _walk(root: Path, landing: Path, report: IntakeReport) -> Iterator[Path]:
    """Regular files and symlinks below ``root`` without following links, sorted. A folder that cannot
    be listed is reported in ``report.failed`` (its files stay in landing) and the walk goes on."""

    def unreadable(exc: OSError) -> None:
        try:
            where = display_path(Path(exc.filename).relative_to(landing))
        except (TypeError, ValueError):
            where = display_path(root.relative_to(landing))
        error = one_line(f"cannot list this folder: {exc.strerror or exc}")
        report.failed.append({"path": where, "error": error})
        log.error("intake: %s: %s (its files stay in landing)", where, error)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable):
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


def _require_columns(url: str) -> None:
    try:
        cols = {c["name"] for c in inspect(get_engine(url)).get_columns("rejections")}
    except Exception:  # noqa: BLE001 - no table at all: the first query says so
        return
    if "dest" not in cols:
        raise StoreError(
            "the database predates intake's commit-then-move columns (rejections.dest); run `bcc db upgrade`"
        )


def intake(
    settings: Settings,
    *,
    run_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    on_committed: Callable[[str], None] | None = None,
) -> IntakeReport:
    """Take every labelled image in ``landing/`` into the dataset store and the ``images`` table.

    Safe to rerun at any point, and after a kill at any point: see the module docstring.
    ``on_committed(path)`` (``path`` as displayed, relative to ``landing/``) is called each time a file's
    outcome has been committed, just before the file is removed or moved; for tests that interrupt
    intake exactly there.
    """
    run_id = run_id or f"intake-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    report = IntakeReport(run_id=run_id)
    landing = settings.landing_dir
    quarantine_root = settings.quarantine_dir / safe_dirname(run_id) / "landing"
    now_ts = time.time()
    if not landing.is_dir():
        log.info("no landing folder at %s; nothing to take in", display_path(landing))
        return report
    _require_columns(settings.database_url)

    for entry in sorted(landing.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name not in CLASS_NAMES or not entry.is_dir() or entry.is_symlink():
            report.ignored += 1
            report.ignored_paths.append(display_path(entry.relative_to(landing)))
            log.warning(
                "ignoring %s: landing/ holds only the folders %s", display_path(entry), ", ".join(CLASS_NAMES)
            )

    last_progress = 0
    with session_scope(settings.database_url) as session:
        unfinished = _finish_interrupted(settings, session, report)
        for label in CLASS_NAMES:
            label_dir = landing / label
            if not label_dir.is_dir() or label_dir.is_symlink():
                continue
            for path in _walk(label_dir, landing, report):
                rel = path.relative_to(landing)
                shown = display_path(rel)
                if shown in unfinished:  # an earlier run's rejection whose move still fails
                    continue
                try:
                    then = _intake_one(settings, session, path, rel, label, report, quarantine_root, now_ts)
                    session.commit()  # one file at a time: a crash loses no more than the current file
                except OSError as exc:  # e.g. the store copy could not be written: keep the file, go on
                    session.rollback()
                    error = one_line(f"{type(exc).__name__}: {exc.strerror or exc}")
                    report.failed.append({"path": shown, "error": error})
                    log.error("could not take in %s (left in landing): %s", shown, error)
                    continue
                if then is not None:
                    if on_committed is not None:
                        on_committed(shown)
                    _carry_out(session, report.run_id, shown, path, then, report)
                done = report.accepted + report.duplicates
                if progress and report.accepted and done % PROGRESS_EVERY == 0 and done != last_progress:
                    last_progress = done  # once per count: rejected and ignored files do not repeat it
                    progress(f"intake: {report.accepted} accepted, {report.duplicates} duplicates so far")
    log.info(
        "intake %s: %d accepted, %d duplicates, %d conflicts, %d rejected, %d ignored, %d skipped, "
        "%d earlier moves finished, %d failed",
        one_line(run_id),
        report.accepted,
        report.duplicates,
        report.conflicts,
        report.rejected,
        report.ignored,
        report.skipped,
        report.recovered,
        len(report.failed),
    )
    return report


# -- after the commit -------------------------------------------------------------------------
def _mark(session, run_id: str, shown: str, **values: Any) -> None:
    session.execute(
        update(Rejection).where(Rejection.run_id == run_id, Rejection.path == shown).values(**values)
    )
    session.commit()


def _write_reason(path: Path, reason: str) -> None:
    try:
        write_reason(path, reason)
    except OSError as exc:
        log.warning("could not write the reason file beside %s: %s", display_path(path), one_line(str(exc)))


def _move(session, run_id: str, shown: str, src: Path, dest: Path, reason: str, report: IntakeReport) -> bool:
    """Move a rejected file to its recorded destination and record where it went; ``False`` (reported,
    recorded as ``move_error``, the file still in landing) when it cannot be moved."""
    try:
        moved = move_no_clobber(src, dest)
    except OSError as exc:
        error = one_line(f"cannot move to {display_path(dest)}: {exc.strerror or exc}")
        _mark(session, run_id, shown, move_error=error)
        report.failed.append({"path": shown, "error": error})
        log.error("could not quarantine %s (left in landing): %s", shown, error)
        return False
    _write_reason(moved, reason)
    _mark(session, run_id, shown, moved_to=display_path(moved), move_error=None)
    return True


def _carry_out(session, run_id: str, shown: str, path: Path, then: _Then, report: IntakeReport) -> None:
    if then.dest is not None:
        _move(session, run_id, shown, path, then.dest, then.reason, report)
        return
    try:
        path.unlink()  # its content is stored and committed
    except FileNotFoundError:
        pass
    except OSError as exc:
        error = one_line(f"stored, but cannot be removed from landing: {exc.strerror or exc}")
        report.failed.append({"path": shown, "error": error})
        log.error("%s: %s", shown, error)


def _finish_interrupted(settings: Settings, session, report: IntakeReport) -> set[str]:
    """Finish the quarantine moves that earlier runs committed but did not complete (killed, or the move
    failed). Returns the paths (as displayed) whose move still fails: they stay in landing, and this run
    leaves them alone."""
    rows = session.execute(
        select(Rejection.run_id, Rejection.path, Rejection.sha256, Rejection.reason, Rejection.dest)
        .where(Rejection.stage == "intake", Rejection.dest.is_not(None), Rejection.moved_to.is_(None))
        .order_by(Rejection.id)
        .limit(_SWEEP_LIMIT)
    ).all()
    unfinished: set[str] = set()
    for r in rows:
        try:
            src, dest = settings.landing_dir / path_from_display(r.path), Path(path_from_display(r.dest))
        except ValueError:
            continue
        if os.path.lexists(src):
            if r.sha256 is not None and not _has_content(src, r.sha256):
                _mark(
                    session,
                    r.run_id,
                    r.path,
                    dest=None,
                    move_error="replaced by other content before it was moved; that content is taken in anew",
                )
                continue
            if _move(session, r.run_id, r.path, src, dest, r.reason, report):
                report.recovered += 1
            else:
                unfinished.add(r.path)
        elif os.path.lexists(dest):  # moved, but killed before that was recorded
            if not os.path.lexists(reason_path(dest)):
                _write_reason(dest, r.reason)
            _mark(session, r.run_id, r.path, moved_to=display_path(dest), move_error=None)
            report.recovered += 1
        else:
            _mark(session, r.run_id, r.path, dest=None, move_error="left landing/ before it was moved")
    if report.recovered:
        log.info("intake: finished %d quarantine move(s) of interrupted runs", report.recovered)
    return unfinished


def _has_content(path: Path, sha: str) -> bool:
    try:
        return not path.is_symlink() and sha256_file(path) == sha
    except OSError:
        return False


# -- one file ---------------------------------------------------------------------------------
def _reject(
    session, rel: Path, reason: str, sha: str | None, report: IntakeReport, quarantine_root: Path
) -> _Then:
    """Record the rejection (with the file's destination) in the session; the move follows the commit."""
    shown, reason = display_path(rel), one_line(reason)
    dest = quarantine_root / rel
    insert_rows(
        session,
        Rejection,
        [
            {
                "run_id": report.run_id,
                "stage": "intake",
                "path": shown,
                "sha256": sha,
                "reason": reason,
                "dest": display_path(dest),
                "moved_to": None,
                "rejected_at": utcnow(),
            }
        ],
        key=("run_id", "path"),
    )
    report.rejected += 1
    report.rejections.append({"path": shown, "reason": reason})
    log.warning("rejected %s: %s", shown, reason)
    return _Then(dest=dest, reason=reason)


def _group_id(folder: str) -> str:
    """The group id of a patient/slide folder: its displayed name, cut to the column's 255 characters
    with a hash of the whole name when longer (an escaped name is up to four times its bytes)."""
    shown = display_path(folder)
    if len(shown) <= _GROUP_MAX:
        return shown
    return f"{shown[: _GROUP_MAX - 9]}#{hashlib.sha256(shown.encode()).hexdigest()[:8]}"


def _ignore(report: IntakeReport, rel: Path) -> None:
    report.ignored += 1
    report.ignored_paths.append(display_path(rel))


def _intake_one(
    settings: Settings,
    session,
    path: Path,
    rel: Path,
    label: str,
    report: IntakeReport,
    quarantine_root: Path,
    now_ts: float,
) -> _Then | None:
    """Stage one file's outcome in ``session``; returns what to do with the file after the commit."""
    if path.is_symlink():
        return _reject(session, rel, "symbolic link: links are never followed", None, report, quarantine_root)
    if _is_ignored_name(path.name) or path.suffix.lower() not in images.IMAGE_EXTENSIONS:
        _ignore(report, rel)
        return None
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end: never open it
            _ignore(report, rel)
            return None
        if now_ts - st.st_mtime < settings.settle_seconds:
            report.skipped += 1  # still being written; next run takes it
            return None
        if st.st_size > images.max_file_bytes(settings.max_pixels):
            return _reject(
                session,
                rel,
                f"file of {st.st_size} bytes is larger than any image within the "
                f"pixel limit ({settings.max_pixels}) can be",
                None,
                report,
                quarantine_root,
            )
        data = path.read_bytes()
    except OSError as exc:
        return _reject(session, rel, f"unreadable file: {exc.strerror or exc}", None, report, quarantine_root)
    sha = images.sha256_bytes(data)
    try:
        info = images.validate(data, max_pixels=settings.max_pixels, min_side=settings.min_side)
        rgb = images.decode(data, max_pixels=settings.max_pixels, min_side=settings.min_side)
    except ImageError as exc:
        return _reject(session, rel, exc.reason, sha, report, quarantine_root)

    shown = display_path(rel)
    parts = rel.parts  # (label, [group, ...], name)
    group = _group_id(parts[1]) if len(parts) > 2 else None
    existing = session.get(ImageRecord, sha)
    if existing is not None and existing.label not in (None, label):
        reason = (
            f"the same image content was already taken in as {existing.label} "
            f"({existing.source_path}); excluded from training under both labels"
        )
        if existing.excluded_reason is None:
            existing.excluded_reason = f"content seen as both {existing.label} and {label} ({shown})"
        report.conflicts += 1
        return _reject(session, rel, reason, sha, report, quarantine_root)
    if existing is not None and existing.label == label:
        report.duplicates += 1
        return _Then()  # its content is already stored under dataset/

    stored = _store_copy(data, sha, path.suffix.lower(), settings.dataset_dir)
    if existing is None:
        session.add(
            ImageRecord(
                sha256=sha,
                label=label,
                group_id=group,
                width=info.width,
                height=info.height,
                format=info.format,
                source_path=shown,
                stored_path=str(stored),
                first_seen_at=utcnow(),
                phash=perceptual_hash(rgb),
            )
        )
    else:  # known from scoring (unlabelled); now it has a label
        existing.label, existing.group_id, existing.stored_path = label, group, str(stored)
        existing.first_seen_at, existing.phash = utcnow(), perceptual_hash(rgb)
    report.accepted += 1
    return _Then()
