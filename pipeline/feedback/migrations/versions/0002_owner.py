"""Feedback belongs to the browser that sent it: the sha256 of its owner token.

Rows from before have no owner: only an operator may take them back.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("feedback") as table:  # batch: SQLite cannot add an index in ALTER
        table.add_column(sa.Column("owner", sa.String(64), nullable=True))
        table.create_index("ix_feedback_owner", ["owner"])


def downgrade() -> None:
    with op.batch_alter_table("feedback") as table:
        table.drop_index("ix_feedback_owner")
        table.drop_column("owner")
