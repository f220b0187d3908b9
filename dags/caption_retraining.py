"""
### Caption model retraining

Runs the captioner's DVC pipeline, one task per stage of `dvc.yaml` as DVC resolves it
(download, validate, backbone, one `features-<i>` task per feature shard, merge_features,
train, evaluate, register). Each task runs `python -m pipeline.ops.task_runner <stage>`, i.e.
`dvc repro --single-item <stage>` in the worker's copy of the project: Airflow owns order,
retries and scheduling, DVC owns caching (an unchanged stage is skipped in seconds).

* A failed `validate` stops the run before training; the registered champion is untouched.
* `register` moves the MLflow alias `champion` only when the new model scores better, and
  publishes the asset `mlflow://models/<name>`, so downstream DAGs can run on a new model.
* Celery workers on other machines: with a DVC remote configured (`dvc remote add -d ...`),
  each task receives its upstream tasks' `dvc.lock` entries of this run (XCom), pulls exactly
  those outputs, and pushes its own; its XCom shows the lock entries and whether it ran.
* Trigger with `{"force": ["train"]}` (or `true` for all) to rerun stages even if unchanged.
* Scheduled on the asset `captioner://feedback/<name>` as well as the cron: the app posts an
  event of it when `feedback.min_new` corrections arrived since the last export, and the run
  trains on them (`feedback` stage). With no new feedback, code or params, a run does nothing.

Settings (environment, read when the DAG is parsed): `CAPTIONER_PROJECT_DIR` (default: the
folder above `dags/`; the Airflow Variable `captioner_project_dir` overrides it at run time),
`CAPTIONER_SCHEDULE` (default `@weekly`; empty: on new feedback and triggers only), `CAPTIONER_RETRIES` (default 2),
`CAPTIONER_RETRY_DELAY_S` (default 120), `CAPTIONER_TASK_QUEUES` (`stage=queue,...`: pin
stages to Celery queues; others use the default queue).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag

from pipeline.config import load_settings
from pipeline.feedback.retraining import asset_uri
from pipeline.ops.airflow_tasks import handover_env, stage_command, task_id, task_queues
from pipeline.ops.dvc_graph import stage_graph

PROJECT_DIR = Path(os.environ.get("CAPTIONER_PROJECT_DIR", Path(__file__).resolve().parents[1]))
VENV_BIN = os.path.dirname(sys.executable)  # dvc and the stages' python come from this env
MODEL_NAME = load_settings(PROJECT_DIR / "params.yaml").registry.model_name
MODEL_ASSET = Asset(f"mlflow://models/{MODEL_NAME}")
FEEDBACK_ASSET = Asset(name=f"{MODEL_NAME}-feedback", uri=asset_uri(MODEL_NAME))
CRON = os.environ.get("CAPTIONER_SCHEDULE", "@weekly")
STAGES = stage_graph(PROJECT_DIR)
QUEUES = task_queues(os.environ.get("CAPTIONER_TASK_QUEUES", ""), STAGES)


@dag(
    dag_id="caption_retraining",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(CRON, timezone="UTC"), assets=FEEDBACK_ASSET)
    if CRON else FEEDBACK_ASSET,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["captioner", "dvc", "mlflow"],
    params={"force": Param([], type=["array", "boolean"],
                           description="stages to rerun even if unchanged (true: all)")},
    default_args={
        "retries": int(os.environ.get("CAPTIONER_RETRIES", "2")),
        "retry_delay": timedelta(seconds=int(os.environ.get("CAPTIONER_RETRY_DELAY_S", "120"))),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    },
)
def caption_retraining():
    tasks = {
        stage: BashOperator(
            task_id=task_id(stage),
            bash_command=stage_command(stage, VENV_BIN),
            cwd="{{ var.value.get('captioner_project_dir', '" + str(PROJECT_DIR) + "') }}",
            env={"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", **handover_env(stage, upstream)},
            append_env=True,
            outlets=[MODEL_ASSET] if stage == "register" else [],
            doc_md=f"`dvc repro --single-item {stage}` (see `{stage.split('@')[0]}` in dvc.yaml).",
            **({"queue": QUEUES[stage]} if stage in QUEUES else {}),
        )
        for stage, upstream in STAGES.items()
    }
    for stage, upstream in STAGES.items():
        for parent in upstream:
            tasks[parent] >> tasks[stage]


caption_retraining()
