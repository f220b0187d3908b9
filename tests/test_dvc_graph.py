import os
import subprocess
import sys
from pathlib import Path

from pipeline.dvc_graph import shell_prelude, stage_command, stage_graph


def test_graph_links_stages_through_outs_and_deps(tmp_path):
    (tmp_path / "dvc.yaml").write_text("""
stages:
  a: {cmd: x, outs: [data/raw: {persist: true}]}
  b: {cmd: x, deps: [data/raw/sub/file.txt], outs: [out/b.parquet]}
  c: {cmd: x, deps: [out/b.parquet, src/c.py], metrics: [m.json: {cache: false}]}
  d: {cmd: x, deps: [m.json, data/raw]}
""")
    assert stage_graph(tmp_path / "dvc.yaml") == {"a": [], "b": ["a"], "c": ["b"], "d": ["a", "c"]}


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


def test_stage_command_pulls_and_pushes_only_with_a_remote():
    script = stage_command("train", "/opt/venv/bin")
    assert script.startswith("set -euo pipefail\nexport PATH=/opt/venv/bin:")
    assert "dvc repro --single-item train" in script
    assert 'if [ -n "$(dvc remote list)" ]; then dvc pull --allow-missing --with-deps train; fi' in script
