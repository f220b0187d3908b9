"""The MLflow UI as a place to compare models: the experiment opens on training runs, runs are
named and carry their data (digest = the DVC hash), the model and its versions are described,
and the captions are a table in the UI. Read back through MlflowClient, then looked at in a real
browser (Debian chromium via Playwright) whose screenshots the README shows."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline import paths
from pipeline.ops.launchers import TRAINING_VIEW
from pipeline.registry.tracking import EXPERIMENT_KIND, file_md5, setup
from pipeline.stages.evaluate import CAPTION_TABLE
from tests.helpers import chromium, free_port, tiny_settings, wait_for_http

NAME = "flickr8k-captioner"
RUN_NAME = re.compile(r"^synthetic-xception-lstm64-[0-9a-f]{6}$")


@pytest.fixture
def client(registered, monkeypatch):
    root, report, _ = registered
    monkeypatch.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return MlflowClient(), report


def test_experiment_opens_on_training_runs(client, trained_project):
    _, settings = trained_project
    experiment = MlflowClient().get_experiment_by_name(settings.mlflow.experiment)
    assert experiment.tags[EXPERIMENT_KIND[0]] == "custom_model_development"


def test_an_existing_experiment_gets_the_kind_tag(tmp_path, trained_project):
    _, settings = trained_project
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    created = MlflowClient().create_experiment(settings.mlflow.experiment)  # as an old version made it
    assert EXPERIMENT_KIND[0] not in MlflowClient().get_experiment(created).tags
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        setup(settings)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    assert MlflowClient().get_experiment(created).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_training_run_is_named_and_carries_its_data(client):
    client, report = client
    run = client.get_run(report["run_id"])
    assert RUN_NAME.match(run.info.run_name), run.info.run_name
    captions_md5, features_md5 = file_md5(paths.CAPTIONS), file_md5(paths.features_file("xception"))
    assert run.data.tags["dvc.captions_md5"] == captions_md5
    assert run.data.tags["dvc.features_md5"] == features_md5
    assert run.data.tags["data.source"] == "synthetic"
    assert re.match(r"^([0-9a-f]{40}(\+dirty)?|unknown)$", run.data.tags["git.commit"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["synthetic-captions"].dataset.digest == captions_md5
    assert inputs["synthetic-xception-features"].dataset.digest == features_md5
    tags = {t.key: t.value for t in inputs["synthetic-captions"].tags}
    assert tags["mlflow.data.context"] == "training"
    assert int(tags["train_images"]) > 0 and int(tags["test_captions"]) > 0


def test_model_and_version_are_described(client):
    client, report = client
    model = client.get_registered_model(NAME)
    assert f'models:/{NAME}@champion' in model.description and "`image`" in model.description
    version = client.get_model_version(NAME, report["version"])
    assert file_md5(paths.CAPTIONS) in version.description
    assert "BLEU-4" in version.description and "CIDEr" in version.description
    assert "no champion (first model)" in version.description


def test_captions_are_a_table_in_the_run(client):
    client, report = client
    table = mlflow.load_table(CAPTION_TABLE, run_ids=[report["run_id"]])
    assert list(table.columns[:4]) == ["image", "beam", "greedy", "references"]
    assert len(table) > 0 and table["beam"].str.len().min() > 0 and " | " in table["references"].iloc[0]
    artifacts = {a.path for a in client.list_artifacts(report["run_id"])}
    assert {"gallery.html", CAPTION_TABLE} <= artifacts



def close_assistant(page) -> None:
    """The MLflow Assistant side panel opens by default and would cover half the screenshot."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


@pytest.mark.timeout(1200)
def test_runs_table_and_model_page_in_a_browser(registered, tmp_path, monkeypatch):
    """Two runs side by side with their names and data, and the model page with its alias (the
    README's pictures come from the model `make run` trains: docs/take_screenshots.py)."""
    from playwright.sync_api import sync_playwright

    from pipeline.stages import train

    browser_path = chromium()
    root, report, _ = registered
    copy = tmp_path / "project"  # a second, smaller model trained beside the first
    shutil.copytree(root, copy)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{copy}/mlflow.db")
    second = tiny_settings(**{"data.synthetic.n_images": 60, "train.epochs": 2, "train.units": 32})
    train.run(second)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(second.mlflow.experiment).experiment_id])
    names = {r.info.run_name for r in runs}
    assert len(names) == 2 and any(n.startswith("synthetic-xception-lstm32-") for n in names)

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{copy}/mlflow.db", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=copy, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    docs = tmp_path
    try:
        wait_for_http(f"{url}/health", server, 240, "mlflow server")  # ~10 s on a quiet machine
        experiment_id = runs[0].info.experiment_id
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 640})
            page.goto(f"{url}/#/experiments/{experiment_id}?{TRAINING_VIEW}")
            page.get_by_text("matching runs").first.wait_for(timeout=120_000)
            close_assistant(page)
            for name in names:
                page.get_by_text(name).first.wait_for(timeout=60_000)
            page.get_by_text(f"synthetic-captions ({file_md5(paths.CAPTIONS)[:8]}").first.wait_for(timeout=60_000)
            page.screenshot(path=str(docs / "mlflow-runs.png"))
            page.set_viewport_size({"width": 1400, "height": 1000})
            page.goto(f"{url}/#/models/{NAME}?{TRAINING_VIEW}")
            page.get_by_text("Writes one English sentence").first.wait_for(timeout=120_000)
            page.get_by_role("row").filter(has_text="champion").first.wait_for(timeout=60_000)
            close_assistant(page)
            page.screenshot(path=str(docs / "mlflow-model.png"))
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert (docs / "mlflow-runs.png").stat().st_size > 10_000
