"""The team stack as native processes on one host (no Docker): ``make team`` or
``python -m pipeline.ops.launchers team --workers N``.

Starts on 127.0.0.1: an MLflow tracking server (Postgres backend store, proxied artifacts, so
workers need only its URL), the Airflow 3 api-server, scheduler, dag-processor and triggerer
with the CeleryExecutor (Redis broker, Postgres metadata DB and result backend), and N Celery
workers. Each worker runs in its own git clone of the project under ``<home>/workers/<name>``,
as a separate machine would, and they share stage outputs only through the DVC remote.

The commands and settings below are the ones docker-compose.yml uses (tests/test_compose.py
checks that the two agree), so what runs here is what runs in the containers.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pipeline.ops.launchers import PARALLELISM, airflow_environment
from pipeline.ops.processes import healthy, stop_group, wait_until_healthy

# Shared with docker-compose.yml (x-airflow-common environment and service commands).
AIRFLOW_SETTINGS = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
    "AIRFLOW__CORE__PARALLELISM": PARALLELISM,
    # one task at a time per worker: a worker is one project folder, i.e. one DVC workspace;
    # add workers (machines) to run more tasks at once
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "true",
}
AIRFLOW_COMMANDS = {
    "airflow-init": ["airflow", "db", "migrate"],
    "airflow-apiserver": ["airflow", "api-server"],
    "airflow-scheduler": ["airflow", "scheduler"],
    "airflow-dag-processor": ["airflow", "dag-processor"],
    "airflow-triggerer": ["airflow", "triggerer"],
    "airflow-worker": ["airflow", "celery", "worker"],
}
MLFLOW_COMMAND = ["mlflow", "server", "--backend-store-uri", "{backend}", "--artifacts-destination",
                  "{artifacts}", "--serve-artifacts", "--host", "{host}", "--port", "{port}"]
MLFLOW_SETTINGS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 0.5 GB instead of 2 GB


@dataclass
class TeamConfig:
    """Where everything lives; URLs come from the environment, the local services by default."""
    project: Path
    home: Path
    workers: int = 2
    airflow_port: int = 8080
    mlflow_port: int = 5000
    airflow_db: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/captioner_airflow"
    mlflow_db: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/captioner_mlflow"
    feedback_db: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/captioner_feedback"
    broker: str = "redis://127.0.0.1:6379/0"
    dvc_remote: str = ""
    artifacts: str = ""
    worker_queues: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, project: Path, home: Path, **kwargs) -> "TeamConfig":
        env = os.environ
        cfg = cls(project=project.resolve(), home=home.resolve(), **kwargs)
        cfg.airflow_db = env.get("CAPTIONER_AIRFLOW_DB", cfg.airflow_db)
        cfg.mlflow_db = env.get("CAPTIONER_MLFLOW_DB", cfg.mlflow_db)
        cfg.feedback_db = env.get("CAPTIONER_FEEDBACK_DB", cfg.feedback_db)
        cfg.broker = env.get("CAPTIONER_BROKER_URL", cfg.broker)
        cfg.dvc_remote = env.get("CAPTIONER_DVC_REMOTE") or str(cfg.home / "dvc-remote")
        cfg.artifacts = env.get("CAPTIONER_ARTIFACTS") or str(cfg.home / "mlflow-artifacts")
        return cfg

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def worker_names(self) -> list[str]:
        return [f"worker{i + 1}" for i in range(self.workers)]

    def worker_dir(self, name: str) -> Path:
        return self.home / "workers" / name


def result_backend(sqlalchemy_url: str) -> str:
    """Celery's result backend on the metadata DB. The driver stays in the URL: SQLAlchemy 2.1
    maps a bare ``postgresql://`` to psycopg 3, which the image does not install."""
    return "db+" + sqlalchemy_url


def ensure_database(sqlalchemy_url: str) -> None:
    """Create the Postgres database of ``sqlalchemy_url`` if it does not exist."""
    import psycopg2

    parsed = urlparse(sqlalchemy_url)
    name = parsed.path.lstrip("/")
    admin = psycopg2.connect(host=parsed.hostname, port=parsed.port or 5432, user=parsed.username,
                             password=parsed.password, dbname="postgres", connect_timeout=10)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()


def _secret(home: Path) -> str:
    """One JWT secret for every Airflow process (tokens from the api-server must verify in the
    workers), kept in the home folder so a restart keeps sessions valid."""
    path = home / "airflow" / "jwt_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def airflow_env(cfg: TeamConfig, venv_bin: Path) -> dict[str, str]:
    return {
        **airflow_environment(cfg.home / "airflow", cfg.airflow_port, cfg.project, venv_bin),
        **AIRFLOW_SETTINGS,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": cfg.airflow_db,
        "AIRFLOW__CELERY__BROKER_URL": cfg.broker,
        "AIRFLOW__CELERY__RESULT_BACKEND": result_backend(cfg.airflow_db),
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(cfg.home),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": os.environ.get("CAPTIONER_AIRFLOW_USERS", "admin:admin"),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "MLFLOW_TRACKING_URI": cfg.mlflow_url,
        "CAPTIONER_FEEDBACK_DB": cfg.feedback_db,  # the feedback stage exports from it, on any worker
    }


def worker_env(cfg: TeamConfig, base: dict[str, str], index: int) -> dict[str, str]:
    """A worker sees its own clone: its DAG file, project folder and log server port."""
    folder = cfg.worker_dir(cfg.worker_names()[index])
    return {**base, "AIRFLOW__CORE__DAGS_FOLDER": str(folder / "dags"),
            "CAPTIONER_PROJECT_DIR": str(folder),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(8793 + index)}


def prepare_worker_folder(cfg: TeamConfig, name: str) -> Path:
    """A git clone of the project (updated if it exists), with the team's DVC remote."""
    folder = cfg.worker_dir(name)
    if not (folder / ".git").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(cfg.project), str(folder)], check=True)
    else:
        subprocess.run(["git", "pull", "-q", "--ff-only"], cwd=folder, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--local", "--default", "--force",
                    "team", cfg.dvc_remote], cwd=folder, check=True, capture_output=True)
    return folder


def mlflow_command(cfg: TeamConfig, venv_bin: Path) -> list[str]:
    values = {"backend": cfg.mlflow_db, "artifacts": cfg.artifacts, "host": "127.0.0.1",
              "port": str(cfg.mlflow_port)}
    cmd = [part.format(**values) for part in MLFLOW_COMMAND]
    return [str(venv_bin / cmd[0]), *cmd[1:], "--workers", "1"]


class Processes:
    """Named process groups; stopping waits until no member of any group is alive."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        print(f"team: {name} started (pid {self.procs[name].pid}, log {log_dir / f'{name}.log'})", flush=True)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # workers first, the database users last
            stop_group(self.procs[name])


def wait_healthy(procs: Processes, name: str, url: str, timeout_s: float) -> None:
    try:
        wait_until_healthy(name, procs.procs[name], url, timeout_s)
    except RuntimeError as err:
        raise RuntimeError(f"{err}; see its log") from None


def run_team(cfg: TeamConfig, venv_bin: Path, start_timeout_s: float = 600) -> int:
    """Start the stack, supervise it until Ctrl-C / SIGTERM or a core process dies, stop it."""
    def to_interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, to_interrupt)
    for url in (cfg.airflow_url, cfg.mlflow_url):
        if healthy(url + "/api/v2/monitor/health") or healthy(url + "/health"):
            print(f"team: {url} is already served by another process; stop it or pick other ports",
                  file=sys.stderr)
            return 1
    logs = cfg.home / "logs"
    procs = Processes()
    base = airflow_env(cfg, venv_bin)
    airflow = str(venv_bin / "airflow")
    try:
        for url in (cfg.airflow_db, cfg.mlflow_db, cfg.feedback_db):
            if url.startswith("postgresql"):
                ensure_database(url)
        if "://" not in cfg.artifacts:  # a local folder (s3://... is the server's to reach)
            Path(cfg.artifacts).mkdir(parents=True, exist_ok=True)
        print("team: migrating the Airflow database", flush=True)
        subprocess.run([airflow, *AIRFLOW_COMMANDS["airflow-init"][1:]], env=base, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.start("mlflow", mlflow_command(cfg, venv_bin), {**os.environ, **MLFLOW_SETTINGS}, cfg.home, logs)
        for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
            procs.start(name, [airflow, *AIRFLOW_COMMANDS[name][1:]], base, cfg.home, logs)
        wait_healthy(procs, "mlflow", cfg.mlflow_url + "/health", start_timeout_s)
        wait_healthy(procs, "airflow-apiserver", cfg.airflow_url + "/api/v2/monitor/health", start_timeout_s)
        for i, name in enumerate(cfg.worker_names()):
            folder = prepare_worker_folder(cfg, name)
            queues = ",".join(["default", name, *cfg.worker_queues])
            procs.start(name, [airflow, *AIRFLOW_COMMANDS["airflow-worker"][1:], "--queues", queues,
                               "--celery-hostname", f"{name}@%h"], worker_env(cfg, base, i), folder, logs)
        print(json.dumps({"airflow": cfg.airflow_url, "mlflow": cfg.mlflow_url,
                          "workers": {n: str(cfg.worker_dir(n)) for n in cfg.worker_names()},
                          "dvc_remote": cfg.dvc_remote}), flush=True)
        print(f"team: ready: Airflow {cfg.airflow_url} (login admin, password in "
              f"{cfg.home / 'airflow'}/simple_auth_manager_passwords.json.generated), MLflow "
              f"{cfg.mlflow_url}; Ctrl-C stops it all", flush=True)
        return _supervise(procs, cfg)
    except KeyboardInterrupt:
        print("\nteam: stopping", flush=True)
        return 0
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        print(f"team: error: {err}\n{detail.decode(errors='replace')[-2000:]}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        print("team: stopped", flush=True)


def _supervise(procs: Processes, cfg: TeamConfig) -> int:
    """Wait; a worker that exits is reported (its tasks are retried on the others), a core
    process that exits ends the stack."""
    workers, reported = set(cfg.worker_names()), set()
    while True:
        for name, proc in procs.procs.items():
            if proc.poll() is None or name in reported:
                continue
            if name in workers:
                reported.add(name)
                print(f"team: {name} exited with status {proc.returncode}; the other workers go on",
                      flush=True)
            else:
                print(f"team: {name} exited with status {proc.returncode}; stopping the stack "
                      f"(see {cfg.home / 'logs' / name}.log)", file=sys.stderr, flush=True)
                return 1
        time.sleep(1)
