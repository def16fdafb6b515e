"""Airflow-side glue shared by the BCC DAGs: default args, the ``prepare_database`` task, and the
settings (and database) for a task.

The DAG files import this module at parse time. That is safe because Airflow puts the bundle's
folder on ``sys.path`` wherever it parses a DAG file for real: ``BundleDagBag`` appends it, and the
DAG processor, the task runner and the ``airflow dags`` commands that name a bundle (``dags test``,
``dags reserialize``, ``list-import-errors --bundle-name``) all parse through it
(``airflow/dag_processing/dagbag.py``). Only a bare ``DagBag()`` (``list-import-errors --local``
without ``--bundle-name``) does not. This module imports nothing heavy: ``bcc_pipeline`` is imported
inside the functions, at run time.

Which database a task uses (the project database, never Airflow's metadata database): the rule of
:mod:`bcc_pipeline.airflow_db` (``BCC_DATABASE_URL``, else the Airflow connection ``bcc_db``, else SQLite
in ``BCC_HOME``), the same the UI plugin follows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from airflow.sdk import task

log = logging.getLogger(__name__)

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "bcc",
    # Database and filesystem hiccups. A retried scoring shard resumes from the ledger (nothing is
    # scored twice); training opts out (a failed fit is not fixed by running it again).
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}

#: The DAG params that are settings; the others (shards, inbox, force, ...) are task arguments.
SETTING_PARAMS = ("profile", "epochs", "require_approval")

BCC_DB_CONN_ID = "bcc_db"
XCOM_LIST_LIMIT = 20


def _task_connection(conn_id: str) -> Any:
    """The Airflow connection as a task reads it (Task SDK), or None when there is no such connection."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def database_url() -> str | None:
    from bcc_pipeline.airflow_db import database_url as resolve

    return resolve(_task_connection, BCC_DB_CONN_ID)


def settings(**overrides: Any):
    """The frozen bcc_pipeline settings for this task: profile/env/overrides plus the database."""
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.files import apply_umask

    overrides = {k: v for k, v in overrides.items() if v is not None}
    profile = overrides.pop("profile", None)
    url = database_url()
    if url:
        overrides["database_url"] = url
    s = load_settings(profile=profile, overrides=overrides)
    apply_umask(s.umask)  # BCC_UMASK: the permission policy for everything this task creates
    return s


def settings_for(params: Mapping[str, Any] | None = None, **overrides: Any):
    """The settings for a task of a run with these DAG ``params`` (empty ones fall through to
    ``BCC_*`` and the profile), plus ``overrides``."""
    chosen = {k: (params or {}).get(k) for k in SETTING_PARAMS}
    return settings(**{**chosen, **overrides})


@task
def prepare_database() -> str:
    """Bring the project database to the current schema (idempotent); returns its revision."""
    from airflow.sdk.exceptions import AirflowFailException

    from bcc_pipeline.errors import ConfigError
    from bcc_pipeline.store import upgrade

    try:
        s = settings()
        return upgrade(s.database_url, home=s.home)  # also marks the home (never scored as an inbox)
    except ConfigError as exc:  # a bad setting, a database URL whose driver is not here: no retry heals it
        raise AirflowFailException(str(exc)) from exc


def actor(context: dict[str, Any]) -> str:
    return f"airflow:{context['dag'].dag_id}/{context['run_id']}"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined metric: NaN) as None: an XCom is JSON, and JSON
    has no NaN (Airflow's task runner refuses the whole return value otherwise)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def small(result: dict[str, Any]) -> dict[str, Any]:
    """Keep an XCom small and JSON: long lists are cut to their first entries (the full lists are in the
    database: rejections, inbox_files) and their lengths kept; NaN becomes None (:func:`json_safe`)."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, list) and len(value) > XCOM_LIST_LIMIT:
            out[key] = value[:XCOM_LIST_LIMIT]
            out[f"{key}_total"] = len(value)
        else:
            out[key] = value
    return json_safe(out)
