"""The photo index store on SQLite (FTS5) and on the team's PostgreSQL (a fresh database per run):
rows round-trip, full-text search ranks by the captions, and query syntax is only ever text."""


import numpy as np
import pytest

from pipeline.search.photo_index import Photo, PhotoIndex, PhotoIndexError
from tests.helpers import fresh_postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request, tmp_path):
    if request.param == "sqlite":
        yield PhotoIndex(tmp_path / "photos.db")
        return
    with fresh_postgres_database("photos") as url:
        store = PhotoIndex(url)
        try:
            yield store
        finally:
            store.engine.dispose()


def photo(path: str, caption: str, others: tuple[str, ...] = (), seed: int = 0) -> Photo:
    vector = np.random.default_rng(seed).normal(size=8).astype(np.float32)
    return Photo(path, 100, 1, f"{seed:064d}", "ok", "", caption,
                 [{"caption": c, "score": -1.0} for c in (caption, *others)], "m/1", "cnn", vector)


def test_rows_round_trip_and_text_search_ranks_by_the_captions(index):
    index.save([photo("a.jpg", "a dog runs on the grass", ("a brown dog",), 1),
                photo("b/c.jpg", "two children play in the water", seed=2),
                photo("d.jpg", "a man rides a bike", ("a dog sits",), 3)])
    rows = {p.path: p for p in index.all()}
    assert rows["b/c.jpg"].candidates[0]["caption"] == "two children play in the water"
    np.testing.assert_array_equal(rows["a.jpg"].embedding, photo("a.jpg", "", seed=1).embedding)
    hits = index.text_search("dog", 10)
    assert [rows_id for rows_id, _ in hits][0] == rows["a.jpg"].id  # its caption and a candidate say dog
    assert {pid for pid, _ in hits} == {rows["a.jpg"].id, rows["d.jpg"].id}
    assert index.text_search("zebra", 10) == [] and index.text_search("", 10) == []
    for hostile in ('"dog', "dog*", "dog NEAR man", "dog'); DROP TABLE photos; --", "dog & | ! :*"):
        assert index.text_search(hostile, 10)  # the words are searched, the syntax is not
    assert len(index.all()) == 3


def test_moves_deletes_and_the_cheap_version_check(index):
    index.save([photo("a.jpg", "a dog", seed=1), photo("b.jpg", "a cat", seed=2)])
    before = index.version()
    a = index.by_path("a.jpg")
    index.move(a.id, "album/a.jpg", 100, 2)
    assert index.by_path("album/a.jpg").id == a.id and index.by_path("a.jpg") is None
    index.delete([index.by_path("b.jpg").id])
    assert index.version() != before and index.text_search("cat", 5) == []
    ids, features, backbones = index.embeddings()
    assert ids == [a.id] and [f.shape for f in features] == [(8,)] and backbones == ["cnn"]


def test_a_path_that_is_not_a_database_is_a_clear_error(tmp_path):
    (tmp_path / "photos.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(PhotoIndexError, match=r"cannot read the photo index sqlite:///.*photos.db.*mv "):
        PhotoIndex(tmp_path / "photos.db")
    with pytest.raises(PhotoIndexError, match="SQLite or PostgreSQL"):
        PhotoIndex("mysql+pymysql://nobody@127.0.0.1:1/photos")


def test_another_tools_database_is_refused_and_left_as_it_was(tmp_path):
    """--db pointing at mlflow.db or feedback.db: the index must not add its tables to them."""
    import sqlite3

    from pipeline.feedback.store import FeedbackStore

    FeedbackStore(tmp_path / "feedback.db")
    mlflow_like = tmp_path / "mlflow.db"
    with sqlite3.connect(mlflow_like) as conn:
        conn.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
    for db in (tmp_path / "feedback.db", mlflow_like):
        before = db.read_bytes()
        with pytest.raises(PhotoIndexError, match="holds tables of another tool .*a database of its own"):
            PhotoIndex(db)
        assert db.read_bytes() == before


def test_readers_do_not_make_an_index_where_there_is_none(tmp_path):
    with pytest.raises(PhotoIndexError, match="there is no photo index at .*captioner index DIR --db"):
        PhotoIndex(tmp_path / "nowhere" / "photos.db", create=False)
    assert not (tmp_path / "nowhere").exists()


def test_an_index_damaged_in_the_middle_is_one_paragraph_for_search(tmp_path):
    import subprocess
    import sys

    db = tmp_path / "photos.db"
    store = PhotoIndex(db)
    store.set_meta("root", str(tmp_path))
    store.save([photo(f"p{i}.jpg", f"a red circle number {i} " + "word " * 200, seed=i) for i in range(300)])
    store.engine.dispose()
    data = bytearray(db.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 20_000] = b"\xa5" * 20_000  # junk over pages in the middle
    db.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", "red circle", "--ranking", "bm25",
                           "--db", str(db)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"cannot read the photo index sqlite:///{db}" in done.stderr and f"mv {db} {db}.bad" in done.stderr


def test_each_photo_keeps_how_sure_its_caption_is_and_search_can_ask_for_sure_ones(index):
    sure, unsure, abstained, unknown = (photo(f"{n}.jpg", "a dog runs", seed=i) for i, n in enumerate(
        ("sure", "unsure", "abstained", "unknown")))
    sure.confidence, unsure.confidence, abstained.confidence = 0.9, 0.3, 0.95
    abstained.abstained, abstained.reason = True, "unlike the photos it learnt from"
    index.save([sure, unsure, abstained, unknown])
    rows = {p.path: p for p in index.all()}
    assert rows["sure.jpg"].confidence == pytest.approx(0.9) and rows["unknown.jpg"].confidence is None
    assert rows["abstained.jpg"].abstained and rows["abstained.jpg"].reason == "unlike the photos it learnt from"
    # never an abstained photo, nor one whose model said nothing of its confidence
    assert index.confident_ids(0.8) == {rows["sure.jpg"].id}
    assert index.confident_ids(0.0) == {rows["sure.jpg"].id, rows["unsure.jpg"].id}


def test_an_index_made_before_confidence_gains_the_columns_and_keeps_its_rows(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    PhotoIndex(db).save([photo("a.jpg", "a dog runs", seed=1)])
    with sqlite3.connect(db) as conn:  # as the index was before the confidence columns
        for column in ("confidence", "abstained", "reason"):
            conn.execute(f"ALTER TABLE photos DROP COLUMN {column}")
    reopened = PhotoIndex(db, create=False)
    (row,) = reopened.all()
    assert row.caption == "a dog runs" and row.confidence is None and row.abstained is False
    assert reopened.text_search("dog", 5)


def test_photos_of_a_pooled_and_an_attention_model_are_compared_by_the_pooled_vector(index):
    """After the champion changes from a pooled to an attention model, an index holds rows of both
    widths until it is run again (the pooled vector, then the grid): search still compares
    photos, by the part every row begins with, instead of failing to stack them."""
    from dataclasses import replace

    from pipeline.search.ranking import Searcher

    pooled = photo("a.jpg", "a dog", seed=1)
    like_a = replace(photo("b.jpg", "a dog", seed=2), backbone="cnn+grid",
                     embedding=np.concatenate([pooled.embedding * 2, np.full(4, 9.0, np.float32)]))
    other = replace(photo("c.jpg", "a cat", seed=3), backbone="cnn+grid")
    other = replace(other, embedding=np.concatenate([-pooled.embedding, np.zeros(4, np.float32)]))
    index.save([pooled, like_a, other])
    ids, vectors, backbones = index.embeddings()
    assert [len(v) for v in vectors] == [8, 12, 12] and backbones == ["cnn", "cnn+grid", "cnn+grid"]
    hits = Searcher(index).more_like(like_a.embedding, 3)
    assert {h.photo.path for h in hits[:2]} == {"a.jpg", "b.jpg"} and hits[2].photo.path == "c.jpg"
    # the same pooled vector (scaled), whatever follows it; the opposite one last
    assert [round(h.score, 5) for h in hits] == [1.0, 1.0, -1.0]
