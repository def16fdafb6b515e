"""scoring run liveness (host, pid, heartbeat, error) and move attempts per ledger row

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scoring_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
    with op.batch_alter_table("inbox_files", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("move_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("inbox_files", schema=None) as batch_op:
        batch_op.drop_column("move_attempts")
    with op.batch_alter_table("scoring_runs", schema=None) as batch_op:
        batch_op.drop_column("error")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("pid")
        batch_op.drop_column("host")
