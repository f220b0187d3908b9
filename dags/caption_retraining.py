"""
### Caption model retraining

Runs the captioner's DVC pipeline, one task per stage of `dvc.yaml`
(download -> validate -> features -> train -> evaluate -> register). Each task runs
`dvc repro --single-item <stage>` in the project directory: Airflow owns order, retries and
scheduling, DVC owns caching (an unchanged stage is skipped in about a second).

* A failed `validate` stops the run before training; the registered champion is untouched.
* `register` moves the MLflow alias `champion` only when the new model scores better, and
  publishes the asset `mlflow://models/<name>`, so downstream DAGs can run on a new model.
* With a DVC remote configured (`dvc remote add -d ...`), each task pulls its inputs first
  and pushes its outputs after, so Celery workers on different machines share stage outputs.

Settings (environment, read when the DAG is parsed): `CAPTIONER_PROJECT_DIR` (default: the
folder above `dags/`; the Airflow Variable `captioner_project_dir` overrides it at run time),
`CAPTIONER_SCHEDULE` (default `@weekly`), `CAPTIONER_RETRIES` (default 2).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import Asset, dag

from pipeline.config import load_settings
from pipeline.dvc_graph import stage_command, stage_graph

PROJECT_DIR = Path(os.environ.get("CAPTIONER_PROJECT_DIR", Path(__file__).resolve().parents[1]))
VENV_BIN = os.path.dirname(sys.executable)  # dvc and the stages' python come from this env
MODEL_NAME = load_settings(PROJECT_DIR / "params.yaml").registry.model_name
MODEL_ASSET = Asset(f"mlflow://models/{MODEL_NAME}")
STAGES = stage_graph(PROJECT_DIR / "dvc.yaml")


@dag(
    dag_id="caption_retraining",
    schedule=os.environ.get("CAPTIONER_SCHEDULE", "@weekly"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["captioner", "dvc", "mlflow"],
    default_args={
        "retries": int(os.environ.get("CAPTIONER_RETRIES", "2")),
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    },
)
def caption_retraining():
    tasks = {
        stage: BashOperator(
            task_id=stage,
            bash_command=stage_command(stage, VENV_BIN),
            cwd="{{ var.value.get('captioner_project_dir', '" + str(PROJECT_DIR) + "') }}",
            env={"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"},
            append_env=True,
            outlets=[MODEL_ASSET] if stage == "register" else [],
            doc_md=f"`dvc repro --single-item {stage}` (see the `{stage}` stage in dvc.yaml).",
        )
        for stage in STAGES
    }
    for stage, upstream in STAGES.items():
        for parent in upstream:
            tasks[parent] >> tasks[stage]


caption_retraining()
