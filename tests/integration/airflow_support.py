"""Helpers for the Airflow tests: an isolated AIRFLOW_HOME per test, the real `airflow` CLI in
subprocesses (Airflow reads its configuration once per process, so each test gets its own), a tiny
registered champion so scoring DAG runs need no DenseNet training, long-running Airflow services
on loopback driven through the REST API, and the Airflow settings of docker-compose.yaml made to
run on loopback."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
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


def metadata_url(env: Mapping[str, str]) -> str:
    """The URL of Airflow's metadata database in ``env``: the one set, else Airflow's default, the SQLite
    file ``$AIRFLOW_HOME/airflow.db``."""
    return env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") or f"sqlite:///{env['AIRFLOW_HOME']}/airflow.db"


def dag_run_states(env: Mapping[str, str], dag_id: str) -> dict[str, str]:
    """The latest run of ``dag_id`` (by start date) and its task states, read from Airflow's metadata
    database (tables ``dag_run`` and ``task_instance``) as `airflow dags list-runs` and `airflow tasks
    states-for-dag-run` show them, without starting two more Airflow processes: ``__run__`` (the run's
    state), ``__run_id__``, and one key per task instance, ``task`` or ``task[i]`` for mapped ones (a task
    that has no state yet: "")."""
    from sqlalchemy import create_engine, text

    engine = create_engine(metadata_url(env))
    try:
        with engine.connect() as c:
            runs = c.execute(
                text("SELECT run_id, state, start_date FROM dag_run WHERE dag_id = :dag_id"),
                {"dag_id": dag_id},
            ).all()
            assert runs, f"no run of {dag_id} in {metadata_url(env)}"
            run = max(runs, key=lambda r: (r.start_date is not None, r.start_date))
            tis = c.execute(
                text(
                    "SELECT task_id, map_index, state FROM task_instance "
                    "WHERE dag_id = :dag_id AND run_id = :run_id"
                ),
                {"dag_id": dag_id, "run_id": run.run_id},
            ).all()
    finally:
        engine.dispose()
    out: dict[str, str] = {"__run__": run.state, "__run_id__": run.run_id}
    for ti in tis:
        key = ti.task_id if ti.map_index is None or ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        out[key] = ti.state or ""
    return out


def dags_test(env: dict[str, str], dag_id: str, conf: dict[str, Any] | None = None) -> dict[str, str]:
    """`airflow dags test` (which calls dag.test()), then the task states of that run from the DB
    (:func:`dag_run_states`), and the command's output under ``__log__``."""
    args = ["dags", "test", dag_id]
    if conf is not None:
        args += ["-c", json.dumps(conf)]
    proc = airflow(env, *args, check=False)  # exits 1 when the run fails: the states below tell
    states = dag_run_states(env, dag_id)
    run = {"__run__": states.pop("__run__"), "__run_id__": states.pop("__run_id__")}
    return {**run, "__log__": proc.stdout + proc.stderr, **states}


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


LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def api_server_args(port: int) -> list[str]:
    """`airflow api-server` on loopback only (``[api] host`` defaults to 0.0.0.0: every interface)."""
    return ["api-server", "--host", LOOPBACK, "--port", str(port)]


#: `airflow scheduler` without its task-log server. With the LocalExecutor the scheduler would serve task
#: logs on every interface (airflow/utils/serve_logs binds host "", and no setting changes that); the
#: api-server of a test reads the task logs from the shared AIRFLOW_HOME instead. (The CeleryExecutor
#: starts no log server in the scheduler; the Celery workers get --skip-serve-logs.)
SCHEDULER_ARGS = ["scheduler", "--skip-serve-logs"]


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every TCP socket listening in this network namespace."""
    found: dict[int, tuple[str, int]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[int(fields[9])] = (str(ipaddress.ip_address(raw)), int(port_hex, 16))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


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

    def listening(self) -> list[tuple[str, str, int]]:
        """(service, address, port) of every TCP socket a process of a service listens on."""
        sockets = _listening_sockets()
        found = set()
        for name in self.procs:
            for pid in self.session(name):
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if target.startswith("socket:[") and int(target[8:-1]) in sockets:
                        found.add((name, *sockets[int(target[8:-1])]))
        return sorted(found)

    def assert_loopback_only(self, expected: Mapping[str, int]) -> list[tuple[str, str, int]]:
        """Every socket the services listen on is on loopback, and ``expected`` (service -> port, e.g.
        the api-server's) is among them, so the check sees the sockets it judges."""
        found = self.listening()
        for name, port in expected.items():
            assert any(s == name and p == port for s, _a, p in found), (name, port, found)
        wide = [f for f in found if not is_loopback(f[1])]
        assert not wide, f"services listening beyond loopback: {wide}"
        return found

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

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _closing_brace(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``${`` at ``start`` (nested ``${...}`` counted), -1 if none."""
    depth, i = 0, start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _braced(inner: str, variables: Mapping[str, str]) -> str:
    m = _NAME.match(inner)
    if not m:
        raise ValueError(f"invalid interpolation ${{{inner}}}")
    name, rest = m.group(), inner[m.end() :]
    value = variables.get(name)
    if not rest:
        return value or ""
    op = next((o for o in _OPERATORS if rest.startswith(o)), None)
    if op is None:
        raise ValueError(f"invalid interpolation ${{{inner}}}")
    # the argument is interpolated first, whether it is used or not, as compose-go does: a required
    # variable inside a default is required even when the outer variable is set
    arg = interpolate(rest[len(op) :], variables)
    present = value is not None and (value != "" or not op.startswith(":"))
    if op.endswith("-"):
        return value if present else arg
    if op.endswith("?"):
        if not present:
            raise KeyError(f"{name} is required: {arg}")
        return value
    return arg if present else ""  # :+ and +


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alt}, ${VAR+alt}, nested (``${A:-${B}}``), and $$ for a literal $. An unset
    variable without a default is empty (compose warns)."""
    out, i = [], 0
    while i < len(value):
        if value[i] != "$":
            out.append(value[i])
            i += 1
        elif value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("${", i):
            end = _closing_brace(value, i)
            if end < 0:
                raise ValueError(f"unclosed ${{ in {value!r}")
            out.append(_braced(value[i + 2 : end], variables))
            i = end + 1
        elif m := _NAME.match(value, i + 1):
            out.append(variables.get(m.group()) or "")
            i = m.end()
        else:  # a $ that starts no variable stays as it is
            out.append("$")
            i += 1
    return "".join(out)


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


# -- the native Celery test's environment: the compose settings plus named test-only ones ---------

#: What the native Celery test (test_celery_scaleout.py) adds to docker-compose.yaml's x-airflow-common
#: settings, key -> why. Nothing else: test_compose.py checks that the test's environment holds exactly
#: the compose settings (used as they are, hosts and paths swapped for loopback) plus these, and none of
#: these may be a compose setting.
NATIVE_ONLY_SETTINGS: dict[str, str] = {
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO, Airflow's default, set for every test by airflow_env",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": (
        "20: a killed worker's task is noticed after 20 s instead of 300 s"
    ),
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2: and looked for every 2 s",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5: the DAG folder is re-listed every 5 s",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": (
        "127.0.0.1: the health server on loopback (default 0.0.0.0; in a container that is the "
        "container's own network, where the healthcheck's curl reaches it)"
    ),
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": "a free port (8974 may be taken on this machine)",
    "BCC_SETTLE_SECONDS": "0: the test's images are complete when written, score them at once",
    "BCC_INBOX_ROOTS": "$BCC_HOME/inbox and $BCC_HOME/drops: the REST-triggered runs score drops/<key>",
}
#: What each native Celery worker adds on top (one machine, two workers), key -> why.
NATIVE_WORKER_ONLY_SETTINGS: dict[str, str] = {
    "AIRFLOW__CORE__HOSTNAME_CALLABLE": (
        "worker_hostname_from_env: each worker records its own name as the task instances' hostname "
        "(in the stack every worker is a container with its own hostname)"
    ),
    "BCC_TEST_WORKER_HOSTNAME": "the name that callable returns",
}
_NATIVE_FIXED = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": LOOPBACK,
    "BCC_SETTLE_SECONDS": "0",
}


def celery_stack_env(
    tmp_path: Path, *, meta_url: str, bcc_url: str, redis_url: str, api_port: int
) -> dict[str, str]:
    """The environment of every process of the native Celery test: docker-compose.yaml's
    x-airflow-common settings with `.env`'s variables filled in (fresh secrets), hosts, ports and
    paths swapped for loopback and ``tmp_path``, plus :data:`NATIVE_ONLY_SETTINGS`. The Celery
    workers add :func:`celery_worker_env`."""
    from cryptography.fernet import Fernet
    from sqlalchemy.engine import make_url

    meta, bcc, broker = make_url(meta_url), make_url(bcc_url), make_url(redis_url)
    af_home = tmp_path / "airflow"
    variables = {
        # what .env provides in the compose stack (trust auth on the test server ignores passwords)
        "POSTGRES_USER": meta.username,
        "POSTGRES_PASSWORD": meta.password or "unused-trust-auth",
        "AIRFLOW_DB_NAME": meta.database,
        "BCC_DB_HOST": bcc.host,
        "BCC_DB_PORT": str(bcc.port or 5432),
        "BCC_DB_NAME": bcc.database,
        "BCC_DB_USER": bcc.username,
        "BCC_DB_PASSWORD": bcc.password or "unused-trust-auth",
        "REDIS_PASSWORD": broker.password or "",
        "REDIS_DB": str(broker.database or 0),
        "AIRFLOW_WORKER_CONCURRENCY": "1",
        "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW_JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW_API_SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW_ADMIN_USER": "admin",
    }
    stack = compose_env_on_loopback(
        variables,
        hosts={
            "@postgres:5432/": f"@{meta.host}:{meta.port or 5432}/",
            "@redis:6379/": f"@{broker.host}:{broker.port or 6379}/",
            "http://airflow-apiserver:8080/": f"http://{LOOPBACK}:{api_port}/",
        },
        paths={
            "/opt/airflow/dags": str(DAGS),
            "/opt/airflow/plugins": str(REPO / "plugins"),
            "/opt/airflow/config": str(af_home),
            "/opt/bcc": str(tmp_path / "bcc"),
        },
    )
    clash = (set(NATIVE_ONLY_SETTINGS) | set(NATIVE_WORKER_ONLY_SETTINGS)) & set(stack)
    assert not clash, f"the native test may not override compose settings: {clash}"
    env = airflow_env(af_home, metadata_url=None, bcc={})
    env.update(stack)
    env.update(_NATIVE_FIXED)
    env["BCC_INBOX_ROOTS"] = os.pathsep.join(str(tmp_path / "bcc" / f) for f in ("inbox", "drops"))
    env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"] = str(free_port())
    return env


def celery_worker_env(env: Mapping[str, str], name: str) -> dict[str, str]:
    """One of several Celery workers on one machine (:data:`NATIVE_WORKER_ONLY_SETTINGS`): each records
    its own name as the task instances' hostname. Task logs are read from the shared AIRFLOW_HOME, so
    the workers do not serve them (``--skip-serve-logs``; one port each otherwise)."""
    return {
        **env,
        "BCC_TEST_WORKER_HOSTNAME": name,
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.integration.airflow_support.worker_hostname_from_env",
    }


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
