"""Alembic's entry point for the feedback database: runs on the connection the store hands it
(``FeedbackStore.migrate``), with its own version table, beside whatever else shares the database."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, version_table="feedback_schema_version")
with context.begin_transaction():
    context.run_migrations()
