import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ops.airflow_tasks import (
    handover_env,
    shell_prelude,
    stage_command,
    task_id,
    task_queues,
)


def test_task_ids_replace_the_at_sign_airflow_refuses():
    assert task_id("features@1") == "features-1" and task_id("train") == "train"


def test_task_queues_pin_named_stages_and_refuse_unknown_ones():
    stages = ["download", "features@0", "train"]
    assert task_queues("", stages) == {}
    assert task_queues(" download=a , features@0=gpu", stages) == {"download": "a", "features@0": "gpu"}
    with pytest.raises(ValueError, match="no stage 'trian'"):
        task_queues("trian=a", stages)
    with pytest.raises(ValueError, match="not stage=queue"):
        task_queues("train", stages)


def test_handover_env_pulls_upstream_xcoms_and_the_previous_run():
    env = handover_env("merge_features", ["features@0", "features@1"])
    assert env["CAPTIONER_UPSTREAM"] == "{{ ti.xcom_pull(task_ids=['features-0', 'features-1']) | tojson }}"
    assert "include_prior_dates=True" in env["CAPTIONER_PREVIOUS"] and "'merge_features'" in env["CAPTIONER_PREVIOUS"]
    assert handover_env("download", [])["CAPTIONER_UPSTREAM"] == "[]"


def test_task_shell_finds_the_project_python_even_when_bashrc_changes_path(tmp_path):
    """A pyenv/conda init in ~/.bashrc prepends its own python; the prelude must win."""
    fake_bin = tmp_path / "shims"
    fake_bin.mkdir()
    (fake_bin / "python").write_text("#!/bin/sh\necho WRONG-PYTHON\n")
    (fake_bin / "python").chmod(0o755)
    rc = tmp_path / "bashrc"
    rc.write_text(f'export PATH="{fake_bin}:$PATH"\n')
    venv_bin = str(Path(sys.executable).parent)
    script = shell_prelude(venv_bin) + 'python -c "import sys; print(sys.prefix)"'
    out = subprocess.run(["bash", "-c", script], env={**os.environ, "BASH_ENV": str(rc)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == sys.prefix
    without = subprocess.run(["bash", "-c", 'python -c "print(1)"'], capture_output=True, text=True,
                             env={**os.environ, "BASH_ENV": str(rc)}).stdout.strip()
    assert without == "WRONG-PYTHON"  # the situation the prelude guards against


def test_stage_command_runs_the_task_runner_in_the_project_env():
    script = stage_command("features@1", "/opt/venv/bin")
    assert script.startswith("set -euo pipefail\nexport PATH=/opt/venv/bin:")
    assert script.rstrip().endswith("exec python -m pipeline.ops.task_runner features@1")
