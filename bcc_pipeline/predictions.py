"""Reading the prediction table back: the queries behind ``bcc predictions``, ``bcc status`` and the UI.

:func:`query_predictions` streams rows (newest first) from ``predictions`` (every prediction of every
model version) or from the ``latest_predictions`` view (the newest prediction per image).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from .config import Settings
from .errors import ConfigError, StoreError
from .store import ModelVersion, Prediction, get_engine, require_schema, utcnow

__all__ = ["PREDICTION_FIELDS", "parse_since", "query_predictions"]


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


PREDICTION_FIELDS = ("sha256", "source_path", "model_version", "prob_malignant", "label", "threshold",
                     "run_id", "scored_at", "model_status", "backend", "precision")


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
        raise ConfigError(f"--since {text!r}: use an ISO date/time (2026-11-26, 2026-11-26T02:00) or an age "
                          "such as 12h or 7d") from exc
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def query_predictions(settings: Settings, *, since: dt.datetime | None = None, label: str | None = None,
                      model_version: str | None = None, limit: int | None = None,
                      latest: bool = False) -> Iterable[dict[str, Any]]:
    """Predictions, newest first, as dicts with :data:`PREDICTION_FIELDS` (streamed, not all in memory).

    From the ``predictions`` table (every prediction of every model version), or with ``latest=True``
    from the ``latest_predictions`` view (the newest prediction per image).
    """
    from sqlalchemy import column, table

    if label is not None and label not in ("benign", "malignant"):
        raise ConfigError(f"label must be benign or malignant, got {label!r}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must not be negative, got {limit}")
    require_schema(settings.database_url)
    if latest:
        v = table("latest_predictions", *(column(c) for c in (
            "image_sha256", "source_path", "model_version", "prob_malignant", "label", "threshold", "run_id",
            "scored_at", "model_status", "prediction_id", "backend", "precision")))
        c = v.c
        q = select(c.image_sha256.label("sha256"), c.source_path, c.model_version, c.prob_malignant, c.label,
                   c.threshold, c.run_id, c.scored_at, c.model_status, c.backend, c.precision).order_by(
            c.scored_at.desc(), c.prediction_id.desc())
    else:
        p, m = Prediction.__table__.c, ModelVersion.__table__.c
        q = (select(p.image_sha256.label("sha256"), p.source_path, p.model_version, p.prob_malignant, p.label,
                    p.threshold, p.run_id, p.scored_at, m.status.label("model_status"), p.backend, p.precision)
             .join_from(Prediction.__table__, ModelVersion.__table__, p.model_version == m.version)
             .order_by(p.scored_at.desc(), p.id.desc()))
        c = p
    if since is not None:
        since_utc = since.astimezone(dt.UTC) if since.tzinfo else since.replace(tzinfo=dt.UTC)
        if get_engine(settings.database_url).dialect.name == "sqlite":
            since_utc = since_utc.replace(tzinfo=None)  # stored as naive UTC text there
        q = q.where(c.scored_at >= since_utc)
    if label is not None:
        q = q.where(c.label == label)
    if model_version is not None:
        q = q.where(c.model_version == model_version)
    if limit is not None:
        q = q.limit(limit)

    def rows() -> Iterable[dict[str, Any]]:
        engine = get_engine(settings.database_url)
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=1000).execute(q)
                for r in result:
                    d = dict(r._mapping)
                    when = d["scored_at"]
                    if isinstance(when, str):  # a view column on SQLite comes back as text
                        when = dt.datetime.fromisoformat(when)
                    d["scored_at"] = _aware(when).isoformat() if when is not None else None
                    d["prob_malignant"] = float(d["prob_malignant"])
                    d["threshold"] = float(d["threshold"])
                    yield d
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read predictions: {str(exc).splitlines()[0]}") from exc

    return rows()
