"""``captioner app``: a caption web page and JSON API over the registry's champion.

It loads ``models:/<name>@<alias>`` from the tracking server, checks the alias every
``poll_seconds`` and, when it moves, loads the new version in the background and swaps it in:
requests in flight finish on the version they started with, and a version that fails to load is
logged while the old one keeps serving. Routes:

* ``GET /``: the page (drop or pick photos; caption, the other beam candidates, time taken);
* ``POST /api/caption``: multipart upload, field ``file`` (repeatable) -> JSON per file;
* ``GET /api/model``: the version in use; ``GET /healthz``;
* with ``--index PATH``: ``GET /api/search?q=`` (photos of the index, best first) and
  ``GET /api/photo?path=`` (a thumbnail of an indexed photo, and only of one);
* feedback (unless ``--no-feedback``; ``pipeline/app/feedback_desk.py``): each caption comes with
  a ``caption_id``; ``POST /api/feedback`` (JSON: caption_id, rating right|wrong, correction,
  submitter, image = the photo in base64 with a correction), ``GET /api/feedback?since=`` (for
  export), ``DELETE /api/feedback/{id}`` (take it back), ``GET /api/feedback/summary``.
"""

import json
import logging
import threading
import time
from pathlib import Path

from pipeline.app.hot_swap import ChampionHolder, Served

FEEDBACK_PATH = "/api/feedback"

log = logging.getLogger("pipeline.app")
PAGE = Path(__file__).with_name("static") / "index.html"
NO_MODEL_BODY_LIMIT = 1 << 20  # bytes of a POST before any model is loaded (all get 503)


class BodyLimit:
    """ASGI middleware: refuse an upload larger than the served model's limits allow (HTTP 413)
    before it is parsed, whether or not it declares its length: the multipart parser would
    otherwise spool any size to disk first."""

    def __init__(self, app, champion: ChampionHolder):
        self.app, self.champion = app, champion

    def limit(self, path: str = "/api/caption") -> int:
        served = self.champion.current
        if served is None:  # every upload is refused (503) until a model is loaded
            return NO_MODEL_BODY_LIMIT
        limits = served.model.limits
        if path.startswith(FEEDBACK_PATH):  # one photo, in base64, and a few short fields
            return (limits.max_image_bytes + 2) // 3 * 4 + 65_536
        return limits.max_rows * (limits.max_image_bytes + 65_536)  # + multipart headers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.limit(scope.get("path", ""))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._refuse(send, limit)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # answer now; the app sees a client that went away
                refused = True
                await self._refuse(send, limit)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = json.dumps({"detail": f"request body over {limit} bytes (files per request x bytes per image)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class PhotoSearch:
    """The index the app serves search over (``captioner app --index PATH``)."""

    def __init__(self, index: str):
        from pipeline.search.photo_index import PhotoIndex
        from pipeline.search.ranking import Searcher

        self.store = PhotoIndex(index)
        self.root = self.store.root()
        if self.root is None:
            from pipeline.search.photo_index import PhotoIndexError

            raise PhotoIndexError(f"{self.store.url} holds no index yet: run captioner index DIR first")
        self.searcher = Searcher(self.store)
        self._lock = threading.Lock()

    def search(self, query: str, limit: int, ranking: str, model):
        with self._lock:  # one query at a time: the feature cache and the model's step graphs
            self.searcher.refresh()
            self.searcher.model = model
            return self.searcher.search(query, limit, ranking)

    def photo_file(self, relative: str) -> Path | None:
        """The file of an indexed photo, or None: only paths the index holds, resolved inside the
        indexed folder (a request's path never reaches the file system unchecked)."""
        photo = self.store.by_path(relative)
        if photo is None:
            return None
        path = (self.root / photo.path).resolve()
        return path if path.is_relative_to(self.root.resolve()) and path.is_file() else None


def thumbnail_jpeg(path: Path, size: int = 320) -> bytes:
    import io

    from PIL import Image, ImageOps

    from pipeline.data.images import to_rgb8

    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        img = to_rgb8(ImageOps.exif_transpose(img))
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()


def create_app(champion: ChampionHolder, poll_seconds: float, photos: PhotoSearch | None = None,
               desk=None):
    """The FastAPI app; the poller runs while the app does. With ``photos``, also search; with
    ``desk`` (a FeedbackDesk), caption ids, traces and feedback."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Header, HTTPException, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field

    from pipeline.app.feedback_desk import Refused

    class FeedbackBody(BaseModel):
        caption_id: str = Field(min_length=1, max_length=64, description="from a caption's result")
        rating: str | None = Field(None, description="right | wrong")
        correction: str | None = Field(None, max_length=100_000, description="the caption the photo should have")
        submitter: str | None = Field(None, max_length=1_000, description="who sends it (or header X-Submitter)")
        image: str | None = Field(None, description="the photo, base64 (needed with a correction)")

    @asynccontextmanager
    async def lifespan(app):
        stop = threading.Event()
        if champion.current is None:
            await run_in_threadpool(champion.refresh)
        poller = threading.Thread(target=champion.poll, args=(poll_seconds, stop), daemon=True, name="champion-poll")
        poller.start()
        yield
        stop.set()
        poller.join(timeout=poll_seconds + 5)
        if desk is not None:
            desk.close()

    app = FastAPI(title="captioner", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.add_middleware(BodyLimit, champion=champion)

    def serving() -> Served:
        served = champion.current  # this request keeps this version, whatever the poller does
        if served is None:
            raise HTTPException(503, f"no model loaded yet: {champion.last_error or 'loading'}")
        return served

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz():
        served = champion.current
        if served is None:
            return JSONResponse({"status": "loading", "error": champion.last_error}, status_code=503)
        return {"status": "ok", "version": served.info["version"]}

    @app.get("/api/model")
    def model_info():
        served = serving()
        return {**served.info, "alias": champion.alias, "poll_seconds": poll_seconds,
                "last_error": champion.last_error}

    @app.post("/api/caption")
    def caption(file: list[UploadFile] = File(..., description="one or more images; repeat the field")):
        served = serving()
        limits = served.model.limits
        if len(file) > limits.max_rows:
            raise HTTPException(400, f"too many files: {len(file)} in one request, the limit is {limits.max_rows}")
        start = time.perf_counter()
        # never more than the limit + 1 bytes of a file: enough for the model to say it is too large
        datas = [upload.file.read(limits.max_image_bytes + 1) for upload in file]
        if desk is None:
            results = served.model.caption_images(datas)
        else:
            with desk.traced(served.info, [u.filename for u in file]) as trace:
                results = served.model.caption_images(datas)
                trace["captions"] = [r["caption"] for r in results]
            desk.served(served.info, datas, results, trace.get("trace_id"))
        took_ms = (time.perf_counter() - start) * 1000
        return {"model": {"name": served.info["name"], "version": served.info["version"]},
                "ms": round(took_ms, 1),
                "results": [{"filename": u.filename, **r} for u, r in zip(file, results)]}

    @app.get("/api/search")
    def search(q: str = Query("", max_length=10_000, description="what is in the photos, in English"),
               limit: int = Query(12, ge=1, le=200), ranking: str = Query("likelihood")):
        if photos is None:
            raise HTTPException(404, "no photo index is served: start the app with --index PATH")
        from pipeline.search.ranking import RANKINGS

        if ranking not in RANKINGS:
            raise HTTPException(400, f"ranking must be one of {', '.join(RANKINGS)}")
        served = champion.current
        result = photos.search(q, limit, ranking, served.model if served else None)
        return {**result.to_json(), "model": served.info["version"] if served else None}

    @app.get("/api/photo")
    def photo(path: str = Query(..., max_length=4096, description="a path the index holds")):
        found = photos.photo_file(path) if photos is not None else None
        if found is None:
            raise HTTPException(404, "no such indexed photo")
        try:
            return Response(thumbnail_jpeg(found), media_type="image/jpeg")
        except (OSError, ValueError) as err:
            raise HTTPException(422, f"cannot read the photo: {str(err).splitlines()[0]}") from None

    def feedback_desk():
        if desk is None:
            raise HTTPException(404, "feedback is off in this app (started with --no-feedback)")
        return desk

    def rate_limited(request: Request):
        found = feedback_desk()
        if not found.limit.allow(request.client.host if request.client else "?"):
            raise HTTPException(429, f"more than {found.cfg.max_per_minute} feedback requests a minute from "
                                     "this address (feedback.max_per_minute): try again in a minute",
                                headers={"Retry-After": "60"})
        return found

    @app.post(FEEDBACK_PATH, status_code=201)
    def give_feedback(body: FeedbackBody, request: Request, x_submitter: str | None = Header(None, max_length=1000)):
        found = rate_limited(request)
        served = champion.current
        max_bytes = served.model.limits.max_image_bytes if served else NO_MODEL_BODY_LIMIT
        try:
            verdict = found.check(body.caption_id, body.rating, body.correction, body.submitter or x_submitter,
                                  body.image, max_bytes)
            row = found.add(verdict)
        except Refused as refused:
            raise HTTPException(refused.status, str(refused)) from None
        return {key: row[key] for key in ("id", "caption_id", "rating", "correction", "submitter", "created_at")}

    @app.get(FEEDBACK_PATH)
    def list_feedback(since: str | None = Query(None, max_length=64, description="ISO time: only later rows"),
                      limit: int = Query(1000, ge=1, le=10_000)):
        try:
            rows = feedback_desk().store.rows(since, limit)
        except ValueError as err:  # a since that is not a time
            raise HTTPException(422, str(err)) from None
        return {"feedback": rows, "count": len(rows)}

    @app.get(FEEDBACK_PATH + "/summary")
    def feedback_summary():
        return {"per_model": feedback_desk().store.counts()}

    @app.delete(FEEDBACK_PATH + "/{feedback_id}")
    def take_back(feedback_id: int, request: Request, submitter: str | None = Query(None, max_length=1000),
                  x_submitter: str | None = Header(None, max_length=1000)):
        outcome = rate_limited(request).delete(feedback_id, submitter or x_submitter)
        if outcome == "not found":
            raise HTTPException(404, f"no feedback {feedback_id} (or it was taken back already)")
        if outcome == "not yours":
            raise HTTPException(403, f"feedback {feedback_id} was sent by someone else (submitter differs)")
        return {"id": feedback_id, "deleted": True}

    @app.get("/api/search/info")
    def search_info():
        return {"enabled": photos is not None, **({"photos": photos.store.counts()} if photos else {})}

    return app


def serve(name: str, alias: str, host: str, port: int, poll_seconds: float, index: str | None = None,
          feedback=None) -> int:
    """Run the app; ``feedback`` (FeedbackSettings, None = off) opens the feedback store."""
    import uvicorn

    photos = PhotoSearch(index) if index else None
    desk = None
    if feedback is not None:
        from pipeline.app.feedback_desk import FeedbackDesk

        desk = FeedbackDesk(feedback, name)
        log.info("feedback goes to %s%s", desk.store.safe_url,
                 f", traces to MLflow experiment {feedback.experiment}" if feedback.trace else "")
    champion = ChampionHolder(name, alias, retry_s=poll_seconds)
    if not champion.refresh():
        log.error("cannot start: %s", champion.last_error)
        return 2
    log.info("serving %s v%s on http://%s:%d (checking @%s every %g s)", name,
             champion.current.info["version"], host, port, alias, poll_seconds)
    uvicorn.run(create_app(champion, poll_seconds, photos, desk), host=host, port=port, log_level="warning")
    return 0
