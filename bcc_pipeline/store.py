"""The project database: SQLAlchemy 2 typed ORM, engines, sessions, keyed inserts and migrations.

The same code runs on SQLite (embedded default) and PostgreSQL (production). The schema is owned
by the Alembic migrations in ``bcc_pipeline/migrations``; ``bcc db upgrade`` (:func:`upgrade`)
brings any older database to the current head in place.

Writes that a retried task could repeat go through :func:`insert_rows` (``INSERT .. ON CONFLICT (key)
DO NOTHING`` or ``DO UPDATE``), keyed by a natural key, so the second attempt changes nothing.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .config import HOME_MARKER
from .errors import StoreError
from .files import atomic_write

__all__ = [
    "Base",
    "HoldoutEvent",
    "ImageRecord",
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
    "require_schema",
    "safe_url",
    "session_scope",
    "upgrade",
    "utcnow",
]

# Stable constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MODEL_STATUSES = ("candidate", "champion", "retired", "rejected")


def utcnow() -> dt.datetime:
    """Timezone-aware UTC now (stored as UTC on both backends)."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class ImageRecord(Base):
    """One row per distinct image content (sha256 of the file bytes)."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str | None] = mapped_column(String(16))  # None: unlabelled (scored only)
    group_id: Mapped[str | None] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    source_path: Mapped[str] = mapped_column(Text)  # first path it was seen under
    stored_path: Mapped[str | None] = mapped_column(Text)  # content-addressed copy (labelled only)
    excluded_reason: Mapped[str | None] = mapped_column(Text)  # e.g. seen under two labels
    phash: Mapped[str | None] = mapped_column(String(16))  # 64-bit perceptual hash, hex (bcc_pipeline.neardup)
    first_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_images_label_first_seen", "label", "first_seen_at"),)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    artifact_path: Mapped[str] = mapped_column(Text)
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    base_weights: Mapped[str] = mapped_column(Text)
    profile: Mapped[str] = mapped_column(String(32))
    image_size: Mapped[int] = mapped_column(Integer)
    preprocessing: Mapped[str] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest_hash: Mapped[str] = mapped_column(String(64))
    n_train: Mapped[int] = mapped_column(Integer)
    n_val: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    code_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    data_cutoff: Mapped[dt.datetime | None]  # newest images.first_seen_at it was trained on
    plots_dir: Mapped[str | None] = mapped_column(Text)
    # sigmoid(logit(p) / temperature) is the calibrated probability; None: uncalibrated (older versions)
    temperature: Mapped[float | None] = mapped_column(Float)
    # how the threshold was chosen: target, role, n, the two observed probabilities it lies between,
    # and the sensitivity it reaches on the holdout with its interval
    operating_point: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # package versions, git commit and dirty flag, CPU features, base-weights sha256, the four role
    # manifest hashes
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    # At most one champion, enforced by the database itself (a partial unique index).
    __table_args__ = (
        Index("uq_model_versions_one_champion", "status", unique=True,
              sqlite_where=text("status = 'champion'"), postgresql_where=text("status = 'champion'")),
    )


class Metric(Base):
    """(model_version, split, name) → value."""

    __tablename__ = "metrics"

    model_version: Mapped[str] = mapped_column(
        ForeignKey("model_versions.version", ondelete="CASCADE"), primary_key=True
    )
    split: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float | None] = mapped_column(Float)
    # the 95 % interval of value, the cases it rests on (k of n for proportions) and how it was computed
    lower: Mapped[float | None] = mapped_column(Float)
    upper: Mapped[float | None] = mapped_column(Float)
    n: Mapped[int | None] = mapped_column(Integer)
    k: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str | None] = mapped_column(String(64))


class Promotion(Base):
    """Append-only decision log. A rollback is a new row, never an edit."""

    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    from_version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.version"))
    to_version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.version"))
    candidate_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    # promoted | rejected | insufficient_evidence | awaiting_approval | manual | rollback
    decision: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decided_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ScoringRun(Base):
    __tablename__ = "scoring_runs"

    run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    model_version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.version"))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    status: Mapped[str] = mapped_column(String(16), default="running")
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # liveness: which process runs it, and when it last got on (a dead process's run becomes "abandoned")
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[dt.datetime | None]
    error: Mapped[str | None] = mapped_column(Text)  # why a failed run failed


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_sha256: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    prob_malignant: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    source_path: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(255))
    scored_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    backend: Mapped[str | None] = mapped_column(String(32))  # the back-end that computed prob_malignant
    precision: Mapped[str | None] = mapped_column(String(16))  # what it computed in (f32, bf16, int8, ...)

    __table_args__ = (
        UniqueConstraint("image_sha256", "model_version"),
        Index("ix_predictions_scored_at", "scored_at"),
    )


class Rejection(Base):
    """Files refused at intake or scoring, with the reason; unique per (run, path). ``path`` is shown as
    :func:`bcc_pipeline.files.display_path` shows it (reversible, so each file has its own row)."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(255))
    stage: Mapped[str] = mapped_column(String(16))  # intake | scoring
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    moved_to: Mapped[str | None] = mapped_column(Text)
    rejected_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # intake (migration 0003): where the file is to go, committed with the row before it moves;
    # ``moved_to`` is set once it has. ``move_error``: why it has not (yet) moved.
    dest: Mapped[str | None] = mapped_column(Text)
    move_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("run_id", "path"),)


# --------------------------------------------------------------------------------------------
_ENGINES: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (the UI) never block the writer
    cur.execute("PRAGMA busy_timeout=30000")  # concurrent shards wait instead of failing
    cur.close()


def get_engine(url: str) -> Engine:
    """One engine per URL per process. SQLite folders are created on demand."""
    engine = _ENGINES.get(url)
    if engine is not None:
        return engine
    try:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_pre_ping=True, future=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot use database URL {safe_url(url)}: {_error_line(exc, url)}") from exc
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


_MASK = "***"


def _secret_key(key: str) -> bool:
    """Whether a URL query parameter carries a credential (``password``, ``sslpassword``, tokens...)."""
    k = key.lower()
    return any(w in k for w in ("password", "secret", "token")) or k in ("pass", "passwd", "pwd")


def safe_url(url: Any) -> str:
    """``url`` (text or a SQLAlchemy URL) for messages and ``bcc config``: the password and every
    credential query parameter (``?password=``, ``?sslpassword=``, ...) masked as ``***``. Every message
    that shows a database URL goes through this."""
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
        query = {k: (_MASK if _secret_key(k) else v) for k, v in u.query.items()}
        return u.set(query=query).render_as_string(hide_password=True).replace("%2A%2A%2A", _MASK)
    except Exception:  # noqa: BLE001 - only for messages
        return "<unparseable url>"


def _secrets(url: Any) -> list[str]:
    """The credential values inside ``url`` (longest first), to be masked wherever they appear."""
    try:
        from urllib.parse import quote_plus

        from sqlalchemy.engine import make_url

        u = make_url(url)
    except Exception:  # noqa: BLE001
        return []
    values = [u.password] if u.password else []
    for k, v in u.query.items():
        if _secret_key(k):
            values.extend([v] if isinstance(v, str) else list(v))
    values = [str(v) for v in values if v]
    values += [quote_plus(v) for v in values]
    return sorted(set(values), key=len, reverse=True)


def _error_line(exc: BaseException, url: Any) -> str:
    """The first line of a driver's error, with any credential of ``url`` in it masked."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    for secret in _secrets(url):
        line = line.replace(secret, _MASK)
    return line


@contextmanager
def session_scope(url_or_engine: str | Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; DB errors become StoreError."""
    engine = get_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except SQLAlchemyError as exc:
        session.rollback()
        raise StoreError(f"database error on {safe_url(engine.url)}: {_error_line(exc, engine.url)}") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


PAGE_ROWS = 1000  # rows per INSERT statement on the bulk paths


def insert_rows(target: Session | Connection, model: type[Base],
                rows: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]], *, key: Sequence[str],
                update: Sequence[str] = (), returning: Any = None) -> list[Any] | int:
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
        stmt = stmt.on_conflict_do_update(index_elements=list(key), set_={c: stmt.excluded[c] for c in update})
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
    return "" if v is None else _csv_text(json.dumps(v))


def _csv_bool(v: Any) -> str:
    return "" if v is None else ("true" if v else "false")


def _csv_formatter(coltype: Any) -> Any:
    """How one column's values are written in PostgreSQL's CSV COPY format (unquoted empty is NULL)."""
    from sqlalchemy.sql import sqltypes

    if isinstance(coltype, sqltypes.JSON):
        return _csv_json
    if isinstance(coltype, sqltypes.Boolean):
        return _csv_bool
    if isinstance(coltype, sqltypes.Integer | sqltypes.Float | sqltypes.Numeric | sqltypes.DateTime | sqltypes.Date):
        return _csv_plain
    return _csv_text


def _pg_execute_values(conn: Connection, table: Any, rows: list[dict[str, Any]], key: Sequence[str],
                       update: Sequence[str], returning: Any) -> list[Any]:
    """PostgreSQL (psycopg2): COPY into a temporary staging table, then one INSERT .. SELECT .. ON CONFLICT,
    for big batches (about 2× ``execute_values``); ``execute_values`` pages for small ones."""
    from psycopg2.extras import Json, execute_values
    from sqlalchemy.sql import sqltypes

    cols = list(rows[0])
    q = conn.dialect.identifier_preparer.quote
    col_list = ", ".join(q(c) for c in cols)
    action = ("DO UPDATE SET " + ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in update)) if update else "DO NOTHING"
    tail = (f"ON CONFLICT ({', '.join(q(k) for k in key)}) {action}"
            + (f" RETURNING {q(returning.name)}" if returning is not None else ""))
    cur = conn.connection.dbapi_connection.cursor()
    try:
        if len(rows) >= COPY_MIN_ROWS:
            stage = q(f"_bcc_stage_{table.name}")
            cur.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} (LIKE {q(table.name)} INCLUDING DEFAULTS) "
                        "ON COMMIT DELETE ROWS")
            cur.execute(f"DELETE FROM {stage}")  # emptied at commit; this is for a second call in one transaction
            fmts = [(c, _csv_formatter(table.c[c].type)) for c in cols]
            data = io.StringIO("\n".join([",".join([f(r[c]) for c, f in fmts]) for r in rows]) + "\n")
            cur.copy_expert(f"COPY {stage} ({col_list}) FROM STDIN WITH (FORMAT csv)", data)
            cur.execute(f"INSERT INTO {q(table.name)} ({col_list}) SELECT {col_list} FROM {stage} {tail}")
            return [r[0] for r in cur.fetchall()] if returning is not None else []
        json_cols = {c for c in cols if isinstance(table.c[c].type, sqltypes.JSON)}
        sql = f"INSERT INTO {q(table.name)} ({col_list}) VALUES %s {tail}"
        args = [tuple(Json(r[c]) if c in json_cols and r[c] is not None else r[c] for c in cols) for r in rows]
        got = execute_values(cur, sql, args, page_size=PAGE_ROWS, fetch=returning is not None)
        return [r[0] for r in got] if returning is not None else []
    finally:
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
        marker = Path(home) / HOME_MARKER
        if not marker.exists():
            atomic_write(marker, "This folder is a BCC home; it is never scored as an inbox.\n")

    try:
        engine = get_engine(url)
        with engine.begin() as conn:
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate {safe_url(url)}: {_error_line(exc, url)}") from exc
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
        raise StoreError(f"database {safe_url(url)} predates the table(s) {', '.join(missing)}; "
                         "run `bcc db upgrade`")


# -- batch scoring (migration 0002) -----------------------------------------------------------
class InboxFile(Base):
    """The scoring ledger: one row per inbox file a scoring run took on, written in the same
    transaction as the batch's predictions, and updated with ``moved_to`` once the file has moved.

    ``status``: ``scored`` (this file's content got a new prediction), ``duplicate`` (the content
    already had a prediction from the run's model version) or ``rejected`` (quarantined, see
    ``reason``). ``path`` is relative to the inbox; ``path_key`` is the sha256 of its exact bytes (paths
    may be long or not valid UTF-8). ``dest`` is where the file is to go, ``moved_to`` where it went;
    ``move_error`` says why it could not be moved (it is then still in the inbox).
    """

    __tablename__ = "inbox_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(255))
    shard: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(Text)
    path_key: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    dest: Mapped[str | None] = mapped_column(Text)
    moved_to: Mapped[str | None] = mapped_column(Text)
    move_error: Mapped[str | None] = mapped_column(Text)
    move_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # failed moves so far
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("run_id", "path_key"),
        Index("ix_inbox_files_path_key", "path_key"),
        Index("ix_inbox_files_sha256", "sha256"),
    )


# -- the frozen holdout (migration 0004) ------------------------------------------------------
class HoldoutEvent(Base):
    """Append-only log of every change of the frozen holdout: who, when, why, the manifest hash
    before and after, and the counts. ``seq`` is unique, so two concurrent changes cannot both
    extend the same state: the history stays one line. The newest row names the current holdout."""

    __tablename__ = "holdout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    action: Mapped[str] = mapped_column(String(16))  # freeze | extend
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    old_hash: Mapped[str | None] = mapped_column(String(64))
    new_hash: Mapped[str] = mapped_column(String(64))
    manifest_path: Mapped[str] = mapped_column(Text)
    n_before: Mapped[int] = mapped_column(Integer)
    n_after: Mapped[int] = mapped_column(Integer)
    n_excluded: Mapped[int] = mapped_column(Integer)  # images kept out by this change, reasons in the manifest
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # per label after the change
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# The back-end tables live beside the code that uses them; imported here so that Base.metadata (what the
# migrations are checked against) is the whole schema whichever module is imported first.
from . import backend_store as _backend_store  # noqa: E402,F401 - registers its tables on Base
