"""The project database: engines, sessions, keyed inserts and migrations (the tables: :mod:`.schema`).

The same code runs on SQLite (embedded default) and PostgreSQL (production). The schema is owned
by the Alembic migrations in ``bcc_pipeline/migrations``; ``bcc db upgrade`` (:func:`upgrade`)
brings any older database to the current head in place.

Writes that a retried task could repeat go through :func:`insert_rows` (``INSERT .. ON CONFLICT (key)
DO NOTHING`` or ``DO UPDATE``), keyed by a natural key, so the second attempt changes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    event,
    exists,
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from .db_urls import _error_line, safe_url  # re-exported: every message showing a URL masks it
from .errors import DatabaseUrlError, StoreError
from .files import mark_home
from .schema import (  # re-exported: the tables are used through the store
    MODEL_STATUSES,
    NAMING_CONVENTION,
    Base,
    HoldoutEvent,
    ImageRecord,
    InboxFile,
    Metric,
    ModelVersion,
    Prediction,
    Promotion,
    Rejection,
    ScoringRun,
    scoring_fields,
    utcnow,
)

__all__ = [
    "Base",
    "HoldoutEvent",
    "ImageRecord",
    "InboxFile",
    "MODEL_STATUSES",
    "NAMING_CONVENTION",
    "Metric",
    "ModelVersion",
    "Prediction",
    "Promotion",
    "Rejection",
    "ScoringRun",
    "current_revision",
    "dispose_engine",
    "get_engine",
    "insert_rows",
    "place_recorded",
    "require_schema",
    "safe_url",
    "scoring_fields",
    "session_scope",
    "upgrade",
    "utcnow",
]

# --------------------------------------------------------------------------------------------
_ENGINES: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (the UI) never block the writer
    cur.execute("PRAGMA busy_timeout=30000")  # concurrent shards wait instead of failing
    cur.close()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_text(value: Any) -> str:
    """How JSON columns are written on every backend and path: an undefined number (NaN, inf) becomes
    null. PostgreSQL refuses NaN in JSON outright, while SQLite would store it and hand it back as text
    that strict readers refuse; null is what the evidence means."""
    return json.dumps(_finite(value), allow_nan=False)


def get_engine(url: str) -> Engine:
    """One engine per URL per process. SQLite folders are created on demand."""
    engine = _ENGINES.get(url)
    if engine is not None:
        return engine
    try:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: an error or a log line shows a statement's SQL, never its values (file paths
        # that may name a patient, a path filter typed in the UI)
        engine = create_engine(
            url, pool_pre_ping=True, future=True, json_serializer=json_text, hide_parameters=True
        )
    except ImportError as exc:  # postgresql:// asks for psycopg (3), which is not what is installed
        raise DatabaseUrlError(
            f"cannot use database URL {safe_url(url)}: its driver is not installed ({_error_line(exc, url)}); "
            "this installation talks to PostgreSQL through psycopg2 (postgresql+psycopg2://...) and to SQLite "
            "(sqlite:///...)"
        ) from exc
    except (SQLAlchemyError, ValueError) as exc:
        raise DatabaseUrlError(f"cannot use database URL {safe_url(url)}: {_error_line(exc, url)}") from exc
    if getattr(engine.dialect, "is_async", False):  # it would fail on first use with "greenlet_spawn ..."
        engine.dispose()
        raise DatabaseUrlError(
            f"cannot use database URL {safe_url(url)}: {engine.dialect.driver} is an asyncio driver, and the "
            "pipeline talks to its database synchronously; use e.g. postgresql+psycopg2:// or sqlite:///"
        )
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    _ENGINES[url] = engine
    return engine


def dispose_engine(url: str) -> None:
    """Close this process's pooled connections to ``url`` and forget the engine (tests dropping a
    database, a worker that forked)."""
    engine = _ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()


@contextmanager
def session_scope(url_or_engine: str | Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; DB errors become StoreError."""
    engine = get_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except SQLAlchemyError as exc:
        _rollback(session)  # on a connection that is gone the rollback fails too: the first error is said
        raise StoreError(f"database error on {safe_url(engine.url)}: {_error_line(exc, engine.url)}") from exc
    except BaseException:
        _rollback(session)
        raise
    finally:
        with contextlib.suppress(SQLAlchemyError):
            session.close()


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except SQLAlchemyError as exc:  # the connection dropped: nothing to roll back on it any more
        logging.getLogger(__name__).debug("rollback failed after a database error: %s", exc)


PAGE_ROWS = 1000  # rows per INSERT statement on the bulk paths


def insert_rows(
    target: Session | Connection,
    model: type[Base],
    rows: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    *,
    key: Sequence[str],
    update: Sequence[str] = (),
    returning: Any = None,
) -> list[Any] | int:
    """``INSERT .. ON CONFLICT (key) DO NOTHING`` (or ``DO UPDATE SET update``) [``RETURNING returning``].

    The one way the project writes rows that a retried task could write again: keyed by a natural key, a
    second attempt changes nothing (or, with ``update``, sets those columns to the new values). ``target``
    is a :class:`Session` (the rows join its transaction) or a :class:`Connection`. All rows must have the
    same keys. Returns the ``returning`` column's values of the rows actually written (conflicting rows
    return nothing under DO NOTHING) when ``returning`` is given, else the number of rows sent.

    The same call works on SQLite and PostgreSQL. PostgreSQL through psycopg2 gets big batches by ``COPY``
    into a staging table and small ones in pages of :data:`PAGE_ROWS` rows per statement
    (``execute_values``: one round trip a page, about 4× the rows per second of SQLAlchemy's executemany
    there); SQLite uses SQLAlchemy's executemany.
    """
    rows = [dict(r) for r in rows]
    conn = target.connection() if isinstance(target, Session) else target
    if not rows:
        return [] if returning is not None else 0
    table = model.__table__
    dialect = conn.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg2" and _plain_columns(table, rows[0]):
        written = _pg_execute_values(conn, table, rows, key, update, returning)
        return written if returning is not None else len(rows)
    if dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported backends
        raise StoreError(f"bulk insert is not implemented for {dialect.name}")
    stmt = insert(table)
    if update:
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key), set_={c: stmt.excluded[c] for c in update}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(key))
    out: list[Any] = []
    for start in range(0, len(rows), PAGE_ROWS):
        page = rows[start : start + PAGE_ROWS]
        if returning is not None:
            out.extend(conn.execute(stmt.returning(returning), page).scalars().all())
        else:
            conn.execute(stmt, page)
    return out if returning is not None else len(rows)


def place_recorded(target: Session | Connection, run_id: str, shown: str) -> bool:
    """Whether a file of run ``run_id`` is recorded as moved to ``shown`` (a path in display form): in the
    scoring ledger or in the rejections (intake's quarantine, or scoring's). A run's files go only under
    its own ``archive/<run>/`` and ``quarantine/<run>/``, so only that run's rows (the ``run_id`` prefix of
    each table's unique key) can hold the name. A move that is not recorded yet must never be given a name
    another file holds (:data:`bcc_pipeline.moving.Taken`)."""
    tables = (InboxFile.__table__, Rejection.__table__)
    query = select(*(exists().where(t.c.run_id == run_id, t.c.moved_to == shown) for t in tables))
    return any(target.execute(query).one())


def _plain_columns(table: Any, row: Mapping[str, Any]) -> bool:
    """True when raw DB-API parameters are enough: no Python-side default would be skipped."""
    for col in table.columns:
        if col.name not in row and col.default is not None and not col.primary_key:
            return False
    return all(c in table.c for c in row)


COPY_MIN_ROWS = 256  # from this many rows on, PostgreSQL gets them by COPY into a staging table


def _csv_text(v: Any) -> str:
    return "" if v is None else '"' + str(v).replace('"', '""') + '"'


def _csv_plain(v: Any) -> str:  # numbers and timestamps: nothing to quote
    return "" if v is None else (v.isoformat() if isinstance(v, dt.datetime | dt.date) else str(v))


def _csv_json(v: Any) -> str:
    return "" if v is None else _csv_text(json_text(v))


def _csv_bool(v: Any) -> str:
    return "" if v is None else ("true" if v else "false")


def _csv_formatter(coltype: Any) -> Any:
    """How one column's values are written in PostgreSQL's CSV COPY format (unquoted empty is NULL)."""
    from sqlalchemy.sql import sqltypes

    if isinstance(coltype, sqltypes.JSON):
        return _csv_json
    if isinstance(coltype, sqltypes.Boolean):
        return _csv_bool
    if isinstance(
        coltype, sqltypes.Integer | sqltypes.Float | sqltypes.Numeric | sqltypes.DateTime | sqltypes.Date
    ):
        return _csv_plain
    return _csv_text


def _pg_execute_values(
    conn: Connection,
    table: Any,
    rows: list[dict[str, Any]],
    key: Sequence[str],
    update: Sequence[str],
    returning: Any,
) -> list[Any]:
    """PostgreSQL (psycopg2): COPY into a temporary staging table, then one INSERT .. SELECT .. ON CONFLICT,
    for big batches (about 2× ``execute_values``); ``execute_values`` pages for small ones."""
    import psycopg2
    from psycopg2.extras import Json, execute_values
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.sql import sqltypes

    cols = list(rows[0])
    q = conn.dialect.identifier_preparer.quote
    col_list = ", ".join(q(c) for c in cols)
    action = (
        ("DO UPDATE SET " + ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in update))
        if update
        else "DO NOTHING"
    )
    tail = f"ON CONFLICT ({', '.join(q(k) for k in key)}) {action}" + (
        f" RETURNING {q(returning.name)}" if returning is not None else ""
    )
    cur = conn.connection.dbapi_connection.cursor()
    try:
        if len(rows) >= COPY_MIN_ROWS:
            stage = q(f"_bcc_stage_{table.name}")
            cur.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} (LIKE {q(table.name)} INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS"
            )
            cur.execute(
                f"DELETE FROM {stage}"
            )  # emptied at commit; this is for a second call in one transaction
            fmts = [(c, _csv_formatter(table.c[c].type)) for c in cols]
            data = io.StringIO("\n".join([",".join([f(r[c]) for c, f in fmts]) for r in rows]) + "\n")
            cur.copy_expert(f"COPY {stage} ({col_list}) FROM STDIN WITH (FORMAT csv)", data)
            cur.execute(f"INSERT INTO {q(table.name)} ({col_list}) SELECT {col_list} FROM {stage} {tail}")
            return [r[0] for r in cur.fetchall()] if returning is not None else []
        json_cols = {c for c in cols if isinstance(table.c[c].type, sqltypes.JSON)}
        sql = f"INSERT INTO {q(table.name)} ({col_list}) VALUES %s {tail}"
        args = [
            tuple(Json(r[c], dumps=json_text) if c in json_cols and r[c] is not None else r[c] for c in cols)
            for r in rows
        ]
        got = execute_values(cur, sql, args, page_size=PAGE_ROWS, fetch=returning is not None)
        return [r[0] for r in got] if returning is not None else []
    except psycopg2.Error as exc:
        # a raw cursor's error is said as SQLAlchemy says its own (a dropped connection was "unexpected
        # error: OperationalError" instead of a database error), and a dead connection is let go
        gone = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cur)
        if gone:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            None,
            None,
            exc,
            psycopg2.Error,
            hide_parameters=True,
            connection_invalidated=gone,
            dialect=conn.dialect,
        ) from exc
    finally:
        with contextlib.suppress(psycopg2.Error):  # closing on a connection that is gone raises too
            cur.close()


# --------------------------------------------------------------------------------------------
def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head", home: str | os.PathLike[str] | None = None) -> str:
    """Apply migrations up to ``revision``; returns the revision the database is at afterwards.

    ``home``: the BCC home this database belongs to; its marker file (``config.HOME_MARKER``) is written
    when missing, so that no deployment ever takes that folder for an inbox."""
    from alembic import command

    if home is not None:
        mark_home(home)

    try:
        engine = get_engine(url)
        with engine.begin() as conn:
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate {safe_url(url)}: {_error_line(exc, url)}") from exc
    return current_revision(url) or ""


def downgrade(url: str, revision: str) -> str:
    """Undo migrations down to ``revision`` (Alembic's ``downgrade``); returns the revision the database is
    at afterwards. Columns and tables that later migrations added are dropped with their data: for rolling
    back a deployment, and for the tests that prove each migration upgrades an older database. The CLI
    offers only ``bcc db upgrade``."""
    from alembic import command

    try:
        with get_engine(url).begin() as conn:
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate {safe_url(url)}: {_error_line(exc, url)}") from exc
    dispose_engine(url)  # pooled connections may hold the old table definitions (SQLite)
    return current_revision(url) or ""


def current_revision(url: str) -> str | None:
    """The Alembic revision of the database, or None when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    try:
        with get_engine(url).connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read {safe_url(url)}: {_error_line(exc, url)}") from exc


def require_schema(url: str, tables: Sequence[str] = ()) -> None:
    """Raise a StoreError that says what to run when the database was never migrated, or when it
    predates one of ``tables`` (a schema older than the code that needs it)."""
    try:
        present = set(inspect(get_engine(url)).get_table_names())
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot connect to {safe_url(url)}: {_error_line(exc, url)}") from exc
    if "model_versions" not in present:
        raise StoreError(f"database {safe_url(url)} has no BCC schema yet; run `bcc db upgrade`")
    missing = [t for t in tables if t not in present]
    if missing:
        raise StoreError(
            f"database {safe_url(url)} predates the table(s) {', '.join(missing)}; run `bcc db upgrade`"
        )


# The back-end tables live beside the code that uses them; imported here so that Base.metadata (what the
# migrations are checked against) is the whole schema whichever module is imported first.
from . import backend_store as _backend_store  # noqa: E402,F401 - registers its tables on Base
