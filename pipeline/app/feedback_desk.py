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

What is refused, and how: ``check`` (HTTP 4xx with the reason) and ``access.RateLimit`` (429).
Who may do what (the owner token, the operator): ``pipeline/app/access.py``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import unicodedata
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.app.access import RateLimit
from pipeline.config import FeedbackSettings
from pipeline.feedback.retraining import AirflowApi, request_if_due
from pipeline.feedback.store import RATINGS, FeedbackStore, sha256_of
from pipeline.registry.tracking import ensure_experiment

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
    owner: str | None = None  # access.owner_key of the token that sent it


def clean_submitter(name: str | None) -> str | None:
    """A typed name as it is stored and shown: NFC, invisible characters (NUL, bidi overrides,
    zero-width marks) dropped, spaces collapsed, at most 200 characters; None when nothing is left.
    An attribution only: who may take feedback back is decided by the owner token."""
    if name is None:
        return None
    name = "".join(ch for ch in unicodedata.normalize("NFC", name) if unicodedata.category(ch) not in _HIDDEN)
    return " ".join(name.split())[:200] or None


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
        try:
            return ensure_experiment(self.cfg.experiment).experiment_id
        except Exception as err:  # a tracking store that cannot be written: serve without traces
            log.warning("no MLflow traces (experiment %s): %s", self.cfg.experiment, str(err).splitlines()[0])
            return None

    # -- captions --------------------------------------------------------------------------------
    @contextmanager
    def traced(self, info: dict, filenames: list[str]):
        """An MLflow trace around one caption request (or nothing when tracing is off); yields a
        dict the caller fills with ``captions`` (and their ``confidence``, ``abstained``), and that
        gets ``trace_id``."""
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
            span.set_outputs({"captions": record.get("captions", []),  # and how sure the model was of each
                              "confidence": record.get("confidence", []), "abstained": record.get("abstained", [])})
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
              image_b64: str | None, max_image_bytes: int, owner: str | None = None) -> Verdict:
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
        submitter = clean_submitter(submitter)
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
            if not self.store.has_image(caption["image_sha256"]) and \
                    self.store.image_bytes() + len(image) > self.cfg.max_photo_bytes:
                raise Refused(507, f"the feedback store holds its budget of photos ({self.cfg.max_photo_bytes} bytes, "
                                   "feedback.max_photo_bytes): a rating without a correction still works; an "
                                   "operator exports the corrections (dvc repro) or raises the budget")
        return Verdict(caption, rating, correction, submitter, image, owner)

    def add(self, verdict: Verdict) -> dict:
        row = self.store.add(verdict.caption["id"], verdict.rating, verdict.correction, verdict.submitter,
                             verdict.image, owner=verdict.owner)
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

    def delete(self, feedback_id: int, owner: str | None, operator: bool = False) -> str:
        return self.store.delete(feedback_id, owner, operator)

    def drain(self, timeout_s: float = 30) -> None:
        """Wait for the background MLflow calls (tests, shutdown)."""
        self._background.submit(lambda: None).result(timeout=timeout_s)

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=False)

