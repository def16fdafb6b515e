"""Batch scoring: every image in the inbox ends up with exactly one prediction from a known model version,
or in quarantine with a reason. Streaming, batched, idempotent, crash-safe, sharded.

The steps, each a plain function returning a small JSON-able dict (an Airflow XCom)::

    plan_shards(settings, run_id, K)     discover the inbox, pin the champion, write runs/<run>/plan.json
    score_shard(settings, run_id, k)     score shard k (K of them may run at once, in any processes)
    finalize_run(settings, run_id)       counts from the ledger into scoring_runs, the run's summary
    score_inbox(settings)                all three with K = 1 (what ``bcc score`` runs)

One module per job, each the place to look for it:

====================  ===================================================================================
:mod:`.inbox`         discovery (what in the inbox is scored, ignored, skipped), the managed folders, where a
                      file goes (``archive/<run>/<rel>``, ``quarantine/<run>/<rel>``)
:mod:`.plan`          run ids, ``runs/<run>/``, the plan (champion, back-end and shards pinned), ``plan_shards``
:mod:`.loader`        reading, validating, decoding and preprocessing in threads, the memory budget; no database
:mod:`.predictor`     the pinned model version on the run's (validated) back-end; the fp32 guard band
:mod:`.ledger`        SQL on the inbox ledger: claim and commit a batch, look-ups, recorded moves
:mod:`.run_records`   SQL on ``scoring_runs``: open, heartbeat, abandon, fail, tally and close a run
:mod:`.db`            the transaction every statement runs in (errors become ``StoreError``), the schema check
:mod:`.moves`         moving committed files, recovering what interrupted runs left
:mod:`.shard`         the loop: load a batch → dedupe → predict → commit → move (``score_shard``, :class:`Hooks`)
:mod:`.run`           ``finalize_run`` and ``score_inbox``
====================  ===================================================================================

Per batch, in ONE transaction: the ledger rows (``inbox_files``, claiming each (run, path) once, so a
shard started twice cannot score a file twice), the ``images`` rows, the predictions (insert-or-nothing on
``UNIQUE(image_sha256, model_version)``: a content already predicted by this model is a *duplicate*) and
the ``rejections``. Only after the commit do the files move, and then the ledger gets ``moved_to``. A run
killed anywhere is finished by the next one (:mod:`.moves`). The prediction queries the CLI and the UI
read live in :mod:`bcc_pipeline.predictions`.
"""

from __future__ import annotations

from .inbox import InboxRefused, discover
from .loader import DECODE_BUDGET_BYTES, DECODE_BYTES_PER_PIXEL, LOAD_WORKERS, LOADER_NICE, PREFETCH_BATCHES
from .moves import MAX_MOVE_ATTEMPTS
from .plan import new_run_id, plan_shards, run_dir
from .run import finalize_run, score_inbox
from .run_records import mark_abandoned, quiet_runs
from .shard import Hooks, score_shard

__all__ = [
    "DECODE_BUDGET_BYTES",
    "DECODE_BYTES_PER_PIXEL",
    "LOADER_NICE",
    "LOAD_WORKERS",
    "PREFETCH_BATCHES",
    "MAX_MOVE_ATTEMPTS",
    "Hooks",
    "InboxRefused",
    "discover",
    "finalize_run",
    "mark_abandoned",
    "new_run_id",
    "plan_shards",
    "quiet_runs",
    "run_dir",
    "score_inbox",
    "score_shard",
]
