"""Serving latency: the registered caption model behind `mlflow models serve` over HTTP
against the same model called in-process.

Builds a small model first (synthetic data, Xception 299x299 random init, the default serving
limits) in a temporary project, registers it in a temporary MLflow store, then measures
  * model load: `mlflow.pyfunc.load_model` in-process, and the server's start until /ping;
  * one-image latency, p50/p95 over --requests requests, HTTP and in-process;
  * throughput for batches of 16 images, HTTP and in-process;
  * one-image latency in-process with the backbone on the default runtime (``auto``: what the
    backbone stage measured fastest on this CPU) against the same model registered again with
    ``features.runtime: keras``, float32, calls interleaved.
Ratios are within this run. Target: on a CPU with native bf16, keras p50 / default p50 >= 1.5.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, append_report  # noqa: E402

NAME = "bench-captioner"


def build_model(root: Path) -> None:
    """A tiny pipeline run in ``root`` registering NAME there: version 1 on the default backbone
    runtime (champion), version 2 the same decoder with the backbone on runtime keras."""
    import yaml

    from pipeline.config import parse_settings
    from pipeline.stages import backbone, download, evaluate, register, train, validate
    from tests.helpers import run_features

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["data"]["synthetic"].update(n_images=60, image_size=128)
    raw["train"].update(epochs=2, units=64, embedding_dim=32)
    raw["register"]["model_name"] = NAME
    settings = parse_settings(raw)
    download.run(settings)
    validate.run(settings)
    run_features(settings)
    for stage in (train, evaluate, register):
        stage.run(settings)
    raw["features"].update(runtime="keras", precision="float32")
    keras_settings = parse_settings(raw)
    backbone.run(keras_settings)
    evaluate.run(keras_settings)  # against v1, the champion now
    register.run(keras_settings)


def photo(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8).clip(60, 200).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def app_latency(root: Path, model, one, jpeg: bytes, requests: int) -> tuple[list[float], list[float]]:
    """``captioner app`` over the same registry: one-image POST /api/caption latency, interleaved
    with the in-process model call."""
    import httpx

    port = free_port()
    bin_dir = Path(sys.executable).parent
    # one client sends every request: the per-address limit (app.max_captions_per_minute) is lifted
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["app"]["max_captions_per_minute"] = 10**9
    (root / "bench_params.yaml").write_text(yaml.safe_dump(params))
    app = subprocess.Popen([str(bin_dir / "captioner"), "app", "--model-name", NAME, "--port", str(port),
                            "--params", str(root / "bench_params.yaml")],
                           env=os.environ.copy(), cwd=root, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        def post() -> None:
            httpx.post(f"{url}/api/caption", files=[("file", ("photo.jpg", jpeg, "image/jpeg"))],
                       timeout=600).raise_for_status()

        post()  # first request
        over_http, local = [], []
        for _ in range(requests):
            with Timer() as t:
                post()
            over_http.append(t.seconds)
            with Timer() as t:
                model.predict(one)
            local.append(t.seconds)
        return over_http, local
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(seconds: list[float]) -> str:
    p50, p95 = np.percentile(np.asarray(seconds) * 1000, [50, 95])
    return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        old = os.getcwd()
        os.chdir(root)
        try:
            build_model(root)
        finally:
            os.chdir(old)
        images = [base64.b64encode(photo(i)).decode() for i in range(16)]

        with Timer() as load:
            model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        one = pd.DataFrame({"image": images[:1]})
        model.predict(one)  # first call
        local_one = []
        for _ in range(args.requests):
            with Timer() as t:
                model.predict(one)
            local_one.append(t.seconds)
        keras_model = mlflow.pyfunc.load_model(f"models:/{NAME}/2")
        keras_model.predict(one)
        chosen = model.unwrap_python_model().spec
        default = f"{chosen.runtime} {chosen.precision}"  # what auto chose on this CPU
        by_runtime = {default: [], "keras": []}
        cnn_only = {default: [], "keras": []}
        pixels = np.zeros((1, 299, 299, 3), np.uint8)
        for _ in range(args.requests):
            for runtime, m in ((default, model), ("keras", keras_model)):
                with Timer() as t:
                    m.predict(one)
                by_runtime[runtime].append(t.seconds)
                with Timer() as t:
                    m.unwrap_python_model().embed(pixels)
                cnn_only[runtime].append(t.seconds)
        del keras_model
        batch = pd.DataFrame({"image": images})
        with Timer() as local_batch:
            for _ in range(args.batches):
                model.predict(batch)

        port = free_port()
        bin_dir = Path(sys.executable).parent
        server = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, cwd=root,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            with Timer() as ready:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    try:
                        urllib.request.urlopen(f"{url}/ping", timeout=5)
                        break
                    except OSError:
                        time.sleep(0.2)

            def post(rows: list[str]) -> None:
                body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}})
                request = urllib.request.Request(f"{url}/invocations", data=body.encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=600) as response:
                    response.read()

            with Timer() as first_request:
                post(images[:1])
            http_one = []
            for _ in range(args.requests):
                with Timer() as t:
                    post(images[:1])
                http_one.append(t.seconds)
            with Timer() as http_batch:
                for _ in range(args.batches):
                    post(images)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        app_one, app_local = app_latency(root, model, one, photo(0), args.requests)

    n = 16 * args.batches
    local_rate, http_rate = n / local_batch.seconds, n / http_batch.seconds
    append_report("Serving (bench_serving.py)", [
        ("model load, in-process (load_model)", f"{load.seconds:.1f} s"),
        ("server start until /ping answers", f"{ready.seconds:.1f} s"),
        ("first HTTP request after start", f"{first_request.seconds * 1000:.0f} ms"),
        ("one image, in-process", percentiles(local_one)),
        ("one image, HTTP", percentiles(http_one)),
        ("HTTP / in-process, one image (p50)", f"{np.median(http_one) / np.median(local_one):.2f}"),
        ("batch of 16, in-process", f"{local_rate:.1f} img/s"),
        ("batch of 16, HTTP", f"{http_rate:.1f} img/s"),
        ("HTTP / in-process throughput", f"{http_rate / local_rate:.2f}"),
        (f"one image, in-process, backbone runtime auto (chose {default})", percentiles(by_runtime[default])),
        ("one image, in-process, backbone runtime keras float32", percentiles(by_runtime["keras"])),
        ("keras p50 / auto p50 (target on a native-bf16 CPU >= 1.5)",
         f"{np.median(by_runtime['keras']) / np.median(by_runtime[default]):.2f}"),
        ("CNN only, one image: auto / keras", f"{percentiles(cnn_only[default])} / {percentiles(cnn_only['keras'])}"),
        ("captioner app, POST /api/caption, one JPEG (multipart)", percentiles(app_one)),
        ("in-process model call, same rounds (interleaved)", percentiles(app_local)),
        ("app / in-process, one image (p50)", f"{np.median(app_one) / np.median(app_local):.2f}"),
    ], [f"{args.requests} one-image requests, {args.batches} batches of 16 JPEGs 500x375 (base64); "
        "Xception 299x299 random init, beam 3, default serving limits"])


if __name__ == "__main__":
    main()
