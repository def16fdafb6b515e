"""batch scoring: the inbox_files ledger and the latest_predictions view

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The latest prediction per image (newest scored_at, then highest id), with the status of the model
# version that made it and the current champion's version. Plain SQL that SQLite and PostgreSQL share.
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
       p.id AS prediction_id
FROM predictions p
JOIN model_versions mv ON mv.version = p.model_version
WHERE p.id = (SELECT p2.id FROM predictions p2
              WHERE p2.image_sha256 = p.image_sha256
              ORDER BY p2.scored_at DESC, p2.id DESC
              LIMIT 1)
"""


def upgrade() -> None:
    op.create_table(
        "inbox_files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("path_key", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("dest", sa.Text(), nullable=True),
        sa.Column("moved_to", sa.Text(), nullable=True),
        sa.Column("move_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox_files")),
        sa.UniqueConstraint("run_id", "path_key", name=op.f("uq_inbox_files_run_id_path_key")),
    )
    with op.batch_alter_table("inbox_files", schema=None) as batch_op:
        batch_op.create_index("ix_inbox_files_path_key", ["path_key"], unique=False)
        batch_op.create_index("ix_inbox_files_sha256", ["sha256"], unique=False)
    op.execute(LATEST_PREDICTIONS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS latest_predictions")
    with op.batch_alter_table("inbox_files", schema=None) as batch_op:
        batch_op.drop_index("ix_inbox_files_sha256")
        batch_op.drop_index("ix_inbox_files_path_key")
    op.drop_table("inbox_files")
