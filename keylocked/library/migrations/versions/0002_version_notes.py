"""Version notes (why a version exists, who asked for it) and an index for per-concept audit queries.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("notes", sa.Text, nullable=False, server_default=""))
    op.create_index("ix_audit_log_concept", "audit_log", ["concept"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_concept", "audit_log")
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("notes")
