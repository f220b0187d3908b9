"""`captioner caption`: bad arguments and unreadable files are reported before the (slow)
model load; a model is needed only for files that exist."""

import json
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "pipeline.cli", "caption"]


def run_cli(*args, cwd):
    start = time.monotonic()
    result = subprocess.run([*CLI, *args, "--model", "models:/nothing@champion",
                             "--tracking-uri", f"sqlite:///{cwd}/mlflow.db"],
                            capture_output=True, text=True, cwd=cwd, timeout=240)
    return result, time.monotonic() - start


def test_missing_files_and_folders_are_reported_without_loading_a_model(tmp_path):
    result, _ = run_cli(str(tmp_path / "nope.jpg"), str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{tmp_path / 'nope.jpg'}\tERROR: no such file" in result.stderr
    assert f"{tmp_path}\tERROR: is a directory" in result.stderr
    assert "cannot load" not in result.stderr  # the model was never asked for
    assert not (tmp_path / "mlflow.db").exists()
    as_json, _ = run_cli("--json", str(tmp_path / "nope.jpg"), cwd=tmp_path)  # one JSON object per file there too
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"file": str(tmp_path / "nope.jpg"), "error": "no such file"}


def test_bad_beam_is_a_usage_error_not_a_traceback(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    for beam in ("-3", "0", "11", "three"):
        result = subprocess.run([*CLI, str(tmp_path / "a.jpg"), "--beam", beam],
                                capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 2
        assert "--beam" in result.stderr and "Traceback" not in result.stderr


def test_help_names_the_exit_codes():
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1]).stdout
    assert "--beam" in out and "exit status" in " ".join(out.split())
