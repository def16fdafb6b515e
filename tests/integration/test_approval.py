"""Human approval through real Airflow: scheduler, dag-processor and api-server on loopback.

`bcc_retrain` runs with `require_approval` on an existing candidate (the tiny classifier of
tests/support.py with its own calibration and holdout manifests, so no DenseNet is trained): the
gate passes, the approval task waits, a person answers through the REST API. Approve: the version is
published and the approver is in `promotions`. Reject (a second candidate): the champion is kept.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from .airflow_support import (
    SCHEDULER_ARGS,
    Services,
    airflow_env,
    api_server_args,
    free_port,
    jwt_token,
    migrate,
    rest,
    run_state,
    task_instances,
)

DAG = "bcc_retrain"


def _images(folder: Path, prefix: str, n: int, seed0: int) -> list[dict]:
    from bcc_pipeline.files import sha256_file
    from tests.support import write_png

    out = []
    for i in range(n):
        path = write_png(folder / f"{prefix}{i}.png", size=40, seed=seed0 + i)
        out.append(
            {
                "sha256": sha256_file(path),
                "label": ("benign", "malignant")[i % 2],
                "group_id": f"{prefix}{i}",
                "path": str(path),
            }
        )
    return out


def _candidate(models: Path, version: str, dev, holdout) -> None:
    """What train_step leaves behind, with the tiny classifier as the network."""
    from tests.support import save_tiny_artifact

    out = models / version
    _, sha = save_tiny_artifact(out, 32, {"version": version})
    meta = json.loads((out / "metadata.json").read_text())
    meta.update(
        {
            "artifact_sha256": sha,
            "manifest_path": str(dev.path),
            "manifest_hash": dev.hash,
            "holdout_path": str(holdout.path),
            "preprocessing": "densenet-torch-v1",
            "hyperparameters": {"base_weights": "none", "profile": "demo"},
            "n_train": 4,
            "n_val": 4,
            "code_version": "test",
            "data_cutoff": None,
        }
    )
    (out / "metadata.json").write_text(json.dumps(meta))
    (out / "history.json").write_text(json.dumps({"loss": [0.7, 0.6], "val_loss": [0.7, 0.65]}))


def _setup(home: Path) -> None:
    from bcc_pipeline.dataset import write_manifest

    img = home / "testdata"
    dev = [
        {**e, "split": role}
        for role, n, seed in (("train", 4, 0), ("validation", 4, 50), ("calibration", 12, 100))
        for e in _images(img, role, n, seed)
    ]
    hold = [{**e, "split": "holdout"} for e in _images(img, "holdout", 16, 500)]
    dev_m = write_manifest(
        sorted(dev, key=lambda e: e["sha256"]), home / "manifests", seed=0, val_fraction=0.2
    )
    hold_m = write_manifest(
        sorted(hold, key=lambda e: e["sha256"]), home / "holdouts", seed=0, val_fraction=0.2
    )
    for version in ("v-approve", "v-reject"):
        _candidate(home / "models", version, dev_m, hold_m)
    for label in ("benign", "malignant"):
        (home / "landing" / label).mkdir(parents=True, exist_ok=True)


ANSWER_AFTER_S = 10  # seconds between the request and the answer (see where it is used)


@pytest.mark.slow
def test_approval_through_the_rest_api_publishes_or_keeps_the_champion(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    home = tmp_path / "bcc"
    bcc_url = f"sqlite:///{tmp_path / 'bcc.db'}"
    af_home = tmp_path / "af"
    passwords = af_home / "passwords.json"
    af_home.mkdir(parents=True)
    passwords.write_text(json.dumps({"admin": "test-pass"}))
    env = airflow_env(
        af_home,
        metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}",
        bcc={
            "BCC_HOME": str(home),
            "BCC_DATABASE_URL": bcc_url,
            "BCC_PROFILE": "demo",
            "BCC_GATE_MIN_ACCURACY": "0",
            "BCC_GATE_MIN_SENSITIVITY": "0",
            "BCC_PUBLISH_BACKENDS": "openvino",
        },
    )
    env.update(
        {
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": "bcc-test-secret-not-for-production",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__CORE__PARALLELISM": "4",
        }
    )
    migrate(env)
    _setup(home)

    services = Services(tmp_path)
    try:
        services.start("api-server", api_server_args(port), env)
        services.start("scheduler", SCHEDULER_ARGS, env)
        services.start("dag-processor", ["dag-processor"], env)
        services.wait_for(
            lambda: rest("GET", f"{base}/api/v2/monitor/health")[0] == 200, 180, "the api-server"
        )
        token = jwt_token(base, "admin", "test-pass")
        services.wait_for(
            lambda: rest("GET", f"{base}/api/v2/dags/{DAG}", token)[0] == 200,
            300,
            f"the dag-processor to parse {DAG}",
        )
        assert rest("PATCH", f"{base}/api/v2/dags/{DAG}", token, {"is_paused": False})[0] == 200

        def log_of(run_id: str, task_id: str, attempt: int = 1) -> str:
            """A task's log through the REST API, one line per event (errors with their details)."""
            _, body = rest(
                "GET",
                f"{base}/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{attempt}"
                "?full_content=true",
                token,
            )
            return "\n".join(
                f"{c.get('event')} {c.get('error_detail') or ''}"
                for c in body.get("content", [])
                if isinstance(c, dict)
            )

        def run(run_id: str, candidate: str, answer: str, comment: str) -> dict:
            from bcc_pipeline import registry
            from bcc_pipeline.store import session_scope

            conf = {"candidate": candidate, "require_approval": True, "force": True, "min_new_images": 0}
            status, body = rest(
                "POST",
                f"{base}/api/v2/dags/{DAG}/dagRuns",
                token,
                {"logical_date": None, "dag_run_id": run_id, "conf": conf},
            )
            assert status == 200, body
            hitl = f"{base}/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails"

            ti_url = f"{base}/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/approve"

            def waiting() -> dict | None:
                # A person answers a request the UI lists as waiting: the task parked in awaiting_input,
                # not merely its request written (the operator writes it a moment before it parks).
                st, ti = rest("GET", ti_url, token)
                if st != 200 or ti.get("state") != "awaiting_input":
                    return None
                st, detail = rest("GET", hitl, token)
                return detail if st == 200 and not detail.get("response_received") else None

            detail = services.wait_for(waiting, 600, f"{run_id} to reach the approval task")
            # A person takes seconds to read the card; a script answering at once hits a known Airflow
            # 3.3 race (apache/airflow#71580, #72716): the trigger resumes the task before the scheduler
            # has drained the executor's "success" of the worker that parked it, and the scheduler then
            # fails the resumed try as a "state mismatch" (its retry asks again; the first answer never becomes
            # a decision). Answer as a person would, after the scheduler's next few loops.
            time.sleep(ANSWER_AFTER_S)
            asked_try = rest("GET", ti_url, token)[1]["try_number"]
            assert candidate in detail["subject"] and detail["options"] == ["Approve", "Reject"]
            assert "sensitivity" in detail["body"] and "(holdout)" in detail["body"]
            assert "model_card.md" in detail["body"] and "reliability.png" in detail["body"]
            with session_scope(bcc_url) as s:  # the gate did not promote by itself
                assert registry.decision_for(s, candidate).decision == registry.AWAITING
            st, resp = rest(
                "PATCH", hitl, token, {"chosen_options": [answer], "params_input": {"comment": comment}}
            )
            assert st == 200 and resp["responded_by"]["name"] == "admin", resp
            try:
                state = services.wait_for(lambda: run_state(base, token, DAG, run_id), 600, f"run {run_id}")
            except AssertionError as e:  # say why the run is stuck: every try of the approval task
                now = rest("GET", ti_url, token)[1]
                tries = "\n".join(
                    f"--- approve try {n} ---\n{log_of(run_id, 'approve', n)}"
                    for n in range(1, int(now.get("try_number") or 1) + 1)
                )
                _, events = rest("GET", f"{base}/api/v2/eventLogs?dag_id={DAG}&run_id={run_id}", token)
                mismatches = [
                    x.get("extra") for x in events.get("event_logs", []) if "mismatch" in str(x.get("event"))
                ]
                raise AssertionError(
                    f"answered try {asked_try}; the task is now {now.get('state')} at try "
                    f"{now.get('try_number')}\nstate mismatches: {mismatches}\n{tries}\n{e}"
                ) from None
            states = {t["task_id"]: t["state"] for t in task_instances(base, token, DAG, run_id)}
            failed = [t for t, st in states.items() if st == "failed"]
            assert state == "success", f"{states}\n" + "\n".join(log_of(run_id, t) for t in failed)
            return states

        from bcc_pipeline import registry
        from bcc_pipeline.store import session_scope

        states = run("approve_1", "v-approve", "Approve", "holdout intervals look fine")
        services.assert_loopback_only({"api-server": port})  # no service listens beyond loopback
        assert states["publish_champion"] == "success" and states["record_decision"] == "success", states
        with session_scope(bcc_url) as s:
            assert registry.get_champion(s).version == "v-approve"
            row = registry.decision_for(s, "v-approve")
            assert row.decision == "promoted" and row.actor == "airflow-user:admin"
            assert row.evidence["approval"]["comment"] == "holdout intervals look fine"
            assert row.evidence["rule"] == registry.GATE_RULE

        states = run("reject_1", "v-reject", "Reject", "not this week")
        assert states["approved"] == "skipped" and states["record_decision"] == "success", states
        assert states["publish_champion"] == "skipped", states
        with session_scope(bcc_url) as s:
            assert registry.get_champion(s).version == "v-approve"  # the champion is kept
            row = registry.decision_for(s, "v-reject")
            assert row.decision == "rejected" and row.actor == "airflow-user:admin"
            assert row.evidence["approval"] == {
                **row.evidence["approval"],
                "approved": False,
                "comment": "not this week",
            }
            assert (
                row.evidence["differences"]["roc_auc"]["n"] == 16
            )  # compared with v-approve on the same holdout
        card = (home / "models" / "v-reject" / "model_card.md").read_text()
        assert "Human approval: rejected by `airflow-user:admin`: not this week" in card
    finally:
        services.stop_all()
        shutil.rmtree(home / "testdata", ignore_errors=True)
