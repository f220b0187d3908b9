"""The photo index: one row per photo of an indexed folder, in SQLite (default) or PostgreSQL.

Per photo: its path relative to the folder, size, mtime and sha256 (what re-indexing compares),
the chosen caption and the other candidates with their scores, the CNN embedding (float32), and
the model that wrote them (``name/version``) with its backbone's digest (so a new champion with
the same CNN reuses the embeddings), and how sure that model was (``confidence``, null for a model
without one; ``abstained`` and the ``reason`` when the photo is unlike what it learnt from). A
photo that could not be read keeps its error instead. An index made before the confidence columns
existed gains them (empty) when it is opened. Beside the model's caption: the alt text or
description a person wrote into the photo's own metadata (``person_text``, and its field), kept
apart from the model's words so that search can say whose words it found.

Full-text search over the captions and candidates: SQLite's FTS5 with its BM25 ranking, or
PostgreSQL's own text search (``ts_rank_cd``) on a ``tsvector`` column with a GIN index. Queries
reach either as words of ``clean_caption`` (letters a-z only), never as the engines' query
syntax, so quotes, ``*`` or ``NEAR`` in a user's query are just text. A person's words are also
searched on their own (``person_fts`` / ``person_words``), for the photos a person described.

Tables are made by SQLAlchemy Core (``metadata.create_all``) the first time an index is opened;
the FTS5 table by its own DDL, as SQLAlchemy has no construct for virtual tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa

from pipeline.config import database_url, sqlite_file
from pipeline.data.caption_text import clean_caption
from pipeline.errors import ReportedError, first_line

SCHEMA_VERSION = "1"
metadata = sa.MetaData()
photos = sa.Table(
    "photos", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("path", sa.Text, nullable=False, unique=True),  # relative to the indexed folder, '/'-separated
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime_ns", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),  # ok | error
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("caption", sa.Text, nullable=False, default=""),
    sa.Column("candidates", sa.Text, nullable=False, default="[]"),  # JSON: [{caption, score, consensus}]
    sa.Column("model", sa.Text, nullable=False, default=""),  # name/version that wrote the caption
    sa.Column("backbone", sa.String(64), nullable=False, default=""),  # digest of the CNN that embedded it
    sa.Column("embedding", sa.LargeBinary, nullable=True),  # float32 vector
    sa.Column("indexed_at", sa.Text, nullable=False, default=""),
    sa.Column("confidence", sa.Float, nullable=True),  # calibrated probability the caption is acceptable
    sa.Column("abstained", sa.Boolean, nullable=False, default=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    # what a person wrote into the photo's own metadata (XMP alt text or description), and which field
    sa.Column("person_text", sa.Text, nullable=False, default=""),
    sa.Column("person_field", sa.String(32), nullable=False, default=""),
)
# columns added since the first indexes were made: (name, DDL type and default)
ADDED_COLUMNS = (("confidence", "FLOAT"), ("abstained", "BOOLEAN NOT NULL DEFAULT FALSE"),
                 ("reason", "TEXT NOT NULL DEFAULT ''"), ("person_text", "TEXT NOT NULL DEFAULT ''"),
                 ("person_field", "VARCHAR(32) NOT NULL DEFAULT ''"))
index_meta = sa.Table("index_meta", metadata,
                      sa.Column("key", sa.String(64), primary_key=True),
                      sa.Column("value", sa.Text, nullable=False))


class PhotoIndexError(ReportedError):
    """The index cannot be opened, or is not an index of the folder asked for."""


def _ours(table: str) -> bool:
    return (table in ("photos", "index_meta", "photos_fts", "person_fts")
            or table.startswith(("photos_fts_", "person_fts_")))


def damaged(url: str, err: BaseException) -> PhotoIndexError:
    """One paragraph: the index, what the database said, and the way out."""
    try:
        url = sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        pass
    file = sqlite_file(url)
    way_out = (f"move it aside (mv {file} {file}.bad) and run captioner index DIR again: the index is rebuilt "
               "from the photos" if file is not None else "check the database, or index into a new one with --db")
    return PhotoIndexError(f"cannot read the photo index {url} ({first_line(err, 200)}); {way_out}")


@dataclass
class Photo:
    path: str
    size: int
    mtime_ns: int
    sha256: str
    status: str
    error: str = ""
    caption: str = ""
    candidates: list[dict] = field(default_factory=list)
    model: str = ""
    backbone: str = ""
    embedding: np.ndarray | None = None
    indexed_at: str = ""
    id: int | None = None
    confidence: float | None = None
    abstained: bool = False
    reason: str = ""
    person_text: str = ""  # alt text or description a person wrote into the photo ('' = none)
    person_field: str = ""  # which field it came from: alt_text, extended_description, description

    @property
    def words(self) -> str:
        """What full-text search reads: the caption, every candidate and what a person wrote."""
        return " ".join([self.caption, *(c["caption"] for c in self.candidates), self.person_text])


class IndexedFile(NamedTuple):
    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    model: str
    backbone: str


def fts_words(query: str) -> list[str]:
    """A user's query as the words full-text search may see (``clean_caption``'s tokens)."""
    return clean_caption(query).split()


def _row_to_photo(row, with_embedding: bool = True) -> Photo:
    emb = (np.frombuffer(row.embedding, dtype=np.float32).copy()
           if with_embedding and row.embedding is not None else None)
    return Photo(row.path, row.size, row.mtime_ns, row.sha256, row.status, row.error, row.caption,
                 json.loads(row.candidates), row.model, row.backbone, emb, row.indexed_at, row.id,
                 row.confidence, bool(row.abstained), row.reason, row.person_text, row.person_field)


class PhotoIndex:
    """An index database. ``url``: a SQLAlchemy URL, or a file path for SQLite."""

    def __init__(self, url: str | Path, create: bool = True):
        """``create``: make the index when there is none (``captioner index``); readers (search,
        the app) pass False and get a PhotoIndexError instead of a new, empty file."""
        text = str(url)
        self.url = database_url(url)
        try:
            backend = sa.engine.make_url(self.url).get_backend_name()
        except sa.exc.ArgumentError as err:
            raise PhotoIndexError(f"{text} is neither a file path nor a database URL: {err}") from None
        if backend not in ("sqlite", "postgresql"):
            raise PhotoIndexError(f"{self.url}: photo indexes live in SQLite or PostgreSQL, not {backend}")
        file = sqlite_file(self.url)
        if file is not None:
            if not create and not file.is_file():
                raise PhotoIndexError(f"there is no photo index at {file}: make one with captioner index DIR --db {file}")
            file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(self.url)
            self.dialect = self.engine.dialect.name
            with self.engine.begin() as conn:
                tables = sa.inspect(conn).get_table_names()
                foreign = sorted(t for t in tables if not _ours(t))
                if foreign:
                    raise PhotoIndexError(
                        f"{self.safe_url} holds tables of another tool ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}): a photo index needs a database of its own "
                        "(e.g. --db photos.db), not the MLflow or feedback store")
                if not create and "photos" not in tables:
                    raise PhotoIndexError(f"{self.safe_url} holds no photo index: make one with captioner index DIR")
                metadata.create_all(conn)
                have = {c["name"] for c in sa.inspect(conn).get_columns("photos")}
                for name, ddl in ADDED_COLUMNS:
                    if name not in have:
                        conn.exec_driver_sql(f"ALTER TABLE photos ADD COLUMN {name} {ddl}")
                if self.dialect == "sqlite":
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    conn.exec_driver_sql("CREATE VIRTUAL TABLE IF NOT EXISTS photos_fts USING fts5(words)")
                    conn.exec_driver_sql("CREATE VIRTUAL TABLE IF NOT EXISTS person_fts USING fts5(words)")
                elif self.dialect == "postgresql":
                    for column in ("words", "person_words"):
                        conn.exec_driver_sql(f"ALTER TABLE photos ADD COLUMN IF NOT EXISTS {column} tsvector")
                        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS photos_{column} ON photos USING gin({column})")
                conn.execute(sa.text("SELECT 1 FROM photos LIMIT 1"))
        except sa.exc.SQLAlchemyError as err:
            raise damaged(self.safe_url, err) from None

    @property
    def safe_url(self) -> str:
        """The URL without its password (for messages)."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    # -- the folder it indexes ------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(index_meta.c.value).where(index_meta.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(index_meta).where(index_meta.c.key == key))
            conn.execute(sa.insert(index_meta).values(key=key, value=value))

    def root(self) -> Path | None:
        value = self.meta("root")
        return Path(value) if value else None

    # -- rows ------------------------------------------------------------------------------------
    def all(self, with_embeddings: bool = True) -> list[Photo]:
        cols = [c for c in photos.c if with_embeddings or c.name != "embedding"]
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(*cols).order_by(photos.c.id)).all()
        return [_row_to_photo(r, with_embeddings) for r in rows]

    def by_ids(self, ids: Iterable[int]) -> dict[int, Photo]:
        ids = list(ids)
        if not ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(photos).where(photos.c.id.in_(ids))).all()
        return {r.id: _row_to_photo(r) for r in rows}

    def by_path(self, path: str) -> Photo | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(photos).where(photos.c.path == path)).first()
        return _row_to_photo(row) if row else None

    def save(self, batch: list[Photo]) -> None:
        """Insert or replace ``batch`` (by path), full-text rows with them, in one transaction:
        a run killed between batches keeps every batch it finished."""
        with self.engine.begin() as conn:
            for photo in batch:
                values = {"path": photo.path, "size": photo.size, "mtime_ns": photo.mtime_ns,
                          "sha256": photo.sha256, "status": photo.status, "error": photo.error,
                          "caption": photo.caption, "candidates": json.dumps(photo.candidates),
                          "model": photo.model, "backbone": photo.backbone,
                          "embedding": None if photo.embedding is None else
                          np.ascontiguousarray(photo.embedding, np.float32).tobytes(),
                          "indexed_at": photo.indexed_at, "confidence": photo.confidence,
                          "abstained": bool(photo.abstained), "reason": photo.reason,
                          "person_text": photo.person_text, "person_field": photo.person_field}
                existing = conn.execute(sa.select(photos.c.id).where(photos.c.path == photo.path)).scalar()
                if existing is None:
                    existing = conn.execute(sa.insert(photos).values(**values)).inserted_primary_key[0]
                else:
                    conn.execute(sa.update(photos).where(photos.c.id == existing).values(**values))
                photo.id = existing
                self._set_words(conn, existing, photo.words if photo.status == "ok" else "",
                                photo.person_text if photo.status == "ok" else "")

    def move(self, photo_id: int, path: str, size: int, mtime_ns: int) -> None:
        """A file that moved (same content): the row follows it, nothing is recomputed."""
        with self.engine.begin() as conn:
            conn.execute(sa.update(photos).where(photos.c.id == photo_id).values(path=path, size=size, mtime_ns=mtime_ns))

    def delete(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(sa.delete(photos).where(photos.c.id.in_(ids)))
            if self.dialect == "sqlite":
                for photo_id in ids:
                    conn.execute(sa.text("DELETE FROM photos_fts WHERE rowid = :id"), {"id": photo_id})
                    conn.execute(sa.text("DELETE FROM person_fts WHERE rowid = :id"), {"id": photo_id})

    def _set_words(self, conn, photo_id: int, words: str, person: str) -> None:
        text, person = " ".join(fts_words(words)), " ".join(fts_words(person))
        if self.dialect == "sqlite":
            for table, value in (("photos_fts", text), ("person_fts", person)):
                conn.execute(sa.text(f"DELETE FROM {table} WHERE rowid = :id"), {"id": photo_id})
                if value:
                    conn.execute(sa.text(f"INSERT INTO {table}(rowid, words) VALUES (:id, :w)"), {"id": photo_id, "w": value})
        else:
            conn.execute(sa.text("UPDATE photos SET words = to_tsvector('english', :w), "
                                 "person_words = to_tsvector('english', :p) WHERE id = :id"),
                         {"id": photo_id, "w": text, "p": person})

    # -- search ----------------------------------------------------------------------------------
    def text_search(self, query: str, limit: int) -> list[tuple[int, float]]:
        """(photo id, score: higher is better) of the photos whose captions share words with
        ``query``, best first: BM25 (SQLite FTS5) or ts_rank_cd (PostgreSQL)."""
        words = fts_words(query)
        if not words:
            return []
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
                rows = conn.execute(sa.text("SELECT rowid, bm25(photos_fts) FROM photos_fts WHERE photos_fts "
                                            "MATCH :q ORDER BY bm25(photos_fts) LIMIT :n"), {"q": match, "n": limit})
                return [(int(r[0]), -float(r[1])) for r in rows]
            tsquery = " | ".join(dict.fromkeys(words))
            rows = conn.execute(sa.text(
                "SELECT id, ts_rank_cd(words, q) AS score FROM photos, to_tsquery('english', :q) q "
                "WHERE words @@ q ORDER BY score DESC LIMIT :n"), {"q": tsquery, "n": limit})
            return [(int(r[0]), float(r[1])) for r in rows]

    def person_search(self, query: str) -> set[int]:
        """The photos whose own metadata, as a person wrote it, holds every word of ``query``."""
        words = list(dict.fromkeys(fts_words(query)))
        if not words:
            return set()
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                rows = conn.execute(sa.text("SELECT rowid FROM person_fts WHERE person_fts MATCH :q"),
                                    {"q": " AND ".join(f'"{w}"' for w in words)})
            else:
                rows = conn.execute(sa.text("SELECT id FROM photos WHERE person_words @@ to_tsquery('english', :q)"),
                                    {"q": " & ".join(words)})
            return {int(r[0]) for r in rows}

    def embeddings(self) -> tuple[list[int], list[np.ndarray], list[str]]:
        """(ids, float32 vectors, the digest of the CNN that embedded each) of every photo indexed
        with an embedding, in id order. Vectors differ in width between CNNs, and between a
        model that reads the pooled vector (that alone) and one that attends over the grid (the
        pooled vector, then the grid)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(photos.c.id, photos.c.embedding, photos.c.backbone).where(
                photos.c.status == "ok", photos.c.embedding.is_not(None)).order_by(photos.c.id)).all()
        return ([r.id for r in rows], [np.frombuffer(r.embedding, np.float32) for r in rows],
                [r.backbone for r in rows])

    def confident_ids(self, min_confidence: float) -> set[int]:
        """Photos whose caption is at least this sure (never an abstained one, nor one captioned
        by a model without a confidence)."""
        with self.engine.connect() as conn:
            return {int(r[0]) for r in conn.execute(sa.select(photos.c.id).where(
                photos.c.status == "ok", photos.c.confidence >= min_confidence, photos.c.abstained.is_(False)))}

    def version(self) -> tuple:
        """Changes whenever a row is added, changed or removed (a cheap check for caches)."""
        with self.engine.connect() as conn:
            return tuple(conn.execute(sa.select(sa.func.count(), sa.func.max(photos.c.id),
                                                sa.func.max(photos.c.indexed_at))).one())

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(photos.c.status, sa.func.count()).group_by(photos.c.status)).all()
        return {status: int(n) for status, n in rows}

    def iter_paths(self) -> Iterator["IndexedFile"]:
        """What re-indexing compares, for every row, without captions or embeddings."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(photos.c.id, photos.c.path, photos.c.size, photos.c.mtime_ns,
                                          photos.c.sha256, photos.c.model, photos.c.backbone)).all()
        for row in rows:
            yield IndexedFile(*row)
