"""Reading the prediction table back: the queries behind ``bcc predictions``, ``bcc status`` and the UI.

:func:`query_predictions` streams rows (newest first) from ``predictions`` (every prediction of every
model version) or from the ``latest_predictions`` view (the newest prediction per image).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from .config import Settings
from .errors import ConfigError, StoreError
from .store import ModelVersion, Prediction, get_engine, require_schema, utcnow

__all__ = [
    "PREDICTION_FIELDS",
    "SORT_KEYS",
    "count_predictions",
    "csv_chunks",
    "iso_utc",
    "json_chunks",
    "parse_since",
    "query_predictions",
]


def iso_utc(t: dt.datetime | str | None) -> str | None:
    """A stored time as ISO 8601 text with its UTC offset (SQLite hands back naive UTC datetimes, and
    text from views and aggregates)."""
    if t is None:
        return None
    if isinstance(t, str):
        t = dt.datetime.fromisoformat(t)
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).isoformat()


PREDICTION_FIELDS = (
    "sha256",
    "source_path",
    "model_version",
    "prob_malignant",
    "label",
    "threshold",
    "run_id",
    "scored_at",
    "model_status",
    "backend",
    "precision",
)

#: The ``latest_predictions`` view's columns: :data:`PREDICTION_FIELDS` (``sha256`` is ``image_sha256``
#: there) and the tiebreaker ``prediction_id``.
_VIEW_COLUMNS = (*("image_sha256" if f == "sha256" else f for f in PREDICTION_FIELDS), "prediction_id")


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``2026-11-26``, ``2026-11-26T02:00``, ``2026-11-26 02:00:00+01:00`` (no zone: UTC) or a relative
    ``90m``, ``12h``, ``7d``, ``2w`` ago. Returns an aware UTC datetime."""
    raw = (text or "").strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if len(raw) >= 2 and raw[-1].lower() in units and raw[:-1].isdigit():
        return (now or utcnow()) - dt.timedelta(seconds=int(raw[:-1]) * units[raw[-1].lower()])
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(
            f"--since {text!r}: use an ISO date/time (2026-11-26, 2026-11-26T02:00) or an age "
            "such as 12h or 7d"
        ) from exc
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


SORT_KEYS = ("scored_at", "prob_malignant", "label", "model_version", "source_path")
"""What :func:`query_predictions` can sort by (``sort="prob_malignant"``, ``"-scored_at"`` for descending)."""


def _filtered(
    settings: Settings,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    label: str | None,
    model_version: str | None,
    path_contains: str | None,
    latest: bool,
) -> tuple[Any, Any, Any]:
    """(select, its columns, the tiebreaker id column) with the filters applied."""
    from sqlalchemy import column, table

    if label is not None and label not in ("benign", "malignant"):
        raise ConfigError(f"label must be benign or malignant, got {label!r}")
    require_schema(settings.database_url)
    if latest:
        c = table("latest_predictions", *(column(name) for name in _VIEW_COLUMNS)).c
        q = select(c.image_sha256.label("sha256"), *(c[f] for f in PREDICTION_FIELDS if f != "sha256"))
        tiebreak = c.prediction_id
    else:
        p, m = Prediction.__table__.c, ModelVersion.__table__.c
        q = select(
            p.image_sha256.label("sha256"),
            p.source_path,
            p.model_version,
            p.prob_malignant,
            p.label,
            p.threshold,
            p.run_id,
            p.scored_at,
            m.status.label("model_status"),
            p.backend,
            p.precision,
        ).join_from(Prediction.__table__, ModelVersion.__table__, p.model_version == m.version)
        c, tiebreak = p, p.id
    naive = get_engine(settings.database_url).dialect.name == "sqlite"  # stored as naive UTC text there

    def utc(t: dt.datetime) -> dt.datetime:
        t = t.astimezone(dt.UTC) if t.tzinfo else t.replace(tzinfo=dt.UTC)
        return t.replace(tzinfo=None) if naive else t

    if since is not None:
        q = q.where(c.scored_at >= utc(since))
    if until is not None:
        q = q.where(c.scored_at < utc(until))
    if label is not None:
        q = q.where(c.label == label)
    if model_version is not None:
        q = q.where(c.model_version == model_version)
    if path_contains:
        q = q.where(func.lower(c.source_path).contains(path_contains.lower(), autoescape=True))
    return q, c, tiebreak


def query_predictions(
    settings: Settings,
    *,
    since: dt.datetime | None = None,
    label: str | None = None,
    model_version: str | None = None,
    limit: int | None = None,
    latest: bool = False,
    until: dt.datetime | None = None,
    path_contains: str | None = None,
    offset: int = 0,
    sort: str = "-scored_at",
) -> Iterable[dict[str, Any]]:
    """Predictions as dicts with :data:`PREDICTION_FIELDS` (streamed, not all in memory), newest first
    unless ``sort`` says otherwise (a :data:`SORT_KEYS` name, ``-`` in front for descending; ties are
    broken newest row first, so pages are stable).

    From the ``predictions`` table (every prediction of every model version), or with ``latest=True``
    from the ``latest_predictions`` view (the newest prediction per image). Filters: scored at or after
    ``since`` and before ``until``, ``label``, ``model_version``, ``path_contains`` (a case-insensitive
    substring of the source path; ``%`` and ``_`` match themselves). ``offset`` rows are skipped first.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must not be negative, got {limit}")
    if offset < 0:
        raise ConfigError(f"offset must not be negative, got {offset}")
    key = sort.removeprefix("-")
    if key not in SORT_KEYS:
        raise ConfigError(
            f"cannot sort by {sort!r}; use one of {', '.join(SORT_KEYS)} (a leading - for descending)"
        )
    q, c, tiebreak = _filtered(
        settings,
        since=since,
        until=until,
        label=label,
        model_version=model_version,
        path_contains=path_contains,
        latest=latest,
    )
    col = c[key]
    q = q.order_by(col.desc() if sort.startswith("-") else col.asc(), tiebreak.desc())
    if offset:
        q = q.offset(offset)
    if limit is not None:
        q = q.limit(limit)

    def rows() -> Iterable[dict[str, Any]]:
        engine = get_engine(settings.database_url)
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=1000).execute(q)
                for r in result:
                    d = dict(r._mapping)
                    d["scored_at"] = iso_utc(d["scored_at"])
                    d["prob_malignant"] = float(d["prob_malignant"])
                    d["threshold"] = float(d["threshold"])
                    yield d
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read predictions: {str(exc).splitlines()[0]}") from exc

    return rows()


def count_predictions(
    settings: Settings,
    *,
    since: dt.datetime | None = None,
    label: str | None = None,
    model_version: str | None = None,
    latest: bool = False,
    until: dt.datetime | None = None,
    path_contains: str | None = None,
) -> int:
    """How many rows :func:`query_predictions` returns for the same filters (without limit/offset)."""
    q, _, _ = _filtered(
        settings,
        since=since,
        until=until,
        label=label,
        model_version=model_version,
        path_contains=path_contains,
        latest=latest,
    )
    try:
        with get_engine(settings.database_url).connect() as conn:
            return int(conn.execute(select(func.count()).select_from(q.subquery())).scalar_one())
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot count predictions: {str(exc).splitlines()[0]}") from exc


def json_chunks(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Rows as one JSON list, a row a line, in pieces (streamed): what ``bcc predictions --format json``
    prints and ``/bcc/api/predictions`` sends, byte for byte."""
    yield "["
    for n, row in enumerate(rows):
        yield ("," if n else "") + "\n  " + json.dumps(row)
    yield "\n]\n"


#: What a spreadsheet takes for the start of a formula (OWASP's CSV injection list; tab and carriage
#: return never reach here: display_path escapes them).
_FORMULA_START = ("=", "+", "-", "@")


def _spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (a run id ``=HYPERLINK(...)`` chosen when a run
    was triggered, a relative path) with a ``'`` in front, which spreadsheets show as text; numbers, and
    the absolute paths and labels the pipeline writes, pass unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_chunks(rows: Iterable[dict[str, Any]], every: int = 500) -> Iterator[str]:
    """Rows as CSV with a header of :data:`PREDICTION_FIELDS`, in pieces of ``every`` rows (streamed): what
    ``bcc predictions --format csv`` prints and ``/bcc/predictions.csv`` sends. A text cell a spreadsheet
    would take for a formula is prefixed with ``'`` (the JSON form keeps every value exactly)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(PREDICTION_FIELDS), lineterminator="\n")
    writer.writeheader()
    for n, row in enumerate(rows, 1):
        writer.writerow({k: _spreadsheet_safe(v) for k, v in row.items()})
        if n % every == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()
