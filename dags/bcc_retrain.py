"""Periodic retraining of the BCC classifier (weekly by default, plus manual runs)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

import bcc_common  # the dags folder is on sys.path when Airflow parses this file (see bcc_common)
from airflow.sdk import Asset, Param, dag, get_current_context, task

# Emitted when a candidate is promoted; its extra carries the new version and headline metrics.
CHAMPION_MODEL = Asset(name="bcc_champion_model", uri="bcc://models/champion")

DOC = """
### BCC retraining

Takes new labelled images from `landing/benign/` and `landing/malignant/` (sub-folders are
patient/slide groups), trains a DenseNet201 candidate with the seed recipe, evaluates it, and
promotes it to **champion** only if it passes the quality gate against the current champion on
the same validation images.

`intake → check_new_data → split → train → evaluate → gate → publish_champion`

* **check_new_data** skips the rest (run still green) when fewer than `min_new_images` new
  labelled images arrived since the champion was trained, unless `force` is set.
* **gate** records the decision in the `promotions` table either way. A rejected candidate leaves
  the champion in place: the run succeeds and `publish_champion` is *skipped* with the reason in
  its log. A promotion emits the `bcc_champion_model` Asset.
* Plots (training curves, confusion matrix, ROC) are written to `models/<version>/plots/`.

Schedule: `BCC_RETRAIN_SCHEDULE` (cron, default `0 3 * * 0`, Sundays 03:00 UTC).
"""

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
        "profile": Param(None, type=["null", "string"], enum=[None, "seed", "demo"], title="Profile",
                         description="Empty: BCC_PROFILE (default seed). seed: the original recipe (224 px, "
                                     "7 epochs, ImageNet weights); demo: small and offline"),
        "epochs": Param(None, type=["null", "integer"], minimum=1, maximum=100, title="Epochs",
                        description="Leave empty for the profile's value"),
        "min_new_images": Param(20, type="integer", minimum=0, title="Minimum new images",
                                description="Skip training when fewer new labelled images arrived since the champion"),
        "force": Param(False, type="boolean", title="Force", description="Train even without new images"),
    },
)
def bcc_retrain():
    @task
    def intake(params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import intake_step

        run_id = get_current_context()["run_id"]
        return bcc_common.small(intake_step(bcc_common.settings_for(params), run_id=run_id))

    @task.short_circuit
    def check_new_data(intake_report: dict, params: dict | None = None) -> bool:
        from bcc_pipeline.pipelines import should_retrain

        go, reason = should_retrain(bcc_common.settings_for(params), params["min_new_images"], params["force"])
        print(f"{reason}; this run's intake accepted {intake_report['accepted']}")
        return go

    @task
    def split(params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import split_step

        return split_step(bcc_common.settings_for(params))

    @task(retries=0, execution_timeout=timedelta(hours=12))  # a failed fit is not fixed by retrying
    def train(split_info: dict, params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import train_step

        return train_step(bcc_common.settings_for(params), split_info["manifest_path"], progress=print)

    @task
    def evaluate(trained: dict, params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import evaluate_step

        return evaluate_step(bcc_common.settings_for(params), trained["version"], progress=print)

    @task
    def gate(evaluated: dict, params: dict | None = None) -> dict:
        from bcc_pipeline.pipelines import gate_step

        return gate_step(bcc_common.settings_for(params), evaluated["version"],
                         actor=bcc_common.actor(get_current_context()), progress=print)

    @task(outlets=[CHAMPION_MODEL])
    def publish_champion(decision: dict, evaluated: dict) -> str:
        from airflow.sdk.exceptions import AirflowSkipException

        if decision["decision"] != "promoted":
            raise AirflowSkipException(
                f"candidate {decision['version']} was {decision['decision']}: {decision['reason']}; "
                f"the champion stays {decision['champion']}")
        ctx = get_current_context()
        ctx["outlet_events"][CHAMPION_MODEL].extra = {
            "version": decision["version"], "threshold": evaluated["threshold"],
            "accuracy": evaluated["validation"]["accuracy"],
            "sensitivity": evaluated["validation"]["sensitivity"]}
        print(f"new champion {decision['version']}: {decision['reason']}")
        return decision["version"]

    db = bcc_common.prepare_database()
    report = intake()
    db >> report
    go = check_new_data(report)
    info = split()
    go >> info
    evaluated = evaluate(train(info))
    publish_champion(gate(evaluated), evaluated)


bcc_retrain()
