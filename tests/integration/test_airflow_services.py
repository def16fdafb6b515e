"""Airflow for real: scheduler, dag-processor and api-server as separate processes on loopback.

`bcc_score` is triggered through the REST API with a JWT from /auth/token, watched until it
succeeds, the prediction table is checked, then the run is cleared and rerun and nothing doubles.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select

from .airflow_support import AIRFLOW, airflow_env, migrate, register_tiny_champion


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(method: str, url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


def _wait(predicate, timeout: float, what: str, procs=None, logs=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        for name, p in (procs or {}).items():
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                     + _tail(logs[name]))
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                         + "\n".join(f"--- {n}\n{_tail(p)}" for n, p in (logs or {}).items()))


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _predictions(url: str) -> tuple[int, int]:
    from bcc_pipeline.store import Prediction, session_scope

    with session_scope(url) as s:
        rows = s.scalar(select(func.count()).select_from(Prediction))
        distinct = s.scalar(select(func.count(func.distinct(Prediction.image_sha256))))
    return rows, distinct


@pytest.mark.slow
def test_score_dag_via_rest_api_on_real_services(tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    home = tmp_path / "bcc"
    bcc_url = f"sqlite:///{tmp_path / 'bcc.db'}"
    af_home = tmp_path / "af"
    passwords = af_home / "passwords.json"
    af_home.mkdir(parents=True)
    passwords.write_text(json.dumps({"admin": "test-pass"}))
    env = airflow_env(af_home, metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}", bcc={
        "BCC_HOME": str(home), "BCC_DATABASE_URL": bcc_url, "BCC_SETTLE_SECONDS": "0"})
    env.update({
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
    })
    migrate(env)
    register_tiny_champion(bcc_url, home / "models")
    from bcc_pipeline.demo_data import generate

    n = len(generate(home / "inbox" / "ward_3", benign=5, malignant=5, size=64, seed=21)["files"])

    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for name, args in (("api-server", ["api-server", "--port", str(port)]),
                           ("scheduler", ["scheduler"]), ("dag-processor", ["dag-processor"])):
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = subprocess.Popen([AIRFLOW, *args], env=env, stdout=open(logs[name], "w"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: _request("GET", f"{base}/api/v2/monitor/health")[0] == 200, 180, "the api-server",
              procs, logs)
        status, tok = _request("POST", f"{base}/auth/token", body={"username": "admin", "password": "test-pass"})
        assert status in (200, 201), tok
        token = tok["access_token"]
        assert _request("GET", f"{base}/api/v2/dags")[0] == 401  # the API is behind login
        _wait(lambda: _request("GET", f"{base}/api/v2/dags/bcc_score", token)[0] == 200, 180,
              "the dag-processor to parse bcc_score", procs, logs)
        status, _ = _request("PATCH", f"{base}/api/v2/dags/bcc_score", token, {"is_paused": False})
        assert status == 200
        run_id = "rest_score_1"
        status, body = _request("POST", f"{base}/api/v2/dags/bcc_score/dagRuns", token,
                                {"logical_date": None, "dag_run_id": run_id, "conf": {"shards": 2, "batch_size": 4}})
        assert status == 200, body

        def finished() -> str | None:
            st, run = _request("GET", f"{base}/api/v2/dags/bcc_score/dagRuns/{run_id}", token)
            return run.get("state") if st == 200 and run.get("state") in ("success", "failed") else None

        assert _wait(finished, 400, f"run {run_id}", procs, logs) == "success", _tail(logs["scheduler"])
        rows, distinct = _predictions(bcc_url)
        assert rows == distinct == n  # every image scored once, whichever run (REST or the catch-up slot) took it
        assert len(list((home / "archive").rglob("*.png"))) == n

        # clear the whole run (every task instance) and let the scheduler run it again
        status, body = _request("POST", f"{base}/api/v2/dags/bcc_score/dagRuns/{run_id}/clear", token,
                                {"dry_run": False})
        assert status == 200, body
        time.sleep(3)
        assert _wait(finished, 400, f"cleared run {run_id}", procs, logs) == "success"
        st, tis = _request("GET", f"{base}/api/v2/dags/bcc_score/dagRuns/{run_id}/taskInstances", token)
        assert st == 200 and any(t["try_number"] >= 2 for t in tis["task_instances"]), tis
        assert _predictions(bcc_url) == (n, n)  # the rerun added nothing
        assert len(list((home / "archive").rglob("*.png"))) == n
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
