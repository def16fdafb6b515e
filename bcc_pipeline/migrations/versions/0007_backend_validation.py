"""back-end validation: backend_validations, compiled_models, predictions.backend/precision, the view

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 17:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# As in 0002, plus the back-end and precision that computed each prediction.
LATEST_PREDICTIONS = """
CREATE VIEW latest_predictions AS
SELECT p.image_sha256 AS image_sha256,
       p.source_path AS source_path,
       p.model_version AS model_version,
       mv.status AS model_status,
       (SELECT c.version FROM model_versions c WHERE c.status = 'champion') AS champion_version,
       p.prob_malignant AS prob_malignant,
       p.label AS label,
       p.threshold AS threshold,
       p.run_id AS run_id,
       p.scored_at AS scored_at,
       p.id AS prediction_id,
       p.backend AS backend,
       p.precision AS precision
FROM predictions p
JOIN model_versions mv ON mv.version = p.model_version
WHERE p.id = (SELECT p2.id FROM predictions p2
              WHERE p2.image_sha256 = p.image_sha256
              ORDER BY p2.scored_at DESC, p2.id DESC
              LIMIT 1)
"""

# The view of 0002, restored by the downgrade.
OLD_LATEST_PREDICTIONS = """
CREATE VIEW latest_predictions AS
SELECT p.image_sha256 AS image_sha256,
       p.source_path AS source_path,
       p.model_version AS model_version,
       mv.status AS model_status,
       (SELECT c.version FROM model_versions c WHERE c.status = 'champion') AS champion_version,
       p.prob_malignant AS prob_malignant,
       p.label AS label,
       p.threshold AS threshold,
       p.run_id AS run_id,
       p.scored_at AS scored_at,
       p.id AS prediction_id
FROM predictions p
JOIN model_versions mv ON mv.version = p.model_version
WHERE p.id = (SELECT p2.id FROM predictions p2
              WHERE p2.image_sha256 = p.image_sha256
              ORDER BY p2.scored_at DESC, p2.id DESC
              LIMIT 1)
"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS latest_predictions")  # it names predictions' columns
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("backend", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("precision", sa.String(length=16), nullable=True))
    op.create_table(
        "backend_validations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("cpu_class", sa.String(length=64), nullable=False),
        sa.Column("software", sa.String(length=64), nullable=False),
        sa.Column("validated", sa.Boolean(), nullable=False),
        sa.Column("precision", sa.String(length=16), nullable=True),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("images", sa.JSON(), nullable=False),
        sa.Column("flips_malignant_to_benign", sa.Integer(), nullable=False),
        sa.Column("flips_benign_to_malignant", sa.Integer(), nullable=False),
        sa.Column("max_delta", sa.Float(), nullable=True),
        sa.Column("p99_delta", sa.Float(), nullable=True),
        sa.Column("max_delta_allowed", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("images_per_second", sa.Float(), nullable=True),
        sa.Column("cpu", sa.JSON(), nullable=False),
        sa.Column("packages", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("validated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["model_versions.version"],
            name=op.f("fk_backend_validations_model_version_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backend_validations")),
        sa.UniqueConstraint(
            "model_version", "backend", "cpu_class", "software", name="uq_backend_validations_key"
        ),
    )
    op.create_table(
        "compiled_models",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compiled_models")),
        sa.UniqueConstraint("artifact_sha256", "format", name="uq_compiled_models_key"),
    )
    op.execute(LATEST_PREDICTIONS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS latest_predictions")
    op.drop_table("compiled_models")
    op.drop_table("backend_validations")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_column("precision")
        batch_op.drop_column("backend")
    op.execute(OLD_LATEST_PREDICTIONS)
