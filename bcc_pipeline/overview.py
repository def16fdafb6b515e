"""Read-only summaries for people: model versions with their quality, scoring runs, rejections and the
inbox. The queries behind ``bcc models``, ``bcc status`` and the Airflow UI pages; nothing here writes.

Every function takes :class:`~bcc_pipeline.config.Settings` and returns plain JSON-able dicts and lists
(timestamps as ISO 8601 UTC text). Importing this module loads no TensorFlow, Keras or OpenCV (the
Airflow api-server imports it); :func:`inbox_status` loads the scoring module, and with it OpenCV,
when it is first called.

Files named in a request (a plot, an archived image) are only ever served through :func:`plot_file`
and :func:`archived_image`: the file must exist, resolve (links followed) to a place inside its own
folder and inside ``BCC_HOME``, or the answer is ``None``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from .config import Settings
from .errors import BCCError, ConfigError, StoreError
from .predictions import iso_utc
from .store import (
    InboxFile,
    Metric,
    ModelVersion,
    Promotion,
    Rejection,
    ScoringRun,
    get_engine,
    require_schema,
)

__all__ = [
    "PLOT_NAMES",
    "archived_image",
    "archived_images",
    "champion_summary",
    "inbox_status",
    "model_version_detail",
    "model_versions",
    "plot_file",
    "promotion_log",
    "quarantine_entries",
    "rejection_summary",
    "scoring_runs",
]

PLOT_NAMES = ("training_curves.png", "confusion_matrix.png", "roc.png", "reliability.png")
"""The plots evaluation writes into a model version's ``plots_dir``, in the order they are shown."""

_PLOT_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}\.png")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _read(settings: Settings, what: str, fn: Any) -> Any:
    """Run ``fn(connection)`` on the project database; database errors become a StoreError."""
    require_schema(settings.database_url)
    try:
        with get_engine(settings.database_url).connect() as conn:
            return fn(conn)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read {what}: {str(exc).splitlines()[0]}") from exc


def _plots(plots_dir: str | None) -> list[str]:
    """Names of the PNG files in ``plots_dir`` (the known plots first, in :data:`PLOT_NAMES` order)."""
    if not plots_dir or not os.path.isdir(plots_dir):
        return []
    names = sorted(n for n in os.listdir(plots_dir) if _PLOT_NAME.fullmatch(n))
    return [n for n in PLOT_NAMES if n in names] + [n for n in names if n not in PLOT_NAMES]


# -- model versions ---------------------------------------------------------------------------
def model_versions(settings: Settings, *, champion_first: bool = False) -> list[dict[str, Any]]:
    """Every model version, newest first (or the champion first, then newest first).

    Each row: the version's registry fields (with ``temperature``, ``operating_point``, ``lineage`` and
    ``manifest_hashes``, the four role manifest hashes), ``validation`` and ``holdout`` (its metrics there),
    ``intervals`` (``{name: {value, lower, upper, n, k, method}}`` of the holdout metrics that carry a 95 %
    interval), ``metrics`` (``{split: {name: value}}`` for every split evaluated) and ``plots`` (file names
    in ``plots_dir``).
    """
    mv, m = ModelVersion.__table__.c, Metric.__table__.c

    def q(conn: Any) -> list[dict[str, Any]]:
        order = [mv.created_at.desc(), mv.version.desc()]
        if champion_first:
            order.insert(0, (mv.status == "champion").desc())
        versions = conn.execute(select(ModelVersion.__table__).order_by(*order)).all()
        metrics: dict[str, dict[str, dict[str, float | None]]] = {}
        intervals: dict[str, dict[str, dict[str, Any]]] = {}
        for r in conn.execute(
            select(m.model_version, m.split, m.name, m.value, m.lower, m.upper, m.n, m.k, m.method)
        ):
            metrics.setdefault(r.model_version, {}).setdefault(r.split, {})[r.name] = r.value
            if r.split == "holdout" and r.method is not None:
                intervals.setdefault(r.model_version, {})[r.name] = {
                    "value": r.value,
                    "lower": r.lower,
                    "upper": r.upper,
                    "n": r.n,
                    "k": r.k,
                    "method": r.method,
                }
        return [
            {
                "version": v.version,
                "status": v.status,
                "created_at": iso_utc(v.created_at),
                "profile": v.profile,
                "image_size": v.image_size,
                "base_weights": v.base_weights,
                "threshold": v.threshold,
                "n_train": v.n_train,
                "n_val": v.n_val,
                "manifest_hash": v.manifest_hash,
                "artifact_path": v.artifact_path,
                "artifact_sha256": v.artifact_sha256,
                "plots_dir": v.plots_dir,
                "code_version": v.code_version,
                "temperature": v.temperature,
                "operating_point": v.operating_point,
                "manifest_hashes": (v.lineage or {}).get("manifests", {}),
                "lineage": v.lineage,
                "validation": metrics.get(v.version, {}).get("validation", {}),
                "holdout": metrics.get(v.version, {}).get("holdout", {}),
                "intervals": intervals.get(v.version, {}),
                "metrics": metrics.get(v.version, {}),
                "plots": _plots(v.plots_dir),
            }
            for v in versions
        ]

    return _read(settings, "model versions", q)


def champion_summary(settings: Settings) -> dict[str, Any] | None:
    """The champion with its validation and holdout metrics, holdout intervals, temperature, manifest
    hashes and the paths of its plots, or None."""
    for v in model_versions(settings, champion_first=True):
        if v["status"] != "champion":
            return None
        plots = sorted(str(p) for p in Path(v["plots_dir"]).glob("*.png")) if v["plots_dir"] else []
        return {
            k: v[k]
            for k in (
                "version",
                "created_at",
                "profile",
                "image_size",
                "threshold",
                "temperature",
                "n_train",
                "n_val",
                "validation",
                "holdout",
                "intervals",
                "manifest_hashes",
            )
        } | {"plots": plots}
    return None


def promotion_log(settings: Settings, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The promotion log (every gate decision, manual promotion and rollback), newest first."""
    p = Promotion.__table__.c

    def q(conn: Any) -> list[dict[str, Any]]:
        stmt = select(Promotion.__table__).order_by(p.decided_at.desc(), p.id.desc()).limit(limit)
        return [
            {
                "decided_at": iso_utc(r.decided_at),
                "decision": r.decision,
                "candidate_version": r.candidate_version,
                "from_version": r.from_version,
                "to_version": r.to_version,
                "actor": r.actor,
                "reason": r.reason,
                "evidence": r.evidence,
            }
            for r in conn.execute(stmt)
        ]

    return _read(settings, "the promotion log", q)


def model_version_detail(settings: Settings, version: str) -> dict[str, Any] | None:
    """One model version (as :func:`model_versions` gives it, ``m``), the promotion-log ``decisions`` about
    it, and its model ``card`` (markdown; ``card_error`` says why there is none: an old or partial
    version). None when there is no such version. The version page and ``/bcc/api/models/<version>``."""
    m = next((m for m in model_versions(settings) if m["version"] == version), None)
    if m is None:
        return None
    card, card_error = None, None
    try:
        from . import model_card

        card = model_card.render(settings, version)
    except (BCCError, OSError, KeyError, TypeError, ValueError) as exc:
        card_error = f"{type(exc).__name__}: {exc}"
    log = promotion_log(settings)
    decisions = [p for p in log if version in (p["candidate_version"], p["to_version"])]
    return {"m": m, "decisions": decisions, "card": card, "card_error": card_error}


def plot_file(settings: Settings, version: str, name: str) -> Path | None:
    """The plot ``name`` of model ``version`` when it exists inside that version's plots folder and inside
    ``BCC_HOME``; None otherwise. A name that is not a plain ``*.png`` file name raises ConfigError."""
    if not _PLOT_NAME.fullmatch(name or ""):
        raise ConfigError("a plot name is a plain file name ending in .png")
    plots_dir = _read(
        settings,
        "model versions",
        lambda conn: conn.execute(
            select(ModelVersion.plots_dir).where(ModelVersion.version == version)
        ).scalar(),
    )
    if not plots_dir:
        return None
    return _contained(Path(plots_dir) / name, Path(plots_dir), settings.home)


# -- scoring runs and rejections ----------------------------------------------------------------
def scoring_runs(settings: Settings, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Scoring runs, newest first, with their counts (scored, duplicates, rejected, ...)."""
    r = ScoringRun.__table__.c

    def q(conn: Any) -> list[dict[str, Any]]:
        stmt = select(ScoringRun.__table__).order_by(r.started_at.desc(), r.run_id.desc()).limit(limit)
        runs = [
            {
                "run_id": x.run_id,
                "model_version": x.model_version,
                "status": x.status,
                "started_at": iso_utc(x.started_at),
                "finished_at": iso_utc(x.finished_at),
                "counts": dict(x.counts or {}),
                "error": x.error,
            }
            for x in conn.execute(stmt)
        ]
        # a run never finalized (killed, failed, still running) has only its planned count: what its ledger
        # holds so far is what it did (before, `bcc status` showed "0 scored" for a run that scored 13)
        open_runs = [x for x in runs if "scored" not in x["counts"]]
        if open_runs:
            t = InboxFile.__table__.c
            done = conn.execute(
                select(t.run_id, t.status, func.count())
                .where(t.run_id.in_([x["run_id"] for x in open_runs]))
                .group_by(t.run_id, t.status)
            ).all()
            for x in open_runs:
                mine = {status: n for run_id, status, n in done if run_id == x["run_id"]}
                x["counts"].update(
                    scored=mine.get("scored", 0),
                    duplicates=mine.get("duplicate", 0),
                    rejected=mine.get("rejected", 0),
                    so_far=True,
                )
        return runs

    return _read(settings, "scoring runs", q)


def rejection_summary(
    settings: Settings, *, run_id: str | None = None, examples: int = 3
) -> list[dict[str, Any]]:
    """Rejections grouped by (stage, reason), the most frequent first: ``{"stage", "reason", "count",
    "runs", "last_at", "examples"}`` (``examples``: up to that many of the newest paths)."""
    t = Rejection.__table__.c

    def q(conn: Any) -> list[dict[str, Any]]:
        stmt = select(
            t.stage,
            t.reason,
            func.count().label("n"),
            func.count(func.distinct(t.run_id)).label("runs"),
            func.max(t.rejected_at).label("last_at"),
        ).group_by(t.stage, t.reason)
        if run_id is not None:
            stmt = stmt.where(t.run_id == run_id)
        groups = conn.execute(stmt.order_by(func.count().desc(), t.reason)).all()
        out = []
        for g in groups:
            ex = select(t.path).where(t.stage == g.stage, t.reason == g.reason)
            if run_id is not None:
                ex = ex.where(t.run_id == run_id)
            paths = (
                conn.execute(ex.order_by(t.rejected_at.desc(), t.id.desc()).limit(examples)).scalars().all()
            )
            out.append(
                {
                    "stage": g.stage,
                    "reason": g.reason,
                    "count": int(g.n),
                    "runs": int(g.runs),
                    "last_at": iso_utc(g.last_at),
                    "examples": list(paths),
                }
            )
        return out

    return _read(settings, "rejections", q)


def quarantine_entries(settings: Settings, *, limit: int = 500) -> list[dict[str, Any]]:
    """Quarantined files, newest first: ``{"run_id", "stage", "path", "reason", "moved_to",
    "rejected_at", "present"}`` (``present``: the quarantined file is still there)."""
    t = Rejection.__table__.c

    def q(conn: Any) -> list[dict[str, Any]]:
        stmt = (
            select(t.run_id, t.stage, t.path, t.reason, t.moved_to, t.rejected_at)
            .where(t.moved_to.is_not(None))
            .order_by(t.rejected_at.desc(), t.id.desc())
            .limit(limit)
        )
        return [
            {
                "run_id": r.run_id,
                "stage": r.stage,
                "path": r.path,
                "reason": r.reason,
                "moved_to": r.moved_to,
                "rejected_at": iso_utc(r.rejected_at),
                "present": os.path.lexists(r.moved_to),
            }
            for r in conn.execute(stmt)
        ]

    return _read(settings, "the quarantine", q)


# -- the inbox ----------------------------------------------------------------------------------
def inbox_status(settings: Settings) -> dict[str, Any]:
    """What the next scoring run would find (the scoring module's own discovery, nothing re-implemented):
    ``waiting`` (image files ready to score), ``links`` (symbolic links it will quarantine),
    ``being_written`` (modified within ``settle_seconds``), ``ignored`` (``{"path", "reason"}``), plus
    ``settle_seconds`` and the ``quarantine`` (:func:`quarantine_entries`)."""
    from .scoring import discover  # loads OpenCV; only when the inbox is asked for

    found = discover(settings)
    return {
        "inbox": found["inbox"],
        "settle_seconds": settings.settle_seconds,
        "waiting": found["pending"],
        "links": found["links"],
        "being_written": found["skipped"],
        "ignored": found["ignored"],
        "quarantine": quarantine_entries(settings),
    }


def archived_image(settings: Settings, sha256: str) -> Path | None:
    """The archived copy of the scored image with this content hash, when one is still inside
    ``BCC_HOME/archive``; None otherwise. Anything but 64 lowercase hex digits raises ConfigError."""
    if not _SHA256.fullmatch(sha256 or ""):
        raise ConfigError("an image is named by the sha256 of its content (64 lowercase hex digits)")
    return archived_images(settings, [sha256]).get(sha256)


def archived_images(settings: Settings, sha256s: list[str]) -> dict[str, Path]:
    """:func:`archived_image` for many hashes at once (one query): ``{sha256: path}`` for those still
    archived. Hashes that are not 64 lowercase hex digits are left out."""
    wanted = sorted({h for h in sha256s if _SHA256.fullmatch(h or "")})
    if not wanted:
        return {}
    t = InboxFile.__table__.c
    require_schema(settings.database_url, tables=("inbox_files",))
    rows = _read(
        settings,
        "the scoring ledger",
        lambda conn: conn.execute(
            select(t.sha256, t.moved_to)
            .where(t.sha256.in_(wanted), t.status.in_(("scored", "duplicate")), t.moved_to.is_not(None))
            .order_by(t.id.desc())
        ).all(),
    )
    found: dict[str, Path] = {}
    for sha, place in rows:
        if sha not in found:
            path = _contained(Path(place), settings.archive_dir, settings.home)
            if path is not None:
                found[sha] = path
    return found


def _contained(candidate: Path, *roots: Path) -> Path | None:
    """``candidate`` resolved (every link followed) when it is a regular file inside every one of
    ``roots`` (each resolved too); None otherwise."""
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    for root in roots:
        try:
            base = root.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(base):
            return None
    return real if real.is_file() else None
