"""Real `dvc repro` of the project's dvc.yaml in a temporary git copy of the project."""

import json

import pytest

from tests.helpers import git_project, sh


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return git_project(tmp_path_factory.mktemp("project"))


@pytest.mark.slow
def test_dvc_repro_runs_the_stages_then_is_a_no_op(repo):
    first = sh(["dvc", "repro"], repo)
    for stage in ("download", "validate", "features", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (repo / "data/features/xception.parquet").is_file()
    report = json.loads((repo / "reports/validation.json").read_text())
    assert report["success"] and report["kept"] == 200
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert {"greedy", "beam", "baseline"} <= set(metrics)
    assert json.loads((repo / "reports/registry.json").read_text())["decision"] == "promoted"
    shown = sh(["dvc", "metrics", "show", "--json"], repo)
    assert "bleu4" in shown.stdout
    second = sh(["dvc", "repro"], repo)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    # register's real output is the MLflow registry: it reruns (not restored from DVC's
    # cache) when its report is gone, e.g. together with a reset MLflow store
    (repo / "reports/registry.json").unlink()
    (repo / "mlflow.db").unlink()
    third = sh(["dvc", "repro"], repo)
    assert "Running stage 'register'" in third.stdout
    assert [line for line in third.stdout.splitlines() if line.startswith("Running stage")] == \
        ["Running stage 'register':"]
    assert json.loads((repo / "reports/registry.json").read_text())["version"] == "1"
