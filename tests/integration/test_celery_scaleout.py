"""The compose stack's topology as real processes on loopback: CeleryExecutor with a Redis broker,
PostgreSQL for Airflow's metadata and (separately) the project's database, scheduler,
dag-processor and api-server, and two `airflow celery worker` processes. The Airflow settings are
docker-compose.yaml's own x-airflow-common block, with hosts, ports and paths swapped for loopback.

`bcc_score` is triggered over the REST API on 64 images in 4 shards: both workers run shards and
every image is scored exactly once. Then a second inbox is scored while one worker is SIGKILLed
(its whole process group, as when its machine dies) in the middle of a shard: the scheduler sees
the task's heartbeat stop, Airflow retries the shard on the surviving worker, and still every image
is scored exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from .airflow_support import (
    SCHEDULER_ARGS,
    Services,
    api_server_args,
    celery_stack_env,
    celery_worker_env,
    free_port,
    jwt_token,
    migrate,
    register_tiny_champion,
    rest,
    run_state,
    tail,
    task_instances,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

REDIS_URL = os.environ.get("BCC_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REQUIRE_REDIS = os.environ.get("BCC_REQUIRE_REDIS", "") not in ("", "0", "false", "no")
DAG = "bcc_score"
SHARDS = 4
IMAGES_PER_CLASS = 32  # 64 images per inbox
WORKERS = ("bcc-worker-1", "bcc-worker-2")


@pytest.fixture
def redis_db() -> Iterator[str]:
    """A dedicated Redis database, emptied before and after. Skips (or fails under
    BCC_REQUIRE_REDIS=1) when Redis or the Celery provider is missing."""
    reason = None
    try:
        import airflow.providers.celery.executors.celery_executor  # noqa: F401
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
    except ImportError as exc:
        reason = f"the Celery executor is not installed ({exc}); pip install -e '.[celery]'"
    except Exception as exc:  # noqa: BLE001
        reason = f"Redis not reachable at {REDIS_URL}: {str(exc).splitlines()[0]}"
    if reason:
        if REQUIRE_REDIS:
            pytest.fail(f"BCC_REQUIRE_REDIS is set but {reason}")
        pytest.skip(reason)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def pg_databases(pg_server: str):
    """Fresh Airflow metadata and project databases, dropped afterwards."""
    from tests.conftest import create_pg_database

    meta_url, drop_meta = create_pg_database("bcc_af_meta")
    bcc_url, drop_bcc = create_pg_database("bcc_project")
    yield meta_url, bcc_url
    drop_bcc()
    drop_meta()


def _ledger(bcc_url: str, run_id: str) -> dict[str, int]:
    from bcc_pipeline.store import InboxFile, session_scope

    with session_scope(bcc_url) as s:
        rows = s.execute(
            select(InboxFile.status, func.count())
            .where(InboxFile.run_id == run_id)
            .group_by(InboxFile.status)
        ).all()
        per_path = s.execute(
            select(func.count())
            .where(InboxFile.run_id == run_id)
            .group_by(InboxFile.path_key)
            .having(func.count() > 1)
        ).all()
    assert not per_path, f"a file of {run_id} is in the ledger more than once"
    return dict(rows)


def _shard_rows(bcc_url: str, run_id: str, shard: int) -> int:
    from bcc_pipeline.store import InboxFile, session_scope

    with session_scope(bcc_url) as s:
        return s.scalar(select(func.count()).where(InboxFile.run_id == run_id, InboxFile.shard == shard))


def _predictions(bcc_url: str, run_ids: list[str]) -> tuple[int, int]:
    from bcc_pipeline.store import Prediction, session_scope

    with session_scope(bcc_url) as s:
        q = select(func.count(), func.count(func.distinct(Prediction.image_sha256))).where(
            Prediction.run_id.in_(run_ids)
        )
        rows, distinct = s.execute(q).one()
    return rows, distinct


def _assert_scored_once(bcc_url: str, home: Path, inbox: Path, run_id: str, shas: set[str]) -> None:
    from bcc_pipeline.store import Prediction, session_scope

    assert _ledger(bcc_url, run_id) == {"scored": len(shas)}
    with session_scope(bcc_url) as s:
        got = s.execute(select(Prediction.image_sha256).where(Prediction.run_id == run_id)).scalars().all()
    assert sorted(got) == sorted(shas)  # every image exactly once, nothing else
    assert not [p for p in inbox.rglob("*") if p.is_file()], "files left in the inbox"
    assert len([p for p in (home / "archive").rglob("*.png") if run_id in str(p)]) == len(shas)


def _shard_tis(base: str, token: str, run_id: str) -> list[dict]:
    return [t for t in task_instances(base, token, DAG, run_id) if t["task_id"] == "score_shard"]


def test_celery_workers_share_the_shards_and_survive_a_killed_worker(tmp_path, redis_db, pg_databases):
    from bcc_pipeline.demo_data import generate
    from bcc_pipeline.files import sha256_file

    meta_url, bcc_url = pg_databases
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # docker-compose.yaml's settings on loopback, plus the named test-only ones (test_compose.py checks)
    env = celery_stack_env(tmp_path, meta_url=meta_url, bcc_url=bcc_url, redis_url=redis_db, api_port=port)
    home = Path(env["BCC_HOME"])
    af_home = Path(env["AIRFLOW_HOME"])
    password = secrets.token_urlsafe(12)
    (af_home / "simple_auth_manager_passwords.json").write_text(f'{{"admin": "{password}"}}')
    migrate(env)
    register_tiny_champion(bcc_url, home / "models")
    (home / "inbox").mkdir(parents=True)  # the nightly slot that unpausing starts scores this (empty) inbox
    # two drops outside the nightly inbox, scored by the REST-triggered runs (the `inbox` parameter)
    inboxes = {}
    for i, key in enumerate(("spread", "kill")):
        inboxes[key] = home / "drops" / key
        generate(
            inboxes[key] / "ward", benign=IMAGES_PER_CLASS, malignant=IMAGES_PER_CLASS, size=48, seed=100 + i
        )
    shas = {k: {sha256_file(p) for p in v.rglob("*.png")} for k, v in inboxes.items()}
    assert all(len(s) == 2 * IMAGES_PER_CLASS for s in shas.values()) and not shas["spread"] & shas["kill"]

    services = Services(tmp_path)
    try:
        services.start("api-server", api_server_args(port), env)
        services.start("scheduler", SCHEDULER_ARGS, env)
        services.start("dag-processor", ["dag-processor"], env)
        for name in WORKERS:  # one after the other: the first creates Celery's result tables (a race
            # between two first-time workers kills one; in the compose stack `restart: always` covers it)
            services.start(
                name,
                ["celery", "worker", "-H", f"{name}@localhost", "--skip-serve-logs"],
                celery_worker_env(env, name),
            )
            services.wait_for(
                lambda name=name: "ready." in tail(services.logs[name], 100_000),
                120,
                f"Celery worker {name}",
                interval=1,
            )
        services.wait_for(
            lambda: rest("GET", f"{base}/api/v2/monitor/health")[0] == 200, 180, "the api-server"
        )
        token = jwt_token(base, "admin", password)
        services.wait_for(
            lambda: rest("GET", f"{base}/api/v2/dags/{DAG}", token)[0] == 200,
            180,
            "the dag-processor to parse bcc_score",
        )
        assert rest("PATCH", f"{base}/api/v2/dags/{DAG}", token, {"is_paused": False})[0] == 200

        def trigger(key: str, **conf) -> str:
            run_id = f"celery_{key}_{uuid.uuid4().hex[:6]}"
            status, body = rest(
                "POST",
                f"{base}/api/v2/dags/{DAG}/dagRuns",
                token,
                {
                    "logical_date": None,
                    "dag_run_id": run_id,
                    "conf": {"shards": SHARDS, "inbox": str(inboxes[key]), **conf},
                },
            )
            assert status == 200, body
            return run_id

        # 1. 64 images, 4 shards: both workers take shards, every image is scored once
        run1 = trigger("spread", batch_size=8)
        assert (
            services.wait_for(lambda: run_state(base, token, DAG, run1), 300, f"run {run1}") == "success"
        ), services.all_logs()
        shards = _shard_tis(base, token, run1)
        assert len(shards) == SHARDS and {t["state"] for t in shards} == {"success"}
        assert {t["hostname"] for t in shards} == set(WORKERS), [
            (t["map_index"], t["hostname"]) for t in shards
        ]
        _assert_scored_once(bcc_url, home, inboxes["spread"], run1, shas["spread"])
        # every process of the stack listens on loopback only: the api-server, the scheduler's health
        # server, nothing else on another interface
        health_port = int(env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"])
        services.assert_loopback_only({"api-server": port, "scheduler": health_port})

        # 2. SIGKILL one worker while it runs a shard; Airflow retries it on the other worker
        run2 = trigger("kill", batch_size=1)
        victim, survivor = WORKERS

        meta = create_engine(meta_url, poolclass=NullPool)  # no connection stays open

        def kill_mid_shard() -> tuple[int, int, int] | None:
            """SIGKILL the victim once a shard it runs has committed some of its files, not all. A shard
            takes about two seconds here, so the victim is frozen (SIGSTOP) as soon as it runs one,
            and let go in short steps (SIGCONT) until part of the shard is committed."""
            with meta.connect() as c:  # the metadata DB: quicker to see a shard start than the REST API
                running = (
                    c.execute(
                        text(
                            "SELECT map_index FROM task_instance WHERE dag_id = :d AND run_id = :r AND task_id = "
                            "'score_shard' AND state = 'running' AND hostname = :h"
                        ),
                        {"d": DAG, "r": run2, "h": victim},
                    )
                    .scalars()
                    .all()
                )
            for shard in running:
                services.signal(victim, signal.SIGSTOP)
                size = len(json.loads((home / "runs" / run2 / "plan.json").read_text())["shards"][shard])
                for _ in range(2000):
                    done = _shard_rows(bcc_url, run2, shard)
                    if 0 < done < size:
                        services.kill(victim)
                        return shard, done, size
                    services.signal(victim, signal.SIGCONT)
                    if done >= size:
                        break  # finished before it could be caught; the victim takes another shard
                    time.sleep(0.02)
                    services.signal(victim, signal.SIGSTOP)
                services.signal(victim, signal.SIGCONT)
            return None

        shard, done, size = services.wait_for(
            kill_mid_shard, 240, f"{victim} part-way through a shard of {run2}", interval=0.1
        )
        print(f"killed {victim} in shard {shard} after {done} of its {size} files")
        assert (
            services.wait_for(lambda: run_state(base, token, DAG, run2), 360, f"run {run2}") == "success"
        ), services.all_logs()
        shards = {t["map_index"]: t for t in _shard_tis(base, token, run2)}
        retried = shards[shard]
        assert retried["state"] == "success" and retried["try_number"] >= 2, retried
        assert retried["hostname"] == survivor, retried
        _assert_scored_once(bcc_url, home, inboxes["kill"], run2, shas["kill"])
        assert _predictions(bcc_url, [run1, run2]) == (4 * IMAGES_PER_CLASS, 4 * IMAGES_PER_CLASS)
    except BaseException:
        print(services.all_logs(8000))
        for log in sorted((af_home / "logs").rglob("attempt=*.log"), key=lambda p: p.stat().st_mtime)[-6:]:
            print(f"--- task log {log.relative_to(af_home)} ---\n{tail(log, 3000)}")
        raise
    finally:
        services.stop_all()
