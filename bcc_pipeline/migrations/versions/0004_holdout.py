"""the frozen holdout: images.phash (perceptual hash for near-duplicates) and the holdout_events log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 17:00:00

``images.phash`` is nullable: rows from an older release get theirs computed from their stored copy
the first time a split needs it (bcc_pipeline.neardup.ensure_phashes).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phash", sa.String(length=16), nullable=True))
    op.create_table(
        "holdout_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("old_hash", sa.String(length=64), nullable=True),
        sa.Column("new_hash", sa.String(length=64), nullable=False),
        sa.Column("manifest_path", sa.Text(), nullable=False),
        sa.Column("n_before", sa.Integer(), nullable=False),
        sa.Column("n_after", sa.Integer(), nullable=False),
        sa.Column("n_excluded", sa.Integer(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_holdout_events")),
        sa.UniqueConstraint("seq", name=op.f("uq_holdout_events_seq")),
    )


def downgrade() -> None:
    op.drop_table("holdout_events")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("phash")
