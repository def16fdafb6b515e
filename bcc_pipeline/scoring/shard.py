"""Scoring one shard of a planned run: load a batch → dedupe → predict → commit → move, until done.

Each step has its own module: :mod:`.loader` reads and decodes (threads, one batch ahead), :mod:`.ledger`
commits a batch (one transaction) and :mod:`.run_records` keeps the run's heartbeat, :mod:`.predictor` is
the pinned model, and :mod:`.moves` moves the committed files and finishes what interrupted attempts left.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import mounts
from ..config import Settings
from ..destinations import mark_run_folder
from ..errors import ArtifactError, BCCError, ConfigError
from ..files import display_path, one_line, safe_dirname
from ..moving import move_no_clobber
from ..store import get_engine
from . import db, ledger, run_records
from .inbox import InboxRefused, destination, require_folders_still_allowed
from .loader import Item, Loader
from .moves import MoveFile, Mover, Tally, require_own_destinations
from .plan import hold_shard, load_plan, read_shard_result, run_dir, write_shard_result
from .predictor import PinnedModel
from .run_records import describe_failure

__all__ = ["Hooks", "Progress", "score_shard"]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Hooks:
    """Named points where a caller can watch or interrupt a shard (tests use them to crash it on purpose).

    ``on_batch_committed(paths)``: after a batch's transaction committed, before its files move.
    ``on_model_batch(n)``: right before the model scores a batch of ``n`` images.
    ``on_move_linked(src, where)``: in the middle of a move, once the file is at ``where`` (hard link or
    published copy) and before the inbox name is removed.
    ``move_file(src, dest, *, expect, before_unlink)``: moves one file (default
    :func:`bcc_pipeline.moving.move_no_clobber`, whose keyword arguments it gets).
    """

    on_batch_committed: Callable[[list[str]], None] | None = None
    on_model_batch: Callable[[int], None] | None = None
    on_move_linked: Callable[[Path, Path], None] | None = None
    move_file: MoveFile = move_no_clobber


@dataclass(frozen=True)
class _Batch:
    """A batch between its model call and its commit: ``shas`` the contents the model is predicting for it,
    ``carried`` those the batch before it was already predicting."""

    n_items: int
    fresh: list[Item]
    shas: frozenset[str]
    carried: frozenset[str]
    job: Future[tuple[dict[str, float], dict[str, tuple[str, str | None]]]] | None

    def wait(self) -> tuple[dict[str, float], dict[str, tuple[str, str | None]]]:
        if self.job is None:
            return {}, {}
        return self.job.result()  # the model's own error, raised here on the committing thread


def score_shard(
    settings: Settings,
    run_id: str,
    shard: int,
    *,
    batch_size: int | None = None,
    progress: Progress | None = None,
    hooks: Hooks | None = None,
    keep_hold: bool = False,
) -> dict[str, Any]:
    """Score shard ``shard`` of the planned run ``run_id`` with the run's pinned model version.
    ``keep_hold``: this process finalizes the run next (``bcc score``): it does not let go of it.

    Safe to retry; a second process given the same shard while one scores it is refused
    (:class:`ConfigError`, :func:`.plan.hold_shard`), and the ledger claims each file once. Returns the shard's
    counts (``scored``, ``duplicates``, ``rejected``, ``skipped``, ``missing``, ``recovered``,
    ``move_failed``, ...) and writes them to ``runs/<run>/shard-<k>.json`` for ``finalize_run``. In a run
    that has finished, a shard is not run again: its stored result is returned.
    Whatever stops it (an error, Ctrl-C, Airflow's timeout or terminate: ``BaseException``) records the
    run as ``failed`` with the reason and ``finished_at``, and is raised again.
    """
    db.require_schema(settings.database_url)
    plan = load_plan(settings, run_id)
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < plan["n_shards"]:
        raise ConfigError(f"scoring run {run_id!r} has shards 0..{plan['n_shards'] - 1}, not {shard!r}")
    size = batch_size or settings.score_batch_size
    if size < 1:
        raise ConfigError(f"the scoring batch size must be positive, got {size}")
    engine = get_engine(settings.database_url)
    done = read_shard_result(settings, run_id, shard)
    if run_records.run_status(engine, run_id) == "finished":
        # a shard of a finished run run again (a cleared Airflow task, `bcc score --run-id` of a finished
        # run): every file is settled, so it changes nothing and its result (back-end, timings) stays
        if done is None:  # its result file deleted or damaged since: nothing to keep the record true with
            raise ConfigError(
                f"scoring run {one_line(run_id)} has finished, but the result of its shard {shard} "
                f"({display_path(run_dir(settings, run_id) / f'shard-{shard}.json')}) is gone or damaged; "
                "nothing was run again (leave out the run id to score what the inbox holds now)"
            )
        log.info("scoring run %s has finished; shard %d is not run again", one_line(run_id), shard)
        return done
    try:
        held = hold_shard(settings, run_id, shard)  # before anything is recorded: the twin is not this one
    except OSError as exc:  # no lock to be had there (a link or folder in its place, no flock): no run
        run_records.fail_run(engine, run_id, describe_failure(exc))
        raise ConfigError(
            f"cannot hold shard {shard} of scoring run {one_line(run_id)}: {describe_failure(exc)}"
        ) from exc
    try:
        done = read_shard_result(settings, run_id, shard)  # again: the other process may have finished it
        result = _score_held_shard(settings, engine, plan, run_id, shard, size, done, progress, hooks)
        if not keep_hold:  # no process holds the run until the next shard or finalize
            run_records.heartbeat(engine, run_id, alive=False)
        return result
    finally:
        os.close(held)


def _score_held_shard(
    settings: Settings,
    engine: Any,
    plan: dict[str, Any],
    run_id: str,
    shard: int,
    size: int,
    done: dict[str, Any] | None,
    progress: Progress | None,
    hooks: Hooks | None,
) -> dict[str, Any]:
    run_records.heartbeat(engine, run_id)
    try:
        # watched from before the folders are judged: a file read in a generation of the mount table
        # that was not judged (a bind mount made since, even one gone again) is judged and never trusted
        # blindly (_ShardScorer._trust)
        with mounts.MountWatch() as watch:
            _require_same_inbox(plan)
            require_own_destinations(settings)  # another home's folder at archive/: refused, no retry
            inbox, rels = plan.get("inbox_realpath") or plan["inbox"], plan["shards"][shard]
            _, judged = watch.stable(lambda: require_folders_still_allowed(settings, inbox, rels))
            scorer = _ShardScorer(settings, plan, shard, progress or log.info, hooks or Hooks(), watch)
            if judged is not None:
                scorer.clean.add(judged)
            result = scorer.run(plan["shards"][shard], size)
        if done is not None and result.get("precision") is None:
            # run again to retry moves, with nothing to score: the back-end it scored with stays known
            keep = (
                "inference",
                "precision",
                "inference_why",
                "rescored_fp32",
                "model_load_seconds",
                "reference_load_started",
                "reference_load_seconds",
                "loop_started",
                "loop_finished",
                "seconds",
            )
            result.update({k: done[k] for k in keep if k in done})
        for root in (settings.archive_dir, settings.quarantine_dir):  # its folders there, once made
            mark_run_folder(settings, root / safe_dirname(run_id))
        write_shard_result(settings, run_id, shard, result)
    except BaseException as exc:  # Ctrl-C, Airflow's timeout and terminate too: never left `running`
        run_records.fail_run(engine, run_id, describe_failure(exc))
        raise
    return result


def _require_same_inbox(plan: dict[str, Any]) -> None:
    """Refuse (:class:`InboxRefused`, no retry) an inbox that resolves elsewhere than when the run was
    planned and judged: a link to it, or above it, re-pointed since (into ``landing/``, say)."""
    was = plan.get("inbox_realpath")  # plans written before this check have none
    now = os.path.realpath(plan["inbox"])
    if was is not None and now != was:
        raise InboxRefused(
            f"the inbox {display_path(plan['inbox'])} now resolves to {display_path(now)}, not to "
            f"{display_path(was)} as when scoring run {one_line(plan['run_id'])} was planned; not scoring through a "
            "re-pointed link (plan a new run)"
        )


class _ShardScorer:
    def __init__(
        self,
        settings: Settings,
        plan: dict[str, Any],
        shard: int,
        progress: Progress,
        hooks: Hooks,
        watch: mounts.MountWatch | None = None,
    ):
        self.s, self.shard, self.progress, self.hooks = settings, shard, progress, hooks
        self.watch, self.rels = watch, list(plan["shards"][shard])
        self.clean: set[int] = set()  # generations of the mount table whose judgement passed
        self.run_id: str = plan["run_id"]
        self.plan_mark: int | None = plan.get("ledger_mark")  # the newest ledger row when it was planned
        # The folder the inbox resolved to when it was judged (checked unchanged by _require_same_inbox):
        # every read and move goes through it, so a link to the inbox re-pointed while this shard runs
        # leads nowhere new.
        self.inbox: str = plan.get("inbox_realpath") or plan["inbox"]
        self.engine = get_engine(settings.database_url)
        self.mv = run_records.model_version(self.engine, plan["model_version"], self.run_id)
        self.model = PinnedModel(
            self.mv,
            plan.get("inference", "keras"),
            settings=settings,
            forced=bool(plan.get("force_unvalidated")),
        )
        self.tally = Tally()
        self.counts = self.tally.counts
        self._last: tuple[dict[str, float], dict[str, tuple[str, str | None]]] = ({}, {})
        self._first_predicted: float | None = None
        self._done = 0
        self._beat = time.monotonic()  # score_shard renewed the heartbeat just now
        self.mover = Mover(
            settings, self.engine, self.run_id, self.inbox, self.tally, hooks.move_file, hooks.on_move_linked
        )

    def run(self, rels: Sequence[str], batch_size: int) -> dict[str, Any]:
        """Score ``rels`` batch by batch. The model works on batch k+1 in its own thread while this thread
        commits batch k and moves its files: every database statement and every move stays on this
        thread, in the same order as without the overlap (claim and commit, then move), so a crash at any
        point leaves what it left before; only the model's arithmetic runs beside them."""
        t0, self._first_predicted, self._done = time.time(), None, 0
        pending: _Batch | None = None
        with (
            Loader(
                self.inbox,
                image_size=self.mv["image_size"],
                max_pixels=self.s.max_pixels,
                min_side=self.s.min_side,
                settle=self.s.settle_seconds,
                prepare=self._attach_ledger,
                watch=self.watch,
            ) as loader,
            ThreadPoolExecutor(1, thread_name_prefix="bcc-model") as model_thread,
        ):
            for items in loader.batches(rels, batch_size):  # 1. load a batch (read one batch ahead)
                self._trust(items)  # read in a mount table that was judged? else never settled or moved
                fresh = self._dedupe(items)  # 2. settle what the ledger already knows
                batch = self._start_predict(items, fresh, pending, model_thread)  # 3. the model starts
                if pending is not None:
                    self._finish(pending, len(rels), batch_size)  # 4-5 of the previous batch meanwhile
                pending = batch
            if pending is not None:
                self._finish(pending, len(rels), batch_size)
        return self._result(len(rels), t0, time.time())

    def _finish(self, batch: _Batch, n_files: int, batch_size: int) -> None:
        """Steps 4 and 5 of a batch whose model call was started: wait for its probabilities, commit the
        batch in one transaction, then move its files and record where they went."""
        probs, how = batch.wait()
        if self._first_predicted is None:
            self._first_predicted = time.time()
        # contents this batch left to the batch before it: predicted there, perhaps not claimed there
        # (another attempt of this shard may have claimed that file), so offered again here; the
        # insert-or-nothing of the commit keeps one prediction per content
        for sha in batch.carried:
            probs[sha], how[sha] = self._last[0][sha], self._last[1][sha]
        self._last = (probs, how)
        if batch.fresh:
            mine = self._commit(batch.fresh, probs, how)  # 4. commit the batch in one transaction
            if self.hooks.on_batch_committed is not None:
                self.hooks.on_batch_committed([it.path for it in mine])
            self.mover.move(
                [
                    (it, "rejected" if it.kind == "rejected" else "scored", self.run_id, it.reason, 0)
                    for it in sorted(mine, key=lambda i: i.key)
                ],
                fresh=True,
            )  # 5. move the files (in the ledger's order: a later run finds them in it), record where
        if time.monotonic() - self._beat >= run_records.HEARTBEAT_EVERY_SECONDS:
            run_records.heartbeat(self.engine, self.run_id)
            self._beat = time.monotonic()
        self._done += batch.n_items
        if self._done % (batch_size * 10) < batch_size or self._done == n_files:
            self.progress(
                f"scoring {one_line(self.run_id)} shard {self.shard}: {self._done}/{n_files} files "
                f"({self.counts['scored']} scored, {self.counts['duplicates']} duplicates, "
                f"{self.counts['rejected']} rejected)"
            )

    def judge(self) -> None:
        """Judge the inbox and the folders of this shard's files (:func:`require_folders_still_allowed`:
        :class:`InboxRefused`, no retry, when one may not be scored now), and remember the mount table's
        generation the judgement holds for."""

        def judge() -> None:
            require_folders_still_allowed(self.s, self.inbox, self.rels)

        if self.watch is None:
            judge()
            return
        _, generation = self.watch.stable(judge)
        if generation is not None:
            self.clean.add(generation)

    def _trust(self, items: list[Item]) -> None:
        """Each item read in a generation of the mount table that was not judged is judged now (a bind
        mount made over an inbox folder while this shard runs: refused, :class:`InboxRefused`). An item
        whose generation still has no judgement (the table changed while it was read, or again since: it
        may have been read through a mount that is gone again) is never settled, committed or moved: it
        stays in the inbox for the next run (``changed``)."""
        if self.watch is None:
            return
        judged = False
        for it in items:
            if it.kind not in ("ok", "rejected") or it.mount_generation in self.clean:
                continue
            if it.mount_generation is not None and not judged:
                log.info(
                    "scoring %s: the mount table changed; judging the inbox's folders again", self.run_id
                )
                self.judge()
                judged = True
            if it.mount_generation not in self.clean:
                it.kind = "unsure"

    def _result(self, n_files: int, t0: float, t1: float) -> dict[str, Any]:
        c, ref = self.counts, self.model.reference_load
        return {
            "run_id": self.run_id,
            "shard": self.shard,
            "model_version": self.mv["version"],
            "n_files": n_files,
            "loop_started": t0,
            "loop_finished": t1,
            "seconds": round(t1 - t0, 3),
            "scored": c["scored"],
            "duplicates": c["duplicates"],
            "rejected": c["rejected"],
            "skipped": c["skipped"],
            "missing": c["missing"],
            "recovered": c["recovered"],
            "already_done": c["already_done"],
            "not_claimed": c["not_claimed"],
            "move_failed": c["move_failed"],
            "move_failures": self.tally.move_failures,
            "changed": c["changed"],
            "quarantined_unmovable": c["quarantined_unmovable"],
            "skipped_paths": self.tally.skipped_paths,
            "model_load_seconds": round(self.model.load_seconds, 3),
            "inference": self.model.backend,
            "precision": self.model.precision,
            "pinned_inference": self.model.pinned,
            "inference_why": self.model.why,
            "rescored_fp32": self.model.rescored_fp32,
            "reference_load_started": ref[0] if ref else None,
            "reference_load_seconds": round(ref[1], 3) if ref else None,
            # when the first batch's probabilities were back: the model is loaded and warm from here on
            "first_predicted": self._first_predicted,
        }

    def _attach_ledger(self, items: list[Item]) -> None:
        """Each item gets the ledger rows that matter; one this run already moved is ``done``. Before the
        files are read: rows written after this (``ledger_mark``) are of runs interleaved with this one."""
        mark = ledger.newest_row(self.engine)
        known = ledger.known_rows(self.engine, self.run_id, [it.key for it in items])
        for it in items:
            it.rows, it.ledger_mark = known.get(it.key, []), mark
            if any(r.run_id == self.run_id and r.moved_to is not None for r in it.rows):
                it.kind = "done"

    def _dedupe(self, items: list[Item]) -> list[Item]:
        """Settle what is already known (done, interrupted, missing, still being written); the rest is fresh."""
        fresh = []
        for it in items:
            if it.kind == "done":
                self.counts["already_done"] += 1
            elif it.kind == "unsure":
                self.counts["changed"] += 1
                log.warning("%s was read while the mount table changed: left for the next run", it.path)
            elif it.rows and self.mover.resolve_known(it):
                pass
            elif it.kind == "missing" and (other := self._moved_by_another_run(it)) is not None:
                self.counts["not_claimed"] += 1  # a run after this one was planned (this one killed) took it
                log.info(
                    "%s was scored and moved by run %s meanwhile: not this run's", it.path, one_line(other)
                )
            elif it.kind == "missing":
                self.counts["missing"] += 1
                log.warning("%s left the inbox before it was scored", it.path)
            elif it.kind == "skipped":
                self.counts["skipped"] += 1
                self.tally.skipped_paths.append(it.path)
            else:
                fresh.append(it)
        return fresh

    def _moved_by_another_run(self, it: Item) -> str | None:
        return ledger.moved_by_another_run(self.engine, self.run_id, it.key, self.plan_mark)

    def _start_predict(
        self, items: list[Item], fresh: list[Item], previous: _Batch | None, model_thread: ThreadPoolExecutor
    ) -> _Batch:
        """Start the model on the contents in ``fresh`` this model has not predicted yet, in one model batch
        on the model thread. A content the previous batch (still being committed) is predicting is not
        predicted again: its probability is carried over when this batch commits."""
        import numpy as np

        ok = [it for it in fresh if it.kind == "ok"]
        known = ledger.predicted(self.engine, self.mv["version"], sorted({it.sha for it in ok}))
        in_flight = previous.shas if previous is not None else frozenset()
        first: dict[str, Item] = {}
        carried: set[str] = set()
        for it in ok:
            if it.sha in known:
                continue
            if it.sha in in_flight:
                carried.add(it.sha)
            elif it.sha not in first:
                first[it.sha] = it
        job = None
        if first:
            x = np.stack([it.x for it in first.values()])
            if self.hooks.on_model_batch is not None:
                self.hooks.on_model_batch(int(x.shape[0]))
            job = model_thread.submit(self._model_step, list(first), x)
        for it in ok:
            it.x = None  # the pixels are no longer needed (the model thread holds the stacked batch)
        return _Batch(len(items), fresh, frozenset(first), frozenset(carried), job)

    def _model_step(
        self, shas: list[str], x: Any
    ) -> tuple[dict[str, float], dict[str, tuple[str, str | None]]]:
        """On the model thread: P(malignant) of each content, and the (back-end, precision) that computed
        it (fp32 Keras for those re-scored near the threshold)."""
        probs = dict(zip(shas, (float(v) for v in self._model_predict(x)), strict=True))
        return probs, dict(zip(shas, self.model.sources(), strict=True))

    def _model_predict(self, x: Any) -> Any:
        """The pinned model's probabilities; a failure of the model itself (a back-end's RuntimeError, a
        damaged converted model) becomes an :class:`ArtifactError` that says which model, where."""
        try:
            return self.model.predict(x)
        except (BCCError, MemoryError):
            raise
        except Exception as exc:
            mv = self.mv
            raise ArtifactError(
                f"model {mv['version']} ({self.model.backend} inference, {mv['artifact_path']}) "
                f"could not be loaded or run: {type(exc).__name__}: {exc}"
            ) from exc

    def _commit(
        self, fresh: list[Item], probs: dict[str, float], how: dict[str, tuple[str, str | None]]
    ) -> list[Item]:
        """Claim, record and predict the batch in one transaction; returns the items this shard claimed."""
        dest = {it.key: display_path(destination(self.s, self.run_id, it.kind, it.rel)) for it in fresh}
        mine, scored = ledger.commit_batch(
            self.engine, self.run_id, self.shard, self.mv, fresh, probs, dest, provenance=how
        )
        self.counts["not_claimed"] += len(fresh) - len(mine)
        for it in mine:
            if it.kind == "rejected":
                self.counts["rejected"] += 1
                log.warning("rejected %s: %s", it.path, it.reason)
            elif it.key in scored:
                self.counts["scored"] += 1
            else:
                self.counts["duplicates"] += 1
        return mine
