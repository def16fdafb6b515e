"""Periodic retraining of the BCC classifier (weekly by default, plus manual runs)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

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

default_args = {
    "owner": "bcc",
    "retries": 2,  # database and filesystem hiccups; training itself does not retry (see train)
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}


@dag(
    dag_id="bcc_retrain",
    schedule=os.environ.get("BCC_RETRAIN_SCHEDULE", "0 3 * * 0"),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
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
    def prepare_database() -> str:
        import bcc_common

        from bcc_pipeline.store import upgrade

        return upgrade(bcc_common.settings().database_url)

    @task
    def intake() -> dict:
        import bcc_common

        from bcc_pipeline.pipelines import intake_step

        ctx = get_current_context()
        report = intake_step(bcc_common.settings(), run_id=ctx["run_id"])
        report["rejections"] = report["rejections"][:20]  # the full list is in the rejections table
        report.pop("ignored_paths", None)
        return report

    @task.short_circuit
    def check_new_data(intake_report: dict, params: dict | None = None) -> bool:
        import bcc_common

        from bcc_pipeline.pipelines import count_new_images

        info = count_new_images(bcc_common.settings())
        wanted = params["min_new_images"]
        print(f"new labelled images since the champion's data: {info['new_images']} "
              f"(total {info['total_images']}, champion {info['champion']}, minimum {wanted}, "
              f"force {params['force']}); this run's intake accepted {intake_report['accepted']}")
        if params["force"]:
            return True
        if info["new_images"] < wanted:
            print(f"skipping training: {info['new_images']} < min_new_images={wanted}")
            return False
        return True

    @task
    def split(params: dict | None = None) -> dict:
        import bcc_common

        from bcc_pipeline.pipelines import split_step

        return split_step(bcc_common.settings(profile=params["profile"]))

    @task(retries=0, execution_timeout=timedelta(hours=12))  # a failed fit is not fixed by retrying
    def train(split_info: dict, params: dict | None = None) -> dict:
        import bcc_common

        from bcc_pipeline.pipelines import train_step

        s = bcc_common.settings(profile=params["profile"], epochs=params["epochs"])
        return train_step(s, split_info["manifest_path"], progress=print)

    @task
    def evaluate(trained: dict, params: dict | None = None) -> dict:
        import bcc_common

        from bcc_pipeline.pipelines import evaluate_step

        result = evaluate_step(bcc_common.settings(profile=params["profile"]), trained["version"], progress=print)
        return {"version": result["version"], "threshold": result["threshold"],
                "validation": result["validation"], "plots": result["plots"]}

    @task
    def gate(evaluated: dict, params: dict | None = None) -> dict:
        import bcc_common

        from bcc_pipeline.pipelines import gate_step

        ctx = get_current_context()
        return gate_step(bcc_common.settings(profile=params["profile"]), evaluated["version"],
                         actor=bcc_common.actor(ctx), progress=print)

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

    db = prepare_database()
    report = intake()
    db >> report
    go = check_new_data(report)
    info = split()
    go >> info
    evaluated = evaluate(train(info))
    publish_champion(gate(evaluated), evaluated)


bcc_retrain()
