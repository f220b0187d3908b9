"""The feedback room: what people say about the captions the app serves, and how it becomes data.

Holds: the feedback store (``store``: served captions, ratings, corrections and their photos in
SQLite or PostgreSQL through SQLAlchemy, its schema made by Alembic migrations in
``migrations/``), the export of corrections as a dataset in the Flickr8k layout (``export``) and
the request for a retraining run when enough new corrections arrived (``retraining``: an
Airflow asset event through Airflow's REST API).

May import: ``pipeline.registry``, ``pipeline.captioning``, ``pipeline.data`` and the ground floor.
"""
