"""`make ui` and `make airflow`: they come up on 127.0.0.1, answer their health endpoint, and
leave no process behind when stopped."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import PROJECT, free_port, write_params


def group_alive(pgid: int) -> bool:
    """A live (non-zombie) process is left in the group."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


def start_and_stop(tmp_path, service: str, health_path: str, timeout_s: float):
    port = free_port()
    write_params(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "pipeline.ops.launchers", service, "--port", str(port)],
                                cwd=tmp_path, env={**env, "PYTHONPATH": str(PROJECT)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True,
                                # as when started in the background of a script: SIGINT ignored
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{health_path}", timeout=3) as r:
                    body = r.read().decode()
                    break
            except OSError:
                assert launcher.poll() is None, launcher.stdout.read()
                assert time.monotonic() < deadline, f"{service} not healthy in {timeout_s} s"
                time.sleep(1)
        clash = subprocess.run([sys.executable, "-m", "pipeline.ops.launchers", service, "--port", str(port)],
                               cwd=tmp_path, env={**env, "PYTHONPATH": str(PROJECT)},
                               capture_output=True, text=True, timeout=240)
        assert clash.returncode == 1 and "already served" in clash.stderr
        # the service runs in its own process group, below the launcher
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert children, "no service process under the launcher"
        service_pgid = os.getpgid(int(children[0]))
        assert service_pgid != os.getpgid(launcher.pid)
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, output
        assert f"{'mlflow' if service == 'ui' else 'airflow'}: stopped" in output
        # "stopped" is printed only once the whole group is gone: no waiting here
        assert not group_alive(service_pgid), "service processes outlived the 'stopped' message"
        return body, output
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def test_mlflow_ui_comes_up_and_goes_away_cleanly(tmp_path):
    body, output = start_and_stop(tmp_path, "ui", "/health", 120)
    assert body.strip() == "OK"
    assert "mlflow: starting" in output


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_airflow_standalone_comes_up_and_goes_away_cleanly(tmp_path):
    (tmp_path / "dags").symlink_to(PROJECT / "dags")
    (tmp_path / "dvc.yaml").symlink_to(PROJECT / "dvc.yaml")
    body, _ = start_and_stop(tmp_path, "airflow", "/api/v2/monitor/health", 300)
    assert '"metadatabase"' in body


def test_airflow_tasks_get_the_stores_a_user_named_relative_to_where_they_started(tmp_path, monkeypatch):
    """The tasks run in the project folder, not in the shell's: a relative store set in the
    environment reaches them absolute."""
    from pathlib import Path

    from pipeline.ops.launchers import airflow_environment

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/mlflow.db")
    monkeypatch.setenv("CAPTIONER_FEEDBACK_DB", "postgresql://127.0.0.1/feedback")
    env = airflow_environment(tmp_path / "home", 8080, PROJECT, Path(sys.executable).parent)
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path.resolve()}/stores/mlflow.db"
    assert env["CAPTIONER_FEEDBACK_DB"] == "postgresql://127.0.0.1/feedback"
