"""The stage graph of dvc.yaml, for orchestrators (the Airflow DAG) that must run exactly the
stages DVC runs, in the same order, without a second copy of the pipeline.

DVC itself resolves dvc.yaml (``foreach`` stages such as ``features@0``, ``features@1``,
params interpolation) and links stages through their outs and deps, so the DAG sees what
``dvc repro`` would run.
"""

from __future__ import annotations

import shlex
from pathlib import Path


def stage_graph(project: str | Path) -> dict[str, list[str]]:
    """Stage name -> upstream stage names (those whose outs it depends on), in file order."""
    from dvc.repo import Repo

    # uninitialized: the graph needs only dvc.yaml and params.yaml, not a .dvc folder
    with Repo(str(project), uninitialized=True) as repo:
        order = [stage.name for stage in repo.index.stages]
        upstream: dict[str, set[str]] = {name: set() for name in order}
        for down, up in repo.index.graph.edges:
            upstream[down.name].add(up.name)
    return {name: [u for u in order if u in upstream[name]] for name in order}


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
    """Shell command of one orchestrated stage (see ``pipeline/task_runner.py``); its last
    line of output is the task's XCom."""
    return shell_prelude(venv_bin) + f"exec python -m pipeline.task_runner {shlex.quote(stage)}\n"


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
