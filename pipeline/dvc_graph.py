"""The stage graph of dvc.yaml, for orchestrators (the Airflow DAG) that must run exactly
the stages DVC runs, in the same order, without a second copy of the pipeline."""

from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath

import yaml


def _paths(entries) -> list[str]:
    """dvc.yaml deps/outs entries: plain strings or single-key mappings with options."""
    out = []
    for entry in entries or []:
        out.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [str(PurePosixPath(p)) for p in out]


def _covers(a: str, b: str) -> bool:
    """True when path a is b or a folder holding b (or the other way round)."""
    return a == b or b.startswith(a + "/") or a.startswith(b + "/")


def stage_graph(dvc_yaml: str | Path) -> dict[str, list[str]]:
    """Stage name -> upstream stage names (those whose outs it depends on), in file order."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    outs = {name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))
            for name, s in stages.items()}
    graph = {}
    for name, stage in stages.items():
        deps = _paths(stage.get("deps"))
        graph[name] = [other for other in stages if other != name
                       and any(_covers(o, d) for o in outs[other] for d in deps)]
    return graph


def shell_prelude(venv_bin: str) -> str:
    """Put the project's environment first on PATH inside the task's shell. Setting the
    operator's env is not enough: when a task's stdin is a socket (Airflow's task supervisor),
    bash reads ~/.bashrc, and a pyenv/conda init there puts its own python back in front."""
    return f"set -euo pipefail\nexport PATH={shlex.quote(venv_bin)}:\"$PATH\"\n"


def stage_command(stage: str, venv_bin: str) -> str:
    """Shell command for one orchestrated stage: with a DVC remote configured, pull the
    stage's inputs first and push its outputs after, so workers on other machines share them."""
    s = shlex.quote(stage)
    return (
        shell_prelude(venv_bin)
        + 'if [ -n "$(dvc remote list)" ]; then dvc pull --allow-missing --with-deps ' + s + "; fi\n"
        + f"dvc repro --single-item {s}\n"
        + 'if [ -n "$(dvc remote list)" ]; then dvc push ' + s + "; fi\n"
    )
