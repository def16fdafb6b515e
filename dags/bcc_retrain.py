"""Periodic retraining of the BCC classifier (weekly by default, plus manual runs)."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Asset, Param, dag, get_current_context, task

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # Airflow's bundle parsing adds it; a bare DagBag or `dags list --local` does not
    sys.path.append(_HERE)

import bcc_common  # noqa: E402 - the shared glue beside this file (light: airflow.sdk and the stdlib)

# Emitted when a candidate is promoted; its extra carries the new version and headline metrics.
CHAMPION_MODEL = Asset(name="bcc_champion_model", uri="bcc://models/champion")

DOC = """
### BCC retraining

Takes new labelled images from `landing/benign/` and `landing/malignant/` (sub-folders are
patient/slide groups), trains a DenseNet201 candidate with the seed recipe, calibrates it and
chooses its threshold on the calibration split, measures it on the frozen holdout, and promotes it
to **champion** only if it passes the statistical gate against the current champion on the same
holdout images.

`intake → check_new_data → split → train → evaluate → gate → needs_approval → approve → approved →
record_decision → publish_champion`

* **intake** fails (red, not retried) when a rejected landing file could not be quarantined in more
  than one attempt (`persistent_move_failures`, named in its log), or when a landing folder is not
  taken in as things are (`unreachable`: it cannot be listed, or it is a bind mount under both labels
  or of another deployment's folder); a first failed move is only reported, and the next run tries again.
* **check_new_data** skips the rest (run still green) when fewer than `min_new_images` new
  labelled images arrived since the champion was trained, unless `force` is set.
* **gate** records the decision in the `promotions` table with its evidence: holdout metrics with
  95% intervals, the paired bootstrap of candidate − champion, the rule and the seed. `promoted`,
  `rejected` or `insufficient_evidence` (the champion stays; the log says how many more holdout
  images would decide).
* **Approval** (`require_approval`, or `BCC_REQUIRE_APPROVAL=1`): a passing candidate is recorded
  `awaiting_approval`, and **approve** (an Airflow human-in-the-loop approval task) waits for a
  person: Browse → Required Actions in the UI, or
  `PATCH /api/v2/dags/bcc_retrain/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails` with
  `{"chosen_options": ["Approve"], "params_input": {"comment": "..."}}`. Its body shows the
  evidence. **record_decision** writes the answer, the approver and the comment into `promotions`:
  Approve promotes, Reject keeps the champion. Without approval both tasks are skipped.
* **publish_champion** emits the `bcc_champion_model` Asset after a promotion and is *skipped*
  (with the reason in its log) otherwise.
* `candidate`: evaluate and gate an already trained version (`models/<version>/`) instead of
  training a new one (split and training are skipped).
* Plots (training curves, confusion matrix, ROC, reliability diagram) and the model card are
  written to `models/<version>/`.

Schedule: `BCC_RETRAIN_SCHEDULE` (cron, default `0 3 * * 0`, Sundays 03:00 UTC).
"""

#: How long a candidate waits for a person before the approval task takes its default, Reject.
APPROVAL_TIMEOUT = timedelta(days=7)
#: The XCom key under which the approval task keeps the answer (who, when, what, the comment).
ANSWER_KEY = "answer"


class RecordedApprovalOperator(ApprovalOperator):
    """Airflow's ApprovalOperator that also keeps the answer in an XCom, before it acts on it.

    On Reject the ApprovalOperator skips its downstream tasks by raising, so it returns no value;
    the XCom written here lets ``record_decision`` log a rejection (with the approver and the
    comment) as well as an approval."""

    def execute_complete(self, context, event):
        if "error" not in event:
            context["ti"].xcom_push(
                key=ANSWER_KEY,
                value={
                    "chosen_options": list(event["chosen_options"]),
                    "params_input": dict(event.get("params_input") or {}),
                    "responded_by_user": event.get("responded_by_user"),
                    "responded_at": str(event.get("responded_at")),
                },
            )
        return super().execute_complete(context=context, event=event)


@dag(
    dag_id="bcc_retrain",
    schedule=os.environ.get("BCC_RETRAIN_SCHEDULE", "0 3 * * 0"),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=bcc_common.DEFAULT_ARGS,
    doc_md=DOC,
    tags=["bcc", "training"],
    params={
        "profile": Param(
            None,
            type=["null", "string"],
            enum=[None, "seed", "demo"],
            title="Profile",
            description="Empty: BCC_PROFILE (default seed). seed: the original recipe (224 px, "
            "7 epochs, ImageNet weights); demo: small and offline",
        ),
        "epochs": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=100,
            title="Epochs",
            description="Leave empty for the profile's value",
        ),
        "min_new_images": Param(
            20,
            type="integer",
            minimum=0,
            title="Minimum new images",
            description="Skip training when fewer new labelled images arrived since the champion",
        ),
        "force": Param(False, type="boolean", title="Force", description="Train even without new images"),
        "require_approval": Param(
            None,
            type=["null", "boolean"],
            title="Require approval",
            description="Empty: BCC_REQUIRE_APPROVAL (default off). On: a candidate that passes "
            "the gate waits for a person's Approve/Reject before it is published",
        ),
        "candidate": Param(
            None,
            type=["null", "string"],
            title="Existing candidate",
            description="Evaluate and gate this already trained version (models/<version>/) "
            "instead of training a new one",
        ),
    },
)
def bcc_retrain():
    @task
    def intake(params: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from bcc_pipeline.pipelines import intake_step

        run_id = get_current_context()["run_id"]
        report = intake_step(bcc_common.settings_for(params), run_id=run_id)
        print(
            f"intake {report['run_id']}: {report['accepted']} accepted, {report['rejected']} rejected, "
            f"{report['changed']} changed, {report['move_failed']} could not be quarantined, "
            f"{len(report['failed'])} left in landing"
        )
        if report["unreachable"]:  # not taken in as things are (unlistable, a foreign bind mount): look
            raise AirflowFailException(
                f"{len(report['unreachable'])} path(s) in landing are not taken in: "
                + "; ".join(f"{u['path']} ({u['error']})" for u in report["unreachable"][:20])
            )
        stuck = report["persistent_move_failures"]
        if stuck:  # the files stay in landing run after run: somebody has to look
            raise AirflowFailException(
                f"{len(stuck)} file(s) could not be quarantined in more than one attempt and are still in "
                "landing: " + "; ".join(f"{f['path']} ({f['error']})" for f in stuck[:20])
            )
        return bcc_common.small(report)

    @task.short_circuit
    def check_new_data(intake_report: dict, params: dict | None = None) -> bool:
        from bcc_pipeline.pipelines import should_retrain

        go, reason = should_retrain(
            bcc_common.settings_for(params), params["min_new_images"], params["force"]
        )
        print(f"{reason}; this run's intake accepted {intake_report['accepted']}")
        return go

    @task
    def split(params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import split_step

        if params.get("candidate"):
            return {"candidate": params["candidate"], "skipped": "an existing candidate is evaluated"}
        return split_step(bcc_common.settings_for(params))

    @task(retries=0, execution_timeout=timedelta(hours=12))  # a failed fit is not fixed by retrying
    def train(split_info: dict, params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import train_step

        if params.get("candidate"):
            print(f"not training: evaluating the existing candidate {params['candidate']}")
            return {"version": params["candidate"]}
        return train_step(
            bcc_common.settings_for(params),
            split_info["manifest_path"],
            progress=print,
            holdout_path=split_info.get("holdout_path"),
        )

    @task
    def evaluate(trained: dict, params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import evaluate_step

        out = evaluate_step(bcc_common.settings_for(params), trained["version"], progress=print)
        return bcc_common.json_safe(
            {k: out[k] for k in ("version", "threshold", "temperature", "intervals", "calibration")}
        )

    @task
    def gate(evaluated: dict, params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import gate_step

        out = gate_step(
            bcc_common.settings_for(params),
            evaluated["version"],
            actor=bcc_common.actor(get_current_context()),
            progress=print,
        )
        print(out["markdown"])
        return bcc_common.json_safe(out)

    @task.short_circuit(
        ignore_downstream_trigger_rules=False
    )  # skips `approve` only; the rest follow their rules
    def needs_approval(decision: dict) -> bool:
        waiting = decision["decision"] == "awaiting_approval"
        print(
            f"{decision['version']} {'awaits a person' if waiting else 'needs no approval'}: {decision['decision']}"
        )
        return waiting

    approve = RecordedApprovalOperator(
        task_id="approve",
        subject="Promote BCC candidate {{ ti.xcom_pull(task_ids='gate')['version'] }} to champion?",
        body="{{ ti.xcom_pull(task_ids='gate')['markdown'] }}",
        params={
            "comment": Param(
                "",
                type="string",
                title="Comment",
                description="Why (recorded with your name in the promotion log)",
            )
        },
        defaults="Reject",
        response_timeout=APPROVAL_TIMEOUT,
    )
    # Reject makes the approval task skip its direct downstream task; this one absorbs that, so that
    # record_decision (trigger rule none_failed) records a rejection as well as an approval.
    approved = EmptyOperator(task_id="approved")

    @task(trigger_rule="none_failed")
    def record_decision(decision: dict, params: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from bcc_pipeline.pipelines import finish_approval

        if decision["decision"] != "awaiting_approval":
            return {k: v for k, v in decision.items() if k != "markdown"}
        answer = get_current_context()["ti"].xcom_pull(task_ids="approve", key=ANSWER_KEY)
        if not answer or not answer.get("chosen_options"):
            raise AirflowFailException(
                f"no answer from the approval task: {decision['version']} still awaits "
                "approval (answer it with bcc_pipeline.registry.record_approval)"
            )
        user = answer.get("responded_by_user") or {}
        actor = (
            f"airflow-user:{user.get('name') or user.get('id') or 'unknown (timeout: the default, Reject)'}"
        )
        comment = (answer.get("params_input") or {}).get("comment") or None
        approved_ = answer["chosen_options"] == [ApprovalOperator.APPROVE]
        out = finish_approval(
            bcc_common.settings_for(params), decision["version"], approved_, actor=actor, comment=comment
        )
        print(f"{'approved' if approved_ else 'rejected'} by {actor}: {out['reason']}")
        return bcc_common.json_safe({k: v for k, v in out.items() if k != "markdown"})

    @task(outlets=[CHAMPION_MODEL])
    def publish_champion(decision: dict, evaluated: dict) -> str:
        from airflow.sdk.exceptions import AirflowSkipException

        if decision["decision"] != "promoted":
            raise AirflowSkipException(
                f"candidate {decision['version']} was {decision['decision']}: {decision['reason']}; "
                f"the champion stays {decision['champion']}"
            )
        ctx = get_current_context()
        ivs = evaluated["intervals"]
        ctx["outlet_events"][CHAMPION_MODEL].extra = {
            "version": decision["version"],
            "threshold": evaluated["threshold"],
            "temperature": evaluated["temperature"],
            "holdout_sensitivity": ivs["sensitivity"],
            "holdout_specificity": ivs["specificity"],
            "holdout_roc_auc": ivs["roc_auc"],
        }
        print(f"new champion {decision['version']}: {decision['reason']}")
        return decision["version"]

    db = bcc_common.prepare_database()
    report = intake()
    db >> report
    go = check_new_data(report)
    info = split()
    go >> info
    evaluated = evaluate(train(info))
    decision = gate(evaluated)
    needs_approval(decision) >> approve >> approved
    final = record_decision(decision)
    approved >> final
    publish_champion(final, evaluated)


bcc_retrain()
