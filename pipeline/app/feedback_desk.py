"""The app's side of the feedback loop: ids for served captions, people's ratings and
corrections, their traces in MLflow, and the request for a retraining run.

Every caption the app returns gets a ``caption_id`` and a row in the feedback store; every
``POST /api/caption`` is one MLflow trace (experiment ``feedback.experiment``) tagged with the
model name and version. A rating is attached to that trace as an MLflow feedback assessment
(``caption_right``: true or false), a correction as an expectation (``correct_caption``), both
with the person as a HUMAN source; the registered model version's tags ``feedback.right``,
``feedback.wrong`` and ``feedback.corrections`` count them, so the registry shows per version
what people thought. MLflow calls run in one background thread: a slow or unreachable
tracking server never holds a request up, and the database row, which the training data comes
from, is written first.

What is refused, and how: ``check`` (HTTP 4xx with the reason) and ``RateLimit`` (429).
"""

from __future__ import annotations

import base64
import binascii
import collections
import logging
import re
import threading
import time
import unicodedata
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.config import FeedbackSettings
from pipeline.feedback.retraining import AirflowApi, request_if_due
from pipeline.feedback.store import RATINGS, FeedbackStore, sha256_of

log = logging.getLogger("pipeline.app")
# a correction is a sentence: tags, entities and control characters are not (one rule, here)
_MARKUP = re.compile(r"<\s*[a-zA-Z!/?]|&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")
# control and format characters (Cc, Cf: bidi overrides, zero-width marks) and line separators:
# invisible in the app, they would reach the training captions as they are
_HIDDEN = {"Cc", "Cf", "Cs", "Zl", "Zp"}


class Refused(Exception):
    """A feedback request the app turns down: ``status`` is the HTTP code, the message the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Verdict:
    """A checked feedback request, ready to store."""

    caption: dict
    rating: str | None
    correction: str | None
    submitter: str | None
    image: bytes | None


def check_correction(text: str, max_chars: int) -> str:
    """The correction as it will be stored (spaces collapsed), or Refused(422) saying why not."""
    text = " ".join(text.split())
    if not text:
        raise Refused(422, "the correction is empty: write the caption the photo should have")
    if len(text) > max_chars:
        raise Refused(422, f"the correction has {len(text)} characters; at most {max_chars} "
                           "(feedback.max_correction_chars): one sentence about the photo")
    if _MARKUP.search(text):
        raise Refused(422, "the correction contains HTML (a tag or an entity): write plain text")
    if any(unicodedata.category(ch) in _HIDDEN for ch in text):
        raise Refused(422, "the correction contains control or invisible formatting characters "
                           "(such as a bidi override or a zero-width mark): write plain text")
    return text


class RateLimit:
    """At most ``per_minute`` requests per key (the client's address) in any 60 seconds."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._seen: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:  # forget idle clients (bounded memory under a flood of addresses)
                self._seen = {k: q for k, q in self._seen.items() if q and now - q[-1] < 60}
            times = self._seen.setdefault(key, collections.deque())
            while times and now - times[0] >= 60:
                times.popleft()
            if len(times) >= self.per_minute:
                return False
            times.append(now)
            return True


class FeedbackDesk:
    """The store, the limits, the tracing and the retraining request, as the app uses them."""

    def __init__(self, cfg: FeedbackSettings, model_name: str, store: FeedbackStore | None = None,
                 airflow: AirflowApi | None = None):
        self.cfg, self.model_name = cfg, model_name
        self.store = store or FeedbackStore(cfg.store_url)
        self.airflow = airflow if airflow is not None else AirflowApi.from_env()
        self.limit = RateLimit(cfg.max_per_minute)
        self._background = ThreadPoolExecutor(1, thread_name_prefix="feedback-mlflow")
        self._experiment_id: str | None = None
        if cfg.trace:
            self._experiment_id = self._experiment()

    def _experiment(self) -> str | None:
        import mlflow

        try:
            experiment = mlflow.get_experiment_by_name(self.cfg.experiment)
            return experiment.experiment_id if experiment else mlflow.create_experiment(self.cfg.experiment)
        except Exception as err:  # a tracking store that cannot be written: serve without traces
            log.warning("no MLflow traces (experiment %s): %s", self.cfg.experiment, str(err).splitlines()[0])
            return None

    # -- captions --------------------------------------------------------------------------------
    @contextmanager
    def traced(self, info: dict, filenames: list[str]):
        """An MLflow trace around one caption request (or nothing when tracing is off); yields a
        dict the caller fills with ``captions``, and that gets ``trace_id``."""
        record: dict = {}
        if self._experiment_id is None:
            yield record
            return
        import mlflow
        from mlflow.entities.trace_location import MlflowExperimentLocation

        with mlflow.start_span(name="caption_photos", span_type="CHAT_MODEL",
                               trace_destination=MlflowExperimentLocation(self._experiment_id)) as span:
            span.set_inputs({"files": filenames})
            mlflow.update_current_trace(tags={"model.name": info["name"], "model.version": str(info["version"])})
            yield record
            span.set_outputs({"captions": record.get("captions", [])})
            record["trace_id"] = span.trace_id

    def served(self, info: dict, datas: list[bytes], results: list[dict], trace_id: str | None) -> None:
        """Give each good result a ``caption_id`` and record it; a store that fails costs the ids,
        never the captions."""
        model = f"{info['name']}/{info['version']}"
        rows = []
        for data, result in zip(datas, results):
            if result.get("caption") and not result.get("error"):
                result["caption_id"] = uuid.uuid4().hex
                rows.append({"id": result["caption_id"], "model": model, "caption": result["caption"],
                             "image_sha256": sha256_of(data), "trace_id": trace_id})
        try:
            self.store.served(rows)
        except Exception as err:  # SQLAlchemyError, OSError: the person still gets the caption
            log.warning("cannot record served captions in %s: %s", self.store.safe_url, str(err).splitlines()[0])
            for result in results:
                result.pop("caption_id", None)

    # -- feedback --------------------------------------------------------------------------------
    def check(self, caption_id: str, rating: str | None, correction: str | None, submitter: str | None,
              image_b64: str | None, max_image_bytes: int) -> Verdict:
        """Refused(4xx) with the reason, or the request as it will be stored."""
        if rating is not None and rating not in RATINGS:
            raise Refused(422, f"rating must be one of {', '.join(RATINGS)}")
        if rating is None and correction is None:
            raise Refused(422, "say something: a rating (right or wrong) and/or a correction")
        if correction is not None:
            correction = check_correction(correction, self.cfg.max_correction_chars)
            if rating == "right":
                raise Refused(422, "a correction says the caption was wrong, but the rating says right")
            rating = "wrong"
        if submitter is not None:
            submitter = " ".join(submitter.split())[:200] or None
        caption = self.store.caption(caption_id)
        if caption is None:
            raise Refused(404, f"no caption was served with id {caption_id!r}")
        image = None
        if correction is not None:
            if not image_b64:
                raise Refused(422, "a correction needs the photo (field image: the file, base64)")
            if len(image_b64) > (max_image_bytes + 2) // 3 * 4 + 4:
                raise Refused(413, f"the photo is over {max_image_bytes} bytes (serving.max_image_bytes)")
            try:
                image = base64.b64decode(image_b64, validate=True)
            except (binascii.Error, ValueError):
                raise Refused(422, "image is not base64") from None
            if sha256_of(image) != caption["image_sha256"]:
                raise Refused(422, f"this is not the photo caption {caption_id} was written for")
        return Verdict(caption, rating, correction, submitter, image)

    def add(self, verdict: Verdict) -> dict:
        row = self.store.add(verdict.caption["id"], verdict.rating, verdict.correction, verdict.submitter,
                             verdict.image)
        self._background.submit(self._after, verdict, row)
        return row

    def _after(self, verdict: Verdict, row: dict) -> None:
        """MLflow assessments and version tags, then the retraining request (background thread)."""
        caption = verdict.caption
        if self._experiment_id is not None and caption.get("trace_id"):
            try:
                self._assess(verdict, row)
            except Exception as err:  # tracking store down: the database keeps the feedback
                log.warning("feedback %s not attached to trace %s: %s", row["id"], caption["trace_id"],
                            str(err).splitlines()[0])
        if verdict.correction is not None:
            try:
                request_if_due(self.store, self.model_name, self.cfg.min_new, self.airflow)
            except Exception as err:
                log.warning("retraining request failed: %s", str(err).splitlines()[0])

    def _assess(self, verdict: Verdict, row: dict) -> None:
        import mlflow
        from mlflow.entities import AssessmentSource

        caption = verdict.caption
        mlflow.flush_trace_async_logging()  # the request's trace may still be on its way to the store
        source = AssessmentSource(source_type="HUMAN", source_id=verdict.submitter or "anonymous")
        meta = {"caption_id": caption["id"], "feedback_id": str(row["id"]), "model": caption["model"]}
        if verdict.rating:
            mlflow.log_feedback(trace_id=caption["trace_id"], name="caption_right", value=verdict.rating == "right",
                                source=source, rationale=verdict.correction, metadata=meta)
        if verdict.correction:
            mlflow.log_expectation(trace_id=caption["trace_id"], name="correct_caption", value=verdict.correction,
                                   source=source, metadata=meta)
        name, _, version = caption["model"].rpartition("/")
        counts = self.store.counts().get(caption["model"], {})
        client = mlflow.MlflowClient()
        for key in ("right", "wrong", "corrections"):
            client.set_model_version_tag(name, version, f"feedback.{key}", str(counts.get(key, 0)))

    def delete(self, feedback_id: int, submitter: str | None) -> str:
        return self.store.delete(feedback_id, submitter)

    def drain(self, timeout_s: float = 30) -> None:
        """Wait for the background MLflow calls (tests, shutdown)."""
        self._background.submit(lambda: None).result(timeout=timeout_s)

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=False)

