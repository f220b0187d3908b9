"""The team stack for real: `python -m pipeline.ops.launchers team` with two Celery workers, each
in its own clone of the project, on the local Postgres (fresh databases per run) and Redis (a
free db number), an MLflow server with a Postgres store, a folder as the shared DVC remote.
The DAG is triggered through Airflow's REST API, as a user would, and by the feedback asset the
caption app posts when people corrected enough captions in a browser."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.captioning.metrics import nltk_bleu
from pipeline.data.caption_text import clean_caption
from tests.helpers import (
    PROJECT,
    chromium,
    drop_files,
    free_port,
    git_project,
    jpeg_bytes,
    postgres_admin,
    require_services,
    run_features,
    synthetic_photos,
    tiny_settings,
)

DAG = "caption_retraining"
MODEL = "flickr8k-captioner"
# enough epochs for the corrections to be learnt; CIDEr (per image) rather than corpus BLEU-4 for
# the paired decision on a handful of held-out photos; the app asks for a run at the 12th correction
CORRECTIONS = 12
OVERRIDES = {"data.synthetic.n_images": 120, "features.shards": [0, 1], "train.epochs": 20, "train.units": 64,
             "train.learning_rate": 0.003, "register.metric": "beam_cider", "feedback.min_new": CORRECTIONS}
# consecutive pinned stages alternate between the workers; train, evaluate and register use the
# default queue, which both consume, so a task of a dead worker is retried on the other
PINS = {"download": "worker1", "validate": "worker2", "backbone": "worker1", "features@0": "worker1",
        "features@1": "worker2", "merge_features": "worker1"}


def _free_redis_db() -> int:
    import redis

    for number in range(15, 0, -1):
        if redis.Redis(host="127.0.0.1", port=6379, db=number).dbsize() == 0:
            return number
    raise AssertionError("no empty Redis database number between 1 and 15")


class Api:
    """Airflow's REST API with a token, as a user's script would call it."""

    def __init__(self, base: str, password: str):
        self.base = base
        self.token = self.call("POST", "/auth/token", {"username": "admin", "password": password})["access_token"]

    def call(self, method: str, path: str, body=None):
        headers = {"Content-Type": "application/json"}
        if getattr(self, "token", None):
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def runs(self) -> list[dict]:
        return self.call("GET", f"/api/v2/dags/{DAG}/dagRuns?limit=100")["dag_runs"]

    def trigger(self, conf: dict | None = None) -> str:
        run = self.call("POST", f"/api/v2/dags/{DAG}/dagRuns",
                        {"logical_date": datetime.now(UTC).isoformat(), "conf": conf or {}})
        return run["dag_run_id"]

    def run_state(self, run_id: str) -> str:
        return self.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}")["state"]

    def wait_for_run(self, run_id: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (state := self.run_state(run_id)) not in ("success", "failed"):
            assert time.monotonic() < deadline, f"run {run_id} still {state} after {timeout_s} s"
            time.sleep(2)
        return state

    def tasks(self, run_id: str) -> dict[str, dict]:
        found = self.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti for ti in found}

    def xcom(self, run_id: str, task: str) -> dict:
        entry = self.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/return_value")
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value


class Launcher:
    """The launcher process, its output collected by a thread."""

    def __init__(self, project: Path, home: Path, env: dict, airflow_port: int, mlflow_port: int,
                 workers: int = 2):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ops.launchers", "team", "--workers", str(workers), "--home", str(home),
             "--port", str(airflow_port), "--mlflow-port", str(mlflow_port)],
            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while not (match := re.search(pattern, self.output())):
            assert self.proc.poll() is None, f"launcher exited:\n{self.output()[-5000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout_s} s:\n{self.output()[-5000:]}"
            time.sleep(0.5)
        return match

    def worker_pid(self, name: str) -> int:
        return int(self.wait_for(rf"team: {name} started \(pid (\d+)", 10).group(1))


def _kill_tree(pid: int) -> None:
    """SIGKILL a worker and everything below it (the task supervisor, bash, dvc, the stage):
    a machine that dies takes all of them with it."""
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _process_running(marker: str, folders: set[str]) -> int | None:
    """pid of a process whose command line contains ``marker`` and that runs in one of
    ``folders`` (resolved paths): another test run on the same machine has its own stages."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cwd = proc.info["cwd"]
        if marker in " ".join(proc.info["cmdline"] or []) and cwd and str(Path(cwd).resolve()) in folders:
            return proc.info["pid"]
    return None


def _left_over(home: Path) -> list[str]:
    """Processes still running from the team home (workers' folders, Airflow home)."""
    import psutil

    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if str(home) in text and proc.status() != psutil.STATUS_ZOMBIE:
            left.append(f"{proc.info['pid']}: {text[:200]}")
    return left


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _outs(lock: dict, stage: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for o in lock[stage].get("outs", [])}


def start_app(team: dict, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """`captioner app` on the team's MLflow server and feedback database, allowed to ask the
    team's Airflow for retraining runs."""
    port = free_port()
    env = {**team["env"], "MLFLOW_TRACKING_URI": team["mlflow"], "CAPTIONER_AIRFLOW_URL": team["airflow"],
           "CAPTIONER_AIRFLOW_USER": "admin", "CAPTIONER_AIRFLOW_PASSWORD": team["password"],
           "PYTHONPATH": str(PROJECT)}
    app = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "app", "--port", str(port), "--poll-seconds", "2"],
                           cwd=team["project"], env=env, stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "app.log", "wb"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 480
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5):
                return app, url
        except OSError:
            assert app.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not start within 480 s"
            time.sleep(1)


def correct_in_browser(url: str, photos: list[tuple[bytes, str]], tmp_path: Path) -> list[str]:
    """Drop the photos on the page, then, card by card, say the caption is wrong and type the
    right one; returns the captions the app showed (one per photo, in order)."""
    from playwright.sync_api import expect, sync_playwright

    files = {f"photo-{i:02d}.jpg": data for i, (data, _) in enumerate(photos)}
    corrections = {f"photo-{i:02d}.jpg": text for i, (_, text) in enumerate(photos)}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        drop_files(page, {name: (data, "image/jpeg") for name, data in files.items()})
        expect(page.locator(".card .caption")).to_have_count(len(files), timeout=300_000)
        shown = {}
        for i in range(len(files)):
            card = page.locator(".card").nth(i)
            name = card.locator(".meta").inner_text().split(":")[0]
            shown[name] = card.locator(".caption").inner_text()
            card.locator(".rate-wrong").click()
            card.locator("input.correction").fill(corrections[name])
            card.locator("button[type=submit]").click()
            expect(card.locator(".status")).to_contain_text("Saved as feedback", timeout=60_000)
        page.screenshot(path=str(tmp_path / "corrections.png"))
        browser.close()
    return [shown[name] for name in files]


def wait_for_version(url: str, version: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/api/model", timeout=30) as response:
            if json.loads(response.read())["version"] == version:
                return True
        time.sleep(1)
    return False


def caption_via_api(url: str, photos: list[tuple[bytes, str]]) -> list[str]:
    """The served champion's captions of the photos (POST /api/caption, multipart)."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for i, (data, _) in enumerate(photos))
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/api/caption", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return [r["caption"] for r in json.loads(response.read())["results"]]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    require_services()
    root = tmp_path_factory.mktemp("team")
    project = git_project(root / "project", **OVERRIDES)
    home = root / "home"
    tag = uuid.uuid4().hex[:10]
    databases = [f"captioner_test_{tag}_airflow", f"captioner_test_{tag}_mlflow", f"captioner_test_{tag}_feedback"]
    redis_db = _free_redis_db()
    airflow_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CAPTIONER_AIRFLOW_DB": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{databases[0]}",
           "CAPTIONER_MLFLOW_DB": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{databases[1]}",
           "CAPTIONER_FEEDBACK_DB": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{databases[2]}",
           "CAPTIONER_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
           "CAPTIONER_TASK_QUEUES": ",".join(f"{s}={q}" for s, q in PINS.items()),
           "CAPTIONER_SCHEDULE": "",  # no cron: triggered runs and the feedback asset
           "CAPTIONER_RETRY_DELAY_S": "2",
           "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
           "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5"}
    env.pop("MLFLOW_TRACKING_URI", None)
    launcher = Launcher(project, home, env, airflow_port, mlflow_port)
    try:
        launcher.wait_for(r"team: ready", 900)
        password = json.loads((home / "airflow/simple_auth_manager_passwords.json.generated").read_text())["admin"]
        api = Api(f"http://127.0.0.1:{airflow_port}", password)
        deadline = time.monotonic() + 600
        while True:  # the dag-processor parses the DAG file a few seconds after start-up
            try:
                api.call("GET", f"/api/v2/dags/{DAG}")
                break
            except urllib.error.HTTPError as err:
                assert err.code == 404 and time.monotonic() < deadline, err
                time.sleep(2)
        api.call("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})
        yield {"api": api, "launcher": launcher, "home": home, "project": project, "env": env,
               "mlflow": f"http://127.0.0.1:{mlflow_port}", "airflow": f"http://127.0.0.1:{airflow_port}",
               "password": password}
        launcher.proc.send_signal(signal.SIGINT)
        launcher.proc.wait(timeout=600)
        launcher.reader.join(timeout=30)
        output = launcher.output()
        assert launcher.proc.returncode == 0, output[-3000:]
        assert output.rstrip().endswith("team: stopped"), output[-3000:]
        # "stopped" is printed only once every process has exited: nothing may be left now
        assert _left_over(home) == []
    finally:
        if launcher.proc.poll() is None:
            os.killpg(launcher.proc.pid, signal.SIGKILL)
            launcher.proc.wait(timeout=60)
        for pid_line in _left_over(home):
            os.kill(int(pid_line.split(":")[0]), signal.SIGKILL)
        for name in databases:
            postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=redis_db).flushdb()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 8 minutes on a quiet 2-core machine
def test_team_run_shares_outputs_across_workers_skips_when_unchanged_and_survives_a_dead_worker(
        team, tmp_path, monkeypatch):
    api, home = team["api"], team["home"]
    worker_of = {str((home / "workers" / w).resolve()): w for w in ("worker1", "worker2")}

    # 1. the first run: every stage runs, pinned stages alternate between the two workers
    started = time.monotonic()
    first = api.trigger()
    assert api.wait_for_run(first, 1200) == "success", api.tasks(first)
    timings = {"first run s": round(time.monotonic() - started)}
    tasks = api.tasks(first)
    assert {t["state"] for t in tasks.values()} == {"success"}
    xcoms = {task: api.xcom(first, task) for task in tasks}
    ran_on = {task: worker_of[x["project"]] for task, x in xcoms.items()}
    assert all(x["ran"] for x in xcoms.values()), xcoms
    assert {ran_on[s.replace("@", "-")] for s in PINS} == {"worker1", "worker2"}
    assert all(ran_on[s.replace("@", "-")] == q for s, q in PINS.items()), ran_on
    assert ran_on["features-0"] != ran_on["features-1"]
    assert min(list(ran_on.values()).count(w) for w in ("worker1", "worker2")) >= 2
    lock = xcoms["register"]["lock"]
    # every stage read exactly what its upstream stage of this run wrote, whoever ran it
    for stage, entry in lock.items():
        for dep in entry.get("deps", []):
            for outs in (_outs(lock, s) for s in lock):
                if dep["path"] in outs:
                    assert dep["md5"] == outs[dep["path"]], f"{stage} read a stale {dep['path']}"

    # the merged features (and what came before them) equal a one-machine, one-shard run's
    single = tmp_path / "single"
    single.mkdir()
    monkeypatch.chdir(single)
    from pipeline.stages import download, validate

    settings = tiny_settings(**{**OVERRIDES, "features.shards": [0]})
    download.run(settings)
    validate.run(settings)
    run_features(settings)
    for stage in ("validate", "merge_features"):
        for path, md5 in _outs(lock, stage).items():
            if path.endswith(".parquet"):  # (validation.json holds the time it ran)
                assert _md5(single / path) == md5, f"{path} differs from the one-machine run"
    assert "data/features/xception.parquet" in _outs(lock, "merge_features")

    # the champion is on the MLflow server and loads in a process that knows only its URL
    image = base64.b64encode(jpeg_bytes(size=(64, 48))).decode()
    client = subprocess.run(
        [sys.executable, "-c",
         "import sys, mlflow, pandas as pd; "
         f"m = mlflow.pyfunc.load_model('models:/{MODEL}@champion'); "
         "print(m.predict(pd.DataFrame({'image': [sys.argv[1]]})).to_json(orient='records'))", image],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
             "MLFLOW_TRACKING_URI": team["mlflow"]})
    assert client.returncode == 0, client.stderr[-3000:]
    answer = json.loads(client.stdout.strip().splitlines()[-1])
    assert answer[0]["caption"] and not answer[0]["error"]

    # 2. nothing changed: every task succeeds and no stage runs
    started = time.monotonic()
    second = api.trigger()
    assert api.wait_for_run(second, 1200) == "success", api.tasks(second)
    timings["unchanged run s"] = round(time.monotonic() - started)
    again = {task: api.xcom(second, task) for task in api.tasks(second)}
    # the feedback stage exports every run (the database is outside DVC): the same bytes, nothing after it
    assert [t for t, x in again.items() if x["ran"]] == ["feedback"]
    assert again["register"]["lock"] == lock

    # 3. people correct captions in the app in a browser; at the last correction the app posts the
    # feedback asset's event and the DAG runs on it; the worker running train dies (train is
    # retried on the other); the new champion is swapped into the app, and writes captions closer
    # to the corrections
    app, url = start_app(team, tmp_path)
    photos = synthetic_photos(CORRECTIONS, seed=11)
    known_runs = {r["dag_run_id"] for r in api.runs()}
    try:
        before = correct_in_browser(url, photos, tmp_path)
        started = time.monotonic()
        deadline = time.monotonic() + 300
        while not (new := [r for r in api.runs() if r["dag_run_id"] not in known_runs]):
            assert time.monotonic() < deadline, "no DAG run on the feedback asset within 300 s"
            time.sleep(1)
        third = new[0]["dag_run_id"]
        assert new[0]["run_type"] == "asset_triggered", new[0]
        deadline = time.monotonic() + 900
        while not (pid := _process_running("pipeline.stages.train", set(worker_of))):
            assert time.monotonic() < deadline and api.run_state(third) in ("queued", "running"), api.tasks(third)
            time.sleep(0.2)
        import psutil

        folder = str(Path(psutil.Process(pid).cwd()).resolve())
        victim = worker_of[folder]
        _kill_tree(team["launcher"].worker_pid(victim))
        assert api.wait_for_run(third, 1200) == "success", api.tasks(third)
        timings["corrections to a new champion s"] = round(time.monotonic() - started)
        registered = api.xcom(third, "register")
        exported = api.xcom(third, "feedback")
        assert exported["ran"] and api.xcom(third, "feedback_features")["ran"]
        assert wait_for_version(url, "2", 120), "the app did not swap in the new champion"
        after = caption_via_api(url, photos)
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=60)
    references = [[clean_caption(text).split()] for _, text in photos]
    bleu = [nltk_bleu(references, [clean_caption(c).split() for c in captions])["bleu4"] for captions in (before, after)]
    print(f"BLEU-4 of the corrected photos' captions against the corrections: v1 {bleu[0]:.3f} -> v2 {bleu[1]:.3f}",
          flush=True)
    assert bleu[1] > bleu[0]
    print("team timings", timings, "tasks per worker",
          {w: list(ran_on.values()).count(w) for w in ("worker1", "worker2")}, flush=True)
    train = api.tasks(third)["train"]
    assert train["try_number"] >= 2
    retried = api.xcom(third, "train")
    assert retried["ran"] and worker_of[retried["project"]] != victim
    final = registered["lock"]
    assert _outs(final, "train") != _outs(lock, "train")  # a new model
    assert _outs(final, "feedback") != _outs(lock, "feedback")  # trained on the corrections dvc.lock pins
    for stage in ("validate", "features@0", "features@1"):  # the dataset's features were not recomputed
        assert _outs(final, stage) == _outs(lock, stage)
    for dep in final["evaluate"]["deps"]:
        if dep["path"] in _outs(final, "train"):
            assert dep["md5"] == _outs(final, "train")[dep["path"]]
    assert f"team: {victim} exited" in team["launcher"].output()


def test_team_urls_come_from_the_environment_with_local_defaults(monkeypatch, tmp_path):
    from pipeline.ops.team import TeamConfig, airflow_env, result_backend, worker_env

    for key in ("CAPTIONER_AIRFLOW_DB", "CAPTIONER_MLFLOW_DB", "CAPTIONER_BROKER_URL", "CAPTIONER_DVC_REMOTE"):
        monkeypatch.delenv(key, raising=False)
    cfg = TeamConfig.from_env(tmp_path, tmp_path / "home")
    assert cfg.airflow_db.startswith("postgresql+psycopg2://postgres@127.0.0.1:5432/")
    assert cfg.broker == "redis://127.0.0.1:6379/0" and cfg.dvc_remote == str(tmp_path / "home/dvc-remote")
    monkeypatch.setenv("CAPTIONER_BROKER_URL", "redis://cache:6379/3")
    monkeypatch.setenv("CAPTIONER_DVC_REMOTE", "s3://bucket/dvc")
    cfg = TeamConfig.from_env(tmp_path, tmp_path / "home", workers=2)
    assert cfg.broker == "redis://cache:6379/3" and cfg.dvc_remote == "s3://bucket/dvc"
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which is not installed
    assert result_backend(cfg.airflow_db) == "db+" + cfg.airflow_db
    base = airflow_env(cfg, Path(sys.executable).parent)
    assert base["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
    one, two = (worker_env(cfg, base, i) for i in (0, 1))
    assert one["CAPTIONER_PROJECT_DIR"] != two["CAPTIONER_PROJECT_DIR"]
    assert one["AIRFLOW__CORE__DAGS_FOLDER"] == one["CAPTIONER_PROJECT_DIR"] + "/dags"
    assert one["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] != two["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"]
    assert one["AIRFLOW__API_AUTH__JWT_SECRET"] == two["AIRFLOW__API_AUTH__JWT_SECRET"]


def test_services_missing_skip_or_fail_as_ci_asks(monkeypatch):
    import tests.helpers as helpers

    monkeypatch.setattr(helpers, "missing_services", lambda: ["PostgreSQL at 127.0.0.1:5432 (refused)"])
    monkeypatch.delenv("CAPTIONER_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs PostgreSQL"):
        helpers.require_services()
    monkeypatch.setenv("CAPTIONER_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="CAPTIONER_REQUIRE_SERVICES=1"):
        helpers.require_services()
