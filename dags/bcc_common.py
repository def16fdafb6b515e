"""Airflow-side glue shared by the BCC DAG tasks: the settings (and database) for a task.

Imported inside task bodies only (the dags folder is on ``sys.path`` when tasks run), and it imports
nothing heavy itself; ``bcc_pipeline`` is imported inside the functions.

Which database a task uses (the project database, never Airflow's metadata database):
1. ``BCC_DATABASE_URL`` when it is set (it wins: one variable overrides everything, as in the CLI);
2. otherwise the Airflow connection ``bcc_db`` (e.g. ``AIRFLOW_CONN_BCC_DB=postgresql://...``);
3. otherwise the embedded default, SQLite at ``$BCC_HOME/bcc.db``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

BCC_DB_CONN_ID = "bcc_db"
LIBPQ_OPTIONS = frozenset({"sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name",
                           "options", "target_session_attrs", "keepalives", "keepalives_idle"})
XCOM_LIST_LIMIT = 20


def _url_from_connection(conn_id: str = BCC_DB_CONN_ID) -> str | None:
    """SQLAlchemy URL from the Airflow connection, or None when there is no such connection."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    extra = dict(conn.extra_dejson or {})
    if extra.get("sqlalchemy_url"):
        return str(extra["sqlalchemy_url"])
    # URL query parameters: `sqlalchemy_query` (as Airflow's own hooks read it), else the libpq
    # options people put in extras; anything else in extra (UI fields...) stays out of the URL.
    query = extra.get("sqlalchemy_query")
    if not isinstance(query, dict):
        query = {k: v for k, v in extra.items() if k in LIBPQ_OPTIONS}
    from sqlalchemy.engine import URL

    kind = (conn.conn_type or "").lower()
    if kind in ("postgres", "postgresql"):
        # get_uri() would give postgres://, which SQLAlchemy 2 refuses; build the URL instead
        return URL.create("postgresql+psycopg2", username=conn.login or None, password=conn.password or None,
                          host=conn.host or None, port=conn.port or None, database=conn.schema or None,
                          query={k: str(v) for k, v in query.items()}).render_as_string(hide_password=False)
    if kind == "sqlite":
        return f"sqlite:///{conn.host or conn.schema}"
    raise ValueError(f"connection {conn_id!r} has type {conn.conn_type!r}; use postgres or sqlite "
                     "(or put a full URL in its extra as sqlalchemy_url)")


def database_url() -> str | None:
    return os.environ.get("BCC_DATABASE_URL") or _url_from_connection()


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


def actor(context: dict[str, Any]) -> str:
    return f"airflow:{context['dag'].dag_id}/{context['run_id']}"


def small(result: dict[str, Any]) -> dict[str, Any]:
    """Keep an XCom small: long lists are cut to their first entries (the full lists are in the
    database: rejections, inbox_files) and their lengths kept."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, list) and len(value) > XCOM_LIST_LIMIT:
            out[key] = value[:XCOM_LIST_LIMIT]
            out[f"{key}_total"] = len(value)
        else:
            out[key] = value
    return out
