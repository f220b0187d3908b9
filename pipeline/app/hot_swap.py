"""The champion as the app serves it: the version the alias points at, swapped in without a restart.

``ChampionHolder.refresh()`` reads ``models:/<name>@<alias>``; when the alias moved it loads the
new version in the calling thread and swaps it in with one reference assignment, so a request
in flight finishes on the version it started with. A version that fails to load is logged and
the old one keeps serving.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field

from pipeline.registry.champion import ALIAS, describe_load_error
from pipeline.registry.pyfunc_model import CaptionModel

log = logging.getLogger("pipeline.app")
SCORES = ("beam_bleu4", "beam_meteor", "beam_rouge_l", "beam_cider")
MAX_RETRY_S = 600  # a version that keeps failing is retried every 10 minutes


@dataclass(frozen=True)
class Served:
    """One loaded model version and what the page header says about it."""

    model: CaptionModel
    info: dict


@dataclass
class ChampionHolder:
    """The version the alias points at, swapped in atomically (one reference assignment).

    A version that fails to load is retried, not given up on: after ``retry_s`` seconds, then
    twice as long each time, up to ``MAX_RETRY_S`` (its files may be restored, a server may come
    back). ``last_error`` says why the alias's version is not served, and is cleared as soon as
    the alias points at the version being served."""

    name: str
    alias: str = ALIAS
    retry_s: float = 10.0
    current: Served | None = None
    last_error: str = ""
    _failures: dict = field(default_factory=dict)  # version -> (failed attempts, monotonic time of the next)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self) -> bool:
        """Load the alias's version if it moved; True when a new version was swapped in. A
        version that cannot be loaded is logged and retried later; the old one keeps serving."""
        from mlflow import MlflowClient

        with self._lock:  # one load at a time (the poller and a first request may race)
            client = MlflowClient()
            try:
                version = client.get_model_version_by_alias(self.name, self.alias)
            except Exception as err:  # MlflowException: no such model/alias; connection errors
                self.last_error = f"cannot read {self.name}@{self.alias}: {str(err).splitlines()[0]}"
                log.warning("%s", self.last_error)
                return False
            number = str(version.version)  # an int from some MLflow calls, a str from others
            if self.current and self.current.info["version"] == number:
                self.last_error = ""  # the alias is back on the version being served
                return False
            attempts, next_try = self._failures.get(number, (0, 0.0))
            if time.monotonic() < next_try:
                return False
            try:
                served = load_version(client, self.name, version)
            except Exception as err:
                wait = min(self.retry_s * 2 ** attempts, MAX_RETRY_S)
                self._failures[number] = (attempts + 1, time.monotonic() + wait)
                self.last_error = f"v{number} failed to load: {describe_load_error(client, self.name, version, err)}"
                log.error("%s; still serving %s; retrying in %.0f s", self.last_error,
                          f"v{self.current.info['version']}" if self.current else "nothing", wait)
                return False
            old = self.current.info["version"] if self.current else None
            self.current = served
            self.last_error = ""
            self._failures.pop(number, None)
            log.info("now serving %s v%s (was %s)", self.name, number, f"v{old}" if old else "none")
            return True

    def poll(self, seconds: float, stop: threading.Event) -> None:
        while not stop.wait(seconds):
            try:
                self.refresh()
            except Exception:  # the poller must outlive any one bad check
                log.exception("checking %s@%s failed", self.name, self.alias)


def load_version(client, name: str, version) -> Served:
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").unwrap_python_model()
    if not hasattr(model, "caption_images"):
        raise TypeError("not a captioner model (no caption_images)")
    run = client.get_run(version.run_id) if version.run_id else None
    metrics = run.data.metrics if run else {}
    tags = version.tags or {}
    promoted = tags.get("promoted_at") or dt.datetime.fromtimestamp(
        version.creation_timestamp / 1000, dt.UTC).isoformat(timespec="seconds")
    info = {"name": name, "version": str(version.version), "run_id": version.run_id, "promoted_at": promoted,
            "decision": tags.get("decision", ""), "scores": {k: round(metrics[k], 4) for k in SCORES if k in metrics},
            "limits": model.limits.model_dump(), "beam_size": model.decoding.beam_size}
    return Served(model, info)


