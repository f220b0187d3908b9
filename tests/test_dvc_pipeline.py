"""Real `dvc repro` of the project's dvc.yaml in a temporary git copy of the project."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT, write_params

VENV_BIN = str(Path(sys.executable).parent)


def project_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=PROJECT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = PROJECT / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/", "reports/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = project_copy(tmp_path_factory.mktemp("project"))
    write_params(root)
    sh(["git", "init", "-q"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    return root


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
