"""The served captions and what people said about them.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "served_captions",
        sa.Column("id", sa.String(32), primary_key=True),  # what the app hands out with a caption
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),  # name/version that wrote it
        sa.Column("caption", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("trace_id", sa.String(64), nullable=True),  # the MLflow trace of the request
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("caption_id", sa.String(32), sa.ForeignKey("served_captions.id"), nullable=False, index=True),
        sa.Column("created_at", sa.String(32), nullable=False, index=True),
        sa.Column("submitter", sa.String(200), nullable=True),
        sa.Column("rating", sa.String(8), nullable=True),  # right | wrong
        sa.Column("correction", sa.Text, nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=True),  # kept only with a correction
        sa.Column("deleted_at", sa.String(32), nullable=True),  # taken back: left out of exports
    )
    op.create_table(  # content-addressed: one row per distinct photo, whoever sent it how often
        "feedback_images",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "feedback_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feedback_meta")
    op.drop_table("feedback_images")
    op.drop_table("feedback")
    op.drop_table("served_captions")
