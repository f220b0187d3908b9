"""What each Airflow task of the retraining DAG runs, and the settings that reach it.

The DAG file (``dags/caption_retraining.py``) holds no logic: it makes one BashOperator per DVC
stage from ``dvc_graph.stage_graph`` and fills it from here: the task id, the shell command
(``python -m pipeline.ops.task_runner STAGE`` with the project's environment first on PATH),
the XCom templates that carry ``dvc.lock`` entries between workers, and the Celery queue a
team pinned the stage to.
"""

from __future__ import annotations

import shlex


def task_id(stage: str) -> str:
    """Airflow task id of a DVC stage (``features@1`` -> ``features-1``: '@' is not allowed)."""
    return stage.replace("@", "-")


def task_queues(spec: str, stages) -> dict[str, str]:
    """``"download=a,features@0=gpu"`` -> {stage: Celery queue}; stages not named use the
    default queue. Lets a team pin a stage to the workers that can run it (a GPU, a big disk)."""
    queues = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        stage, sep, queue = item.partition("=")
        if not sep or not stage.strip() or not queue.strip():
            raise ValueError(f"CAPTIONER_TASK_QUEUES: {item!r} is not stage=queue")
        if stage.strip() not in stages:
            raise ValueError(f"CAPTIONER_TASK_QUEUES: no stage {stage.strip()!r} in dvc.yaml "
                             f"(stages: {', '.join(stages)})")
        queues[stage.strip()] = queue.strip()
    return queues


def shell_prelude(venv_bin: str) -> str:
    """Put the project's environment first on PATH inside the task's shell. Setting the
    operator's env is not enough: when a task's stdin is a socket (Airflow's task supervisor),
    bash reads ~/.bashrc, and a pyenv/conda init there puts its own python back in front."""
    return f"set -euo pipefail\nexport PATH={shlex.quote(venv_bin)}:\"$PATH\"\n"


def stage_command(stage: str, venv_bin: str) -> str:
    """Shell command of one orchestrated stage (see ``pipeline/ops/task_runner.py``); its last
    line of output is the task's XCom."""
    return shell_prelude(venv_bin) + f"exec python -m pipeline.ops.task_runner {shlex.quote(stage)}\n"


def handover_env(stage: str, upstream: list[str]) -> dict[str, str]:
    """Environment of a stage's task, as Airflow templates: the XComs of its upstream tasks
    in this DAG run, its own XCom from the latest earlier run, and the stages to force."""
    ids = [task_id(name) for name in upstream]
    own = task_id(stage)
    return {
        "CAPTIONER_UPSTREAM": f"{{{{ ti.xcom_pull(task_ids={ids!r}) | tojson }}}}" if ids else "[]",
        "CAPTIONER_PREVIOUS": f"{{{{ ti.xcom_pull(task_ids={own!r}, include_prior_dates=True) | tojson }}}}",
        "CAPTIONER_FORCE": "{{ params.force | tojson }}",
    }
