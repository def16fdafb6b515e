"""intake commits a rejection with its destination before the file moves: rejections.dest, move_error

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 17:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dest", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("move_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.drop_column("move_error")
        batch_op.drop_column("dest")
