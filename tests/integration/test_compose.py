"""docker-compose.yaml without a Docker engine: it validates against the Compose specification's
schema, every Airflow service runs the same image with the same settings, and those settings are
the ones the native Celery test runs on loopback (it reads them from this file)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .airflow_support import (
    COMPOSE_FILE,
    DAGS,
    LOOPBACK,
    NATIVE_ONLY_SETTINGS,
    NATIVE_WORKER_ONLY_SETTINGS,
    REPO,
    SCHEDULER_ARGS,
    api_server_args,
    celery_stack_env,
    celery_worker_env,
    compose_common_env,
    compose_env_on_loopback,
    interpolate,
    is_loopback,
    load_compose,
)

# the Airflow services of the stack; the GPU worker differs only by its image's CUDA build
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
    "airflow-cli",
}
BCC_HOME_FOLDERS = ("landing", "inbox", "archive", "quarantine", "models", "dataset", "runs")


def _check_jsonschema() -> str:
    exe = Path(sys.executable).with_name("check-jsonschema")
    found = str(exe) if exe.exists() else shutil.which("check-jsonschema")
    if not found:
        pytest.fail("check-jsonschema is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return found


def test_compose_file_validates_against_the_compose_spec_offline(tmp_path):
    proc = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the validator does reject a file that breaks the spec (so the check above can fail)
    bad = tmp_path / "docker-compose.yaml"
    bad.write_text(COMPOSE_FILE.read_text().replace("    restart: always", "    restart_policy: always", 1))
    proc = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "restart_policy" in proc.stdout


def test_every_airflow_service_shares_the_image_and_the_settings():
    compose = load_compose()
    common = compose["x-airflow-common"]
    common_env = compose_common_env(compose)
    services = compose["services"]
    assert AIRFLOW_SERVICES <= set(services), set(services)
    assert set(services) - AIRFLOW_SERVICES == {"postgres", "redis"}
    for name in AIRFLOW_SERVICES:
        svc = services[name]
        if name == "airflow-worker-gpu":  # the same Dockerfile, built with TensorFlow's CUDA libraries
            assert svc["image"] == common["image"] + "-gpu"
            assert svc["build"] == {
                "context": common["build"]["context"],
                "args": {"TENSORFLOW_EXTRA": "and-cuda"},
            }
        else:
            assert svc["image"] == common["image"], name
            assert svc["build"] == common["build"], name
        env = {k: str(v) for k, v in svc["environment"].items()}
        airflow_settings = {k: v for k, v in env.items() if k.startswith(("AIRFLOW__", "BCC_"))}
        assert airflow_settings == {
            k: v for k, v in common_env.items() if k.startswith(("AIRFLOW__", "BCC_"))
        }, name
        assert svc["volumes"] == common["volumes"], name
    assert common_env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert common_env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:${REDIS_PASSWORD:-}@redis:6379/")


def test_stack_topology_healthchecks_and_dependencies():
    services = load_compose()["services"]
    for name in (
        "postgres",
        "redis",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-worker-gpu",
    ):
        assert "healthcheck" in services[name], name
    for name in AIRFLOW_SERVICES - {"airflow-init", "airflow-cli"}:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy", name
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
    for worker in ("airflow-worker", "airflow-worker-gpu"):
        assert services[worker]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
        assert "container_name" not in services[worker] and "ports" not in services[worker]  # --scale works
        assert services[worker]["command"].startswith("celery worker")
    init = " ".join(services["airflow-init"]["command"])
    script = interpolate(services["airflow-init"]["command"][1], {})
    syntax = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert syntax.returncode == 0, (
        syntax.stderr
    )  # the init script is valid bash after compose's interpolation
    assert "airflow db migrate" in init and "bcc db upgrade" in init
    assert "simple_auth_manager_passwords.json" in init
    for folder in BCC_HOME_FOLDERS:
        assert f"/opt/bcc/{folder}" in init, folder
    # the GPU worker is opt-in and reserves NVIDIA devices
    gpu = services["airflow-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert all(
        "profiles" not in services[s] for s in services if s not in ("airflow-worker-gpu", "airflow-cli")
    )


def test_secrets_come_from_env_and_the_project_database_is_not_airflows():
    text = COMPOSE_FILE.read_text()
    for secret in (
        "POSTGRES_PASSWORD",
        "BCC_DB_PASSWORD",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_API_SECRET_KEY",
        "AIRFLOW_ADMIN_PASSWORD",
    ):
        assert f"${{{secret}:?" in text, secret  # required from .env, no default value in the file
        assert f"{secret}=change-me" in (REPO / ".env.example").read_text(), secret
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored"
    assert subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=REPO).returncode == 1

    variables = {
        "POSTGRES_PASSWORD": "pw",
        "BCC_DB_PASSWORD": "pw",
        "AIRFLOW_FERNET_KEY": "k",
        "AIRFLOW_JWT_SECRET": "j",
        "AIRFLOW_API_SECRET_KEY": "s",
    }
    from sqlalchemy.engine import make_url

    common = {k: interpolate(v, variables) for k, v in compose_common_env().items()}
    airflow_db = make_url(common["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    bcc_db = make_url(common["BCC_DATABASE_URL"])
    assert (airflow_db.database, airflow_db.username) == ("airflow", "airflow")
    assert (bcc_db.database, bcc_db.username) == ("bcc", "bcc")
    assert common["AIRFLOW__CELERY__RESULT_BACKEND"].endswith("@postgres:5432/airflow")


def test_native_test_runs_the_compose_settings_on_loopback():
    """What the native Celery test starts its processes with: every compose setting, only hosts,
    ports and paths swapped, and a change to the compose file cannot slip past it."""
    variables = {
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": "x",
        "AIRFLOW_DB_NAME": "meta_db",
        "BCC_DB_HOST": "127.0.0.1",
        "BCC_DB_USER": "postgres",
        "BCC_DB_PASSWORD": "x",
        "BCC_DB_NAME": "project_db",
        "REDIS_DB": "13",
        "AIRFLOW_FERNET_KEY": "k",
        "AIRFLOW_JWT_SECRET": "j",
        "AIRFLOW_API_SECRET_KEY": "s",
        "AIRFLOW_WORKER_CONCURRENCY": "1",
    }
    hosts = {
        "@postgres:5432/": "@127.0.0.1:5432/",
        "@redis:6379/": "@127.0.0.1:6379/",
        "http://airflow-apiserver:8080/": "http://127.0.0.1:18080/",
    }
    paths = {
        "/opt/airflow/dags": "/tmp/dags",
        "/opt/airflow/plugins": "/tmp/plugins",
        "/opt/airflow/config": "/tmp/af",
        "/opt/bcc": "/tmp/bcc",
    }
    env = compose_env_on_loopback(variables, hosts, paths)
    assert set(env) == set(compose_common_env())
    assert (
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        == "postgresql+psycopg2://postgres:x@127.0.0.1:5432/meta_db"
    )
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@127.0.0.1:6379/13"  # no REDIS_PASSWORD
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == "/tmp/plugins"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert env["BCC_DATABASE_URL"] == "postgresql+psycopg2://postgres:x@127.0.0.1:5432/project_db"
    assert env["BCC_HOME"] == "/tmp/bcc"
    # a substitution that no longer applies, or a container name left behind, fails loudly
    with pytest.raises(AssertionError, match="no longer appears"):
        compose_env_on_loopback(variables, {**hosts, "@db:5432/": "@127.0.0.1:5432/"}, paths)
    with pytest.raises(AssertionError, match="left in the settings"):
        compose_env_on_loopback(variables, {k: v for k, v in hosts.items() if "redis" not in k}, paths)
    with pytest.raises(AssertionError, match="left in the settings"):
        compose_env_on_loopback(variables, hosts, {k: v for k, v in paths.items() if "plugins" not in k})
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        compose_env_on_loopback(
            {k: v for k, v in variables.items() if k != "POSTGRES_PASSWORD"}, hosts, paths
        )


def test_dockerfile_builds_on_the_official_image_with_the_pinned_celery():
    import tomllib

    from packaging.requirements import Requirement

    text = (REPO / "Dockerfile").read_text()
    assert "\nFROM apache/airflow:3.3.2-python3.11\n" in text
    args = dict(
        line.removeprefix("ARG ").split("=", 1) for line in text.splitlines() if line.startswith("ARG ")
    )
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {r.name: r for r in map(Requirement, extras["celery"])}
    assert str(pins["apache-airflow-providers-celery"].specifier) == f"=={args['CELERY_PROVIDER_VERSION']}"
    assert pins["celery"].specifier.contains(args["CELERY_VERSION"])
    assert not pins["celery"].specifier.contains("5.7.0")  # 5.7.0 breaks the executor
    dev = [r for r in map(Requirement, extras["dev"]) if r.name == "bcc-pipeline"]
    assert dev and "celery" in dev[0].extras  # the tests get the same Celery pins as the image
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in text  # pip may not move Airflow off the image's version
    assert (
        "asyncpg==${ASYNCPG_VERSION}" in text and "COPY --chown=airflow:root dags/ /opt/airflow/dags/" in text
    )


def test_the_plugin_is_in_the_image_where_airflow_looks_for_plugins():
    """The BCC pages exist in the stack: the Dockerfile copies plugins/ (bcc_plugin.py and its
    templates) to the folder docker-compose.yaml names as Airflow's plugins folder, and nothing the
    plugin needs is left out of the build context."""
    text = (REPO / "Dockerfile").read_text()
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    plugins_folder = compose_common_env()["AIRFLOW__CORE__PLUGINS_FOLDER"]
    assert plugins_folder == "/opt/airflow/plugins"
    assert ["--chown=airflow:root", "plugins/", plugins_folder + "/"] in copies, copies
    tracked = subprocess.run(
        ["git", "ls-files", "plugins"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "plugins/bcc_plugin.py" in tracked and any(f.startswith("plugins/bcc_templates/") for f in tracked)
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [p for p in ignored if p.strip("/*") in ("plugins", "bcc_templates", "*.html", "*.py")], (
        ignored
    )


def _settings(env):
    return {k for k in env if k.startswith(("AIRFLOW__", "BCC_"))}


def test_native_celery_env_is_the_compose_settings_plus_the_named_test_only_ones(tmp_path):
    """What the native Celery test runs with (built by airflow_support.celery_stack_env) holds exactly
    docker-compose.yaml's settings plus the commented allowlist NATIVE_ONLY_SETTINGS (and, for each
    worker, NATIVE_WORKER_ONLY_SETTINGS): a setting added to one side only fails here, fast."""
    compose = compose_common_env()
    env = celery_stack_env(
        tmp_path,
        meta_url="postgresql+psycopg2://postgres@127.0.0.1:5432/meta",
        bcc_url="postgresql+psycopg2://postgres@127.0.0.1:5432/project",
        redis_url="redis://127.0.0.1:6379/13",
        api_port=18080,
    )
    worker = celery_worker_env(env, "bcc-worker-1")
    assert not (set(NATIVE_ONLY_SETTINGS) | set(NATIVE_WORKER_ONLY_SETTINGS)) & set(compose)
    assert all(why.strip() for why in {**NATIVE_ONLY_SETTINGS, **NATIVE_WORKER_ONLY_SETTINGS}.values())

    def drift(native: dict, allowed: set) -> tuple[set, set]:
        """(settings the native env adds beyond the allowlist, compose settings it lacks)"""
        return _settings(native) - set(compose) - allowed, set(compose) - set(native)

    assert drift(env, set(NATIVE_ONLY_SETTINGS)) == (set(), set())
    assert drift(worker, set(NATIVE_ONLY_SETTINGS) | set(NATIVE_WORKER_ONLY_SETTINGS)) == (set(), set())
    assert _settings(env) == _settings(compose) | set(NATIVE_ONLY_SETTINGS)
    # an unlisted extra setting is caught
    assert drift({**env, "AIRFLOW__CORE__PARALLELISM": "4"}, set(NATIVE_ONLY_SETTINGS))[0] == {
        "AIRFLOW__CORE__PARALLELISM"
    }
    # the compose values are used as they are, only hosts, ports and paths swapped
    fixed = {k: v for k, v in compose.items() if "$" not in v and "/opt/" not in v and "://" not in v}
    assert {"AIRFLOW__CORE__EXECUTOR", "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"} <= set(fixed)
    assert {k: env[k] for k in fixed} == fixed
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@127.0.0.1:6379/13"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(DAGS)
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(REPO / "plugins")
    assert (
        env["BCC_DATABASE_URL"] == "postgresql+psycopg2://postgres:unused-trust-auth@127.0.0.1:5432/project"
    )
    assert env["BCC_SCORE_SHARDS"] == "1"
    # every service the test starts listens on loopback only
    assert env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST"] == LOOPBACK
    args = api_server_args(18080)
    assert args[0] == "api-server" and args[args.index("--host") + 1] == LOOPBACK
    assert "--skip-serve-logs" in SCHEDULER_ARGS


def test_loopback_addresses_are_told_apart():
    assert all(map(is_loopback, ("127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.1.2.3", "::ffff:10.1.2.3")))


def test_compose_interpolation_nested_defaults_and_required_values():
    assert interpolate("${A:-${B:-x}}/${C-y}/${D:+set}", {"C": ""}) == "x//"
    assert interpolate("${A:-${B:-x}}", {"B": "b"}) == "b"
    assert interpolate("${A:-${B:?need B}}", {"A": "a", "B": "b"}) == "a"
    with pytest.raises(KeyError, match="need B"):  # compose-go: evaluated even when A is set
        interpolate("${A:-${B:?need B}}", {"A": "a"})
    assert interpolate("$$HOME ${A}$A $", {"A": "1"}) == "$HOME 11 $"


_SECRETS = {
    "POSTGRES_PASSWORD": "pw",
    "BCC_DB_PASSWORD": "pw",
    "AIRFLOW_FERNET_KEY": "k",
    "AIRFLOW_JWT_SECRET": "j",
    "AIRFLOW_API_SECRET_KEY": "s",
}


def test_bcc_database_url_from_env_points_at_an_existing_postgresql():
    """BCC_DATABASE_URL in .env wins over the BCC_DB_* parts, verbatim: a URL-encoded password and
    libpq options such as sslmode reach every service; .env.example and README say how."""
    from sqlalchemy.engine import make_url

    raw = compose_common_env()["BCC_DATABASE_URL"]
    url = "postgresql+psycopg2://bcc_app:p%40ss%3Aw%2Frd@db.lab.example:6432/bcc_prod?sslmode=require"
    assert interpolate(raw, {**_SECRETS, "BCC_DATABASE_URL": url}) == url
    parsed = make_url(url)
    assert (parsed.password, parsed.host, parsed.query) == (
        "p@ss:w/rd",
        "db.lab.example",
        {"sslmode": "require"},
    )
    default = make_url(interpolate(raw, {**_SECRETS, "BCC_DATABASE_URL": ""}))
    assert (default.host, default.database, default.username) == ("postgres", "bcc", "bcc")
    assert "# BCC_DATABASE_URL=postgresql+psycopg2://" in (REPO / ".env.example").read_text()
    readme = (REPO / "README.md").read_text()
    assert "sslmode=require" in readme and "URL-encode" in readme


def test_the_nightly_shards_come_from_env_through_every_service():
    raw = compose_common_env()["BCC_SCORE_SHARDS"]
    assert interpolate(raw, {}) == "1"
    assert interpolate(raw, {"BCC_SCORE_SHARDS": "3"}) == "3"
    assert "BCC_SCORE_SHARDS=" in (REPO / ".env.example").read_text()


def test_redis_requires_the_password_when_one_is_set(tmp_path):
    """The redis service's own command and healthcheck, run with this machine's redis-server on a free
    loopback port: with REDIS_PASSWORD set a client without it is refused, the healthcheck and the
    broker URL every Airflow service gets (same variable) get in; without it, both work unauthenticated."""
    import os
    import time

    from .airflow_support import free_port

    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        pytest.skip("redis-server/redis-cli not installed")
    import redis

    svc = load_compose()["services"]["redis"]
    assert svc["command"][0] == "redis-server"  # the image's entrypoint then drops root for the redis user
    assert svc["healthcheck"]["test"][0] == "CMD-SHELL"
    assert svc["environment"]["REDIS_PASSWORD"] == "${REDIS_PASSWORD:-}"
    broker = compose_common_env()["AIRFLOW__CELERY__BROKER_URL"]
    for password in ("s3cret-Token_1", ""):
        port = free_port()
        variables = {"REDIS_PASSWORD": password, "REDIS_DB": "3"}
        shell_env = {
            **os.environ,
            "REDIS_PASSWORD": interpolate(svc["environment"]["REDIS_PASSWORD"], variables),
        }
        server = [interpolate(a, variables) for a in svc["command"]]
        server += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        health = interpolate(svc["healthcheck"]["test"][1], variables).replace(
            "redis-cli", f"redis-cli -p {port}"
        )
        proc = subprocess.Popen(server, env=shell_env, cwd=tmp_path, stdout=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if subprocess.run(["sh", "-c", health], env=shell_env).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"the healthcheck never passed (password {bool(password)})")
            url = interpolate(broker, variables).replace("@redis:6379/", f"@127.0.0.1:{port}/")
            assert redis.Redis.from_url(url).ping()
            anonymous = redis.Redis(host="127.0.0.1", port=port)
            if password:
                with pytest.raises(redis.AuthenticationError):
                    anonymous.ping()
                unauthenticated = subprocess.run(
                    ["sh", "-c", health], env={**shell_env, "REDIS_PASSWORD": ""}
                )
                assert unauthenticated.returncode != 0  # the healthcheck does test the password
            else:
                assert anonymous.ping()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
