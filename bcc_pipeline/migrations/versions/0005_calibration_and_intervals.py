"""calibration, intervals and lineage: model_versions.temperature/operating_point/lineage, metrics
lower/upper/n/k/method, promotions.decision widened for insufficient_evidence and awaiting_approval

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 17:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("temperature", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("operating_point", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("lineage", sa.JSON(), nullable=True))
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lower", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("upper", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("n", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("k", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("method", sa.Text(), nullable=True))
    with op.batch_alter_table("promotions", schema=None) as batch_op:
        batch_op.alter_column(
            "decision",
            existing_type=sa.String(length=16),
            type_=sa.String(length=32),
            existing_nullable=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("promotions", schema=None) as batch_op:
        batch_op.alter_column(
            "decision",
            existing_type=sa.String(length=32),
            type_=sa.String(length=16),
            existing_nullable=False,
        )
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        for name in ("method", "k", "n", "upper", "lower"):
            batch_op.drop_column(name)
    # Not in batch mode: on SQLite a batch rebuilds the table, which the latest_predictions view
    # (migration 0002) forbids; plain DROP COLUMN works on SQLite >= 3.35 and PostgreSQL alike.
    for name in ("lineage", "operating_point", "temperature"):
        op.drop_column("model_versions", name)
