import datetime as dt

import pytest
from sqlalchemy import func, inspect, select

from bcc_pipeline import store
from bcc_pipeline.errors import StoreError
from bcc_pipeline.store import ImageRecord, ModelVersion, Prediction, insert_rows, session_scope
from tests.support import model_version_row


def _mv(version: str, status: str = "candidate") -> ModelVersion:
    return model_version_row(
        version,
        status,
        artifact_path="/x/model.keras",
        profile="demo",
        preprocessing="p",
        hyperparameters={"epochs": 1},
        manifest_hash="m" * 64,
        n_train=1,
        n_val=1,
    )


def test_upgrade_creates_schema_and_is_repeatable(db_url):
    assert store.current_revision(db_url) is None
    with pytest.raises(StoreError, match="bcc db upgrade"):
        store.require_schema(db_url)
    rev = store.upgrade(db_url)
    assert rev and store.upgrade(db_url) == rev
    tables = set(inspect(store.get_engine(db_url)).get_table_names())
    assert {
        "images",
        "model_versions",
        "metrics",
        "promotions",
        "scoring_runs",
        "predictions",
        "rejections",
    } <= tables
    store.require_schema(db_url)


def test_schema_matches_orm(migrated_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.get_engine(migrated_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), store.Base.metadata)
    assert diff == []


def test_insert_rows_with_a_session_is_idempotent(migrated_url):
    with session_scope(migrated_url) as s:
        s.add(_mv("v1"))
    row = {
        "image_sha256": "a" * 64,
        "model_version": "v1",
        "prob_malignant": 0.7,
        "label": "malignant",
        "threshold": 0.5,
        "source_path": "x.png",
        "run_id": "r1",
        "scored_at": store.utcnow(),
    }
    for _ in range(3):
        with session_scope(migrated_url) as s:
            insert_rows(s, Prediction, [row], key=("image_sha256", "model_version"))
    with session_scope(migrated_url) as s:
        assert s.scalar(select(func.count()).select_from(Prediction)) == 1
    # with update columns the existing row takes the new values, still one row
    with session_scope(migrated_url) as s:
        insert_rows(
            s,
            Prediction,
            [dict(row, prob_malignant=0.9)],
            key=("image_sha256", "model_version"),
            update=("prob_malignant",),
        )
    with session_scope(migrated_url) as s:
        assert s.scalars(select(Prediction.prob_malignant)).all() == [0.9]
        assert insert_rows(s, Prediction, [], key=("image_sha256", "model_version")) == 0


def test_insert_rows_chunks_many_rows(migrated_url):
    rows = [
        {
            "sha256": f"{i:064x}",
            "label": "benign",
            "group_id": None,
            "width": 1,
            "height": 1,
            "format": "PNG",
            "source_path": f"{i}.png",
            "first_seen_at": store.utcnow(),
        }
        for i in range(5000)
    ]
    with session_scope(migrated_url) as s:
        assert insert_rows(s, ImageRecord, rows, key=("sha256",)) == 5000
        assert s.scalar(select(func.count()).select_from(ImageRecord)) == 5000


@pytest.mark.parametrize("count", [3, 700])  # 700: PostgreSQL takes the COPY path (store.COPY_MIN_ROWS)
def test_insert_rows_round_trips_awkward_values_and_returns_what_it_wrote(migrated_url, count):
    """Bulk inserts keep NULL apart from '', keep quotes, commas, newlines, backslashes and unicode,
    JSON and timezone-aware datetimes; RETURNING lists only rows actually written; a second call in the
    same transaction sees none of the first one's staging rows."""
    from bcc_pipeline.store import ScoringRun, get_engine

    assert 3 < store.COPY_MIN_ROWS <= 700  # the two params exercise both PostgreSQL paths
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    awkward = ["", "a,b", 'say "hi"', "two\nlines", "back\\slash \\N", "ünïcødé ✓", "\\N", " "]
    rows = [
        {
            "run_id": f"r{i:04d}",
            "model_version": "v1",
            "started_at": when,
            "finished_at": None,
            "status": awkward[i % len(awkward)],
            "counts": {"n": i, "s": awkward[i % len(awkward)], "x": None},
        }
        for i in range(count)
    ]
    engine = get_engine(migrated_url)
    with session_scope(migrated_url) as s:
        s.add(_mv("v1"))
    rt = ScoringRun.__table__
    with engine.begin() as conn:
        first = insert_rows(conn, ScoringRun, rows[: count // 2 + 1], key=("run_id",), returning=rt.c.run_id)
        second = insert_rows(conn, ScoringRun, rows, key=("run_id",), returning=rt.c.run_id)
    assert sorted(first) == [r["run_id"] for r in rows[: count // 2 + 1]]
    assert sorted(second) == [r["run_id"] for r in rows[count // 2 + 1 :]]
    with engine.begin() as conn:
        assert insert_rows(conn, ScoringRun, rows, key=("run_id",), returning=rt.c.run_id) == []
        got = {r.run_id: r for r in conn.execute(select(rt))}
    assert len(got) == count
    for r in rows:
        g = got[r["run_id"]]
        assert g.status == r["status"] and g.counts == r["counts"] and g.finished_at is None
        assert g.started_at.replace(tzinfo=g.started_at.tzinfo or dt.UTC) == when
    # DO UPDATE: the existing rows take the new values
    with engine.begin() as conn:
        insert_rows(
            conn, ScoringRun, [dict(r, status="finished") for r in rows], key=("run_id",), update=("status",)
        )
        assert set(conn.execute(select(rt.c.status)).scalars()) == {"finished"}


def test_database_allows_one_champion_only(migrated_url):
    with session_scope(migrated_url) as s:
        s.add_all([_mv("v1", "champion"), _mv("v2", "retired"), _mv("v3", "retired")])
    with pytest.raises(StoreError, match="database error"):
        with session_scope(migrated_url) as s:
            s.get(ModelVersion, "v2").status = "champion"


def test_datetimes_round_trip_as_utc(migrated_url):
    t = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    with session_scope(migrated_url) as s:
        m = _mv("v1")
        m.created_at = t
        s.add(m)
    with session_scope(migrated_url) as s:
        got = s.get(ModelVersion, "v1").created_at
        assert got.replace(tzinfo=got.tzinfo or dt.UTC) == t


def test_bad_url_is_a_store_error(tmp_path):
    with pytest.raises(StoreError):
        store.upgrade("postgresql+psycopg2://nobody@127.0.0.1:1/nothing")
    with pytest.raises(StoreError):
        store.get_engine("notadialect://x")
    # round 27: postgresql:// asks for psycopg (3), not installed here: the driver to use is named
    from bcc_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"driver is not installed.*postgresql\+psycopg2://"):
        store.get_engine("postgresql://u:hunter2@127.0.0.1:1/db")
    # round 25: an asyncio driver failed on first use with "greenlet_spawn has not been called"
    with pytest.raises(StoreError, match=r"asyncpg is an asyncio driver.*postgresql\+psycopg2") as info:
        store.get_engine("postgresql+asyncpg://u:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(info.value)


# -- credentials never shown ------------------------------------------------------------------------
_SECRET_URL = (
    "postgresql+psycopg2://bcc:hunter2pw@127.0.0.1:1/bcc"
    "?password=querysecret&sslpassword=sslsecret&sslmode=disable&connect_timeout=2"
)


def test_safe_url_masks_every_credential_form() -> None:
    from bcc_pipeline.store import safe_url

    shown = safe_url(_SECRET_URL)
    for secret in ("hunter2pw", "querysecret", "sslsecret"):
        assert secret not in shown
    assert "sslmode=disable" in shown and "bcc:***@127.0.0.1:1/bcc" in shown
    assert "PASSWORD=***" in safe_url("postgresql://h/db?PASSWORD=upper")
    # whole connection strings (which the driver uses, password included), passphrases and keys
    for url in (
        "postgresql+psycopg2://u@h/db?dsn=password%3Dhunter2",
        "mssql+pyodbc://?odbc_connect=DRIVER%3Dx%3BPWD%3Dhunter2%3B",
        "sqlite+pysqlcipher://:@/x.db?key=hunter2",
        "sqlite:///x.db?passphrase=hunter2",
    ):
        assert "hunter2" not in safe_url(url), url
    assert safe_url("not a url at all") == "<unparseable url>"
    # round 25: a misspelt key holds the password typed all the same; a password inside an option value
    for url in (
        "postgresql://u@h/db?passwrd=hunter2",
        "postgresql://u@h/db?options=-c%20password%3Dhunter2",
        "postgresql://u@h/db?options=-c+password=hunter2&sslmode=require",
    ):
        assert "hunter2" not in safe_url(url), url
    assert "sslmode=require" in safe_url("postgresql://u@h/db?options=-c+password=x&sslmode=require")


def _connection_error(url: str) -> str:
    """The error a schema check gives for a database that cannot be reached (it says so)."""
    from bcc_pipeline.errors import StoreError
    from bcc_pipeline.store import dispose_engine, require_schema

    try:
        with pytest.raises(StoreError) as info:
            require_schema(url)
    finally:
        dispose_engine(url)
    text = str(info.value)
    assert "cannot connect to" in text
    return text


def test_a_failing_connection_never_shows_the_password() -> None:
    text = _connection_error(_SECRET_URL)
    for secret in ("hunter2pw", "querysecret", "sslsecret"):
        assert secret not in text
    # round 25: the driver's refusal of a misspelt key, or of an option, quoted the password typed there
    for url in (
        "postgresql+psycopg2://u@127.0.0.1:1/db?passwrd=hunter2typo&connect_timeout=2",
        "postgresql+psycopg2://u@127.0.0.1:1/db?options=-c%20password%3Dhunter2opt&connect_timeout=2",
    ):
        text = _connection_error(url)
        assert "hunter2" not in text, text


def test_a_password_with_an_unencoded_at_sign_is_masked_whole() -> None:
    """A password with an '@' not written ``%40``: make_url cuts it at the first '@' and takes the rest
    for the host, which the driver then names in its error; no piece of it is ever shown."""
    from sqlalchemy.engine import make_url

    from bcc_pipeline.store import safe_url

    url = "postgresql+psycopg2://bcc:Pa55@Secret-Tail-XYZ@127.0.0.1:1/bcc?connect_timeout=2"
    for shown in (safe_url(url), safe_url(make_url(url))):
        assert "bcc:***@127.0.0.1:1/bcc" in shown, shown
    text = _connection_error(url)
    for piece in ("Pa55", "Secret", "Tail", "XYZ"):
        assert piece not in text and piece not in safe_url(url), (piece, text)
    # a normal URL and a user name with an '@' (user@server) keep their form
    assert safe_url("postgresql://admin@srv:pw@h/db") == "postgresql://admin%40srv:***@h/db"
    assert safe_url("postgresql://u:p%40x@h/db") == "postgresql://u:***@h/db"


def test_a_credential_inside_a_connection_string_is_masked_in_errors() -> None:
    """A password inside ``?dsn=`` (psycopg2 uses it) never appears in a failing connection's error."""
    from bcc_pipeline.store import _error_line

    url = "postgresql+psycopg2://u@127.0.0.1:1/db?dsn=host%3D127.0.0.1+password%3D'hunter2'"
    error = RuntimeError("connection failed: host=127.0.0.1 password='hunter2' port=1\nmore")
    assert "hunter2" not in _error_line(error, url)


@pytest.mark.parametrize("count", [3, 700])  # execute_values pages; COPY
def test_a_connection_dropped_mid_session_is_a_database_error_not_an_unexpected_one(pg_url, count) -> None:
    """Round 26: PostgreSQL dropping the connection during intake gave `unexpected error: OperationalError`
    (or `InterfaceError ... connection already closed`): the bulk insert's raw psycopg2 cursor raised the
    driver's own error, which no handler took for a database error, and closing that cursor raised again.
    It is said as a database error naming the database now, and the next session gets a live connection."""
    from sqlalchemy import text

    from bcc_pipeline.store import ScoringRun, get_engine

    store.upgrade(pg_url)
    with session_scope(pg_url) as s:
        s.add(_mv("v1"))
    rows = [
        {
            "run_id": f"r{i}",
            "model_version": "v1",
            "status": "finished",
            "counts": {},
            "started_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            "finished_at": None,
        }
        for i in range(count)
    ]
    with pytest.raises(StoreError, match=r"^database error on postgresql\S*: \(psycopg2.OperationalError\)"):
        with session_scope(pg_url) as s:
            pid = s.execute(text("SELECT pg_backend_pid()")).scalar()
            with get_engine(pg_url).connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            insert_rows(s, ScoringRun, rows, key=("run_id",))
    with session_scope(pg_url) as s:  # the dead connection was let go
        insert_rows(s, ScoringRun, rows, key=("run_id",))
        assert s.execute(text("SELECT count(*) FROM scoring_runs")).scalar() == count


def test_settings_repr_masks_the_database_url(make_settings) -> None:
    s = make_settings(_SECRET_URL)
    assert "querysecret" not in repr(s) and "hunter2pw" not in repr(s) and "sslsecret" not in repr(s)


@pytest.mark.parametrize("count", [1, 3, 700])  # 1: the ORM; 3: execute_values; 700: COPY (on PostgreSQL)
def test_json_columns_store_an_undefined_number_as_null(migrated_url, count):
    """A NaN in a JSON value (an undefined metric in gate evidence or run counts) is stored as null on
    every backend and insert path; PostgreSQL would refuse the whole row otherwise."""
    from bcc_pipeline.store import ScoringRun, get_engine

    with session_scope(migrated_url) as s:
        s.add(_mv("v1"))
    counts = {"auc": float("nan"), "inf": float("inf"), "nested": [1.0, float("nan")], "ok": 0.5}
    want = {"auc": None, "inf": None, "nested": [1.0, None], "ok": 0.5}
    if count == 1:
        with session_scope(migrated_url) as s:
            s.add(ScoringRun(run_id="r0", model_version="v1", status="finished", counts=counts))
    else:
        rows = [
            {
                "run_id": f"r{i}",
                "model_version": "v1",
                "status": "finished",
                "counts": counts,
                "started_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                "finished_at": None,
            }
            for i in range(count)
        ]
        with get_engine(migrated_url).begin() as conn:
            insert_rows(conn, ScoringRun, rows, key=("run_id",))
    with session_scope(migrated_url) as s:
        stored = list(s.scalars(select(ScoringRun.counts)))
    assert len(stored) == count and all(c == want for c in stored)


def test_a_database_error_raised_in_an_autoflush_keeps_its_cause() -> None:
    """Round 23: SQLAlchemy puts a note first when a flush before a query fails ("(raised as a result of
    Query-invoked autoflush; ..."), and the one-line error kept only that note: "database is locked" or
    "database or disk is full" was lost. The driver's error is the line now."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from bcc_pipeline.store import _error_line

    exc = OperationalError("INSERT INTO images ...", {}, sqlite3.OperationalError("database is locked"))
    exc.add_detail(
        "raised as a result of Query-invoked autoflush; consider using a session.no_autoflush block if this "
        "flush is occurring prematurely"
    )
    assert str(exc).startswith("(raised as a result of Query-invoked autoflush")
    assert _error_line(exc, "sqlite:///x.db") == "(sqlite3.OperationalError) database is locked"
