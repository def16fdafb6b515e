"""The database plumbing every SQL statement of batch scoring shares: one transaction whose database errors
become :class:`StoreError`, and the schema check. The statements themselves are in :mod:`.ledger` (the
inbox ledger and a batch's commit) and :mod:`.run_records` (the ``scoring_runs`` rows)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from .. import store
from ..errors import StoreError

__all__ = ["require_schema", "transaction"]


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()`` whose database errors become :class:`StoreError`, naming the database (its URL,
    password masked): "database or disk is full" says where."""
    try:
        with engine.begin() as conn:
            yield conn
    except SQLAlchemyError as exc:
        where = store.safe_url(engine.url)
        raise StoreError(f"database error while scoring ({where}): {str(exc).splitlines()[0]}") from exc


def require_schema(url: str) -> None:
    """The BCC schema, at least at the revision whose columns scoring writes (0008: the ledger's
    ``src_identity``); an older one is named with the command that upgrades it."""
    store.require_schema(url, tables=("inbox_files",))
    from sqlalchemy import inspect

    try:
        cols = {c["name"] for c in inspect(store.get_engine(url)).get_columns("inbox_files")}
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read the schema: {str(exc).splitlines()[0]}") from exc
    if "src_identity" not in cols:
        raise StoreError(
            "the database predates inbox_files.src_identity (migration 0008); run `bcc db upgrade`"
        )
