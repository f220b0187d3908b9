"""Take the README's pictures in headless Debian chromium.

    .venv/bin/python docs/take_screenshots.py        # from the project root

The app, search and correction pictures show real photos: with a champion that `captioner
real-model` made (its work folder `real/`, `--work`), the shared Flickr8k dev photos (`--photos`)
and one of the shared out-of-domain charts, on which the model abstains;
without one, the synthetic test photos of the model `make run` trained. The MLflow pictures show
the project's store. Indexes the photos into a temporary photo index, starts `captioner app` (with that
index) and an MLflow server over the project's own store (ports chosen free), searches the photos,
drops a few on the app, corrects one caption, opens the runs table and the registered model, and
writes docs/search.png, docs/app.png, docs/correction.png, docs/mlflow-runs.png and docs/mlflow-model.png. Needs chromium
(`apt-get install chromium`) and the Python playwright package (in requirements.lock).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.config import load_settings
from pipeline.ops.launchers import TRAINING_VIEW
from pipeline.registry.tracking import tracking_uri

DOCS = Path(__file__).resolve().parent
PHOTOS = DOCS.parents[1] / "shared" / "flickr8k_real" / "dev_photos"
# a picture unlike any photo (a chart), to show the model abstaining
UNLIKE = DOCS.parents[1] / "shared" / "out_of_domain" / "images"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        time.sleep(0.5)


def close_assistant(page) -> None:
    """MLflow's Assistant side panel opens by default and would cover half the picture."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("real"), help="captioner real-model's work folder")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="the real photos it was scored on")
    args = parser.parse_args()
    settings = load_settings()
    uri = tracking_uri(settings)
    name = settings.registry.model_name
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    real = (args.work / paths.TEST_SCORES).is_file() and args.photos.is_dir()
    base = args.work if real else Path(".")
    captions = pd.read_parquet(base / paths.CAPTIONS)
    images_dir = args.photos if real else paths.dataset_dir(settings.data.source) / paths.IMAGES_SUBDIR
    query = "a dog runs through the grass" if real else "a red circle on a blue background"
    # the test photo the model captions worst (beam CIDEr in evaluate's per-image scores) first: the
    # one a person would correct; then two others
    scores = pd.read_parquet(base / paths.TEST_SCORES).query("model == 'candidate' and mode == 'beam' and set == 'test'")
    worst = scores.sort_values(["cider", "image"])["image"].iloc[0]
    photos = [worst, *[p for p in sorted(scores["image"]) if p != worst][:2]]
    if (base / paths.DEV_CONFIDENCE).is_file():  # beside it, the photo the model is surest of
        sure = pd.read_parquet(base / paths.DEV_CONFIDENCE).query("image in @scores.image and image != @worst")
        photos = [worst, sure.sort_values(["confidence", "image"], ascending=[False, True])["image"].iloc[0]]
    app_port, ui_port = free_port(), free_port()
    index_dir = Path(tempfile.mkdtemp(prefix="captioner-screenshots-"))
    db = index_dir / "photos.db"
    test_photos = sorted(set(captions.loc[captions["split"] == "test", "image"]) & {p.name for p in images_dir.iterdir()})
    (index_dir / "Photos").mkdir()
    for photo in test_photos:
        shutil.copy(images_dir / photo, index_dir / "Photos" / photo)
    subprocess.run([str(BIN / "captioner"), "index", str(index_dir / "Photos"), "--db", str(db), "-q"], env=env, check=True)
    # the correction shown goes to a throwaway feedback store, not the project's
    env = {**env, "CAPTIONER_FEEDBACK_DB": str(index_dir / "feedback.db")}
    app = start([str(BIN / "captioner"), "app", "--port", str(app_port), "--poll-seconds", "30", "--index", str(db)], env)
    ui = start([str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                "--port", str(ui_port), "--workers", "1"], env)
    try:
        wait_for(f"http://127.0.0.1:{app_port}/healthz", app)
        wait_for(f"http://127.0.0.1:{ui_port}/health", ui)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(f"http://127.0.0.1:{app_port}")
            page.locator("#q").fill(query)
            page.locator("#search button").click()
            expect(page.locator(".hit")).to_have_count(12, timeout=120_000)
            page.wait_for_timeout(1500)  # let the thumbnails load
            page.screenshot(path=str(DOCS / "search.png"))
            page.set_viewport_size({"width": 1200, "height": 860})
            page.goto(f"http://127.0.0.1:{app_port}")
            unlike = sorted(UNLIKE.glob("charts__*.jpg"))[:1] if real else []
            # cards show the last file first: the surest photo, the worst, then the chart
            page.locator("#picker").set_input_files([*map(str, unlike), *[str(images_dir / p) for p in photos]])
            expect(page.locator(".card .caption")).to_have_count(len(photos) + len(unlike), timeout=120_000)
            page.screenshot(path=str(DOCS / "app.png"))
            card = page.locator(".card").filter(has_text=photos[0])
            card.locator(".rate-wrong").click()
            # what a person who sees the photo would write: here, its first reference caption
            truth = captions.loc[captions["image"] == photos[0]].sort_values("caption_idx")["caption_raw"].iloc[0]
            card.locator("input.correction").fill(truth)
            card.locator("button[type=submit]").click()
            expect(card.locator(".status")).to_contain_text("Saved as feedback", timeout=60_000)
            card.screenshot(path=str(DOCS / "correction.png"))
            from mlflow import MlflowClient

            experiment = MlflowClient(uri).get_experiment_by_name(settings.mlflow.experiment).experiment_id
            page.set_viewport_size({"width": 1400, "height": 640})
            page.goto(f"http://127.0.0.1:{ui_port}/#/experiments/{experiment}?{TRAINING_VIEW}")
            page.get_by_text("matching runs").first.wait_for(timeout=120_000)
            close_assistant(page)
            page.screenshot(path=str(DOCS / "mlflow-runs.png"))
            page.set_viewport_size({"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{ui_port}/#/models/{name}?{TRAINING_VIEW}")
            page.get_by_text("Writes one English sentence").first.wait_for(timeout=120_000)
            close_assistant(page)
            page.screenshot(path=str(DOCS / "mlflow-model.png"))
            browser.close()
    finally:
        for proc in (app, ui):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        shutil.rmtree(index_dir, ignore_errors=True)
    shots = ("search.png", "app.png", "correction.png", "mlflow-runs.png", "mlflow-model.png")
    print(f"wrote {', '.join(str(DOCS / n) for n in shots)}")


if __name__ == "__main__":
    main()
