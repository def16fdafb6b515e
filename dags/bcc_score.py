"""Nightly batch scoring of the inbox with the champion model (plus manual runs)."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # Airflow's bundle parsing adds it; a bare DagBag or `dags list --local` does not
    sys.path.append(_HERE)

import bcc_common  # noqa: E402 - the shared glue beside this file (light: airflow.sdk and the stdlib)

MAX_SHARDS = 64  # the `shards` param's maximum, and BCC_SCORE_SHARDS's (bcc_pipeline/settings.py)


def default_shards() -> int:
    """``BCC_SCORE_SHARDS``, the default of the `shards` param: what the scheduled (nightly) run uses.
    Read from the environment when the file is parsed (bcc_pipeline/settings.py declares the setting;
    this file may not import bcc_pipeline at parse time). A value that is not a whole number from 1 to
    64 fails the parse with one line, an import error in the UI, instead of quietly scoring with one
    shard."""
    raw = os.environ.get("BCC_SCORE_SHARDS", "").strip() or "1"
    try:
        shards = int(raw)
    except ValueError:
        shards = 0
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"BCC_SCORE_SHARDS must be a whole number from 1 to {MAX_SHARDS}, got {raw!r}")
    return shards


DOC = """
### BCC batch scoring

Scores every image in `inbox/` (any nesting) with the current **champion** model. Each prediction
is stored with the model version that made it (`predictions`, UNIQUE per image content and model
version: a retried or cleared task adds nothing). Scored files move to `archive/<run>/`, rejected
ones to `quarantine/<run>/` with a reason file beside each.

`plan → score_shard (mapped, one per shard) → finalize`

* **plan** lists the pending files once and splits them into `shards` disjoint shards; a retry of
  this run reuses the same plan.
* **score_shard** runs once per shard (dynamic task mapping): with the CeleryExecutor the shards
  spread over the workers.
* **finalize** writes the run's counts to `scoring_runs` and returns the summary; it fails (red) when
  a file could not be moved in more than one run (`persistent_move_failures`) or a path in the inbox
  cannot be reached (`unreachable`: a folder it cannot list, a path longer than the system allows).

Query the results: `bcc predictions`, or the `latest_predictions` view in SQL.
Schedule: `BCC_SCORE_SCHEDULE` (cron, default `0 2 * * *`, 02:00 UTC nightly). The scheduled run
uses `BCC_SCORE_SHARDS` shards (default 1): set it to the number of Celery workers.
"""


@dag(
    dag_id="bcc_score",
    schedule=os.environ.get("BCC_SCORE_SCHEDULE", "0 2 * * *"),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=bcc_common.DEFAULT_ARGS,
    doc_md=DOC,
    tags=["bcc", "scoring"],
    params={
        "inbox": Param(
            None, type=["null", "string"], title="Inbox folder", description="Leave empty for $BCC_HOME/inbox"
        ),
        "shards": Param(
            default_shards(),
            type="integer",
            minimum=1,
            maximum=MAX_SHARDS,
            title="Shards",
            description="Split the inbox into this many parallel scoring tasks; the default is "
            "BCC_SCORE_SHARDS (1), set to the number of Celery workers",
        ),
        "batch_size": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=1024,
            title="Batch size",
            description="Inference batch size; empty for BCC_SCORE_BATCH_SIZE (32)",
        ),
        # the choices of bcc_pipeline.config.INFERENCE_CHOICES (this file may not import it at parse time)
        "inference": Param(
            None,
            type=["null", "string"],
            title="Inference back-end",
            enum=[
                None,
                "auto",
                "keras",
                "xla",
                "keras-bf16",
                "openvino",
                "openvino-bf16",
                "openvino-int8",
                "onnxruntime",
            ],
            description="Empty for BCC_INFERENCE (auto: the fastest back-end validated for the "
            "champion on this CPU class, else fp32 keras); pinned for the whole run",
        ),
        "force_unvalidated": Param(
            False,
            type="boolean",
            title="Force an unvalidated back-end",
            description="Score with the chosen back-end even where it is not validated "
            "for the champion (recorded in the run's counts)",
        ),
    },
)
def bcc_score():
    @task
    def plan(params: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from bcc_pipeline.errors import ConfigError, NoChampionError
        from bcc_pipeline.scoring import plan_shards

        ctx = get_current_context()
        try:
            return plan_shards(
                bcc_common.settings_for(params),
                ctx["run_id"],
                params["shards"],
                inbox=params["inbox"],
                inference=params.get("inference"),
                force_unvalidated=bool(params.get("force_unvalidated")),
            )
        except NoChampionError as exc:  # nothing to score with yet: not a failure, nothing to retry
            raise AirflowSkipException(f"{exc}; run bcc_retrain first") from exc
        except ConfigError as exc:  # a refused inbox, an unvalidated back-end: a retry would not change that
            raise AirflowFailException(str(exc)) from exc

    @task
    def shard_numbers(planned: dict) -> list[int]:
        return list(range(planned["shards"]))

    @task(map_index_template="shard {{ shard_label }}", execution_timeout=timedelta(hours=6))
    def score_shard(shard: int, planned: dict, params: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from bcc_pipeline.errors import ArtifactError
        from bcc_pipeline.scoring import score_shard as run_shard
        from bcc_pipeline.scoring.inbox import InboxRefused

        get_current_context()["shard_label"] = f"{shard + 1}/{planned['shards']}"

        try:
            result = run_shard(
                bcc_common.settings_for(params),
                planned["run_id"],
                shard,
                batch_size=params["batch_size"],
                progress=print,
            )
        except (ArtifactError, InboxRefused) as exc:  # a tampered model, a re-pointed inbox: no retry heals
            raise AirflowFailException(str(exc)) from exc
        return bcc_common.small(result)

    # none_skipped: runs after a failed shard too (to record the counts), not when plan was skipped
    @task(trigger_rule="none_skipped")
    def finalize(planned: dict, shard_results: list, params: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from bcc_pipeline.scoring import finalize_run

        if planned is None:  # planning failed (a refused inbox, ...): nothing to count, nothing to retry
            raise AirflowFailException("the run was not planned (see the plan task); nothing to finalize")
        summary = finalize_run(bcc_common.settings_for(params), planned["run_id"])
        print(f"scoring run {planned['run_id']}: {summary}")
        if summary["status"] == "incomplete":  # the counts are recorded, but the run must not look green
            raise AirflowFailException(
                f"{summary['shards_finished']} of {summary['shards']} shards finished; the files of the failed "
                "shard(s) are still in the inbox. Clear the failed shard task to resume."
            )
        if summary["status"] == "failed":
            raise AirflowFailException(
                f"scoring run {planned['run_id']} failed ({summary['shards_finished']} of "
                f"{summary['shards']} shards finished): {summary['error']}"
            )
        if summary["unreachable"]:  # never scored as things are (no permission, a path too long): look
            raise AirflowFailException(
                f"{len(summary['unreachable'])} path(s) in the inbox cannot be reached and are never scored: "
                + "; ".join(f"{u['path']} ({u['reason']})" for u in summary["unreachable"][:20])
            )
        stuck = summary["persistent_move_failures"]
        if stuck:  # the files stay in the inbox run after run: somebody has to look
            raise AirflowFailException(
                f"{len(stuck)} file(s) could not be moved in more than one run and are still "
                "in the inbox: " + "; ".join(f"{f['path']} ({f['error']})" for f in stuck[:20])
            )
        return bcc_common.small(summary)

    planned = plan()
    bcc_common.prepare_database() >> planned
    results = score_shard.partial(planned=planned).expand(shard=shard_numbers(planned))
    finalize(planned, results)


bcc_score()
