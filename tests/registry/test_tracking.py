"""The tracking store, as every command meets it: a damaged mlflow.db or a server that is down
is one paragraph naming the store and the way out, within seconds, and nothing is lost."""

import shutil
import subprocess
import sys
import time

import yaml

from pipeline import paths
from tests.helpers import free_port, jpeg_bytes


def test_a_damaged_mlflow_db_stops_a_stage_with_one_paragraph_and_keeps_its_reports(trained_project, tmp_path):
    root, settings = trained_project
    project = tmp_path / "project"
    shutil.copytree(root, project)
    (project / "params.yaml").write_text(yaml.safe_dump(settings.model_dump(by_alias=True), sort_keys=False))
    db = project / "mlflow.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])  # truncated, as a full disk leaves it
    reports = {p: (project / p).read_bytes() for p in (paths.EVAL_METRICS, paths.TEST_CAPTIONS, paths.GALLERY)}
    env = {"PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin", "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.evaluate"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) < 15, done.stderr
    assert f"cannot use the MLflow tracking store sqlite:///{db}" in message
    assert f"mv {db} {db}.bad" in message and "dvc repro -f -s register" in message
    assert all((project / p).read_bytes() == data for p, data in reports.items())
    # every command that opens the store says the same, not a traceback or "run the pipeline first"
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes())
    (tmp_path / "photos").mkdir()
    for args in (["caption", str(photo)], ["app", "--port", str(free_port())],
                 ["index", str(tmp_path / "photos"), "--db", str(tmp_path / "photos.db")]):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) < 5, done.stderr
        assert f"cannot use the MLflow tracking store sqlite:///{db}" in done.stderr and f"mv {db}" in done.stderr


def test_an_unreachable_tracking_server_fails_within_seconds_naming_it(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes())
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    for args in (["caption", str(photo), "--model", "models:/m@champion"], ["app", "--model-name", "m"]):
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--tracking-uri", uri],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - start
        assert done.returncode == 2, done.stderr
        assert f"cannot use the MLflow tracking store {uri}" in done.stderr and "Traceback" not in done.stderr
        assert took < 60, f"{args[0]} took {took:.0f} s to give up"  # MLflow alone retried for 4 minutes


KILLED_REGISTER = """
import os, signal, sys
import mlflow
from pipeline.registry.tracking import owner_tags
mlflow.set_tracking_uri(sys.argv[1])
experiment = mlflow.set_experiment("captioner")
with mlflow.start_run(run_name="register"):
    mlflow.set_tags(owner_tags())
    run = mlflow.active_run().info.run_id
    mlflow.MlflowClient().create_logged_model(experiment.experiment_id, name="caption_model", source_run_id=run)
    print(run, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-upload: nothing of the process runs after this
"""


def test_what_a_killed_stage_left_open_is_marked_failed_when_the_next_one_starts(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.registry.tracking import setup
    from tests.helpers import tiny_settings

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed = subprocess.run([sys.executable, "-c", KILLED_REGISTER, uri], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    run_id = killed.stdout.split()[0]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("captioner").experiment_id
    assert client.get_run(run_id).info.status == "RUNNING"  # the ghost the UI would show forever
    (model,) = client.search_logged_models([experiment])
    assert str(model.status.value) == "PENDING"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    setup(tiny_settings())  # the next stage starts
    assert client.get_run(run_id).info.status == "FAILED"
    assert "killed" in client.get_run(run_id).data.tags["captioner.note"]
    assert str(client.get_logged_model(model.model_id).status.value) == "FAILED"
