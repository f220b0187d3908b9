"""``captioner app``: a caption web page and JSON API over the registry's champion.

It loads ``models:/<name>@<alias>`` from the tracking server, checks the alias every
``poll_seconds`` and, when it moves, loads the new version in the background and swaps it in:
requests in flight finish on the version they started with, and a version that fails to load is
logged while the old one keeps serving. Routes:

* ``GET /``: the page (drop or pick photos; caption, the other beam candidates, time taken);
* ``POST /api/caption``: multipart upload, field ``file`` (repeatable) -> JSON per file: the
  caption, its candidates, how sure the model is (``confidence``, ``confidence_words``,
  ``abstained`` and its ``reason``) and ``spoken``, the caption as a reader should take it; with
  ``?attention=1``, ``attention``: where the model looked for each word ({"grid": [rows,
  columns], "words", "maps": per word rows x columns integers 0..100, the percent of that word's
  strongest region}; null for a model that reads one vector per photo). Bounded as the rest: at
  most ``max_rows`` photos of ``max_length`` words;
* ``POST /api/photo-with-alt-text``: one photo (field ``file``) -> the same photo with the
  champion's caption written into its own XMP (IPTC alt text, by ``tag.fields``), as
  ``captioner tag`` writes it: "Download with alt text". Nothing else in the file changes; an
  unsure caption is not written (422, with the reason), a person's alt text is kept as it is;
* ``GET /api/model``: the version in use; ``GET /healthz``;
* with ``--index PATH``: ``GET /api/search?q=`` (photos of the index, best first) and
  ``GET /api/photo?path=`` (a thumbnail of an indexed photo, and only of one);
* feedback (unless ``--no-feedback``; ``pipeline/app/feedback_desk.py``): each caption comes with
  a ``caption_id``; ``POST /api/feedback`` (JSON: caption_id, rating right|wrong, correction,
  submitter, image = the photo in base64 with a correction), ``GET /api/feedback?since=`` (the
  caller's own feedback; everyone's for an operator), ``DELETE /api/feedback/{id}`` (take it back:
  its sender or an operator), ``GET /api/feedback/summary``.

Who may do what (owner tokens, the operator's credential, origins, hosts, proxies, rate limits):
``pipeline/app/access.py``.
"""

import json
import logging
import re
import threading
import time
from pathlib import Path
from urllib.parse import quote

from pipeline.alttext.tagging import MEDIA_TYPES
from pipeline.app.access import (
    OWNER_COOKIE,
    OperatorCredential,
    RateLimit,
    cookie_header,
    cross_origin,
    host_allowed,
    new_owner_token,
    owner_key,
    valid_token,
)
from pipeline.app.hot_swap import ChampionHolder, Served
from pipeline.captioning.confidence import said_of
from pipeline.config import AltTextSettings, AppSettings, TagSettings
from pipeline.data.photo_metadata import MetadataError
from pipeline.errors import ReportedError

FEEDBACK_PATH = "/api/feedback"
ALT_TEXT_PATH = "/api/photo-with-alt-text"

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
        if path == ALT_TEXT_PATH:  # one photo
            return limits.max_image_bytes + 65_536
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

        self.store = PhotoIndex(index, create=False)
        self.root = self.store.root()
        if self.root is None:
            from pipeline.search.photo_index import PhotoIndexError

            raise PhotoIndexError(f"{self.store.url} holds no index yet: run captioner index DIR first")
        self.searcher = Searcher(self.store)
        self._lock = threading.Lock()

    def search(self, query: str, limit: int, ranking: str, model):
        import sqlalchemy as sa

        from pipeline.search.photo_index import damaged

        with self._lock:  # one query at a time: the feature cache and the model's step graphs
            try:
                self.searcher.refresh()
                self.searcher.model = model
                return self.searcher.search(query, limit, ranking)
            except sa.exc.SQLAlchemyError as err:  # damaged past its first pages
                raise damaged(self.store.safe_url, err) from None

    def photo_file(self, relative: str) -> Path | None:
        """The file of an indexed photo, or None: only paths the index holds, resolved inside the
        indexed folder (a request's path never reaches the file system unchecked)."""
        photo = self.store.by_path(relative)
        if photo is None:
            return None
        path = (self.root / photo.path).resolve()
        return path if path.is_relative_to(self.root.resolve()) and path.is_file() else None


THUMBNAIL_SIZE = 320


class AltTextWriter:
    """One ExifTool for the app's downloads, started at the first one, one download at a time."""

    def __init__(self, tag: TagSettings, alt_text: AltTextSettings):
        self.tag_cfg, self.alt_cfg = tag, alt_text
        self._tool = None
        self._lock = threading.Lock()

    def tag(self, data: bytes, name: str, said: dict, identity: str):
        from pipeline.alttext.tagging import tag_upload
        from pipeline.data.photo_metadata import PhotoMetadata

        with self._lock:
            if self._tool is None:
                self._tool = PhotoMetadata(self.tag_cfg.max_xmp_bytes)
            return tag_upload(self._tool, data, name, said, identity, self.tag_cfg, self.alt_cfg)

    def close(self) -> None:
        with self._lock:
            if self._tool is not None:
                self._tool.close()
                self._tool = None


class RequestGuard:
    """ASGI middleware, before any route: a ``Host`` the app does not answer is refused (400: DNS
    rebinding), and so is a state-changing request from a page of another origin (403)."""

    def __init__(self, app, hosts: list[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if not host_allowed(headers.get("host", ""), self.hosts):
                return await _answer(send, 400, f"this app does not answer to the host {headers.get('host', '')[:100]!r} "
                                                "(captioner app --allowed-hosts)")
            why = cross_origin(scope["method"], headers, scope.get("scheme", "http"))
            if why is not None:
                return await _answer(send, 403, why)
        await self.app(scope, receive, send)


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def captioned(model, datas: list[bytes], attention: bool) -> list[dict]:
    """``model.caption_images(datas)``, with where it looked for each word when ``attention`` is
    asked: ``attention`` is then null for a model without (one that reads one vector per photo, or
    one registered before models could say, whose packaged code takes no such request)."""
    if attention and hasattr(model, "attention_of"):
        return model.caption_images(datas, attention=True)
    results = model.caption_images(datas)
    if attention:
        for result in results:
            result["attention"] = None
    return results


def create_app(champion: ChampionHolder, poll_seconds: float, limits: AppSettings,
               photos: PhotoSearch | None = None, desk=None, operator: OperatorCredential | None = None,
               hosts: list[str] | None = None, tag: TagSettings | None = None,
               alt_text: AltTextSettings | None = None):
    """The FastAPI app; the poller runs while the app does. ``limits``: requests per client
    address. With ``photos``, also search; with ``desk`` (a FeedbackDesk), caption ids, traces and
    feedback; ``operator`` (default: none) may list and take back anyone's feedback; ``hosts``:
    the Host headers answered (default: any); ``tag`` and ``alt_text``: how captions are written
    into downloaded photos (params ``tag.*``, ``alt_text.*``; without them, no such downloads)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Header, HTTPException, Query, Request, UploadFile
    from fastapi import Path as PathParam
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field

    from pipeline.app.feedback_desk import Refused
    from pipeline.data.images import ImageError, thumbnail_jpeg

    operator = operator or OperatorCredential(None)
    caption_limit = RateLimit(limits.max_captions_per_minute)
    writer = AltTextWriter(tag, alt_text) if tag is not None and alt_text is not None else None

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
        if writer is not None:
            writer.close()

    app = FastAPI(title="captioner", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.add_middleware(BodyLimit, champion=champion)
    app.add_middleware(RequestGuard, hosts=hosts or ["*"])  # added last: runs first

    def client_address(request: Request) -> str:
        # the connection's peer: uvicorn rewrites it from X-Forwarded-For only for --trusted-proxies
        return request.client.host if request.client else "?"

    def owner_token(request: Request, response: Response) -> str:
        """The token this browser holds, or a new one handed to it in a cookie."""
        token = valid_token(request.cookies.get(OWNER_COOKIE))
        if token is None:
            token = new_owner_token()
            response.headers.append("set-cookie", cookie_header(token, request.url.scheme == "https"))
        return token

    def serving() -> Served:
        served = champion.current  # this request keeps this version, whatever the poller does
        if served is None:
            raise HTTPException(503, f"no model loaded yet: {champion.last_error or 'loading'}")
        return served

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request, response: Response) -> str:
        if desk is not None:
            owner_token(request, response)  # before the first feedback: two at once share one owner
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

    def limited(request: Request) -> None:
        if not caption_limit.allow(client_address(request)):
            raise HTTPException(429, f"more than {limits.max_captions_per_minute} caption requests a minute from "
                                     "this address (app.max_captions_per_minute): try again in a minute",
                                headers={"Retry-After": "60"})

    @app.post(ALT_TEXT_PATH)
    def photo_with_alt_text(request: Request, file: UploadFile = File(..., description="one photo")):
        """The photo back with the champion's caption as its own alt text (a download)."""
        if writer is None:
            raise HTTPException(404, "this app writes no alt text into photos (started without tag.* settings)")
        limited(request)
        served = serving()
        data = file.file.read(served.model.limits.max_image_bytes + 1)
        (said,) = served.model.caption_images([data])
        if said.get("error"):
            raise HTTPException(422, f"{file.filename}: {said['error']}")
        identity = f"{served.info['name']}/{served.info['version']}"
        try:
            body, done, file_type = writer.tag(data, file.filename or "photo", said, identity)
        except MetadataError as err:
            raise HTTPException(503, f"this server cannot write photo metadata: {err}") from None
        if done.action not in ("written", "unchanged", "kept"):
            raise HTTPException(422, f"no alt text written: {done.detail}")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(file.filename or "photo").stem)[:80].strip("._") or "photo"
        return Response(body, media_type=MEDIA_TYPES.get(file_type, "application/octet-stream"), headers={
            "Content-Disposition": f'attachment; filename="{stem}-alt-text.{file_type}"',
            "X-Alt-Text-Action": done.action,  # written | unchanged (already so) | kept (a person's, left as is)
            "X-Alt-Text": quote(done.detail if done.action == "written" else "", safe=" .,;:!?'-"),
            "X-Confidence-Words": said_of(said)["confidence_words"]})

    @app.post("/api/caption")
    def caption(request: Request, file: list[UploadFile] = File(..., description="one or more images; repeat the field"),
                attention: bool = Query(False, description="also where the model looked for each word (an attention "
                                                           "model; null for one that reads one vector per photo)")):
        limited(request)
        served = serving()
        model_limits = served.model.limits
        if len(file) > model_limits.max_rows:
            raise HTTPException(400, f"too many files: {len(file)} in one request, the limit is {model_limits.max_rows}")
        start = time.perf_counter()
        # never more than the limit + 1 bytes of a file: enough for the model to say it is too large
        datas = [upload.file.read(model_limits.max_image_bytes + 1) for upload in file]
        if desk is None:
            results = captioned(served.model, datas, attention)
        else:
            with desk.traced(served.info, [u.filename for u in file]) as trace:
                results = captioned(served.model, datas, attention)
                trace["captions"] = [r["caption"] for r in results]
                trace["confidence"] = [r.get("confidence") for r in results]
                trace["abstained"] = [bool(r.get("abstained")) for r in results]
            desk.served(served.info, datas, results, trace.get("trace_id"))
        took_ms = (time.perf_counter() - start) * 1000
        return {"model": {"name": served.info["name"], "version": served.info["version"]},
                "ms": round(took_ms, 1),
                "results": [{"filename": u.filename, **r, **({} if r.get("error") else said_of(r))}
                            for u, r in zip(file, results)]}

    @app.get("/api/search")
    def search(q: str = Query("", max_length=10_000, description="what is in the photos, in English"),
               limit: int = Query(12, ge=1, le=200), ranking: str = Query("likelihood")):
        if photos is None:
            raise HTTPException(404, "no photo index is served: start the app with --index PATH")
        from pipeline.search.ranking import RANKINGS

        if ranking not in RANKINGS:
            raise HTTPException(400, f"ranking must be one of {', '.join(RANKINGS)}")
        served = champion.current
        try:
            result = photos.search(q, limit, ranking, served.model if served else None)
        except ReportedError as err:
            raise HTTPException(503, str(err)) from None
        return {**result.to_json(), "model": served.info["version"] if served else None}

    @app.get("/api/photo")
    def photo(path: str = Query(..., max_length=4096, description="a path the index holds")):
        found = photos.photo_file(path) if photos is not None else None
        if found is None:
            raise HTTPException(404, "no such indexed photo")
        served = serving()  # its pixel limit holds here too: the index may hold refused photos
        try:
            return Response(thumbnail_jpeg(found, THUMBNAIL_SIZE, served.model.limits.max_image_pixels),
                            media_type="image/jpeg")
        except (ImageError, OSError) as err:
            raise HTTPException(422, f"cannot show the photo: {str(err).splitlines()[0]}") from None

    def feedback_desk():
        if desk is None:
            raise HTTPException(404, "feedback is off in this app (started with --no-feedback)")
        return desk

    def rate_limited(request: Request):
        found = feedback_desk()
        if not found.limit.allow(client_address(request)):
            raise HTTPException(429, f"more than {found.cfg.max_per_minute} feedback requests a minute from "
                                     "this address (feedback.max_per_minute): try again in a minute",
                                headers={"Retry-After": "60"})
        return found

    @app.post(FEEDBACK_PATH, status_code=201)
    def give_feedback(body: FeedbackBody, request: Request, response: Response,
                      x_submitter: str | None = Header(None, max_length=1000)):
        found = rate_limited(request)
        served = champion.current
        max_bytes = served.model.limits.max_image_bytes if served else NO_MODEL_BODY_LIMIT
        owner = owner_key(owner_token(request, response))
        try:
            verdict = found.check(body.caption_id, body.rating, body.correction, body.submitter or x_submitter,
                                  body.image, max_bytes, owner)
            row = found.add(verdict)
        except Refused as refused:
            raise HTTPException(refused.status, str(refused)) from None
        return {key: row[key] for key in ("id", "caption_id", "rating", "correction", "submitter", "created_at")}

    @app.get(FEEDBACK_PATH)
    def list_feedback(request: Request, since: str | None = Query(None, max_length=64, description="ISO time: only later rows"),
                      limit: int = Query(1000, ge=1, le=10_000),
                      authorization: str | None = Header(None, max_length=1000)):
        """The caller's own feedback (by the browser's owner token); everyone's for an operator."""
        everyone = operator.holds(authorization)
        token = valid_token(request.cookies.get(OWNER_COOKIE))
        if not everyone and token is None:
            return {"feedback": [], "count": 0, "scope": "yours"}
        try:
            rows = feedback_desk().store.rows(since, limit, owner=None if everyone else owner_key(token))
        except ValueError as err:  # a since that is not a time
            raise HTTPException(422, str(err)) from None
        rows = [{k: v for k, v in row.items() if k != "owner"} for row in rows]
        return {"feedback": rows, "count": len(rows), "scope": "everyone" if everyone else "yours"}

    @app.get(FEEDBACK_PATH + "/summary")
    def feedback_summary():
        return {"per_model": feedback_desk().store.counts()}

    @app.delete(FEEDBACK_PATH + "/{feedback_id}")
    def take_back(request: Request, feedback_id: int = PathParam(ge=1, le=2**63 - 1),
                  authorization: str | None = Header(None, max_length=1000)):
        token = valid_token(request.cookies.get(OWNER_COOKIE))
        outcome = rate_limited(request).delete(feedback_id, owner_key(token) if token else None,
                                               operator=operator.holds(authorization))
        if outcome == "not found":
            raise HTTPException(404, f"no feedback {feedback_id} (or it was taken back already)")
        if outcome == "not yours":
            raise HTTPException(403, f"feedback {feedback_id} was not sent from this browser: only the browser that "
                                     "sent it (its owner cookie) or an operator (CAPTIONER_ADMIN_TOKEN) may take it back")
        return {"id": feedback_id, "deleted": True}

    @app.get("/api/search/info")
    def search_info():
        return {"enabled": photos is not None, **({"photos": photos.store.counts()} if photos else {})}

    return app


def serve(name: str, alias: str, host: str, port: int, poll_seconds: float, limits: AppSettings,
          index: str | None = None, feedback=None, trusted_proxies: list[str] | None = None,
          extra_hosts: list[str] | None = None, tag: TagSettings | None = None,
          alt_text: AltTextSettings | None = None) -> int:
    """Run the app; ``feedback`` (FeedbackSettings, None = off) opens the feedback store;
    ``trusted_proxies``: addresses whose X-Forwarded-For is believed (default: none);
    ``extra_hosts``: Host headers answered besides the defaults (``access.allowed_hosts``)."""
    import socket

    import uvicorn

    from pipeline.app.access import allowed_hosts

    try:
        operator = OperatorCredential.from_env()
    except ValueError as err:
        log.error("cannot start: %s", err)
        return 2
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # first: a busy port is said at once, not after the model loaded and "serving on" was logged
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        log.error("cannot start: %s:%d cannot be used (%s): pick another --port or stop what holds it",
                  host, port, err.strerror or err)
        return 2
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
        sock.close()
        return 2
    log.info("serving %s v%s on http://%s:%d (checking @%s every %g s)%s%s", name,
             champion.current.info["version"], host, port, alias, poll_seconds,
             "; operator credential set" if operator.configured else "",
             f"; proxy headers believed from {', '.join(trusted_proxies)}" if trusted_proxies else "")
    app = create_app(champion, poll_seconds, limits, photos, desk, operator, allowed_hosts(host, extra_hosts or []),
                     tag, alt_text)
    config = uvicorn.Config(app, log_level="warning", proxy_headers=bool(trusted_proxies),
                            forwarded_allow_ips=trusted_proxies or [])
    uvicorn.Server(config).run(sockets=[sock])
    return 0
