"""intake rejections and the scoring ledger record what the path held (device, inode, size, mtime_ns);
rejections are unique per (run, stage, path): an intake and a scoring run may share a run id

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 08:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("src_identity", sa.String(length=128), nullable=True))
        batch_op.drop_constraint("uq_rejections_run_id_path", type_="unique")
        batch_op.create_unique_constraint("uq_rejections_run_id_stage_path", ["run_id", "stage", "path"])
    with op.batch_alter_table("inbox_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("src_identity", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox_files", schema=None) as batch_op:
        batch_op.drop_column("src_identity")
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.drop_constraint("uq_rejections_run_id_stage_path", type_="unique")
        batch_op.create_unique_constraint("uq_rejections_run_id_path", ["run_id", "path"])
        batch_op.drop_column("src_identity")
