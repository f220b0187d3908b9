"""The stage graph of dvc.yaml, for orchestrators (the Airflow DAG) that must run exactly the
stages DVC runs, in the same order, without a second copy of the pipeline.

DVC itself resolves dvc.yaml (``foreach`` stages such as ``features@0``, ``features@1``,
params interpolation) and links stages through their outs and deps, so the DAG sees what
``dvc repro`` would run.
"""

from __future__ import annotations

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
