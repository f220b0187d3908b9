"""`captioner app`: the JSON API over the registry's champion (FastAPI's TestClient, a real
MLflow registry), the hot swap when the alias moves, and the page in a real browser (Debian
chromium via Playwright)."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.app.hot_swap import ChampionHolder
from pipeline.app.routes import create_app
from tests.helpers import (
    PROJECT,
    chromium,
    drop_files,
    free_port,
    tiny_params,
    tiny_settings,
    wait_for_http,
)

NAME = "flickr8k-captioner"
LIMITS = tiny_settings(**{"app.max_captions_per_minute": 1000}).app  # the caption limit has its own test


@pytest.fixture
def store(registered, tmp_path, monkeypatch):
    """A copy of the session's registry (version 1 = champion), so tests may move the alias."""
    root, _, _ = registered
    copy = tmp_path / "project"
    shutil.copytree(root, copy)
    monkeypatch.chdir(copy)
    uri = f"sqlite:///{copy}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return copy


def new_version(client: MlflowClient, source_version: str = "1", source: str | None = None) -> str:
    """Register another version (the same model files unless ``source`` says otherwise)."""
    base = client.get_model_version(NAME, source_version)
    return client.create_model_version(NAME, source or base.source, run_id=base.run_id).version


def photo(index: int = 0) -> bytes:
    """One of the synthetic dataset's photos (the kind of image the model was trained on)."""
    return sorted(Path("data/raw/synthetic/Images").glob("*.jpg"))[index].read_bytes()  # cwd: the store


def unlike(seed: int) -> bytes:
    """A JPEG of random noise: nothing like the photos the model learnt from, so it abstains
    (a trained model's confidence on its own kind of photo varies from run to run; this does not)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def api(store):
    from fastapi.testclient import TestClient

    champion = ChampionHolder(NAME)
    with TestClient(create_app(champion, poll_seconds=3600, limits=LIMITS)) as client:
        yield client, champion



@contextlib.contextmanager
def running_app(store: Path, *options: str, drop_env: tuple[str, ...] = ()):
    """`captioner app` in its own process over the test store (its params.yaml: the tiny ones
    unless the test wrote its own); yields it and its URL once healthy."""
    from tests.helpers import write_params

    if not (store / "params.yaml").is_file():
        write_params(store)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "PYTHONPATH": str(PROJECT)}
    for name in drop_env:
        env.pop(name, None)
    app = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "app", "--port", str(port), "--model-name", NAME,
                            *options], cwd=store, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", app, 480, "captioner app")  # ~15 s on a quiet machine
        yield app, url
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=60)

def test_a_jpeg_gets_a_caption_and_the_other_candidates(api):
    client, _ = api
    response = client.post("/api/caption", files=[("file", ("photo.jpg", photo(), "image/jpeg"))])
    assert response.status_code == 200, response.text
    body = response.json()
    (result,) = body["results"]
    assert result["filename"] == "photo.jpg" and result["error"] == ""
    assert result["caption"] and result["caption"] == result["candidates"][0]["caption"]
    assert len(result["candidates"]) == 3  # the model's beam size, sampled candidates included
    weight = tiny_params()["decoding"]["consensus"]["weight"]
    totals = [c["consensus"] + weight * c["score"] for c in result["candidates"]]
    assert all(a >= b - 1e-3 for a, b in zip(totals, totals[1:]))  # best first, as reranked (4 decimals)
    assert body["model"] == {"name": NAME, "version": "1"} and body["ms"] > 0

    assert "attention" not in result  # only when asked


def test_attention_asked_of_a_model_that_reads_one_vector_is_null_not_made_up(api):
    client, _ = api
    response = client.post("/api/caption?attention=1", files=[("file", ("photo.jpg", photo(), "image/jpeg"))])
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["caption"] and result["attention"] is None
    assert client.post("/api/caption?attention=maybe", files=[("file", ("p.jpg", photo(), "image/jpeg"))]).status_code == 422


def noise_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_noise_is_not_described_as_if_it_were_a_photo(api):
    """A picture unlike the training photos (noise) abstains: the answer says so, with the reason,
    and the guess is only the candidate behind it; a photo of the kind it learnt from does not."""
    client, _ = api
    files = [("file", ("noise.png", noise_png(), "image/png")), ("file", ("a.jpg", photo(0), "image/jpeg"))]
    noise, known = client.post("/api/caption", files=files).json()["results"]
    assert noise["abstained"] is True and "unlike the photos it learnt from" in noise["reason"]
    assert noise["confidence_words"] == "not sure what this shows" and noise["spoken"].startswith("Not sure")
    assert noise["caption"]  # the candidate is still there, behind the disclosure
    assert known["abstained"] is False and 0 <= known["confidence"] <= 1 and known["confidence_words"]


def test_bad_files_get_their_own_error_and_good_ones_still_a_caption(api):
    client, _ = api
    files = [("file", ("notes.txt", b"just some text", "text/plain")),
             ("file", ("a.jpg", photo(1), "image/jpeg")),
             ("file", ("empty.jpg", b"", "image/jpeg")),
             ("file", ("huge.jpg", b"\xff" * 200_001, "image/jpeg"))]
    results = client.post("/api/caption", files=files).json()["results"]
    assert "not a recognised image" in results[0]["error"] or "cannot" in results[0]["error"]
    assert results[1]["caption"] and not results[1]["error"]
    assert "empty" in results[2]["error"]
    assert "over the limit of 200,000 bytes" in results[3]["error"]


def test_too_many_files_is_a_400_and_no_file_a_422(api):
    client, _ = api
    files = [("file", (f"{i}.jpg", photo(i), "image/jpeg")) for i in range(5)]  # limit 4
    response = client.post("/api/caption", files=files)
    assert response.status_code == 400 and "limit is 4" in response.json()["detail"]
    assert client.post("/api/caption").status_code == 422


def test_model_info_and_health(api):
    client, _ = api
    info = client.get("/api/model").json()
    assert info["name"] == NAME and info["version"] == "1" and info["alias"] == "champion"
    assert info["promoted_at"] and "beam_bleu4" in info["scores"]
    assert client.get("/healthz").json() == {"status": "ok", "version": "1"}
    assert "Drop photos here" in client.get("/").text


def test_a_promoted_version_is_swapped_in_and_a_broken_one_is_not(api, tmp_path):
    client, champion = api
    registry = MlflowClient()
    in_flight = champion.current  # a request that started before the swap keeps this one
    registry.set_registered_model_alias(NAME, "champion", new_version(registry))
    assert champion.refresh()
    assert client.get("/api/model").json()["version"] == "2"
    assert in_flight.model.caption_images([photo()])[0]["caption"]
    damaged = tmp_path / "damaged_model"  # a version whose files are not a loadable model
    damaged.mkdir()
    (damaged / "MLmodel").write_text("flavors: [not, a, model\n")
    broken = new_version(registry, source=str(damaged))
    registry.set_registered_model_alias(NAME, "champion", broken)
    assert not champion.refresh()
    info = client.get("/api/model").json()
    assert info["version"] == "2" and info["last_error"].startswith(f"v{broken} failed to load")
    files = [("file", ("photo.jpg", photo(), "image/jpeg"))]
    assert client.post("/api/caption", files=files).json()["model"]["version"] == "2"


@pytest.mark.timeout(1200)
def test_the_page_in_a_browser(store, tmp_path):
    """Drop a JPEG, a text file and two photos on the page; promote another version and see the
    header change within the polling interval, with no restart."""
    from playwright.sync_api import expect, sync_playwright

    browser_path = chromium()
    images = {name: photo(i) for i, name in enumerate(["shapes-1.jpg", "shapes-2.jpg", "shapes-3.jpg"])}
    with running_app(store, "--poll-seconds", "1") as (app, url):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("version 1", timeout=60_000)

            def drop(files: dict[str, tuple[bytes, str]]) -> None:
                drop_files(page, files)

            drop({"shapes-1.jpg": (images["shapes-1.jpg"], "image/jpeg")})
            expect(page.locator(".card .caption")).to_have_count(1, timeout=120_000)
            expect(page.locator(".card .candidate")).to_have_count(3)
            # the model reranks by consensus: each candidate says why it stands where it does
            expect(page.locator(".card .candidate").first).to_contain_text("agreement")
            drop({"notes.txt": (b"not a photo", "text/plain")})
            expect(page.locator(".card .error")).to_contain_text("notes.txt", timeout=120_000)
            page.locator("#picker").set_input_files([  # the file picker, two at once
                {"name": n, "mimeType": "image/jpeg", "buffer": images[n]} for n in ("shapes-2.jpg", "shapes-3.jpg")])
            expect(page.locator(".card .caption")).to_have_count(3, timeout=120_000)
            # "Download with alt text": the tiny model is never sure enough (tag.min_confidence), and the page says so
            card = page.locator(".card", has_text="shapes-1.jpg")
            card.locator("button.download-alt").click()
            expect(card.locator(".download .download-status")).to_contain_text("no alt text written", timeout=60_000)
            expect(card.locator(".download .download-status")).to_contain_text("below tag.min_confidence")

            registry = MlflowClient()
            registry.set_registered_model_alias(NAME, "champion", new_version(registry))
            promoted = time.monotonic()
            expect(page.locator("#model")).to_contain_text("version 2", timeout=120_000)
            swap_s = time.monotonic() - promoted
            expect(page.locator("#swapped")).to_contain_text("was 1")
            drop({"shapes-1.jpg": (images["shapes-1.jpg"], "image/jpeg")})
            expect(page.locator(".card .meta").first).to_contain_text("model version 2", timeout=120_000)
            # a picture unlike the training photos: said so first, the guess behind a disclosure
            drop({"noise.png": (noise_png(), "image/png")})
            expect(page.locator(".card .caption").first).to_have_text("Not sure what this shows", timeout=120_000)
            guess = page.locator(".card details.guess").first
            expect(guess.locator("p")).to_be_hidden()
            guess.locator("summary").click()
            expect(guess.locator("p")).to_contain_text("unlike the photos it learnt from")
            page.screenshot(path=str(tmp_path / "app.png"))  # docs/app.png comes from a trained model
            browser.close()
        assert app.poll() is None  # no restart
        print(f"new champion shown {swap_s:.1f} s after promotion")


def test_an_oversized_upload_is_refused_before_it_is_parsed(api):
    client, _ = api
    limit = 4 * (200_000 + 65_536)  # max_rows x (max_image_bytes + headers)
    response = client.post("/api/caption", files=[("file", ("big.jpg", b"\xff" * (limit + 1), "image/jpeg"))])
    assert response.status_code == 413 and "request body over" in response.json()["detail"]

    def chunks():  # no Content-Length: the body is counted as it streams
        yield (b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")
        for _ in range(limit // 65_536 + 2):
            yield b"x" * 65_536
    response = client.post("/api/caption", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert response.status_code == 413
    assert client.get("/healthz").status_code == 200


def test_a_version_that_failed_is_retried_and_the_error_names_its_missing_files(store):
    registry = MlflowClient()
    champion = ChampionHolder(NAME, retry_s=0.05)
    assert champion.refresh() and champion.current.info["version"] == "1"
    second = str(new_version(registry))
    # the version's files (shared with the session's registry: put back whatever happens)
    files = Path(registry.get_model_version_download_uri(NAME, second).removeprefix("file://"))
    aside = files.with_name(files.name + ".aside")
    files.rename(aside)  # the artifacts are gone (a cleaned disk, a lost bucket)
    try:
        registry.set_registered_model_alias(NAME, "champion", second)
        assert not champion.refresh()
        assert champion.last_error.startswith(f"v{second} failed to load: its files are missing: {files} does not "
                                              "exist (restore them or point @champion at another version)")
        # this store is a copy: its mlflow.db names the files of the folder it was copied from
        assert "if the project was copied or moved" in champion.last_error
        assert "dvc repro -f -s register" in champion.last_error
        assert champion.current.info["version"] == "1"  # still serving
    finally:
        aside.rename(files)  # restored
    deadline = time.monotonic() + 30
    while not champion.refresh():
        assert time.monotonic() < deadline, champion.last_error
        time.sleep(0.05)
    assert champion.current.info["version"] == second and champion.last_error == ""
    registry.set_registered_model_alias(NAME, "champion", "1")  # back to v1: loads it again
    assert champion.refresh() and champion.current.info["version"] == "1"
    champion.last_error = "stale"
    assert not champion.refresh() and champion.last_error == ""  # the alias is on the served version


@pytest.fixture
def photo_index(store, tmp_path):
    """12 of the synthetic photos indexed by the champion; (index path, folder)."""
    from pipeline.registry.champion import load_champion_model
    from pipeline.search.indexing import index_folder
    from pipeline.search.photo_index import PhotoIndex

    folder = tmp_path / "Photos"
    (folder / "album").mkdir(parents=True)
    for i in range(12):
        (folder / ("album" if i % 3 else "") / f"photo-{i:02d}.jpg").write_bytes(photo(i))
    identity, model = load_champion_model(NAME)
    db = tmp_path / "photos.db"
    index_folder(folder, PhotoIndex(db), model, identity, batch_size=12, progress=False)
    return db, folder


def test_search_answers_with_photos_and_serves_only_indexed_thumbnails(store, photo_index, tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    from pipeline.app.routes import PhotoSearch
    from pipeline.registry.champion import load_champion_model
    from pipeline.search.indexing import index_folder
    from pipeline.search.photo_index import PhotoIndex

    db, folder = photo_index
    stored = PhotoIndex(db).all(with_embeddings=False)
    # a picture over the served model's pixel limit (1,000,000 here): the indexer records it as
    # refused, and the thumbnail endpoint must not decode it either
    Image.new("RGB", (1100, 1000), (250, 250, 250)).save(folder / "huge.png")
    identity, model = load_champion_model(NAME)
    index_folder(folder, PhotoIndex(db), model, identity, batch_size=12, progress=False)
    (tmp_path / "secret.jpg").write_bytes(photo(0))
    (folder / "not-indexed.jpg").write_bytes(photo(1))  # inside the folder, but not in the index
    with TestClient(create_app(ChampionHolder(NAME), 3600, LIMITS, PhotoSearch(str(db)))) as client:
        body = client.get("/api/search", params={"q": stored[0].caption, "limit": 5}).json()
        assert body["ranking"] == "likelihood" and len(body["results"]) == 5
        assert {r["path"] for r in body["results"]} <= {p.path for p in stored}
        for query in ("", "x" * 10_000, '"', "*", "NEAR red", "zebra"):
            response = client.get("/api/search", params={"q": query})
            assert response.status_code == 200, (query, response.text)
        assert client.get("/api/search", params={"q": "x" * 10_001}).status_code == 422
        assert client.get("/api/search", params={"q": "red", "ranking": "random"}).status_code == 400
        thumb = client.get("/api/photo", params={"path": stored[0].path})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        for hostile in ("../secret.jpg", str(tmp_path / "secret.jpg"), "/etc/passwd", "not-indexed.jpg",
                        "album/../../secret.jpg", "%2e%2e/secret.jpg", ""):
            assert client.get("/api/photo", params={"path": hostile}).status_code in (404, 422), hostile
        huge = client.get("/api/photo", params={"path": "huge.png"})
        assert huge.status_code == 422 and "too large" in huge.json()["detail"], huge.text
        assert client.get("/api/search/info").json()["photos"]["ok"] == 12
    with TestClient(create_app(ChampionHolder(NAME), 3600, LIMITS)) as client:  # no index served
        assert client.get("/api/search", params={"q": "red"}).status_code == 404


@pytest.mark.timeout(1200)
def test_searching_photos_in_a_browser(store, photo_index):
    """Type a query in the page's search box and see the right photo first."""
    from playwright.sync_api import expect, sync_playwright

    from pipeline.registry.champion import load_champion_model
    from pipeline.search.photo_index import PhotoIndex
    from pipeline.search.ranking import Searcher

    db, _ = photo_index
    _, model = load_champion_model(NAME)
    index = PhotoIndex(db)
    searcher = Searcher(index, model)
    # a photo the model's own caption finds first: that caption is the query, that photo the answer
    target = next(p for p in index.all(False) if searcher.search(p.caption, 1).hits[0].photo.path == p.path)
    browser_path = chromium()
    with running_app(store, "--index", str(db), "--poll-seconds", "60") as (_, url):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            page.locator("#q").fill(target.caption)
            page.locator("#search button").click()
            expect(page.locator(".hit")).to_have_count(12, timeout=120_000)
            expect(page.locator(".hit .meta").first).to_contain_text(target.path)
            expect(page.locator(".hit .meta").first).to_contain_text("confidence")  # how sure, in words
            page.wait_for_function("() => { const i = document.querySelector('.hit img');"
                                   " return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
            browser.close()


@pytest.fixture
def feedback_api(store):
    """The app with feedback on: a SQLite feedback store beside the copy's mlflow.db, traces in
    the copy's MLflow store."""
    from fastapi.testclient import TestClient

    from pipeline.app.feedback_desk import FeedbackDesk
    from tests.helpers import tiny_settings

    cfg = tiny_settings().feedback.model_copy(update={"db": str(store / "feedback.db")})
    desk = FeedbackDesk(cfg, NAME)
    champion = ChampionHolder(NAME)
    with TestClient(create_app(champion, poll_seconds=3600, limits=LIMITS, desk=desk)) as client:
        yield client, desk


def caption_one(client, index: int = 0) -> dict:
    response = client.post("/api/caption", files=[("file", (f"{index}.jpg", photo(index), "image/jpeg"))])
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def test_ratings_and_corrections_are_stored_traced_in_mlflow_and_can_be_taken_back(feedback_api):
    import base64

    client, desk = feedback_api
    first, second = caption_one(client, 0), caption_one(client, 1)
    assert len(first["caption_id"]) == 32 and first["caption_id"] != second["caption_id"]
    right = client.post("/api/feedback", json={"caption_id": first["caption_id"], "rating": "right"},
                        headers={"X-Submitter": "ana"})
    assert right.status_code == 201, right.text
    assert right.json()["rating"] == "right" and right.json()["submitter"] == "ana"
    fix = client.post("/api/feedback", json={
        "caption_id": second["caption_id"], "correction": "  a blue   square at the top ", "submitter": "ben",
        "image": base64.b64encode(photo(1)).decode()})
    assert fix.status_code == 201, fix.text
    assert fix.json()["rating"] == "wrong" and fix.json()["correction"] == "a blue square at the top"
    listed = client.get("/api/feedback").json()
    assert listed["count"] == 2 and {r["model"] for r in listed["feedback"]} == {f"{NAME}/1"}
    assert client.get("/api/feedback", params={"since": right.json()["created_at"]}).json()["count"] == 1
    assert client.get("/api/feedback/summary").json() == {
        "per_model": {f"{NAME}/1": {"right": 1, "wrong": 1, "corrections": 1}}}

    # MLflow: one trace per request, tagged with the model; the rating and the correction on it
    desk.drain()
    traces = mlflow.search_traces(locations=[mlflow.get_experiment_by_name("captioner-serving").experiment_id],
                                  return_type="list", flush=True)
    assert len(traces) == 2 and {t.info.tags["model.version"] for t in traces} == {"1"}
    by_id = {t.info.trace_id: t for t in traces}
    stored = {r["caption_id"]: r for r in desk.store.rows()}
    rated = mlflow.get_trace(stored[first["caption_id"]]["trace_id"]).info.assessments
    assert [(a.name, a.value, a.source.source_type, a.source.source_id) for a in rated] == [
        ("caption_right", True, "HUMAN", "ana")]
    corrected = {a.name: a for a in mlflow.get_trace(stored[second["caption_id"]]["trace_id"]).info.assessments}
    assert corrected["caption_right"].value is False
    assert corrected["correct_caption"].value == "a blue square at the top"
    assert set(by_id) == {stored[c]["trace_id"] for c in stored}
    # the trace keeps how sure the model was, beside what people then said of the caption
    outputs = by_id[stored[first["caption_id"]]["trace_id"]].data.spans[0].outputs
    assert outputs["confidence"] == [first["confidence"]] and outputs["abstained"] == [first["abstained"]]
    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert (tags["feedback.right"], tags["feedback.wrong"], tags["feedback.corrections"]) == ("1", "1", "1")

    # the browser that sent it takes it back (its owner cookie); then it is out of every export
    fix_id = fix.json()["id"]
    assert client.delete(f"/api/feedback/{fix_id}").status_code == 200
    assert client.delete(f"/api/feedback/{fix_id}").status_code == 404
    assert desk.store.corrections() == [] and client.get("/api/feedback").json()["count"] == 1


def test_a_locked_feedback_database_costs_the_caption_its_id_not_its_answer(feedback_api, store):
    """Another writer holds feedback.db: the caption comes back (without a caption_id) after the
    store's short wait, not after SQLite's 30 s busy timeout."""
    import sqlite3

    client, _ = feedback_api
    caption_one(client, 0)  # warm: the model's step graphs
    holder = sqlite3.connect(store / "feedback.db", timeout=1, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a write lock, as a long export or a stuck process holds it
    answer: dict = {}
    request = threading.Thread(target=lambda: answer.update(caption_one(client, 1)))
    try:
        request.start()
        request.join(timeout=25)  # bounded; SQLite alone would make it wait 30 s
        answered_while_locked = not request.is_alive()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        request.join(timeout=120)
    assert answered_while_locked, "the caption request waited for the lock"
    assert answer["caption"] and "caption_id" not in answer
    assert "caption_id" in caption_one(client, 2)  # the lock gone, ids again


OPERATOR = "operator-secret-0123456789abcdef"


def test_feedback_belongs_to_the_browser_that_sent_it_not_to_a_typed_name(store):
    """A name is an attribution; the owner cookie the app issued decides who may list and take
    back feedback; everyone's feedback is for the operator's credential alone."""
    import base64

    from fastapi.testclient import TestClient

    from pipeline.app.access import OWNER_COOKIE, OperatorCredential
    from pipeline.app.feedback_desk import FeedbackDesk

    cfg = tiny_settings().feedback.model_copy(update={"db": str(store / "feedback.db")})
    desk = FeedbackDesk(cfg, NAME)
    app = create_app(ChampionHolder(NAME), 3600, LIMITS, desk=desk, operator=OperatorCredential(OPERATOR))
    with TestClient(app) as ana:
        bob, stranger = TestClient(app), TestClient(app)  # other browsers: cookie jars of their own
        first, second = caption_one(ana, 0), caption_one(bob, 1)
        sent = ana.post("/api/feedback", json={"caption_id": first["caption_id"], "rating": "wrong",
                                               "correction": "a red circle", "submitter": "ana",
                                               "image": base64.b64encode(photo(0)).decode()})
        assert sent.status_code == 201, sent.text
        cookie = sent.cookies.get(OWNER_COOKIE) or ana.cookies.get(OWNER_COOKIE)
        assert cookie and len(cookie) == 43
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {a.strip() for a in sent.headers["set-cookie"].split(";")}
        theirs = bob.post("/api/feedback", json={"caption_id": second["caption_id"], "rating": "right",
                                                 "submitter": "ana"}, headers={"X-Submitter": "ana"})
        assert theirs.status_code == 201
        ana_id, bob_id = sent.json()["id"], theirs.json()["id"]
        # the token is never stored, only its hash; the listing shows no owner at all
        assert cookie not in (store / "feedback.db").read_bytes().decode("latin-1")
        # each browser lists its own; a stranger none; the operator everyone's
        assert [r["id"] for r in ana.get("/api/feedback").json()["feedback"]] == [ana_id]
        assert [r["id"] for r in bob.get("/api/feedback").json()["feedback"]] == [bob_id]
        assert stranger.get("/api/feedback").json()["count"] == 0
        everyone = stranger.get("/api/feedback", headers={"Authorization": f"Bearer {OPERATOR}"}).json()
        assert everyone["scope"] == "everyone" and [r["id"] for r in everyone["feedback"]] == [ana_id, bob_id]
        assert all("owner" not in r for r in everyone["feedback"])
        wrong = stranger.get("/api/feedback", headers={"Authorization": f"Bearer {OPERATOR[:-1]}x"}).json()
        assert wrong["count"] == 0
        # a typed name, a header or a query naming ana takes nothing back; a forged cookie neither
        for attempt in (bob.delete(f"/api/feedback/{ana_id}", headers={"X-Submitter": "ana"}),
                        stranger.delete(f"/api/feedback/{ana_id}", params={"submitter": "ana"}),
                        TestClient(app, cookies={OWNER_COOKIE: "A" * 43}).delete(f"/api/feedback/{ana_id}"),
                        stranger.delete(f"/api/feedback/{bob_id}", headers={"Authorization": "Bearer nope"})):
            assert attempt.status_code == 403 and "not sent from this browser" in attempt.json()["detail"]
        assert len(desk.store.rows()) == 2
        # the sender takes theirs back whatever name they typed; the operator anyone's
        assert ana.delete(f"/api/feedback/{ana_id}").status_code == 200
        assert stranger.delete(f"/api/feedback/{bob_id}",
                               headers={"Authorization": f"Bearer {OPERATOR}"}).status_code == 200
        assert desk.store.rows() == []
        # ids and times out of range are a 4xx, not a 500
        assert ana.delete("/api/feedback/99999999999999999999").status_code == 422
        assert ana.get("/api/feedback", params={"since": "9999-12-31T23:59:59-14:00"}).status_code == 422
        # a name keeps no invisible characters
        third = caption_one(ana, 2)
        named = ana.post("/api/feedback", json={"caption_id": third["caption_id"], "rating": "right",
                                                "submitter": "e\u0301va\x00 \u202eevil\u200b  x"})
        assert named.status_code == 201 and named.json()["submitter"] == "\u00e9va evil x"
        # the store's budget for photos: a new photo past it is refused, one it holds is not
        desk.cfg = desk.cfg.model_copy(update={"max_photo_bytes": desk.store.image_bytes() + 10})
        fourth = caption_one(ana, 3)
        full = ana.post("/api/feedback", json={"caption_id": fourth["caption_id"], "correction": "a dog",
                                               "image": base64.b64encode(photo(3)).decode()})
        assert full.status_code == 507 and "feedback.max_photo_bytes" in full.json()["detail"]
        held = ana.post("/api/feedback", json={"caption_id": first["caption_id"], "correction": "a red disc",
                                               "image": base64.b64encode(photo(0)).decode()})
        assert held.status_code == 201
    desk.close()


def test_bad_feedback_is_refused_with_the_reason_and_nothing_stored_is_lost(feedback_api):
    import base64

    client, desk = feedback_api
    result = caption_one(client, 2)
    image = base64.b64encode(photo(2)).decode()

    def send(**body):
        return client.post("/api/feedback", json={"caption_id": result["caption_id"], **body})

    kept = send(correction="a green circle in the middle", image=image)
    assert kept.status_code == 201
    refused = {
        "empty": (send(correction="   ", image=image), 422, "empty"),
        "long": (send(correction="word " * 60, image=image), 422, "at most 200"),
        "html": (send(correction="<script>alert(1)</script> a dog", image=image), 422, "HTML"),
        "entity": (send(correction="a cat &amp; a dog", image=image), 422, "HTML"),
        "control": (send(correction="a cat\x07 on a mat", image=image), 422, "control"),
        "bidi": (send(correction="a cat on a \u202etam", image=image), 422, "invisible"),
        "zero width": (send(correction="a c\u200bat", image=image), 422, "invisible"),
        "not a time": (client.get("/api/feedback", params={"since": "yesterday"}), 422, "not an ISO date"),
        "rating": (send(rating="maybe"), 422, "right, wrong"),
        "nothing": (send(), 422, "say something"),
        "contradiction": (send(rating="right", correction="a dog", image=image), 422, "says right"),
        "no photo": (send(correction="a dog"), 422, "needs the photo"),
        "other photo": (send(correction="a dog", image=base64.b64encode(photo(3)).decode()), 422,
                        "not the photo"),
        "not base64": (send(correction="a dog", image="%%%"), 422, "not base64"),
        "oversized": (send(correction="a dog", image="A" * 300_000), 413, "200000 bytes"),
        "unknown id": (client.post("/api/feedback", json={"caption_id": "f" * 32, "rating": "right"}), 404,
                       "no caption was served"),
    }
    for name, (response, status, words) in refused.items():
        assert response.status_code == status, (name, response.text)
        assert words in str(response.json()["detail"]), (name, response.text)
    huge = client.post("/api/feedback", content=b"{" + b" " * 400_000 + b"}",
                       headers={"content-type": "application/json"})
    assert huge.status_code == 413  # refused before it is parsed

    # a flood: the address gets feedback.max_per_minute requests a minute, then 429s
    codes = [send(rating="wrong").status_code for _ in range(1000)]
    assert set(codes) == {201, 429}
    assert codes.index(429) == codes.count(201) and codes[-1] == 429
    response = send(rating="right")
    assert response.status_code == 429 and "feedback.max_per_minute" in response.json()["detail"]
    assert response.headers["retry-after"] == "60"

    rows = desk.store.rows()
    assert sum(1 for r in rows if r["correction"]) == 1  # the one accepted correction, intact
    assert rows[0]["correction"] == "a green circle in the middle"
    assert len(rows) == 1 + codes.count(201)
    assert caption_one(client, 4)["caption"] and client.get("/healthz").status_code == 200


def test_correcting_a_caption_in_a_browser(store, tmp_path):
    """Say a caption is right, correct another in the card's box, take one back: the rows the
    database holds are what the person did."""
    from playwright.sync_api import expect, sync_playwright

    from pipeline.feedback.store import FeedbackStore
    from tests.helpers import write_params

    write_params(store)  # the app reads feedback.* from it: feedback.db beside mlflow.db
    browser_path = chromium()
    with running_app(store, "--poll-seconds", "60", drop_env=("CAPTIONER_FEEDBACK_DB",)) as (_, url):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(url)
            page.locator("#picker").set_input_files([
                {"name": f"noise-{i}.jpg", "mimeType": "image/jpeg", "buffer": unlike(i)} for i in (0, 1)])
            expect(page.locator(".card .caption")).to_have_count(2, timeout=120_000)
            page.locator("#submitter").fill("ana")
            cards = page.locator(".card")
            # the newest card is first; the photos were sent together, in order
            right_card, wrong_card = cards.nth(0), cards.nth(1)
            # pictures unlike the photos the model learnt from (noise): each card says it is not sure
            # in words and asks for the person's own caption first, the box open and empty
            for card in (right_card, wrong_card):
                expect(card.locator(".confidence")).to_contain_text(re.compile("low confidence|not sure"))
                expect(card.locator(".ask")).to_contain_text("not sure")
                expect(card.locator("input.correction")).to_be_visible()
                expect(card.locator("input.correction")).to_have_value("")
            right_card.locator(".rate-right").click()
            expect(right_card.locator(".status")).to_contain_text("Saved as feedback", timeout=60_000)
            wrong_card.locator("button[type=submit]").click()  # an empty caption is refused, said in the card
            expect(wrong_card.locator(".status")).to_have_class(re.compile("bad"), timeout=60_000)
            box = wrong_card.locator("input.correction")
            box.fill("a blue square near the top of a white picture")
            wrong_card.locator("button[type=submit]").click()
            expect(wrong_card.locator(".status")).to_contain_text("Saved as feedback", timeout=60_000)
            page.screenshot(path=str(tmp_path / "correction.png"))
            right_card.locator(".take-back").click()
            expect(right_card.locator(".status")).to_contain_text("taken back", timeout=60_000)
            browser.close()
        rows = FeedbackStore(store / "feedback.db").rows()
        assert [(r["rating"], r["correction"], r["submitter"]) for r in rows] == [
            ("wrong", "a blue square near the top of a white picture", "ana")]
        assert FeedbackStore(store / "feedback.db").image(rows[0]["image_sha256"]) in (unlike(0), unlike(1))


def test_a_real_app_believes_no_forwarded_address_no_foreign_origin_and_no_foreign_host(store):
    """uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise: with its defaults, a
    client past its limit could name any address and be let in again."""
    import httpx

    from tests.helpers import write_params

    write_params(store, **{"app.max_captions_per_minute": 2})

    def post(url, **headers):
        return httpx.post(f"{url}/api/caption", files=[("file", ("a.jpg", photo(0), "image/jpeg"))],
                          headers=headers, timeout=120)

    with running_app(store, "--poll-seconds", "60") as (_, url):
        assert [post(url).status_code for _ in range(2)] == [200, 200]
        over = post(url)
        assert over.status_code == 429 and "app.max_captions_per_minute" in over.json()["detail"]
        assert over.headers["retry-after"] == "60"
        forged = [post(url, **{"X-Forwarded-For": f"203.0.113.{i}", "X-Real-IP": f"198.51.100.{i}"}).status_code
                  for i in range(10)]
        assert forged == [429] * 10
        # another site's page cannot make this browser send feedback or captions
        crossed = httpx.post(f"{url}/api/feedback", json={"caption_id": "x", "rating": "right"},
                             headers={"Origin": "http://evil.example"}, timeout=30)
        assert crossed.status_code == 403 and "origin" in crossed.json()["detail"]
        sneaky = httpx.post(f"{url}/api/feedback", json={"caption_id": "x", "rating": "right"},
                            headers={"Sec-Fetch-Site": "cross-site"}, timeout=30)
        assert sneaky.status_code == 403
        same = httpx.post(f"{url}/api/feedback", json={"caption_id": "x", "rating": "right"},
                          headers={"Origin": url, "Sec-Fetch-Site": "same-origin"}, timeout=30)
        assert same.status_code == 404  # through the guard: an unknown caption id
        # DNS rebinding: a name that resolves to 127.0.0.1 but is not this app's
        assert httpx.get(f"{url}/healthz", headers={"Host": "evil.example"}, timeout=30).status_code == 400
        assert httpx.get(f"{url}/healthz", headers={"Host": "localhost"}, timeout=30).status_code == 200
        # a second app on the same port says so at once, and does not say it serves
        port = url.rsplit(":", 1)[1]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "PYTHONPATH": str(PROJECT)}
        busy = subprocess.run([sys.executable, "-m", "pipeline.cli", "app", "--port", port, "--model-name", NAME],
                              cwd=store, env=env, capture_output=True, text=True, timeout=300)
        assert busy.returncode == 2 and f"127.0.0.1:{port} cannot be used" in busy.stderr
        assert "serving" not in busy.stderr
    # behind a proxy the operator names, the forwarded address is the client's
    with running_app(store, "--poll-seconds", "60", "--trusted-proxies", "127.0.0.1") as (_, url):
        hop = {"X-Forwarded-For": "203.0.113.7"}
        assert [post(url, **hop).status_code for _ in range(3)] == [200, 200, 429]
        assert post(url, **{"X-Forwarded-For": "203.0.113.8"}).status_code == 200


def test_download_with_alt_text(store, tmp_path):
    """The photo comes back with the champion's caption as its own IPTC alt text (read back by
    ExifTool), nothing else changed; a person's alt text is kept; an unsure caption, hostile XMP
    and a format that cannot carry XMP get a reason instead of a file."""
    import io
    from urllib.parse import unquote

    from fastapi.testclient import TestClient
    from PIL import Image, ImageCms

    from tests.data.test_photo_metadata import LAUGHS, PERSON_XMP, image_data, read_back
    from tests.helpers import exiftool

    exiftool()

    def jpeg(index: int, **extra) -> bytes:  # a synthetic photo as a camera leaves it: EXIF, ICC (and XMP)
        exif = Image.Exif()
        exif[0x013B] = "Grace Hopper"
        buf = io.BytesIO()
        Image.open(io.BytesIO(photo(index))).save(buf, "JPEG", quality=90, exif=exif.tobytes(),
                                                   icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(), **extra)
        return buf.getvalue()

    path = "/api/photo-with-alt-text"
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(jpeg(0))
    # the tiny model is never sure enough for the default bar (tag.min_confidence 0.8): nothing is written
    cfg = tiny_settings(**{"app.max_captions_per_minute": 1000})
    with TestClient(create_app(ChampionHolder(NAME), 3600, LIMITS, tag=cfg.tag, alt_text=cfg.alt_text)) as client:
        refused = client.post(path, files=[("file", ("photo.jpg", upload.read_bytes(), "image/jpeg"))])
        assert refused.status_code == 422 and "below tag.min_confidence 0.8" in refused.json()["detail"]
    sure = cfg.tag.model_copy(update={"min_confidence": 0.0})
    with TestClient(create_app(ChampionHolder(NAME), 3600, LIMITS, tag=sure, alt_text=cfg.alt_text)) as client:
        got = client.post(path, files=[("file", ("My photo\n\";.jpg", upload.read_bytes(), "image/jpeg"))])
        assert got.status_code == 200, got.text
        assert got.headers["content-type"] == "image/jpeg" and got.headers["x-alt-text-action"] == "written"
        # the name sent never reaches the header as it was: quotes, line breaks and ; are gone
        assert re.fullmatch(r'attachment; filename="My_photo[A-Za-z0-9_]*-alt-text\.jpg"',
                            got.headers["content-disposition"]), got.headers["content-disposition"]
        out = tmp_path / "download.jpg"
        out.write_bytes(got.content)
        fields = read_back(out)[0]
        alt = fields["XMP-iptcCore:AltTextAccessibility"]
        assert alt == unquote(got.headers["x-alt-text"]) and alt.endswith(".") and alt[0].isupper()
        assert fields["XMP-captioner:Model"] == NAME and str(fields["XMP-captioner:ModelVersion"]) == "1"
        assert fields["XMP-captioner:ConfidenceWords"] == got.headers["x-confidence-words"]
        assert fields["IFD0:Artist"] == "Grace Hopper" and "ICC_Profile:ProfileDescription" in fields
        assert image_data(out, tmp_path) == image_data(upload, tmp_path)  # the image data byte for byte
        # what the app wrote, sent again: nothing more to write
        again = client.post(path, files=[("file", ("download.jpg", got.content, "image/jpeg"))])
        assert again.headers["x-alt-text-action"] == "unchanged" and again.content == got.content
        # a person's alt text is theirs: the photo comes back as it was sent
        person = jpeg(1, xmp=PERSON_XMP)
        kept = client.post(path, files=[("file", ("garden.jpg", person, "image/jpeg"))])
        assert kept.status_code == 200 and kept.headers["x-alt-text-action"] == "kept" and kept.content == person
        # hostile XMP (entities, a DTD) is never expanded, and nothing is written into it
        hostile = client.post(path, files=[("file", ("laughs.jpg", jpeg(2, xmp=LAUGHS), "image/jpeg"))])
        assert hostile.status_code == 422 and "DTD or entities" in hostile.json()["detail"]
        buf = io.BytesIO()
        Image.open(io.BytesIO(photo(3))).save(buf, "BMP")
        bmp = client.post(path, files=[("file", ("photo.bmp", buf.getvalue(), "image/bmp"))])
        assert bmp.status_code == 422 and "BMP kind cannot carry alt text" in bmp.json()["detail"]
        text = client.post(path, files=[("file", ("notes.jpg", b"not a photo at all", "image/jpeg"))])
        assert text.status_code == 422 and "notes.jpg" in text.json()["detail"]
        big = client.post(path, files=[("file", ("big.jpg", b"\xff" * (200_000 + 70_000), "image/jpeg"))])
        assert big.status_code == 413
        assert client.post(path).status_code == 422  # no file at all
