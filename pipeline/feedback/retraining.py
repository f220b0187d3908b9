"""Asking for a retraining run when people have corrected enough captions.

The retraining DAG is scheduled on the Airflow asset ``captioner://feedback/<model name>`` (see
``dags/caption_retraining.py``). After a correction, the app counts the corrections that arrived
since the last export (the ``feedback`` stage records when it ran); from ``feedback.min_new`` on
it posts one asset event through Airflow's REST API (``POST /api/v2/assets/events``), and not
again until the next export. The DAG run then exports, trains, evaluates and registers; the app
swaps in the new champion if it won.

Where Airflow is (``CAPTIONER_AIRFLOW_URL``) and how to log in (``CAPTIONER_AIRFLOW_USER``,
``CAPTIONER_AIRFLOW_PASSWORD``) come from the environment; without a URL nothing is posted and
the scheduled (cron) runs pick the corrections up.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from pipeline.errors import ReportedError
from pipeline.feedback.store import LAST_EXPORT, LAST_REQUEST, FeedbackStore, now

log = logging.getLogger("pipeline.feedback")


def asset_uri(model_name: str) -> str:
    """The Airflow asset that stands for a model's new feedback (the DAG is scheduled on it)."""
    return f"captioner://feedback/{model_name}"


class AirflowError(ReportedError):
    """Airflow's REST API refused or could not be reached."""


@dataclass(frozen=True)
class AirflowApi:
    """Just enough of Airflow 3's REST API to post an asset event."""

    url: str
    user: str
    password: str
    timeout_s: float = 20

    @classmethod
    def from_env(cls) -> AirflowApi | None:
        url = os.environ.get("CAPTIONER_AIRFLOW_URL", "").rstrip("/")
        if not url:
            return None
        return cls(url, os.environ.get("CAPTIONER_AIRFLOW_USER", "admin"),
                   os.environ.get("CAPTIONER_AIRFLOW_PASSWORD", ""))

    def _call(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(self.url + path, method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            raise AirflowError(f"Airflow at {self.url} answered {err.code} to {method} {path}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise AirflowError(f"cannot reach Airflow at {self.url} ({err}); check CAPTIONER_AIRFLOW_URL") from None

    def post_asset_event(self, uri: str, extra: dict) -> dict:
        """Post an event of the asset ``uri`` (which a DAG must be scheduled on); returns it."""
        token = self._call("POST", "/auth/token", {"username": self.user, "password": self.password})["access_token"]
        found = self._call("GET", "/api/v2/assets?" + urllib.parse.urlencode({"uri_pattern": uri}), token=token)
        ids = [a["id"] for a in found.get("assets", []) if a.get("uri") == uri]
        if not ids:
            raise AirflowError(f"Airflow at {self.url} knows no asset {uri}: is the DAG caption_retraining "
                               "deployed there (its file parsed, the DAG scheduled on the asset)?")
        return self._call("POST", "/api/v2/assets/events", {"asset_id": ids[0], "extra": extra}, token=token)


def request_if_due(store: FeedbackStore, model_name: str, min_new: int, api: AirflowApi | None) -> dict | None:
    """Post the feedback asset's event when ``min_new`` corrections arrived since the last export
    and none was posted since; returns the event, or None when not due (or no Airflow is set).
    A failed post is logged and forgotten: the next correction tries again."""
    if api is None:
        return None
    last_export, last_request = store.meta(LAST_EXPORT), store.meta(LAST_REQUEST)
    if last_request and (last_export is None or last_request > last_export):
        return None  # asked already; the run's export resets this
    new = store.count_corrections_since(last_export)
    if new < min_new:
        return None
    store.set_meta(LAST_REQUEST, now())
    try:
        event = api.post_asset_event(asset_uri(model_name), {"corrections_since_export": new})
    except AirflowError as err:
        log.warning("could not ask for a retraining run: %s", err)
        store.set_meta(LAST_REQUEST, "")
        return None
    log.info("%d new corrections: asked Airflow for a retraining run (asset event %s)", new, event.get("id"))
    return event
