"""The retraining DAG: parsed by a real DagBag, run end to end by dag.test() in a temporary
git copy of the project with a temporary MLflow store and Airflow home."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ops.airflow_tasks import task_id
from pipeline.ops.dvc_graph import stage_graph
from tests.helpers import PROJECT, git_project, jpeg_bytes, sh, write_flickr_dataset, write_params


def run_airflow(project: Path, home: Path, *extra: str) -> dict:
    env = {**os.environ,
           "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__PARALLELISM": "4",
           "CAPTIONER_PROJECT_DIR": str(project), "CAPTIONER_RETRIES": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the tasks use params.yaml's own sqlite:///mlflow.db
    result = subprocess.run([sys.executable, str(PROJECT / "tests" / "airflow_run.py"),
                             str(project / "dags"), *extra],
                            env=env, cwd=project, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result (exit {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def dvc_graph_edges(root: Path) -> set[tuple[str, str]]:
    """Edges of DVC's own stage graph (the ground truth the DAG must match)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        return {(up.name, down.name) for down, up in graph.edges}


def test_each_feature_shard_is_a_task(tmp_path):
    sharded = git_project(tmp_path / "sharded", **{"features.shards": [0, 1, 2]})
    result = run_airflow(sharded, tmp_path / "airflow", "--parse-only")
    assert result["import_errors"] == {}
    tasks = result["tasks"]
    assert [t for t in tasks if t.startswith("features-")] == ["features-0", "features-1", "features-2"]
    assert set(tasks["merge_features"]) == {"validate", "features-0", "features-1", "features-2", "feedback",
                                            "feedback_features"}
    assert all(tasks[f"features-{i}"] == ["backbone", "download", "validate"] for i in range(3))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return git_project(tmp_path_factory.mktemp("airflow_project"))


def test_dagbag_has_no_import_errors_and_matches_dvc_yaml(project, tmp_path):
    result = run_airflow(project, tmp_path / "airflow", "--parse-only")
    assert result["import_errors"] == {}
    assert result["dags"] == ["caption_retraining"]
    assert list(result["tasks"]) == ["download", "validate", "backbone", "features-0", "feedback",
                                     "feedback_features", "merge_features", "train", "calibrate", "evaluate", "register"]
    dag_edges = {(up, down) for down, ups in result["tasks"].items() for up in ups}
    assert dag_edges == {(task_id(u), task_id(d)) for u, d in dvc_graph_edges(project)}
    assert dag_edges == {(task_id(u), task_id(d)) for d, ups in stage_graph(project).items() for u in ups}
    assert result["max_active_runs"] == 1
    # weekly, and whenever the app posts the feedback asset's event (enough new corrections)
    assert result["schedule_assets"] == ["captioner://feedback/flickr8k-captioner"]
    assert "0 0 * * 0" in result["timetable"]
    assert result["outlets"]["register"] == ["mlflow://models/flickr8k-captioner"]


@pytest.mark.slow
@pytest.mark.timeout(3000)  # three DAG runs, about 150 s together on a quiet machine
def test_dag_run_trains_registers_retrains_against_the_champion_then_bad_data_stops_before_training(project, tmp_path):
    home = tmp_path / "airflow"
    remote = tmp_path / "dvc-remote"  # a shared DVC remote, as Celery workers would use
    sh(["dvc", "remote", "add", "-d", "shared", str(remote)], project)
    first = run_airflow(project, home)
    assert first["state"] == "success", first
    assert set(first["task_states"].values()) == {"success"}
    pushed = {p.name for p in remote.rglob("*") if p.is_file()}
    assert len(pushed) > 10  # every task pushed its outputs
    status = sh(["dvc", "status", "--cloud"], project)
    assert "are in sync" in status.stdout
    assert json.loads((project / "metrics/eval.json").read_text())["beam"]["bleu4"] >= 0
    registry = json.loads((project / "reports/registry.json").read_text())
    assert registry["decision"] == "promoted" and registry["version"] == "1"

    # Retraining with another seed: the evaluate task's champion process (in a temporary folder)
    # opens the project's store through the relative default URI and compares, not crowns.
    write_params(project, **{"train.seed": 8})
    retrained = run_airflow(project, home)
    assert retrained["state"] == "success", retrained
    registry = json.loads((project / "reports/registry.json").read_text())
    assert registry["version"] == "2" and registry["old_champion"]["status"] == "scored", registry
    assert registry["comparison"] is not None and registry["comparison"]["images"] > 0
    champion_after_retraining = registry["champion"]

    # New data arrives, and it is bad: caption lines without a tab -> validate must fail.
    names = [f"{i}_x.jpg" for i in range(10)]
    bad = write_flickr_dataset(tmp_path / "bad_dataset", {n: jpeg_bytes() for n in names},
                               [f"{n}#{k} no tab here" for n in names for k in range(5)],
                               {"train": names[:8], "dev": names[8:9], "test": names[9:]})
    write_params(project, **{"data.source": "local", "data.local_path": str(bad)})
    second = run_airflow(project, home)
    assert second["state"] == "failed"
    states = second["task_states"]
    assert states["validate"] == "failed"
    assert {states[t] for t in ("features-0", "merge_features", "train", "calibrate", "evaluate", "register")} == \
        {"upstream_failed"}

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    champion = client.get_model_version_by_alias("flickr8k-captioner", "champion")
    assert str(champion.version) == champion_after_retraining
    assert len(client.search_model_versions("name='flickr8k-captioner'")) == 2
