"""Which project database an Airflow process uses, in one place for the DAGs' tasks and the UI plugin:

1. ``BCC_DATABASE_URL`` when it is set (it wins: one variable overrides everything, as in the CLI);
2. otherwise the Airflow connection ``bcc_db`` (e.g. ``AIRFLOW_CONN_BCC_DB=postgresql://...``);
3. otherwise the embedded default, SQLite at ``$BCC_HOME/bcc.db`` (``None`` here).

A task reads the connection through the Task SDK, the api-server through its own secrets backends: each
passes its reader (``conn_id → connection or None``). Imports nothing from Airflow itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["BCC_DB_CONN_ID", "LIBPQ_OPTIONS", "connection_url", "database_url"]

BCC_DB_CONN_ID = "bcc_db"
LIBPQ_OPTIONS = frozenset(
    {
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "connect_timeout",
        "application_name",
        "options",
        "target_session_attrs",
        "keepalives",
        "keepalives_idle",
    }
)


def connection_url(conn: Any, conn_id: str = BCC_DB_CONN_ID) -> str:
    """SQLAlchemy URL of an Airflow connection (``conn_type``, ``host``, ``login``, ``password``, ``port``,
    ``schema``, ``extra_dejson``)."""
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
        return URL.create(
            "postgresql+psycopg2",
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port or None,
            database=conn.schema or None,
            query={k: str(v) for k, v in query.items()},
        ).render_as_string(hide_password=False)
    if kind == "sqlite":
        return f"sqlite:///{conn.host or conn.schema}"
    raise ValueError(
        f"connection {conn_id!r} has type {conn.conn_type!r}; use postgres or sqlite "
        "(or put a full URL in its extra as sqlalchemy_url)"
    )


def database_url(get_connection: Callable[[str], Any], conn_id: str = BCC_DB_CONN_ID) -> str | None:
    """``BCC_DATABASE_URL``, else the URL of connection ``conn_id`` (``get_connection`` returns it or
    None), else None (the settings' SQLite default)."""
    if os.environ.get("BCC_DATABASE_URL"):
        return os.environ["BCC_DATABASE_URL"]
    conn = get_connection(conn_id)
    return None if conn is None else connection_url(conn, conn_id)
