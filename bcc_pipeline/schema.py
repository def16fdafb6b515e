"""The project database's tables: SQLAlchemy 2 typed ORM classes on one :class:`Base` whose metadata names
every constraint (so migrations can refer to them on every backend).

The schema itself is owned by the Alembic migrations in ``bcc_pipeline/migrations``; these classes
describe the head revision. Engines, sessions, keyed inserts and migrations are in :mod:`.store`, which
re-exports every name here.
"""

from __future__ import annotations

import datetime as dt
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
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "MODEL_STATUSES",
    "NAMING_CONVENTION",
    "Base",
    "HoldoutEvent",
    "ImageRecord",
    "InboxFile",
    "Metric",
    "ModelVersion",
    "Prediction",
    "Promotion",
    "Rejection",
    "ScoringRun",
    "scoring_fields",
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
    phash: Mapped[str | None] = mapped_column(
        String(16)
    )  # 64-bit perceptual hash, hex (bcc_pipeline.neardup)
    # the same hash of its 7 other orientations (turned 90/180/270 degrees, and those mirrored), 16 hex each:
    # a turned or mirrored copy is the same picture (bcc_pipeline.neardup)
    phash_turns: Mapped[str | None] = mapped_column(String(112))
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
        Index(
            "uq_model_versions_one_champion",
            "status",
            unique=True,
            sqlite_where=text("status = 'champion'"),
            postgresql_where=text("status = 'champion'"),
        ),
    )


def scoring_fields(mv: Any) -> dict[str, Any]:
    """What scoring and back-end validation need of a model version (a :class:`ModelVersion` or a row of
    ``model_versions``): version, image_size, threshold, temperature (None when the version was not
    calibrated), artifact path and sha."""
    return {
        "version": mv.version,
        "image_size": int(mv.image_size),
        "threshold": float(mv.threshold),
        "temperature": None if mv.temperature is None else float(mv.temperature),
        "artifact_path": mv.artifact_path,
        "artifact_sha256": mv.artifact_sha256,
    }


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
    method: Mapped[str | None] = mapped_column(Text)


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
    """Files refused at intake or scoring, with the reason; unique per (run, stage, path). ``path`` is shown as
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
    # intake (migration 0008): what the path held when it was refused, "dev:ino:size:mtime_ns"
    # (:func:`bcc_pipeline.moving.identity`), so that a move finished by a later run moves only that file,
    # also where no content hash was taken (a link, a file too large to read).
    src_identity: Mapped[str | None] = mapped_column(String(128))

    # by stage too (migration 0008): an intake run and a scoring run may carry the same (Airflow) run id
    __table_args__ = (UniqueConstraint("run_id", "stage", "path"),)


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
    # migration 0008: what the path held when it was loaded ("dev:ino:size:mtime_ns"), so that a move an
    # interrupted run left is finished only for that file, also where no content hash was taken
    src_identity: Mapped[str | None] = mapped_column(String(128))
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
    action: Mapped[str] = mapped_column(String(16))  # freeze | extend | withdraw
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    old_hash: Mapped[str | None] = mapped_column(String(64))
    new_hash: Mapped[str] = mapped_column(String(64))
    manifest_path: Mapped[str] = mapped_column(Text)
    n_before: Mapped[int] = mapped_column(Integer)
    n_after: Mapped[int] = mapped_column(Integer)
    n_excluded: Mapped[int] = mapped_column(
        Integer
    )  # images kept out by this change, reasons in the manifest
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # per label after the change
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
