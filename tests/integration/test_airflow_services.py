"""Airflow for real: scheduler, dag-processor and api-server as separate processes on loopback.

`bcc_score` is triggered through the REST API with a JWT from /auth/token, watched until it
succeeds, the prediction table is checked, then the run is cleared and rerun and nothing doubles.
"""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from .airflow_support import (
    SCHEDULER_ARGS,
    Services,
    airflow_env,
    api_server_args,
    free_port,
    jwt_token,
    migrate,
    register_tiny_champion,
    rest,
    run_state,
    task_instances,
)


def _predictions(url: str) -> tuple[int, int]:
    from bcc_pipeline.store import Prediction, session_scope

    with session_scope(url) as s:
        rows = s.scalar(select(func.count()).select_from(Prediction))
        distinct = s.scalar(select(func.count(func.distinct(Prediction.image_sha256))))
    return rows, distinct


@pytest.mark.slow
def test_score_dag_via_rest_api_on_real_services(tmp_path):
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
        bcc={"BCC_HOME": str(home), "BCC_DATABASE_URL": bcc_url, "BCC_SETTLE_SECONDS": "0"},
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
    register_tiny_champion(bcc_url, home / "models")
    from bcc_pipeline.demo_data import generate

    n = len(generate(home / "inbox" / "ward_3", benign=5, malignant=5, size=64, seed=21)["files"])

    services = Services(tmp_path)
    try:
        services.start("api-server", api_server_args(port), env)
        services.start("scheduler", SCHEDULER_ARGS, env)
        services.start("dag-processor", ["dag-processor"], env)
        services.wait_for(
            lambda: rest("GET", f"{base}/api/v2/monitor/health")[0] == 200, 180, "the api-server"
        )
        token = jwt_token(base, "admin", "test-pass")
        assert rest("GET", f"{base}/api/v2/dags")[0] == 401  # the API is behind login
        services.wait_for(
            lambda: rest("GET", f"{base}/api/v2/dags/bcc_score", token)[0] == 200,
            180,
            "the dag-processor to parse bcc_score",
        )
        status, _ = rest("PATCH", f"{base}/api/v2/dags/bcc_score", token, {"is_paused": False})
        assert status == 200
        run_id = "rest_score_1"
        status, body = rest(
            "POST",
            f"{base}/api/v2/dags/bcc_score/dagRuns",
            token,
            {"logical_date": None, "dag_run_id": run_id, "conf": {"shards": 2, "batch_size": 4}},
        )
        assert status == 200, body

        def finished() -> str | None:
            return run_state(base, token, "bcc_score", run_id)

        assert services.wait_for(finished, 400, f"run {run_id}") == "success", services.all_logs()
        services.assert_loopback_only({"api-server": port})  # no service listens beyond loopback
        rows, distinct = _predictions(bcc_url)
        assert (
            rows == distinct == n
        )  # every image scored once, whichever run (REST or the catch-up slot) took it
        assert len(list((home / "archive").rglob("*.png"))) == n

        # clear the whole run (every task instance) and let the scheduler run it again
        status, body = rest(
            "POST", f"{base}/api/v2/dags/bcc_score/dagRuns/{run_id}/clear", token, {"dry_run": False}
        )
        assert status == 200, body
        time.sleep(3)
        assert services.wait_for(finished, 400, f"cleared run {run_id}") == "success"
        tis = task_instances(base, token, "bcc_score", run_id)
        assert any(t["try_number"] >= 2 for t in tis), tis
        assert _predictions(bcc_url) == (n, n)  # the rerun added nothing
        assert len(list((home / "archive").rglob("*.png"))) == n
    finally:
        services.stop_all()
