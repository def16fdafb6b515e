"""Scoring runs and their plans: run ids, ``runs/<run>/``, the plan every shard of a run follows.

A plan (``runs/<run>/plan.json``, written once, atomically, whoever is first wins) pins what a run does:
the inbox, the model version (the champion when it was planned), the inference back-end, and the files,
split into disjoint shards. Each finished shard leaves its counts in ``runs/<run>/shard-<k>.json``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from ..config import INFERENCE_CHOICES, Settings
from ..errors import ConfigError, StoreError
from ..files import atomic_write, display_path, mark_home, one_line, safe_dirname
from ..leftovers import sweep_stale_temporaries
from ..moving import files_below
from ..store import get_engine, utcnow
from . import db, ledger, run_records
from .inbox import InboxArg, InboxRefused, discover
from .moves import require_own_destinations
from .sweep import sweep_interrupted

__all__ = [
    "hold_shard",
    "require_own_runs",
    "load_plan",
    "new_run_id",
    "plan_shards",
    "read_shard_result",
    "read_shard_results",
    "run_dir",
    "write_shard_result",
]

log = logging.getLogger(__name__)
PLAN_VERSION = 1
_SHARD_TIMES = ("loop_started", "loop_finished")  # what finalize_run needs of every shard's result


def new_run_id(now: dt.datetime | None = None) -> str:
    """``score-20261126T020000-3fa2c1``: sortable by time, unique enough for concurrent runs."""
    now = now or dt.datetime.now(dt.UTC)
    return f"score-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def run_dir(settings: Settings, run_id: str) -> Path:
    """``$BCC_HOME/runs/<run>/``: the plan and the shard summaries of a scoring run."""
    return settings.runs_dir / safe_dirname(run_id)


def require_own_runs(settings: Settings) -> None:
    """Refuse (:class:`InboxRefused`, no retry) to read or write scoring runs while ``runs/`` is another
    deployment's folder (a link or a mount into that home: :func:`bcc_pipeline.homes.destination_refusal`).
    Round 28: with ``runs/`` linked to another home's, this home wrote its plans, results and shard locks
    there, and `--run-id` of that home's run loaded its plan and rewrote its lock."""
    from ..homes import destination_refusal

    if problem := destination_refusal(settings, settings.runs_dir):
        raise InboxRefused(f"refusing to use {display_path(settings.runs_dir)} for scoring runs: {problem}")


def load_plan(settings: Settings, run_id: str) -> dict[str, Any]:
    """The plan of ``run_id``; a :class:`ConfigError` when the run was never planned (or ``runs/`` is
    another home's: :func:`require_own_runs`)."""
    require_own_runs(settings)
    path = run_dir(settings, run_id) / "plan.json"
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"scoring run {run_id!r} has no plan ({path}); plan it first") from exc
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the plan of scoring run {run_id!r} ({path}): {exc}") from exc
    if plan.get("run_id") != run_id:
        raise StoreError(f"{path} belongs to run {plan.get('run_id')!r}, not {run_id!r}")
    return plan


def plan_inbox(settings: Settings, run_id: str) -> str | None:
    """The inbox ``run_id`` was planned for, as it resolved then (a link to it is never gone through
    again), or None when its plan cannot be read."""
    try:
        plan = load_plan(settings, run_id)
        return plan.get("inbox_realpath") or plan["inbox"]
    except (ConfigError, StoreError):
        return None


def plan_files(settings: Settings, run_id: str) -> list[str]:
    """The files ``run_id`` planned (relative to its inbox, every shard's), or none when its plan cannot
    be read."""
    try:
        return [rel for shard in load_plan(settings, run_id)["shards"] for rel in shard]
    except (ConfigError, StoreError, KeyError, TypeError):
        return []


def write_shard_result(settings: Settings, run_id: str, shard: int, result: dict[str, Any]) -> None:
    path = run_dir(settings, run_id) / f"shard-{shard}.json"
    try:
        atomic_write(path, json.dumps(result, indent=1))
    except OSError as exc:  # say which file (a full disk raises without a file name)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def read_shard_result(settings: Settings, run_id: str, shard: int) -> dict[str, Any] | None:
    """The result shard ``shard`` of ``run_id`` wrote when it finished, or None (still running, never run,
    or its file cannot be read: the shard is run again)."""
    p = run_dir(settings, run_id) / f"shard-{shard}.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), int | float) for k in _SHARD_TIMES):
        return None  # not a shard's result (damaged, or written by hand)
    return doc


def read_shard_results(settings: Settings, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The results of the shards of ``plan`` that finished (a shard still running has none)."""
    found = (read_shard_result(settings, plan["run_id"], k) for k in range(plan["n_shards"]))
    return [doc for doc in found if doc is not None]


def hold_shard(settings: Settings, run_id: str, shard: int) -> int:
    """Hold shard ``shard`` of ``run_id`` for this process (an exclusive ``flock`` on ``runs/<run>/shard-<k>
    .lock``, let go when the process closes it or dies): a second process given the same shard at the same
    time (the same run id started twice, a task cleared while it runs) is refused with one line instead of
    counting the first one's files as another run's and overwriting its result."""
    import fcntl

    path = run_dir(settings, run_id) / f"shard-{shard}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"shard {shard} of scoring run {one_line(run_id)} is being scored by another process now; not "
            "scoring it twice (let that one finish, or leave out the run id for a new run)"
        ) from None
    # who holds it, for run_records.mark_abandoned: the run records one host and PID, and a shard killed
    # after another shard's process let go of the run would otherwise look alive for an hour
    with contextlib.suppress(OSError):  # only a record: a full disk must not stop the shard
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()}\t{os.getpid()}\n".encode(), 0)
    return fd


def _plan_result(plan: dict[str, Any], path: Path) -> dict[str, Any]:
    return {
        "run_id": plan["run_id"],
        "shards": plan["n_shards"],
        "n_files": plan["n_files"],
        "plan_path": str(path),
        "model_version": plan["model_version"],
        "inbox": plan["inbox"],
        "inference": plan.get("inference", "keras"),
        "force_unvalidated": bool(plan.get("force_unvalidated")),
        "ignored": len(plan["ignored"]),
        "skipped": len(plan["skipped"]),
    }


def plan_shards(
    settings: Settings,
    run_id: str,
    shards: int,
    inbox: InboxArg = None,
    inference: str | None = None,
    force_unvalidated: bool = False,
    keep_hold: bool = False,
) -> dict[str, Any]:
    """Discover the inbox, pin the current champion and split the files into ``shards`` disjoint lists.
    ``keep_hold``: this process goes on to score and finalize the run (``bcc score``), so it keeps its hold
    (killed in between, the run is ``abandoned`` at once, not after an hour).

    Marks the home (``.bcc-home``) and removes stale temporaries killed processes left
    (:func:`bcc_pipeline.leftovers.sweep_stale_temporaries`) first. Writes ``runs/<run>/plan.json`` atomically
    and the ``scoring_runs`` row. When the plan of ``run_id``
    already exists it is returned unchanged (a retried planning task changes nothing). Raises
    :class:`NoChampionError` when there is no champion. Returns ``{run_id, shards, n_files, plan_path,
    model_version, inbox, inference, force_unvalidated, ignored, skipped}``. ``inference`` (default
    ``settings.inference``; ``auto`` or a back-end) is resolved for the champion by
    :func:`bcc_pipeline.validation.resolve_backend` (an unvalidated back-end is refused unless
    ``force_unvalidated``) and the result pinned for every shard of the run.
    """
    inference = inference or settings.inference
    if inference not in INFERENCE_CHOICES:
        raise ConfigError(
            f"unknown inference back-end {inference!r}; choose one of {', '.join(INFERENCE_CHOICES)}"
        )
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"the number of shards must be a positive integer, got {shards!r}")
    if not run_id or not str(run_id).strip():
        raise ConfigError("a scoring run needs a non-empty run id")
    db.require_schema(settings.database_url)
    engine = get_engine(settings.database_url)
    require_own_runs(settings)  # plans, results and locks: never written into another home's runs/
    require_own_destinations(settings)  # before anything is marked or moved: never into another home
    mark_home(settings.home)  # this home now holds runs/, archive/ and quarantine/: never scored as an inbox
    sweep_stale_temporaries(settings)  # what killed processes left in the folders the pipeline writes
    path = run_dir(settings, run_id) / "plan.json"
    if not path.exists():
        from ..validation import resolve_backend

        champion = run_records.champion_version(engine)
        chosen = resolve_backend(settings, champion, inference, force_unvalidated=force_unvalidated)
        found = discover(settings, inbox)
        files = sorted(found["pending"] + found["links"])
        plan = {
            "plan_version": PLAN_VERSION,
            "run_id": run_id,
            "inbox": found["inbox"],
            # what the inbox resolved to when it was judged (allowed roots, no BCC home): every shard
            # checks it still does, so a link re-pointed after planning is never scored through
            "inbox_realpath": os.path.realpath(found["inbox"]),
            "model_version": champion,
            "inference": chosen["inference"],
            "inference_requested": inference,
            "force_unvalidated": chosen["force_unvalidated"],
            "inference_reason": chosen["reason"],
            "planned_on_cpu_class": chosen["cpu_class"],
            "n_shards": shards,
            "n_files": len(files),
            "created_at": utcnow().isoformat(),
            "settle_seconds": settings.settle_seconds,
            # ledger rows written after this one are of runs that came after the plan (a file of this plan
            # another run scored and moved meanwhile is that run's, not "gone")
            "ledger_mark": ledger.newest_row(engine),
            "shards": [files[k::shards] for k in range(shards)],
            "ignored": found["ignored"],
            "skipped": found["skipped"],
        }
        try:
            atomic_write(path, json.dumps(plan, indent=1), exclusive=True)
            log.info(
                "planned scoring run %s: %d files in %d shard(s), model %s, %s inference (%s), %d ignored, "
                "%d skipped",
                one_line(run_id),
                len(files),
                shards,
                champion,
                chosen["inference"],
                chosen["reason"],
                len(found["ignored"]),
                len(found["skipped"]),
            )
        except FileExistsError:
            pass
    plan = load_plan(settings, run_id)  # whoever wrote it first wins; everyone uses that one
    if plan["n_shards"] != shards:
        raise ConfigError(
            f"scoring run {run_id!r} is already planned with {plan['n_shards']} shard(s), not {shards}"
        )
    if inbox and os.path.abspath(os.path.expanduser(os.fspath(inbox))) != plan["inbox"]:
        # finishing the run scores the plan's inbox only: the one asked for would be silently left out
        raise ConfigError(
            f"scoring run {one_line(run_id)} was planned for the inbox {display_path(plan['inbox'])}, not "
            f"{display_path(os.fspath(inbox))}; leave out the inbox to finish that run, or the run id to "
            "plan a new one"
        )
    run_records.open_run(engine, run_id, plan["model_version"], plan["n_files"], runs_dir=settings.runs_dir)
    try:
        # what the inbox holds now (walked only if a row's file must be looked for under a new name; not
        # the plan's list: a retried run's plan is older than a rename)
        listed = files_below(plan.get("inbox_realpath") or plan["inbox"])
        sweep_interrupted(
            settings,
            engine,
            lambda run: plan_inbox(settings, run),
            listed=listed,
            planned_of=lambda run: plan_files(settings, run),
        )
    except BaseException as exc:  # the run's row is open: never left `running` by what stops the sweep
        run_records.fail_run(engine, run_id, run_records.describe_failure(exc))
        raise
    if not keep_hold:
        run_records.release(engine, run_id)  # planned: no process holds it until a shard starts
    return _plan_result(plan, path)
