"""images.phash_turns: the perceptual hash of an image's 7 other orientations, so that a turned or mirrored
copy is found as the near-copy it is

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 02:20:00

Nullable: rows from an older release get theirs computed from their stored copy the first time a split
needs it (bcc_pipeline.neardup.ensure_phashes).
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phash_turns", sa.String(length=112), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("phash_turns")
