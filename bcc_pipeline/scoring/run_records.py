"""The ``scoring_runs`` rows of batch scoring, and every SQL statement on them: the champion a run pins and
what scoring needs of that version, opening a run, its liveness (a heartbeat at most every
:data:`HEARTBEAT_EVERY_SECONDS`; :func:`mark_abandoned` turns runs whose process is gone into
``abandoned``), failing it, its tallies from the inbox ledger, and closing it with its counts. Database errors become :class:`StoreError`."""

from __future__ import annotations

import collections
import datetime as dt
import errno
import logging
import os
import socket
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from .. import store
from ..display import display_path, one_line
from ..errors import BCCError, NoChampionError, StoreError
from ..registry import get_champion
from ..store import InboxFile, ModelVersion, ScoringRun, insert_rows, scoring_fields, utcnow
from .db import transaction

__all__ = [
    "HEARTBEAT_EVERY_SECONDS",
    "HEARTBEAT_STALE_SECONDS",
    "champion_version",
    "claim",
    "close_run",
    "describe_failure",
    "fail_run",
    "heartbeat",
    "mark_abandoned",
    "model_version",
    "open_run",
    "quiet_runs",
    "release",
    "run_status",
    "run_tallies",
]

HEARTBEAT_STALE_SECONDS = 3600
"""A ``running`` scoring run whose heartbeat is older than this is ``abandoned``."""

HEARTBEAT_EVERY_SECONDS = 30.0
"""A shard renews its run's heartbeat after a batch when this much time has passed since the last one (a
write per batch would cost the scoring loop a transaction for nothing: staleness is judged in hours)."""


def champion_version(engine: Engine) -> str:
    """The version of the current champion; :class:`NoChampionError` when there is none."""
    with store.session_scope(engine) as session:
        champion = get_champion(session)
        version = champion.version if champion is not None else None
    if version is None:
        raise NoChampionError(
            "there is no champion model to score with; train one (`bcc train`) or choose one "
            "(`bcc promote VERSION --reason ...`)"
        )
    return version


def model_version(engine: Engine, version: str, run_id: str) -> dict[str, Any]:
    """What scoring needs of the pinned model version: version, image_size, threshold, temperature (None
    when the version was not calibrated), artifact path and sha."""
    with transaction(engine) as conn:
        row = conn.execute(select(ModelVersion).where(ModelVersion.version == version)).first()
    if row is None:
        raise StoreError(f"model version {version} of scoring run {run_id} is not in the registry")
    return scoring_fields(row)


def open_run(engine: Engine, run_id: str, version: str, n_files: int, runs_dir: Path | None = None) -> None:
    """The ``scoring_runs`` row of a planned run (kept as it is when it exists already). Runs of dead
    processes are marked ``abandoned`` first (:func:`mark_abandoned`)."""
    mark_abandoned(engine, runs_dir=runs_dir)
    with transaction(engine) as conn:
        insert_rows(
            conn,
            ScoringRun,
            [
                {
                    "run_id": run_id,
                    "model_version": version,
                    "started_at": utcnow(),
                    "heartbeat_at": utcnow(),
                    "finished_at": None,
                    "status": "running",
                    "counts": {"planned": n_files},
                    # the planning process holds it (killed while planning: abandoned at once, not after
                    # the heartbeat goes stale); it lets go when the plan is written (release)
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                }
            ],
            key=("run_id",),
        )


def heartbeat(engine: Engine, run_id: str, *, alive: bool = True) -> None:
    """This process works on ``run_id`` (``alive``: its host and PID are recorded, the run is ``running``
    again if it was not), or stopped working on it (``alive=False``: :func:`release`; a shard still working
    in another process keeps its hold). One host and PID per run: with shards in several processes, the
    one that beat last is recorded, and each beats again every ``HEARTBEAT_EVERY_SECONDS``."""
    rt = ScoringRun.__table__
    if not alive:  # let go of it only where this process holds it: another shard's hold stays
        release(engine, run_id)
        return
    values: dict[str, Any] = {
        "heartbeat_at": utcnow(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "status": "running",
        "finished_at": None,
    }
    with transaction(engine) as conn:
        conn.execute(update(rt).where(rt.c.run_id == run_id).values(**values))


def claim(engine: Engine, run_id: str) -> None:
    """This process works on ``run_id`` now (planning or finalizing it): its host and PID are recorded, so
    that the run becomes ``abandoned`` at once should the process die. Its status is left as it is."""
    rt = ScoringRun.__table__
    with transaction(engine) as conn:
        conn.execute(
            update(rt)
            .where(rt.c.run_id == run_id)
            .values(heartbeat_at=utcnow(), host=socket.gethostname(), pid=os.getpid())
        )


def release(engine: Engine, run_id: str) -> None:
    """This process has stopped working on ``run_id`` (held by it: another process's hold is kept)."""
    rt = ScoringRun.__table__
    with transaction(engine) as conn:
        conn.execute(
            update(rt)
            .where(rt.c.run_id == run_id, rt.c.host == socket.gethostname(), rt.c.pid == os.getpid())
            .values(heartbeat_at=utcnow(), host=None, pid=None)
        )


def describe_failure(exc: BaseException) -> str:
    """One line that says what failed and where (the ``error`` of a failed run)."""
    if isinstance(exc, OSError):
        where = display_path(exc.filename) if exc.filename is not None else "(file unknown)"
        if exc.errno == errno.ENOSPC:
            return f"no space left on device writing {where}"
        return f"{exc.strerror or exc}: {where}"
    if isinstance(exc, BCCError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__  # KeyboardInterrupt: no text


def fail_run(engine: Engine, run_id: str, error: str) -> None:
    """Record that ``run_id`` failed (status ``failed``, the error, ``finished_at``). Never raises: it is
    called while another error is on its way up (a database that is down cannot record anything)."""
    rt = ScoringRun.__table__
    try:
        with transaction(engine) as conn:
            conn.execute(
                update(rt)
                .where(rt.c.run_id == run_id)
                .values(status="failed", error=error, finished_at=utcnow(), host=None, pid=None)
            )
    except StoreError as exc:
        logging.getLogger(__name__).error("could not record that scoring run %s failed: %s", run_id, exc)


_PID_MAX = 1 << 22  # Linux's largest pid_max (kernel.pid_max): a larger number names no process


def _pid_alive(pid: int) -> bool:
    if not 0 < pid < _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _pid_of(text: str) -> int | None:
    """A process id as written in a shard's lock file, or None: anything else there (a huge number, other
    digits than 0-9, text) names no process, and must not stop the check of every other run."""
    return int(text) if text.isascii() and text.isdigit() and 0 < len(text) <= 7 else None


def _locked_files() -> set[tuple[int, int, int]] | None:
    """(device major, minor, inode) of every file a process of this machine holds a lock on, from
    ``/proc/locks`` (read only: testing a lock by taking it could refuse a shard starting that instant);
    None where it cannot be read."""
    try:
        with open("/proc/locks", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except (OSError, ValueError):
        return None
    out = set()
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2148001 0 EOF"; a waiter's line has "->"
        parts = line.split()
        if len(parts) < 6 or "->" in parts:
            continue
        try:
            major, minor, inode = parts[5].split(":")
            out.add((int(major, 16), int(minor, 16), int(inode)))
        except ValueError:
            continue
    return out


def _shard_holders(runs_dir: Path, run_id: str, locked: set[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """The shards of ``run_id`` that a process took (a ``shard-<k>.lock``, :func:`.plan.hold_shard`): for
    each, ``shard``, ``held`` (a process of this machine holds its lock now), ``finished`` (its result is
    written), and the ``host`` and ``pid`` that took it last (None for a lock from before they were
    written into it)."""
    from ..files import safe_dirname

    folder = runs_dir / safe_dirname(run_id)
    try:
        names = [n for n in os.listdir(folder) if n.startswith("shard-") and n.endswith(".lock")]
    except OSError:
        return []
    out = []
    for name in names:
        try:
            fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            text = os.read(fd, 512).decode("utf-8", "replace") if st.st_size else ""
        except OSError:
            continue
        finally:
            os.close(fd)
        host, _, pid = text.strip().partition("\t")
        shard = name[len("shard-") : -len(".lock")]
        out.append(
            {
                "shard": shard,
                "held": (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in locked,
                "finished": os.path.exists(folder / f"shard-{shard}.json"),
                "host": host or None,
                "pid": _pid_of(pid),
            }
        )
    return out


def _dead_shard(holders: list[dict[str, Any]], here: str) -> str | None:
    """Why the run is gone when a shard of it that never finished was taken by a process of this machine
    that is no longer alive and holds nothing (another machine's process cannot be looked at)."""
    for h in holders:
        if (
            not h["held"]
            and not h["finished"]
            and h["host"] == here
            and h["pid"]
            and not _pid_alive(h["pid"])
        ):
            return f"the process of its shard {h['shard']} ({h['host']}, PID {h['pid']}) is gone"
    return None


def _stale(beat: dt.datetime | None, now: dt.datetime, stale_after: float) -> bool:
    beat = beat if beat is None or beat.tzinfo else beat.replace(tzinfo=dt.UTC)
    return beat is not None and (now - beat).total_seconds() > stale_after


def mark_abandoned(
    engine: Engine, stale_after: float = HEARTBEAT_STALE_SECONDS, runs_dir: Path | None = None
) -> list[str]:
    """``running`` runs whose process is gone become ``abandoned`` (with ``finished_at``): the process
    recorded on this host is no longer alive, or the heartbeat is older than ``stale_after`` seconds.
    With ``runs_dir``, a run one of whose shards a process of this machine holds (its lock) is alive,
    whatever process was recorded last, and one whose unfinished shard was taken by a process of this
    machine that is gone is abandoned at once, also when no process is recorded (another shard let go of
    the run). Returns their run ids. (Rerunning an abandoned run's id finishes it.)"""
    rt = ScoringRun.__table__
    here, now = socket.gethostname(), utcnow()
    with transaction(engine) as conn:
        rows = conn.execute(
            select(rt.c.run_id, rt.c.host, rt.c.pid, rt.c.heartbeat_at, rt.c.started_at).where(
                rt.c.status == "running"
            )
        ).all()
        gone = {}
        locked = _locked_files() if runs_dir is not None and rows else None
        for r in rows:
            holders = _shard_holders(runs_dir, r.run_id, locked) if locked is not None else []
            if any(h["held"] for h in holders):
                # one host and PID per run: the one recorded may be a shard that died while another
                # shard's process, here, still works on the run (its lock says so)
                continue
            if r.host == here and r.pid and not _pid_alive(int(r.pid)):
                gone[r.run_id] = f"its process ({r.host}, PID {r.pid}) is gone"
            elif r.host is None and (why := _dead_shard(holders, here)):
                gone[r.run_id] = why  # no process recorded: the last one let go, this one died
            elif _stale(r.heartbeat_at or r.started_at, now, stale_after):
                gone[r.run_id] = f"no sign of life since {(r.heartbeat_at or r.started_at).isoformat()}"
        for run_id, why in gone.items():
            conn.execute(
                update(rt)
                .where(rt.c.run_id == run_id, rt.c.status == "running")
                .values(status="abandoned", finished_at=now, error=f"abandoned: {why}")
            )
    return sorted(gone)


def quiet_runs(engine: Engine, runs_dir: Path, stale_after: float = HEARTBEAT_STALE_SECONDS) -> list[str]:
    """One line for each ``running`` run that a live process of this machine holds (a shard's lock) but
    that has shown no sign of life (no heartbeat: a batch finished) for ``stale_after`` seconds: it may
    hang. It stays ``running`` (its process is alive); this only says so, for ``bcc status``."""
    rt = ScoringRun.__table__
    now = utcnow()
    with transaction(engine) as conn:
        rows = conn.execute(
            select(rt.c.run_id, rt.c.heartbeat_at, rt.c.started_at).where(rt.c.status == "running")
        ).all()
    locked = _locked_files() if rows else None
    out = []
    for r in rows:
        beat = r.heartbeat_at or r.started_at
        if locked is None or not _stale(beat, now, stale_after):
            continue
        for h in _shard_holders(runs_dir, r.run_id, locked):
            if h["held"]:
                who = f"PID {h['pid']} on {h['host']}" if h["pid"] else "a process of this machine"
                out.append(
                    f"scoring run {one_line(r.run_id)}: shard {h['shard']} is held by {who}, but the "
                    f"run has shown no sign of life since {beat.isoformat()}; it may hang (look at that "
                    "process; the run stays running while it lives)"
                )
    return out


def run_status(engine: Engine, run_id: str) -> str | None:
    """The ``status`` of the run's ``scoring_runs`` row, or None when it has none (not planned yet)."""
    rt = ScoringRun.__table__
    with transaction(engine) as conn:
        return conn.execute(select(rt.c.status).where(rt.c.run_id == run_id)).scalar()


def run_tallies(engine: Engine, run_id: str) -> dict[str, Any]:
    """Aggregates and short lists of a run's ledger (memory does not grow with the run): ``by_status``,
    ``rejections`` [{path, reason}], ``unmoved`` rows (path, move_error), and the run row's ``started_at``,
    ``finished_at``, ``error`` and ``status``."""
    rt = ScoringRun.__table__
    t = InboxFile.__table__
    with transaction(engine) as conn:
        by_status = collections.Counter(
            dict(
                conn.execute(
                    select(t.c.status, func.count()).where(t.c.run_id == run_id).group_by(t.c.status)
                ).all()
            )
        )
        rejections = [
            {"path": r.path, "reason": r.reason}
            for r in conn.execute(
                select(t.c.path, t.c.reason)
                .where(t.c.run_id == run_id, t.c.status == "rejected")
                .order_by(t.c.path)
            )
        ]
        unmoved = conn.execute(
            select(t.c.path, t.c.move_error, t.c.move_attempts)
            .where(t.c.run_id == run_id, t.c.moved_to.is_(None), t.c.move_error.is_not(None))
            .order_by(t.c.path)
        ).all()
        run = conn.execute(select(rt).where(rt.c.run_id == run_id)).first()
    return {
        "by_status": by_status,
        "rejections": rejections,
        "unmoved": unmoved,
        "started_at": run.started_at if run is not None else None,
        "finished_at": run.finished_at if run is not None else None,
        "error": run.error if run is not None else None,
        "status": run.status if run is not None else None,
    }


def close_run(
    engine: Engine,
    run_id: str,
    status: str,
    counts: dict[str, Any],
    finished_at: dt.datetime | None,
    error: str | None = None,
) -> None:
    rt = ScoringRun.__table__
    with transaction(engine) as conn:
        conn.execute(
            update(rt)
            .where(rt.c.run_id == run_id)
            .values(status=status, counts=counts, finished_at=finished_at, error=error)
        )
