"""Intake: labelled images from ``landing/`` into the content-addressed dataset store and ``images``.

Intake reads ``landing/<label>/[<group>/]...`` (label ``benign`` or ``malignant``; the first folder
under the label, when there is one, is the patient/slide group). Every accepted file is copied into
``dataset/<sha[:2]>/<sha><ext>`` and recorded in ``images``. Content seen under both labels is excluded
from training and reported. Unreadable files go to ``quarantine/<run>/landing/...`` with a reason file;
nothing is dropped silently.

Commit, then move. Each file's outcome is committed first: its ``images`` row, or its ``rejections`` row
together with where the file is to go (``dest``) and, for a label conflict, the exclusion of the content
from training. Only then is the file removed from ``landing/`` or quarantined (:mod:`.intake_moves`). A
process killed in between loses nothing: the next intake first finishes every recorded move, and only then
looks for new files, so a file never gets a second row. A rerun under the same run id (a retried task)
that finds another rejected file at a path this run already quarantined leaves it in ``landing/``
(``failed``) for the next run: the first file's record is never overwritten.

Each file is read once, through one descriptor that never follows a link and never blocks on a FIFO
(:func:`bcc_pipeline.files.read_once`), and what it was (:func:`bcc_pipeline.moving.identity` of that
descriptor) travels with its outcome. The file is removed or quarantined only while the path still holds
that very file: a path that holds another by then (a scanner replaced it) is left in ``landing/`` for the
next run and counted as *changed*, so content that was not stored is never deleted and nothing is
quarantined under another file's reason.

A file counts as written by the rule scoring uses (:func:`bcc_pipeline.files.settled`: a modification
time further in the future than the settle time is settled, with a clock-skew warning). A quarantine
path too long for the system gets a hashed folder (:func:`bcc_pipeline.files.fit_path`), as scoring's
archive does. A quarantine move that fails is reported (``move_failed``, ``failed``) and retried by the
next run; one that fails again is listed in ``persistent_move_failures``: ``bcc intake`` exits 1 and the
retraining DAG's intake task fails, naming the files.

Paths in the report, the database and the log are shown in the one reversible form of
:func:`bcc_pipeline.files.display_path` (names that are not valid UTF-8 included).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, inspect, select, update

from . import images, mounts
from .config import Settings
from .content_store import holds, store_copy
from .destinations import destination_lost, mark_run_folder
from .errors import ImageError, StoreError
from .files import (
    display_path,
    one_line,
    safe_dirname,
)
from .holdout.records import mark_both_labels
from .homes import destination_refusal
from .intake_folders import (
    FolderJudge,
    Refused,
    landing_refusal,
    not_taken_in,
    read_landing_file,
    walk,
)
from .intake_moves import (
    DATASET_PIN,
    Then,
    carry_out,
    changed,
    finish_interrupted,
    pinned_roots,
    quarantine_dest,
)
from .leftovers import sweep_stale_temporaries
from .manifests import patient_cut, patient_name
from .model import CLASS_NAMES
from .moving import (
    Identity,
    identity_text,
)
from .neardup import perceptual_hash, turned_hashes
from .store import (
    ImageRecord,
    Rejection,
    get_engine,
    insert_rows,
    session_scope,
    utcnow,
)

__all__ = ["PROGRESS_EVERY", "IntakeReport", "intake", "patient_group"]

log = logging.getLogger(__name__)

#: Why a label folder that is a symbolic link is not taken in (red: its images would wait unseen).
LINKED_LABEL = (
    "the label folder is a symbolic link, never followed (it could lead to the other label); make it a "
    "real folder, or make landing/ itself the link"
)
PROGRESS_EVERY = 50  # intake reports progress each time this many more files are stored
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
    changed: int = 0  # held another file by the time it was to be removed or moved: left for the next run
    move_failed: int = 0  # quarantine moves that failed in this run (also listed under ``failed``)
    rejections: list[dict[str, str]] = field(default_factory=list)
    ignored_paths: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # could not be handled; still in landing
    # quarantine moves that failed again (an earlier attempt failed too): somebody has to look
    persistent_move_failures: list[dict[str, str]] = field(default_factory=list)
    # folders not taken in as things are (cannot be listed; a bind mount it cannot label or that is not
    # its own), also under ``failed``: somebody has to look, so ``bcc intake`` exits 1 and the task fails
    unreachable: list[dict[str, str]] = field(default_factory=list)
    contested_holdout: list[str] = field(default_factory=list)  # holdout images now seen under both labels
    rejections_mark: int = 0  # the newest rejections row id when this run started (later: other runs')

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _PathTaken(Exception):
    """This run already holds a rejection for the path, of a file that has left it: a retried task (the
    same run id) finds another file there. Its record must not replace the first one's."""


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
    sweep_stale_temporaries(settings)  # what a killed earlier run left half-written (.bcc-tmp-*)
    if not landing.is_dir():
        log.info("no landing folder at %s; nothing to take in", display_path(landing))
        return report
    require_columns(settings.database_url)
    if (why := landing_refusal(settings)) is not None:  # another home's landing/: nothing of it is ours
        not_taken_in(report, landing, str(landing), why)
        return report
    for folder in (settings.quarantine_dir, settings.dataset_dir):  # another home's folder: never written
        if (why := destination_refusal(settings, folder)) is not None:
            not_taken_in(report, landing, str(landing), f"{display_path(folder)} may not be written: {why}")
            return report
        if (why := destination_lost(settings, folder)) is not None:  # its disk not mounted? made when new
            not_taken_in(report, landing, str(landing), why)
            return report

    for entry in sorted(landing.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name in CLASS_NAMES and entry.is_symlink():  # never followed: it may lead to the other label
            not_taken_in(report, landing, str(entry), LINKED_LABEL)
        elif entry.name not in CLASS_NAMES and (meant := _label_meant(entry.name)) is not None:
            # `Malignant/`, `benign ` (a share that changes case, a name typed by hand): never guessed, but
            # its images would wait unseen on every run: red, naming the folder meant
            not_taken_in(
                report,
                landing,
                str(entry),
                f"not a label folder: labels are the folders named exactly {', '.join(CLASS_NAMES)} "
                f"(rename it to {meant}/, or move its contents there)",
            )
        elif entry.name not in CLASS_NAMES or not entry.is_dir():
            report.ignored += 1
            report.ignored_paths.append(display_path(entry.relative_to(landing)))
            log.warning(
                "ignoring %s: landing/ holds only the folders %s", display_path(entry), ", ".join(CLASS_NAMES)
            )

    last_progress = 0
    # the mount table is watched from before the folders are judged: a bind mount made while intake runs
    # is judged before any file read through it is stored, labelled or quarantined (FolderJudge)
    with (
        session_scope(settings.database_url) as session,
        mounts.MountWatch() as watch,
        pinned_roots(settings),
    ):
        # rejections written after this one are other runs' (row ids: the hosts' clocks may differ)
        report.rejections_mark = int(session.scalar(select(func.max(Rejection.id))) or 0)
        unfinished = finish_interrupted(settings, session, report)
        label_dirs = [landing / label for label in CLASS_NAMES]
        label_dirs = [d for d in label_dirs if d.is_dir() and not d.is_symlink()]
        judge = FolderJudge(settings, label_dirs, watch)
        for label_dir in label_dirs:
            label = label_dir.name
            for path in walk(label_dir, landing, report, judge.blocked):
                rel = path.relative_to(landing)
                shown = display_path(rel)
                if shown in unfinished:  # an earlier run's rejection whose move still fails
                    continue
                try:
                    then = _intake_one(
                        settings, session, path, rel, label, report, quarantine_root, now_ts, judge
                    )
                    session.commit()  # one file at a time: a crash loses no more than the current file
                except OSError as exc:  # e.g. the store copy could not be written: keep the file, go on
                    session.rollback()
                    where = f" ({display_path(exc.filename)})" if exc.filename else ""
                    error = one_line(f"{type(exc).__name__}: {exc.strerror or exc}{where}")
                    report.failed.append({"path": shown, "error": error})
                    # a full or failing store: every run would leave it in landing with a green run
                    report.unreachable.append(report.failed[-1])
                    log.error("could not take in %s (left in landing): %s", shown, error)
                    continue
                except _PathTaken:
                    session.rollback()
                    error = (
                        f"run {one_line(run_id)} already quarantined another file from this path; "
                        "left in landing for the next intake run"
                    )
                    report.failed.append({"path": shown, "error": error})
                    log.error("not rejecting %s: %s", shown, error)
                    continue
                if then is not None:
                    if on_committed is not None:
                        on_committed(shown)
                    carry_out(settings, session, report.run_id, shown, path, then, report)
                done = report.accepted + report.duplicates
                if progress and report.accepted and done % PROGRESS_EVERY == 0 and done != last_progress:
                    last_progress = done  # once per count: rejected and ignored files do not repeat it
                    progress(f"intake: {report.accepted} accepted, {report.duplicates} duplicates so far")
    log.info(
        "intake %s: %d accepted, %d duplicates, %d conflicts, %d rejected, %d ignored, %d skipped, "
        "%d changed, %d earlier moves finished, %d moves failed, %d failed",
        one_line(run_id),
        report.accepted,
        report.duplicates,
        report.conflicts,
        report.rejected,
        report.ignored,
        report.skipped,
        report.changed,
        report.recovered,
        report.move_failed,
        len(report.failed),
    )
    mark_run_folder(settings, quarantine_root.parent)  # quarantine/<run>/, where this run put anything
    if report.persistent_move_failures:
        log.error(
            "intake: %d file(s) could not be quarantined in more than one attempt and are still in landing: %s",
            len(report.persistent_move_failures),
            "; ".join(f"{f['path']} ({f['error']})" for f in report.persistent_move_failures[:20]),
        )
    if report.conflicts:  # a frozen holdout image now seen under the other label: said, never changed here
        from .holdout import contested

        report.contested_holdout = [c["sha256"] for c in contested(settings)]
        if report.contested_holdout:
            log.warning(
                "intake: %d holdout image(s) have a contested label (the same content landed under the other "
                "label); holdout metrics still count them under their holdout label: see `bcc holdout show`, "
                "and `bcc holdout withdraw --contested --reason ...`",
                len(report.contested_holdout),
            )
    return report


def _label_meant(name: str) -> str | None:
    """The label a landing entry named like one (other case, spaces around it) stands for, or None."""
    key = name.strip().casefold()
    return next((label for label in CLASS_NAMES if label.casefold() == key), None)


def _reject(
    session,
    rel: Path,
    reason: str,
    sha: str | None,
    report: IntakeReport,
    quarantine_root: Path,
    ident: Identity | None,
) -> Then:
    """Record the rejection (with the file's destination) in the session; the move follows the commit,
    only while the path still holds the file that was checked (``ident``)."""
    shown, reason = display_path(rel), one_line(reason)
    taken = select(Rejection.path).where(
        Rejection.run_id == report.run_id, Rejection.stage == "intake", Rejection.path == shown
    )
    if session.execute(taken).first() is not None:
        # Rows are keyed by (run, path); the earlier rows' moves were finished (or are skipped as
        # unfinished) before the walk, so this is another file. Raised before any count changes.
        raise _PathTaken(shown)
    dest = quarantine_dest(quarantine_root, rel)
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
                "src_identity": identity_text(ident),
            }
        ],
        key=("run_id", "stage", "path"),
    )
    report.rejected += 1
    report.rejections.append({"path": shown, "reason": reason})
    log.warning("rejected %s: %s", shown, reason)
    return Then(dest=dest, reason=reason, ident=ident, sha256=sha)


def patient_group(folder: str) -> str:
    """The group id of a patient/slide folder: its displayed name. A name longer than the column's 255
    characters (an escaped name is up to four times its bytes) is the patient's normalized name
    (:func:`.manifests.patient_name`, so that every spelling of one patient gets one id, as
    :func:`.manifests.patient_key` compares shorter ones), cut to the column with a hash of it when still
    too long."""
    shown = display_path(folder)
    if len(shown) <= _GROUP_MAX:
        return shown
    if name := patient_cut(patient_name(folder)):  # letters and digits: displayed as they are
        return name
    return f"{shown[: _GROUP_MAX - 9]}#{hashlib.sha256(shown.encode()).hexdigest()[:8]}"


def _intake_one(
    settings: Settings,
    session,
    path: Path,
    rel: Path,
    label: str,
    report: IntakeReport,
    quarantine_root: Path,
    now_ts: float,
    judge: FolderJudge | None = None,
) -> Then | None:
    """Stage one file's outcome in ``session``; returns what to do with the file after the commit (with
    the identity of the file that was read: it is removed or moved only while the path still holds it).
    ``judge``: the folders as judged in the mount table's current generation; a file read while the table
    changed is read again (judged anew), and one in a folder not to take in from (a bind mount made since
    the walk began) is left where it is, before anything is staged."""
    refused: Refused | None = None
    for _ in range(3):
        generation = judge.current() if judge is not None else None
        try:
            read, refused = read_landing_file(settings, path, rel, report, now_ts), None
        except Refused as exc:
            read, refused = None, exc
        if judge is None or (read is None and refused is None) or judge.unchanged_since(generation):
            break
        log.warning("%s was read while the mount table changed: judged and read again", display_path(rel))
    else:  # the table kept changing while it was read: what was read may not be what the folder holds
        changed(report, display_path(rel))
        return None
    if judge is not None and (read is not None or refused is not None) and judge.refuses(path, report):
        return None
    if refused is not None:
        return _reject(session, rel, refused.reason, None, report, quarantine_root, refused.ident)
    if read is None:
        return None
    data, ident, ctime = read
    sha = images.sha256_bytes(data)
    try:
        info = images.validate(data, max_pixels=settings.max_pixels, min_side=settings.min_side)
        rgb = images.decode(data, max_pixels=settings.max_pixels, min_side=settings.min_side)
    except ImageError as exc:
        return _reject(session, rel, exc.reason, sha, report, quarantine_root, ident)

    shown = display_path(rel)
    parts = rel.parts  # (label, [group, ...], name)
    group = patient_group(parts[1]) if len(parts) > 2 else None
    # Twice at most: a scoring run (or another intake) may commit a row for this content between the
    # read and the insert; the insert then writes nothing and the decision is made again with that row.
    for _ in range(2):
        existing = session.get(ImageRecord, sha, populate_existing=True)
        if existing is not None and existing.label not in (None, label):
            reason = (
                f"the same image content was already taken in as {existing.label} "
                f"({existing.source_path}); excluded from training under both labels"
            )
            then = _reject(session, rel, reason, sha, report, quarantine_root, ident)
            mark_both_labels(existing, label, shown)
            report.conflicts += 1
            return then
        if existing is not None and existing.label == label:
            # removed from landing only while the store holds its content: a stored copy that is gone
            # (deleted, a store restored without it) or damaged is written again from this file
            if not holds(existing.stored_path, sha):
                stored = store_copy(
                    data, sha, path.suffix.lower(), settings.dataset_dir, root_pin=DATASET_PIN.get()
                )
                existing.stored_path = str(stored)
            report.duplicates += 1
            return Then(ident=ident, ctime=ctime, sha256=sha)  # its content is already stored under dataset/

        stored = store_copy(data, sha, path.suffix.lower(), settings.dataset_dir, root_pin=DATASET_PIN.get())
        if existing is None:
            row = {
                "sha256": sha,
                "label": label,
                "group_id": group,
                "width": info.width,
                "height": info.height,
                "format": info.format,
                "source_path": shown,
                "stored_path": str(stored),
                "excluded_reason": None,
                "first_seen_at": utcnow(),
                "phash": perceptual_hash(rgb),
                "phash_turns": turned_hashes(rgb),
            }
            sha_column = ImageRecord.__table__.c.sha256
            if not insert_rows(session, ImageRecord, [row], key=("sha256",), returning=sha_column):
                continue  # committed by another process meanwhile: decide with its row
        else:  # known from scoring (unlabelled); now it has a label, only while nobody labelled it since
            t = ImageRecord.__table__
            labelled = session.execute(
                update(t)
                .where(t.c.sha256 == sha, t.c.label.is_(None))
                .values(
                    label=label,
                    group_id=group,
                    source_path=shown,  # where it was labelled, not the inbox name it was scored under
                    stored_path=str(stored),
                    first_seen_at=utcnow(),
                    phash=perceptual_hash(rgb),
                    phash_turns=turned_hashes(rgb),
                )
            )
            if labelled.rowcount != 1:
                continue  # another intake labelled it meanwhile: decide with its label (a conflict?)
        report.accepted += 1
        return Then(ident=ident, ctime=ctime, sha256=sha)
    raise StoreError(f"the images row of {shown} changed twice while it was taken in; the next run retries")


def require_columns(url: str) -> None:
    """The ``rejections`` columns these moves write (``dest``, migration 0008's ``src_identity``); an older
    schema is named with the command that upgrades it."""
    try:
        cols = {c["name"] for c in inspect(get_engine(url)).get_columns("rejections")}
        cols |= {f"images.{c['name']}" for c in inspect(get_engine(url)).get_columns("images")}
    except Exception:  # noqa: BLE001 - no table at all, or the database dropped: the first query says so
        return
    if "dest" not in cols:
        raise StoreError(
            "the database predates intake's commit-then-move columns (rejections.dest); run `bcc db upgrade`"
        )
    if "src_identity" not in cols:
        raise StoreError(
            "the database predates rejections.src_identity (migration 0008); run `bcc db upgrade`"
        )
    if "images.phash_turns" not in cols:
        raise StoreError("the database predates images.phash_turns (migration 0009); run `bcc db upgrade`")
