"""The database side of inference back-ends: validation results and the checksums of converted models.

``backend_validations``: one row per (model version, back-end, CPU class, software), the latest
validation of that back-end against fp32 Keras there (measured by :mod:`bcc_pipeline.backend_measure`,
judged and chosen from by :mod:`bcc_pipeline.validation`).

``compiled_models``: the sha256 of every file of a converted model (OpenVINO IR, ONNX), per (artifact
sha256, format), written when the conversion is published into the cache beside the artifact. A
converted model is loaded only when the bytes read match this row (:class:`CompiledModels`, the ledger
:func:`bcc_pipeline.inference.load_predictor` takes); the cache folder cannot vouch for itself.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.orm import Mapped, mapped_column

from .store import Base, get_engine, insert_rows, require_schema, session_scope, utcnow

__all__ = ["BackendValidation", "CompiledModel", "CompiledModels", "record_validation", "validation_rows"]


class BackendValidation(Base):
    """How far one back-end strays from fp32 Keras for one model version, on one CPU class and software."""

    __tablename__ = "backend_validations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version", ondelete="CASCADE"))
    backend: Mapped[str] = mapped_column(String(32))
    cpu_class: Mapped[str] = mapped_column(String(64))  # bcc_pipeline.cpu.cpu_info()["cpu_class"]
    software: Mapped[str] = mapped_column(String(64))  # bcc_pipeline.cpu.software_info()["software"]
    validated: Mapped[bool] = mapped_column(Boolean)
    precision: Mapped[str | None] = mapped_column(String(16))
    n_images: Mapped[int] = mapped_column(Integer)
    images: Mapped[dict[str, Any]] = mapped_column(JSON)  # role -> number of images compared
    flips_malignant_to_benign: Mapped[int] = mapped_column(Integer)
    flips_benign_to_malignant: Mapped[int] = mapped_column(Integer)
    max_delta: Mapped[float | None] = mapped_column(Float)
    p99_delta: Mapped[float | None] = mapped_column(Float)
    max_delta_allowed: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    images_per_second: Mapped[float | None] = mapped_column(Float)
    cpu: Mapped[dict[str, Any]] = mapped_column(JSON)  # vendor, model, numerics flags
    packages: Mapped[dict[str, Any]] = mapped_column(JSON)  # name -> version
    error: Mapped[str | None] = mapped_column(Text)  # why it could not be compared (then not validated)
    validated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint(
            "model_version", "backend", "cpu_class", "software", name="uq_backend_validations_key"
        ),
    )


class CompiledModel(Base):
    """The checksums of a converted model's files, recorded when it was published into the cache."""

    __tablename__ = "compiled_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))  # openvino | openvino-int8 | onnx
    model_version: Mapped[str | None] = mapped_column(String(64))
    files: Mapped[dict[str, Any]] = mapped_column(JSON)  # file name -> sha256
    published_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("artifact_sha256", "format", name="uq_compiled_models_key"),)


_VALIDATION_KEY = ("model_version", "backend", "cpu_class", "software")


def record_validation(database_url: str, row: dict[str, Any]) -> None:
    """Insert or replace the validation of (model version, back-end, CPU class, software)."""
    row = {**row, "validated_at": row.get("validated_at") or utcnow()}
    with session_scope(database_url) as s:
        insert_rows(
            s,
            BackendValidation,
            [row],
            key=_VALIDATION_KEY,
            update=[c for c in row if c not in _VALIDATION_KEY],
        )


def validation_rows(database_url: str, version: str | None = None) -> list[dict[str, Any]]:
    """The recorded validations (of ``version``, or of every version), newest version first."""
    require_schema(database_url, tables=("backend_validations",))
    t = BackendValidation.__table__
    q = select(t).order_by(t.c.model_version.desc(), t.c.backend)
    if version is not None:
        q = q.where(t.c.model_version == version)
    with session_scope(database_url) as s:
        return [dict(r._mapping) for r in s.execute(q)]


class CompiledModels:
    """The ledger of converted models in database ``database_url`` (see the module's doc)."""

    def __init__(self, database_url: str, version: str | None = None):
        self.url, self.version = database_url, version

    def expected(self, artifact_sha256: str, fmt: str) -> dict[str, str] | None:
        """file name -> sha256 recorded for this conversion, or None when none was published."""
        t = CompiledModel.__table__
        with get_engine(self.url).connect() as conn:
            files = conn.execute(
                select(t.c.files).where(t.c.artifact_sha256 == artifact_sha256, t.c.format == fmt)
            ).scalar()
        return dict(files) if files else None

    def record(self, artifact_sha256: str, fmt: str, files: dict[str, str]) -> None:
        """The checksums of a conversion just published into the cache (replacing an older record)."""
        row = {
            "artifact_sha256": artifact_sha256,
            "format": fmt,
            "model_version": self.version,
            "files": dict(files),
            "published_at": utcnow(),
        }
        with session_scope(self.url) as s:
            insert_rows(
                s,
                CompiledModel,
                [row],
                key=("artifact_sha256", "format"),
                update=["model_version", "files", "published_at"],
            )
