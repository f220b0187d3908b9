"""When the app asks Airflow for a retraining run: once per ``min_new`` corrections since the last
export, never twice before the next export, and a refused or unreachable Airflow costs nothing
but a warning. A small HTTP server on 127.0.0.1 records what would reach Airflow's REST API (the
real Airflow answering the real request is the team test's job, ``tests/ops/test_team.py``)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.feedback.retraining import AirflowApi, AirflowError, asset_uri, request_if_due
from pipeline.feedback.store import LAST_EXPORT, FeedbackStore, now, sha256_of

URI = asset_uri("flickr8k-captioner")


class Recorder(BaseHTTPRequestHandler):
    """Answers the three calls ``post_asset_event`` makes and keeps the asset events it got."""

    events: list[dict]
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/auth/token":
            self._answer({"access_token": "t-" + body["username"]})
        elif self.path == "/api/v2/assets/events":
            assert self.headers["Authorization"] == "Bearer t-admin"
            if self.status != 200:
                self._answer({"detail": "no"}, self.status)
                return
            self.events.append(body)
            self._answer({"id": len(self.events), **body})

    def do_GET(self):
        self._answer({"assets": [{"id": 41, "uri": URI + "-other"}, {"id": 42, "uri": URI}]})

    def _answer(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def airflow():
    handler = type("Handler", (Recorder,), {"events": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, AirflowApi(f"http://127.0.0.1:{server.server_port}", "admin", "pw", timeout_s=10)
    server.shutdown()


def correct(store: FeedbackStore, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        photo = f"photo {i}".encode()
        store.served([{"id": f"c{i}", "model": "flickr8k-captioner/1", "caption": "x",
                       "image_sha256": sha256_of(photo), "trace_id": None}])
        store.add(f"c{i}", "wrong", f"a correction {i}", None, photo)


def test_asks_once_per_batch_of_new_corrections_until_the_next_export(tmp_path, airflow):
    handler, api = airflow
    store = FeedbackStore(tmp_path / "feedback.db")
    correct(store, 2)
    assert request_if_due(store, "flickr8k-captioner", 3, api) is None  # 2 of 3
    correct(store, 1, start=2)
    event = request_if_due(store, "flickr8k-captioner", 3, api)
    assert event["asset_id"] == 42 and event["extra"] == {"corrections_since_export": 3}
    correct(store, 5, start=3)
    assert request_if_due(store, "flickr8k-captioner", 3, api) is None  # asked already: the run will export
    assert len(handler.events) == 1
    store.set_meta(LAST_EXPORT, now())  # the run's feedback stage exported everything
    correct(store, 2, start=8)
    assert request_if_due(store, "flickr8k-captioner", 3, api) is None
    correct(store, 1, start=10)
    assert request_if_due(store, "flickr8k-captioner", 3, api)["extra"] == {"corrections_since_export": 3}
    assert len(handler.events) == 2
    assert request_if_due(store, "flickr8k-captioner", 1, None) is None  # no Airflow set: cron runs pick them up


def test_a_refused_or_missing_airflow_is_a_warning_and_the_next_correction_tries_again(tmp_path, airflow, caplog):
    handler, api = airflow
    store = FeedbackStore(tmp_path / "feedback.db")
    correct(store, 3)
    handler.status = 403
    assert request_if_due(store, "flickr8k-captioner", 3, api) is None
    assert "answered 403 to POST /api/v2/assets/events" in caplog.text
    handler.status = 200
    assert request_if_due(store, "flickr8k-captioner", 3, api) is not None  # not counted as asked
    with pytest.raises(AirflowError, match="knows no asset captioner://feedback/other-model"):
        api.post_asset_event(asset_uri("other-model"), {})
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(AirflowError, match="cannot reach Airflow .* check CAPTIONER_AIRFLOW_URL"):
        AirflowApi(f"http://127.0.0.1:{closed}", "admin", "pw", timeout_s=5).post_asset_event(URI, {})


def test_from_env(monkeypatch):
    monkeypatch.delenv("CAPTIONER_AIRFLOW_URL", raising=False)
    assert AirflowApi.from_env() is None
    monkeypatch.setenv("CAPTIONER_AIRFLOW_URL", "http://127.0.0.1:8080/")
    monkeypatch.setenv("CAPTIONER_AIRFLOW_PASSWORD", "pw")
    assert AirflowApi.from_env() == AirflowApi("http://127.0.0.1:8080", "admin", "pw")
