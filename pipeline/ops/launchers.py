"""Local services for ``make airflow`` and ``make ui``, bound to 127.0.0.1.

Each service runs in its own process group; Ctrl-C (or SIGTERM) stops the whole group, so
no scheduler, worker or gunicorn process outlives the command.

    python -m pipeline.ops.launchers airflow [--port 8080]   # airflow standalone, this project's DAGs
    python -m pipeline.ops.launchers ui [--port 5000]        # MLflow server over the project's store
    python -m pipeline.ops.launchers team [--workers 2]      # Celery workers, Postgres, Redis, MLflow server

team: database and broker URLs come from CAPTIONER_AIRFLOW_DB, CAPTIONER_MLFLOW_DB,
CAPTIONER_BROKER_URL (defaults: the local Postgres and Redis), the shared DVC remote from
CAPTIONER_DVC_REMOTE (default: <home>/dvc-remote; s3://... works too), MLflow's artifact store
from CAPTIONER_ARTIFACTS (default: <home>/mlflow-artifacts). See pipeline/ops/team.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError, absolute_location, load_settings
from pipeline.ops.processes import healthy, stop_group, wait_until_healthy
from pipeline.registry.tracking import tracking_uri

PROJECT = Path.cwd()
STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "CAPTIONER_FEEDBACK_DB")  # locations a user may set in the shell
VENV_BIN = Path(sys.executable).parent


def supervise(name: str, cmd: list[str], env: dict, base_url: str, health_path: str,
              ready_note: str = "", start_timeout_s: float = 300) -> int:
    """Start ``cmd`` in a new process group, report when ``base_url + health_path`` answers,
    and stop the group on Ctrl-C / SIGTERM or when the service dies."""
    health_url = base_url + health_path
    def to_interrupt(signum, frame):
        raise KeyboardInterrupt

    # Installed explicitly: a launcher started in the background of a script inherits SIGINT
    # as ignored, and Ctrl-C / kill -INT must still stop the service group.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, to_interrupt)
    if healthy(health_url):
        print(f"{name}: {base_url} is already served by another process; stop it or use --port",
              file=sys.stderr)
        return 1
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    print(f"{name}: starting (pid {proc.pid}); waiting for {health_url}", flush=True)
    try:
        try:
            wait_until_healthy(name, proc, health_url, start_timeout_s)
        except RuntimeError as err:
            print(f"{err}; stopping", file=sys.stderr)
            return proc.returncode or 1
        print(f"{name}: ready at {base_url}{ready_note} (Ctrl-C stops it)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        print(f"\n{name}: stopping", flush=True)
        return 0
    finally:
        stop_group(proc)
        print(f"{name}: stopped", flush=True)


# Task instances Airflow runs at once, standalone, in the team stack and in compose alike:
# `airflow standalone` starts 32 worker processes by default (5 GB).
PARALLELISM = "4"


def airflow_environment(home: Path, port: int, project: Path, venv_bin: Path) -> dict[str, str]:
    """What every Airflow process of this project sees, standalone or in the team stack: its home,
    the DAGs of ``project``, the API on 127.0.0.1:``port``, and this environment's bin first on PATH."""
    # the tasks run in the project folder, not here: a relative store in the environment is made absolute
    stores = {k: absolute_location(os.environ[k], Path.cwd()) for k in STORE_VARIABLES if os.environ.get(k)}
    return {**os.environ, **stores, "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": PARALLELISM,
            "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "CAPTIONER_PROJECT_DIR": str(project),
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}


def airflow(port: int) -> int:
    home = PROJECT / "airflow_home"
    home.mkdir(exist_ok=True)
    env = airflow_environment(home, port, PROJECT, VENV_BIN)
    note = f"; login: admin, password in {home}/simple_auth_manager_passwords.json.generated"
    return supervise("airflow", [str(VENV_BIN / "airflow"), "standalone"], env,
                     f"http://127.0.0.1:{port}", "/api/v2/monitor/health", note)


TRAINING_VIEW = "workflowType=machine_learning"


def ui(port: int) -> int:
    try:
        uri = tracking_uri(load_settings())
    except ConfigError as err:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            print(f"mlflow: {err}; run from the project root or set MLFLOW_TRACKING_URI", file=sys.stderr)
            return 1
        uri = absolute_location(os.environ["MLFLOW_TRACKING_URI"], Path.cwd())
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # 0.5 GB instead of 2 GB
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # MLflow 3.17's UI opens on its GenAI pages unless told (once per browser, or by this URL
    # parameter) to show model training: the runs table and the registry.
    return supervise("mlflow", cmd, env, f"http://127.0.0.1:{port}", "/health",
                     f" (store: {uri}); training runs: http://127.0.0.1:{port}/#/experiments?{TRAINING_VIEW}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ops.launchers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", choices=["airflow", "ui", "team"])
    parser.add_argument("--port", type=int, default=None,
                        help="default: 8080 (airflow and team's Airflow), 5000 (ui)")
    parser.add_argument("--workers", type=int, default=2, help="team: Celery workers (default: 2)")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="team: MLflow server port (default: 5000)")
    parser.add_argument("--home", type=Path, default=Path("team_home"),
                        help="team: folder for worker clones, logs, Airflow home (default: team_home)")
    args = parser.parse_args()
    if args.service == "team":
        from pipeline.ops.team import TeamConfig, run_team

        if args.workers < 1:
            parser.error("--workers must be at least 1")
        cfg = TeamConfig.from_env(PROJECT, args.home, workers=args.workers,
                                  airflow_port=args.port or 8080, mlflow_port=args.mlflow_port)
        sys.exit(run_team(cfg, VENV_BIN))
    if args.service == "airflow":
        sys.exit(airflow(args.port or 8080))
    sys.exit(ui(args.port or 5000))


if __name__ == "__main__":
    main()
