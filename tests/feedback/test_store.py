"""The feedback store on a real database: SQLite by default, PostgreSQL as the team stack runs
it (a fresh database per test run, dropped after); two processes writing at once lose nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.feedback.store import FeedbackError, FeedbackStore, as_timestamp, sha256_of
from tests.helpers import PROJECT, fresh_postgres_database, jpeg_bytes


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "feedback.db")
        return
    with fresh_postgres_database("feedback") as url:
        yield url


def serve(store: FeedbackStore, caption_id: str, photo: bytes, caption: str = "a red circle") -> None:
    store.served([{"id": caption_id, "model": "flickr8k-captioner/3", "caption": caption,
                   "image_sha256": sha256_of(photo), "trace_id": None}])


def test_ratings_corrections_and_taking_them_back(location):
    store = FeedbackStore(location)
    photo = jpeg_bytes()
    serve(store, "c1", photo)
    legacy = store.add("c1", "right", None, "ana", None)  # stored before owners: nobody's
    right = store.add("c1", "right", None, None, None, owner="b" * 64)
    fix = store.add("c1", "wrong", "a blue square at the top", "ana", photo, owner="a" * 64)
    assert right["image_sha256"] is None and fix["image_sha256"] == sha256_of(photo)
    assert store.image(sha256_of(photo)) == photo  # the photo is kept with the correction, once
    assert store.has_image(sha256_of(photo)) and store.image_bytes() == len(photo)
    assert [r["id"] for r in store.rows(owner="a" * 64)] == [fix["id"]]
    assert store.delete(legacy["id"], "a" * 64) == "not yours"  # only an operator takes it back
    assert store.delete(legacy["id"], None, operator=True) == "deleted"
    assert store.counts() == {"flickr8k-captioner/3": {"right": 1, "wrong": 1, "corrections": 1}}
    assert [r["correction"] for r in store.corrections()] == ["a blue square at the top"]
    assert store.count_corrections_since(None) == 1 and store.count_corrections_since(fix["created_at"]) == 0
    assert store.delete(fix["id"], "b" * 64) == "not yours"
    assert store.delete(fix["id"], None) == "not yours"
    assert store.delete(fix["id"], "a" * 64) == "deleted"
    assert store.delete(fix["id"], "a" * 64) == "not found"
    assert store.corrections() == [] and [r["id"] for r in store.rows()] == [right["id"]]
    FeedbackStore(location)  # opening again: the schema is there, the migration does nothing
    assert len(FeedbackStore(location).rows()) == 1


WRITER = """
import sys
sys.path.insert(0, sys.argv[3])
from pipeline.feedback.store import FeedbackStore, sha256_of
store = FeedbackStore(sys.argv[1])
who = sys.argv[2]
for i in range(60):
    photo = f"photo {i % 7}".encode()  # both writers store the same 7 photos
    store.served([{"id": f"{who}-{i}", "model": "m/1", "caption": "x", "image_sha256": sha256_of(photo),
                   "trace_id": None}])
    store.add(f"{who}-{i}", "wrong", f"correction {i} by {who}", who, photo)
"""


def test_two_processes_writing_at_once_lose_nothing(location):
    FeedbackStore(location)  # made once; the writers race on the rows, not on the schema
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, location, who, str(PROJECT)],
                                stderr=subprocess.PIPE, text=True) for who in ("one", "two")]
    for writer in writers:
        assert writer.wait(timeout=300) == 0, writer.stderr.read()[-2000:]
    rows = FeedbackStore(location).corrections()
    assert len(rows) == 120
    assert {(r["submitter"], r["correction"]) for r in rows} == {
        (who, f"correction {i} by {who}") for who in ("one", "two") for i in range(60)}
    assert len({r["image_sha256"] for r in rows}) == 7


def test_a_store_that_cannot_be_opened_says_where_and_how_to_point_elsewhere(tmp_path):
    with pytest.raises(FeedbackError, match="SQLite or PostgreSQL, not mysql"):
        FeedbackStore("mysql://root@127.0.0.1/feedback")
    with pytest.raises(FeedbackError, match="CAPTIONER_FEEDBACK_DB"):
        FeedbackStore("postgresql+psycopg2://postgres:secret@127.0.0.1:1/none")
    try:
        FeedbackStore("postgresql+psycopg2://postgres:secret@127.0.0.1:1/none")
    except FeedbackError as err:
        assert "secret" not in str(err)  # the password never reaches a message
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(FeedbackError, match="cannot open the feedback store"):
        FeedbackStore(blocked / "feedback.db")


def test_since_takes_any_iso_time_and_compares_it_as_a_time(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    photo = jpeg_bytes()
    serve(store, "c1", photo)
    row = store.add("c1", "right", None, None, None)
    day = row["created_at"][:10]
    assert as_timestamp(day) == f"{day}T00:00:00.000000+00:00"
    assert as_timestamp("2026-11-30T13:00:00+01:00") == "2026-11-30T12:00:00.000000+00:00"
    assert len(store.rows(since=day)) == 1  # a date: the rows from that day on
    assert store.rows(since=row["created_at"]) == []
    assert len(store.rows(since=row["created_at"].replace("+00:00", "-01:00"))) == 0
    assert len(store.rows(since=row["created_at"].replace("+00:00", "+01:00"))) == 1  # an hour earlier
    with pytest.raises(ValueError, match="not an ISO date or time"):
        store.rows(since="yesterday")
