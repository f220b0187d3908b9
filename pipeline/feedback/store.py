"""The feedback store: every caption the app served, and what people said about it.

A SQL database through SQLAlchemy: SQLite by default (``feedback.db`` beside ``mlflow.db``),
PostgreSQL in the team stack (``CAPTIONER_FEEDBACK_DB`` or ``feedback.db`` in params). Its
tables are made and changed by Alembic migrations (``migrations/``), applied when a store is
opened, under a lock so that two app processes starting together do not race.

Tables: ``served_captions`` (one per caption the app returned: the model that wrote it, the
photo's sha256, the MLflow trace of the request), ``feedback`` (a rating, "right" or "wrong",
and/or a correction; the name typed, when; ``owner``: the sha256 of the browser's owner token,
which alone may take it back; taken back when ``deleted_at`` is set),
``feedback_images`` (the photo of a correction, content-addressed by its sha256 and stored once:
in the database, so that the ``feedback`` stage on any worker reads it where the app wrote it)
and ``feedback_meta`` (when the last export ran, when retraining was last asked for). Several
app processes may write at once: SQLite in WAL mode with a busy timeout, PostgreSQL as it is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
from pathlib import Path

import sqlalchemy as sa

from pipeline.config import database_url, sqlite_file
from pipeline.errors import ReportedError

MIGRATIONS = Path(__file__).with_name("migrations")
RATINGS = ("right", "wrong")
metadata = sa.MetaData()
served_captions = sa.Table(
    "served_captions", metadata,
    sa.Column("id", sa.String(32), primary_key=True), sa.Column("created_at", sa.String(32)),
    sa.Column("model", sa.String(200)), sa.Column("caption", sa.Text), sa.Column("image_sha256", sa.String(64)),
    sa.Column("trace_id", sa.String(64)))
feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True), sa.Column("caption_id", sa.String(32)),
    sa.Column("created_at", sa.String(32)), sa.Column("submitter", sa.String(200)), sa.Column("rating", sa.String(8)),
    sa.Column("correction", sa.Text), sa.Column("image_sha256", sa.String(64)), sa.Column("deleted_at", sa.String(32)),
    sa.Column("owner", sa.String(64)))
feedback_images = sa.Table(
    "feedback_images", metadata, sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("data", sa.LargeBinary), sa.Column("created_at", sa.String(32)))
feedback_meta = sa.Table("feedback_meta", metadata, sa.Column("key", sa.String(64), primary_key=True),
                         sa.Column("value", sa.Text))

SQLITE_BUSY_TIMEOUT_S = 30  # how long a write waits for another writer's lock
SERVED_WAIT_S = 2.0  # ... except recording a served caption: the request it belongs to is waiting
LAST_EXPORT = "last_export_at"  # set by the feedback stage
LAST_REQUEST = "retraining_requested_at"  # set when the app asked Airflow for a run


class FeedbackError(ReportedError):
    """The feedback store cannot be opened or written."""


def now() -> str:
    """A sortable UTC time stamp (microseconds: two rows of one second still order)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def as_timestamp(text: str) -> str:
    """An ISO date or time (``2026-11-30``, ``2026-11-30T12:00``, with or without a zone; no zone
    means UTC) in the form :func:`now` stores, so that times compare as text; ValueError otherwise."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"since={text[:64]!r} is not an ISO date or time, e.g. 2026-11-30 or "
                         "2026-11-30T12:00:00+00:00") from None
    try:
        when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is past the last UTC time Python knows
        raise ValueError(f"since={text[:64]!r} is out of range: give a time between years 1 and 9999 (UTC)") from None
    return when.isoformat(timespec="microseconds")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeedbackStore:
    """``location``: a SQLAlchemy URL or a file path (SQLite)."""

    def __init__(self, location: str | Path):
        self.url = database_url(location)
        try:
            backend = sa.engine.make_url(self.url).get_backend_name()
        except sa.exc.ArgumentError as err:
            raise FeedbackError(f"{location} is neither a file path nor a database URL: {err}") from None
        if backend not in ("sqlite", "postgresql"):
            raise FeedbackError(f"{self.url}: the feedback store lives in SQLite or PostgreSQL, not {backend}")
        kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if backend == "sqlite" else {"pool_pre_ping": True}
        try:
            if backend == "sqlite":
                self._sqlite_file().parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(self.url, **kwargs)
            if backend == "sqlite":
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            self.migrate()
        except (sa.exc.SQLAlchemyError, OSError) as err:
            raise FeedbackError(f"cannot open the feedback store {self.safe_url}: {str(err).splitlines()[0]}; "
                                "check CAPTIONER_FEEDBACK_DB (or feedback.db in params.yaml)") from None

    @property
    def safe_url(self) -> str:
        """The URL without its password (for messages and logs)."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def _sqlite_file(self) -> Path:
        return sqlite_file(self.url)

    def migrate(self) -> None:
        """Bring the schema to the latest migration, one process at a time."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._migration_lock(), self.engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    @contextlib.contextmanager
    def _migration_lock(self):
        if self.engine.dialect.name == "sqlite":
            with open(f"{self._sqlite_file()}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
            return
        with self.engine.connect() as conn:  # a session lock: held until unlocked or disconnected
            conn.execute(sa.text("SELECT pg_advisory_lock(7070)"))
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(7070)"))
                conn.commit()

    # -- writes ----------------------------------------------------------------------------------
    def served(self, rows: list[dict], wait_s: float = SERVED_WAIT_S) -> None:
        """Record captions the app returned: dicts of id, model, caption, image_sha256, trace_id.
        Waits at most ``wait_s`` for a lock another writer holds (a caption request must not hang
        on a busy or locked database: the caller serves the caption without an id instead)."""
        if rows:
            stamp = now()
            sqlite = self.engine.dialect.name == "sqlite"
            with self.engine.begin() as conn:
                if sqlite:
                    conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
                else:
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(wait_s * 1000)}ms'")
                try:
                    conn.execute(sa.insert(served_captions), [{**row, "created_at": stamp} for row in rows])
                finally:
                    if sqlite:  # the pooled connection keeps the usual wait
                        conn.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")

    def caption(self, caption_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(served_captions).where(served_captions.c.id == caption_id)).first()
        return dict(row._mapping) if row else None

    def add(self, caption_id: str, rating: str | None, correction: str | None, submitter: str | None,
            image: bytes | None, owner: str | None = None) -> dict:
        """Record one person's word on a served caption; a correction keeps its photo."""
        sha = sha256_of(image) if image is not None else None
        if correction is not None and sha is None:
            raise ValueError("a correction needs the photo it corrects")
        with self.engine.begin() as conn:
            if correction is not None and conn.execute(
                    sa.select(feedback_images.c.sha256).where(feedback_images.c.sha256 == sha)).first() is None:
                try:
                    with conn.begin_nested():  # another process may store the same photo at once
                        conn.execute(sa.insert(feedback_images).values(sha256=sha, data=image, created_at=now()))
                except sa.exc.IntegrityError:
                    pass
            new_id = conn.execute(sa.insert(feedback).values(
                caption_id=caption_id, created_at=now(), submitter=submitter, rating=rating, owner=owner,
                correction=correction, image_sha256=sha if correction is not None else None)).inserted_primary_key[0]
            row = conn.execute(sa.select(feedback).where(feedback.c.id == new_id)).one()
        return dict(row._mapping)

    def delete(self, feedback_id: int, owner: str | None, operator: bool = False) -> str:
        """Take a feedback row back: "deleted", "not found" or "not yours". Its ``owner`` may, an
        ``operator`` may; a row without an owner (stored before owners) only an operator. The row
        stays in the table, marked, and is left out of every later export."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(feedback).where(feedback.c.id == feedback_id)).first()
            if row is None or row.deleted_at:
                return "not found"
            if not operator and (row.owner is None or row.owner != owner):
                return "not yours"
            conn.execute(sa.update(feedback).where(feedback.c.id == feedback_id).values(deleted_at=now()))
        return "deleted"

    # -- reads -----------------------------------------------------------------------------------
    def rows(self, since: str | None = None, limit: int | None = None, owner: str | None = None) -> list[dict]:
        """Feedback not taken back, oldest first (only ``owner``'s when given), with the caption it
        was about and the model that wrote it (no photo bytes: ``image`` reads one)."""
        query = (sa.select(feedback, served_captions.c.caption, served_captions.c.model,
                           served_captions.c.trace_id)
                 .join(served_captions, served_captions.c.id == feedback.c.caption_id)
                 .where(feedback.c.deleted_at.is_(None)).order_by(feedback.c.id))
        if owner is not None:
            query = query.where(feedback.c.owner == owner)
        if since:
            query = query.where(feedback.c.created_at > as_timestamp(since))
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def corrections(self) -> list[dict]:
        """Every correction not taken back (what the ``feedback`` stage exports), oldest first."""
        return [r for r in self.rows() if r["correction"] is not None]

    def has_image(self, sha: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(feedback_images.c.sha256).where(feedback_images.c.sha256 == sha)).first() \
                is not None

    def image_bytes(self) -> int:
        """Bytes of the stored photos (feedback.max_photo_bytes bounds them)."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(feedback_images.c.data)), 0)))
                       .scalar())

    def image(self, sha: str) -> bytes | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(feedback_images.c.data).where(feedback_images.c.sha256 == sha)).scalar()

    def count_corrections_since(self, since: str | None) -> int:
        query = sa.select(sa.func.count()).select_from(feedback).where(
            feedback.c.deleted_at.is_(None), feedback.c.correction.is_not(None))
        if since:
            query = query.where(feedback.c.created_at > as_timestamp(since))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar())

    def counts(self) -> dict:
        """Ratings and corrections not taken back, per model version (what /api/feedback/summary shows)."""
        query = (sa.select(served_captions.c.model, feedback.c.rating, feedback.c.correction.is_not(None),
                           sa.func.count())
                 .join(served_captions, served_captions.c.id == feedback.c.caption_id)
                 .where(feedback.c.deleted_at.is_(None))
                 .group_by(served_captions.c.model, feedback.c.rating, feedback.c.correction.is_not(None)))
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for model, rating, corrected, n in conn.execute(query):
                entry = out.setdefault(model, {"right": 0, "wrong": 0, "corrections": 0})
                if rating:
                    entry[rating] += n
                if corrected:
                    entry["corrections"] += n
        return out

    def meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(feedback_meta.c.value).where(feedback_meta.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(sa.update(feedback_meta).where(feedback_meta.c.key == key)
                            .values(value=value)).rowcount == 0:
                conn.execute(sa.insert(feedback_meta).values(key=key, value=value))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
