"""A whole scoring run: :func:`finalize_run` counts it from the ledger, :func:`score_inbox` plans, scores
and finalizes with one shard in one process (what ``bcc score`` runs)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..config import Settings
from ..errors import ConfigError
from ..files import safe_dirname
from ..store import get_engine, utcnow
from . import db, ledger, run_records
from .inbox import InboxArg, unreachable
from .plan import load_plan, new_run_id, plan_inbox, plan_shards, read_shard_results
from .shard import Hooks, Progress, score_shard
from .sweep import sweep_interrupted

__all__ = ["finalize_run", "score_inbox"]


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def finalize_run(settings: Settings, run_id: str) -> dict[str, Any]:
    """Count the run from its ledger, close its ``scoring_runs`` row and return the summary.

    Safe to call again (the counts are recomputed). Status: ``finished``; ``move_failed`` when some files
    could not be moved (they are listed and still in the inbox); ``incomplete`` when a shard has not
    finished (run it, then finalize again); ``failed`` when a shard failed (the run's ``error`` says why).
    ``persistent_move_failures`` lists the files whose move failed in more than one run: the caller
    decides (the DAG turns red, ``bcc score`` exits non-zero). ``changed`` counts files that held other
    content by the time they were to move (left in the inbox for the next run). Whatever stops it (an
    error, Ctrl-C, Airflow's timeout: ``BaseException``) records the run as ``failed`` and is raised again.
    """
    db.require_schema(settings.database_url)
    plan = load_plan(settings, run_id)
    engine = get_engine(settings.database_url)
    run_records.claim(engine, run_id)  # killed while finalizing: abandoned at once, not after an hour
    try:
        return _finalize(settings, engine, plan, run_id)
    except BaseException as exc:  # Ctrl-C, Airflow's timeout and terminate too: never left `running`
        run_records.fail_run(engine, run_id, run_records.describe_failure(exc))
        raise


def _finalize(settings: Settings, engine: Any, plan: dict[str, Any], run_id: str) -> dict[str, Any]:
    sweep_interrupted(settings, engine, lambda run: plan_inbox(settings, run), only_run=run_id)
    tallies = run_records.run_tallies(engine, run_id)
    by_status = tallies["by_status"]
    shard_docs = read_shard_results(settings, plan)
    failures = [
        {"path": r.path, "error": r.move_error, "attempts": r.move_attempts}
        for r in tallies["unmoved"]
        if not ledger.vanished(r.move_error) and not ledger.changed(r.move_error)
    ]
    for d in shard_docs:  # files of interrupted earlier runs this run tried to move, in vain
        failures += [f for f in d.get("move_failures", []) if f.get("run_id", run_id) != run_id]
    started = _aware(tallies["started_at"])
    # finalized before, and no shard has run since (it would have made the run `running` again): counted
    # again, but it finished when it finished
    closed_before = tallies["status"] in ("finished", "move_failed") and tallies["finished_at"] is not None
    finished = _aware(tallies["finished_at"]) if closed_before else utcnow()
    loop_start = min((d["loop_started"] for d in shard_docs), default=None)
    loop_end = max((d["loop_finished"] for d in shard_docs), default=None)
    processed = by_status["scored"] + by_status["duplicate"] + by_status["rejected"]
    # scoring time: the shards' span, less the time it took to load the model (TensorFlow start-up)
    load = max((d.get("model_load_seconds", 0.0) for d in shard_docs), default=0.0)
    busy = (loop_end - loop_start - load) if loop_start is not None else 0.0
    error = None
    if len(shard_docs) < plan["n_shards"]:
        status, error = (
            ("failed", tallies["error"]) if tallies["status"] == "failed" else ("incomplete", None)
        )
    elif failures:
        status = "move_failed"
    else:
        status = "finished"
    summary: dict[str, Any] = {
        "run_id": run_id,
        "model_version": plan["model_version"],
        "status": status,
        "inference": plan.get("inference", "keras"),
        "precision": next((d["precision"] for d in shard_docs if d.get("precision")), None),
        # what each shard scored with: the plan's back-end, or fp32 Keras where it is not validated
        "shard_backends": [
            {
                "shard": d.get("shard"),
                "inference": d.get("inference"),
                "precision": d.get("precision"),
                "why": d.get("inference_why"),
            }
            for d in shard_docs
        ],
        "force_unvalidated": bool(plan.get("force_unvalidated")),
        "rescored_fp32": sum(d.get("rescored_fp32", 0) for d in shard_docs),
        "scored": by_status["scored"],
        "duplicates": by_status["duplicate"],
        "rejected": by_status["rejected"],
        "ignored": len(plan["ignored"]),
        "skipped": len(plan["skipped"]) + sum(d.get("skipped", 0) for d in shard_docs),
        "move_failed": len(failures),
        "persistent_move_failures": [f for f in failures if (f.get("attempts") or 1) >= 2],
        "unreachable": unreachable(plan["ignored"]),
        "changed": sum(d.get("changed", 0) for d in shard_docs),
        "quarantined_unmovable": sum(d.get("quarantined_unmovable", 0) for d in shard_docs),
        "recovered": sum(d.get("recovered", 0) for d in shard_docs),
        "missing": sum(d.get("missing", 0) for d in shard_docs),
        # files of this plan another run (interleaved, or after this one was killed) scored and moved
        "taken_by_other_runs": sum(d.get("not_claimed", 0) for d in shard_docs),
        "planned": plan["n_files"],
        "shards": plan["n_shards"],
        "shards_finished": len(shard_docs),
        "seconds": round((finished - started).total_seconds(), 3) if started else None,
        "images_per_second": round(processed / busy, 2) if busy > 0 else 0.0,
        "model_load_seconds": round(load, 3),
        "started_at": started.isoformat() if started else None,
        "finished_at": finished.isoformat(),
        "inbox": plan["inbox"],
        "archive_dir": str(settings.archive_dir / safe_dirname(run_id)),
        "quarantine_dir": str(settings.quarantine_dir / safe_dirname(run_id)),
        "rejections": tallies["rejections"],
        "move_failures": failures,
        "error": error,
        "ignored_paths": plan["ignored"],
        "skipped_paths": plan["skipped"] + [p for d in shard_docs for p in d.get("skipped_paths", [])],
    }
    counts = {
        k: summary[k]
        for k in (
            "scored",
            "duplicates",
            "rejected",
            "ignored",
            "skipped",
            "move_failed",
            "recovered",
            "missing",
            "taken_by_other_runs",
            "changed",
            "quarantined_unmovable",
            "planned",
            "seconds",
            "images_per_second",
            "inference",
            "precision",
            "shard_backends",
            "force_unvalidated",
            "rescored_fp32",
        )
    }
    run_records.close_run(engine, run_id, status, counts, None if status == "incomplete" else finished, error)
    return summary


def score_inbox(
    settings: Settings,
    *,
    inbox: InboxArg = None,
    run_id: str | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    hooks: Hooks | None = None,
    force_unvalidated: bool = False,
) -> dict[str, Any]:
    """Plan with one shard, score it, finalize: the whole nightly job in one process (``bcc score``).

    Passing the ``run_id`` of an interrupted run finishes that run (its plan is reused; another ``inbox``
    is refused). For a run that had finished, nothing is done and its summary is returned as recorded, with
    ``finished_before`` true. ``hooks``: see
    :class:`Hooks`. ``force_unvalidated``: see :func:`plan_shards`.
    """
    run_id = run_id or new_run_id()
    try:
        shards = int(load_plan(settings, run_id)["n_shards"])  # finishing an earlier (maybe sharded) run
    except ConfigError:  # no plan yet: a new run
        shards = 1
    # one process from plan to finalize holds the run throughout: killed anywhere, it is abandoned at once
    # (round 28: killed between its shard and finalize, it stayed `running` for an hour)
    plan_shards(settings, run_id, shards, inbox=inbox, force_unvalidated=force_unvalidated, keep_hold=True)
    was = run_records.run_status(get_engine(settings.database_url), run_id)
    for shard in range(shards):
        score_shard(
            settings, run_id, shard, batch_size=batch_size, progress=progress, hooks=hooks, keep_hold=True
        )
    summary = finalize_run(settings, run_id)
    # the run id of a run that had finished: nothing was done now (`bcc score` says so)
    summary["finished_before"] = was == "finished"
    return summary
