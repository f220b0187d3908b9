import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from pipeline import paths
from pipeline.stages import register
from tests.helpers import jpeg_bytes

NAME = "flickr8k-captioner"


def set_beam_bleu4(value: float) -> None:
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    metrics["beam"]["bleu4"] = value
    paths.EVAL_METRICS.write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def registered(trained_project):
    """Three registrations: 0.30 (first: champion), 0.20 (worse), 0.30 (tie), 0.40 (better)."""
    root, settings = trained_project
    old = os.getcwd()
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    real = paths.EVAL_METRICS.read_text()
    reports = []
    try:
        for score in (0.30, 0.20, 0.30, 0.40):
            set_beam_bleu4(score)
            reports.append(register.run(settings))
    finally:
        paths.EVAL_METRICS.write_text(real)
        os.chdir(old)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root, reports


def test_worse_or_equal_model_does_not_take_champion_better_one_does(registered):
    _, reports = registered
    assert [r["decision"] for r in reports] == ["promoted", "kept_champion", "kept_champion", "promoted"]
    assert [r["alias"] for r in reports] == ["champion", "challenger", "challenger", "champion"]
    assert reports[1]["old_champion"] == {"version": "1", "score": 0.30}
    assert reports[3]["champion"] == reports[3]["version"] == "4"


def test_registry_aliases_and_tags(registered):
    root, _ = registered
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "4"
    challenger = client.get_model_version_by_alias(NAME, "challenger")
    assert str(challenger.version) == "3" and challenger.tags["decision"] == "kept_champion"
    assert json.loads((root / paths.REGISTRY_REPORT).read_text())["version"] == "4"


def test_champion_loads_in_a_fresh_process_and_captions_images(registered, tmp_path):
    root, _ = registered
    good = tmp_path / "photo.jpg"
    good.write_bytes(jpeg_bytes(size=(120, 90)))
    script = f"""
import base64, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
data = open({str(good)!r}, "rb").read()
out = model.predict(pd.DataFrame({{"image": [{str(good)!r}, data, base64.b64encode(data).decode(),
                                              b"not an image", "/no/such/file.jpg"]}}))
print(out.to_json(orient="records"))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    captions = [r["caption"] for r in rows]
    assert captions[0] and captions[0] == captions[1] == captions[2]
    assert all(not r["error"] for r in rows[:3])
    assert rows[3]["caption"] == "" and "cannot decode" in rows[3]["error"]
    assert "not an existing file path" in rows[4]["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rest_serving_returns_a_caption(registered):
    root, _ = registered
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [f"{bin_dir}/mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                time.sleep(1)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(jpeg_bytes(size=(100, 80))).decode()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert predictions[0]["caption"] and not predictions[0]["error"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_captioner_cli_prints_one_caption_per_image(registered, tmp_path):
    root, _ = registered
    good, bad = tmp_path / "a.jpg", tmp_path / "b.jpg"
    good.write_bytes(jpeg_bytes(size=(90, 70)))
    bad.write_bytes(b"\xff\xd8 not really")
    cli = Path(sys.executable).parent / "captioner"
    result = subprocess.run([str(cli), "caption", str(good), str(bad), "--beam", "1",
                             "--tracking-uri", f"sqlite:///{root}/mlflow.db"],
                            capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 1  # one image failed
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{good}\t") and len(line.split("\t")[1]) > 0
    assert f"{bad}\tERROR:" in result.stderr
