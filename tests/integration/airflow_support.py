"""Helpers for the Airflow tests: an isolated AIRFLOW_HOME per test, the real `airflow` CLI in
subprocesses (Airflow reads its configuration once per process, so each test gets its own), a tiny
registered champion so scoring DAG runs need no DenseNet training, long-running Airflow services
on loopback driven through the REST API, and the Airflow settings of docker-compose.yaml made to
run on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
COMPOSE_FILE = REPO / "docker-compose.yaml"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def airflow_env(home: Path, *, metadata_url: str | None, bcc: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BCC_"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": str(REPO),
        }
    )
    if metadata_url:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = metadata_url
    env.update(bcc)
    return env


def airflow(
    env: dict[str, str], *args: str, timeout: float = 900, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"airflow {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def migrate(env: dict[str, str]) -> None:
    airflow(env, "db", "migrate", timeout=300)


def _json_out(text: str) -> Any:
    """The JSON document in an `airflow ... -o json` output (warnings may precede it on stdout)."""
    for line in text.splitlines():
        if line.startswith(("[", "{")):
            return json.loads(line)
    raise AssertionError(f"no JSON in airflow output:\n{text[-3000:]}")


def dags_test(env: dict[str, str], dag_id: str, conf: dict[str, Any] | None = None) -> dict[str, str]:
    """`airflow dags test` (which calls dag.test()), then the task states of that run from the DB."""
    args = ["dags", "test", dag_id]
    if conf is not None:
        args += ["-c", json.dumps(conf)]
    proc = airflow(env, *args, check=False)  # exits 1 when the run fails: the states below tell
    runs = _json_out(airflow(env, "dags", "list-runs", dag_id, "-o", "json").stdout)
    run = max(runs, key=lambda r: r.get("start_date") or "")
    states = _json_out(
        airflow(env, "tasks", "states-for-dag-run", dag_id, run["run_id"], "-o", "json").stdout
    )
    out: dict[str, str] = {
        "__run__": run["state"],
        "__run_id__": run["run_id"],
        "__log__": proc.stdout + proc.stderr,
    }
    for row in states:
        key = (
            row["task_id"]
            if str(row.get("map_index", "-1")) in ("-1", "None", "")
            else f"{row['task_id']}[{row['map_index']}]"
        )
        out[key] = row["state"]
    return out


def register_tiny_champion(
    database_url: str,
    models_dir: Path,
    *,
    version: str = "vtiny-champion",
    image_size: int = 32,
    threshold: float = 0.5,
    status: str = "champion",
) -> str:
    """The tiny classifier of tests/support.py saved as a checksummed artifact under
    ``models_dir/<version>/`` and registered as champion, or with another ``status`` such as candidate
    (with validation metrics, so the gate has something to compare)."""
    from tests.support import register_version, save_tiny_artifact

    artifact = save_tiny_artifact(models_dir / version, image_size, {"version": version})
    return register_version(
        database_url,
        version,
        artifact=artifact,
        threshold=threshold,
        image_size=image_size,
        status=status,
        metrics={"accuracy": 0.5, "sensitivity": 0.5, "roc_auc": 0.5},
    )


# -- Airflow services as real processes on loopback ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(method: str, url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    """One REST call: (status, JSON body); status 0 when nothing answers."""
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


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Services:
    """Long-running `airflow ...` processes, each in its own process group with its log in a file.
    `wait_for` fails with every log's tail when a service dies or the wait times out; `stop_all`
    (call it in a `finally`) ends every group, SIGKILL after a grace period."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.expected_dead: set[str] = set()

    def start(self, name: str, args: list[str], env: Mapping[str, str]) -> subprocess.Popen:
        self.logs[name] = self.log_dir / f"{name}.log"
        with open(self.logs[name], "w") as log:
            self.procs[name] = subprocess.Popen(
                [AIRFLOW, *args], env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self.procs[name]

    def session(self, name: str) -> list[int]:
        """Every process the service started, in whatever process group: each service leads its own
        session, which its children keep (Airflow puts each task process in a group of its own)."""
        leader = self.procs[name].pid
        pids = []
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            try:
                if os.getsid(pid) == leader:
                    pids.append(pid)
            except OSError:
                pass
        return pids

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to every process of the service (SIGSTOP/SIGCONT freeze and thaw it whole)."""
        for pid in self.session(name):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self, name: str) -> None:
        """SIGKILL every process of one service (a worker, its pool and the tasks they run), as
        when its machine dies, and reap it."""
        self.expected_dead.add(name)
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def all_logs(self, n: int = 4000) -> str:
        return "\n".join(f"--- {name} ---\n{tail(path, n)}" for name, path in self.logs.items())

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            for name, p in self.procs.items():
                if name not in self.expected_dead and p.poll() is not None:
                    raise AssertionError(
                        f"{name} exited with {p.returncode} while waiting for {what}:\n" + self.all_logs()
                    )
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" + self.all_logs())

    def stop_all(self) -> None:
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for name, p in self.procs.items():  # and anything left in its session (task processes)
            self.signal(name, signal.SIGKILL)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def jwt_token(base: str, username: str, password: str) -> str:
    status, body = rest("POST", f"{base}/auth/token", body={"username": username, "password": password})
    assert status in (200, 201), (status, body)
    return body["access_token"]


def run_state(base: str, token: str, dag_id: str, run_id: str) -> str | None:
    """The run's state once it is finished (success/failed), else None."""
    status, run = rest("GET", f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}", token)
    return run.get("state") if status == 200 and run.get("state") in ("success", "failed") else None


def task_instances(base: str, token: str, dag_id: str, run_id: str) -> list[dict]:
    status, body = rest("GET", f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100", token)
    assert status == 200, (status, body)
    return body["task_instances"]


def worker_hostname_from_env() -> str:
    """`[core] hostname_callable` for several Celery workers on one machine: each worker process
    gets its own BCC_TEST_WORKER_HOSTNAME, so task instances record which worker ran them (in the
    compose stack every worker is its own container, and the default FQDN already tells them apart)."""
    return os.environ["BCC_TEST_WORKER_HOSTNAME"]


# -- docker-compose.yaml's Airflow settings, run on loopback ----------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
    and $$ for a literal $."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        val = variables.get(name)
        if op in (":-", ":?") and not val:
            val = None
        if val is None:
            if op and op.endswith("?"):
                raise KeyError(f"{name} is required: {arg}")
            return arg if op else ""
        return val

    return _VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def compose_common_env(compose: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The settings block every Airflow service of docker-compose.yaml shares (x-airflow-common)."""
    compose = compose or load_compose()
    return {k: str(v) for k, v in compose["x-airflow-common"]["environment"].items()}


def compose_env_on_loopback(
    variables: Mapping[str, str], hosts: Mapping[str, str], paths: Mapping[str, str]
) -> dict[str, str]:
    """docker-compose.yaml's shared Airflow/BCC settings with the `.env` variables filled in, its
    service names (``hosts``: e.g. ``"@postgres:5432/" -> "@127.0.0.1:5432/"``) and container paths
    (``paths``) swapped for this machine's. Every substitution must apply, and no service name or
    container path may be left over, so a change to the compose file either carries over to the
    native test or makes it fail."""
    env = {k: interpolate(v, variables) for k, v in compose_common_env().items()}
    for old, new in {**hosts, **paths}.items():
        if not any(old in v for v in env.values()):
            raise AssertionError(
                f"{old!r} no longer appears in docker-compose.yaml's x-airflow-common settings"
            )
        env = {k: v.replace(old, new) for k, v in env.items()}
    leftovers = {
        k: v
        for k, v in env.items()
        if "/opt/" in v or re.search(r"@(postgres|redis)[:/]|//(redis|airflow-[a-z-]+)[:/]", v)
    }
    if leftovers:
        raise AssertionError(f"container names or paths left in the settings for loopback: {leftovers}")
    return env


def evaluate_version(
    database_url: str, version: str, plots_dir: Path, *, n: int = 60, seed: int = 0, noise: float = 0.2
) -> dict[str, Any]:
    """Validation and holdout metrics (the holdout's with 95% intervals) plus the plots for ``version``, written by the real
    evaluation functions on a synthetic labelled set (what a retrain records; more ``noise``, a worse
    model), so the pages have a model with quality to show. Returns the validation metrics."""
    import numpy as np
    from sqlalchemy import update

    from bcc_pipeline import evaluation, plots, registry, stats
    from bcc_pipeline.store import ModelVersion, session_scope

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    with session_scope(database_url) as s:
        threshold = s.get(ModelVersion, version).threshold
        for split in ("validation", "holdout"):
            y = np.arange(n) % 2
            p = np.clip(threshold + (y - 0.5) * 0.6 + rng.normal(0, noise, n), 0.001, 0.999)
            metrics = evaluation.compute_metrics(y, p, threshold=threshold)
            intervals = stats.metric_intervals(y, p, threshold, seed=seed) if split == "holdout" else None
            registry.save_metrics(s, version, split, metrics, intervals)
            if split == "validation":
                out = metrics
                history = {
                    "loss": [0.69, 0.52, 0.41, 0.35],
                    "val_loss": [0.68, 0.55, 0.47, 0.44],
                    "accuracy": [0.55, 0.74, 0.82, 0.86],
                    "val_accuracy": [0.56, 0.71, 0.79, 0.81],
                }
                plots.plot_all(
                    history=history, y_true=y, prob_malignant=p, threshold=threshold, out_dir=plots_dir
                )
        s.execute(
            update(ModelVersion).where(ModelVersion.version == version).values(plots_dir=str(plots_dir))
        )
    return out
