"""One DVC stage as one orchestrated task, correct on any worker of a team.

``python -m pipeline.ops.task_runner STAGE`` is what each task of the Airflow DAG runs, in the
worker's own copy of the project. Workers do not share a disk, so each has its own
``dvc.lock``; a worker's lock names what *it* last produced, which is not what the upstream
tasks of this DAG run produced on other workers. So the lock travels with the run:

1. every task prints, as its last line (its XCom), the ``dvc.lock`` entries of its stage and of
   all stages upstream of it *in this DAG run*;
2. with a DVC remote configured, a task first writes the entries it receives from its upstream
   tasks (and its own stage's entry from the latest earlier run) into its local ``dvc.lock``,
   then pulls exactly those outputs: it sees the run's upstream outputs, whoever made them;
3. ``dvc repro --single-item STAGE`` then runs the stage, or skips it when its deps, params and
   outs match (an unchanged pipeline runs nothing), and ``dvc push`` shares what it made.

Without a remote (one machine, ``make airflow``) steps 2 and 3's pull/push are skipped: every
task works in the same folder. Input comes from the environment, filled in by the DAG:
``CAPTIONER_UPSTREAM`` (JSON list of the upstream XComs), ``CAPTIONER_PREVIOUS`` (this task's
XCom of the latest earlier run, or null), ``CAPTIONER_FORCE`` (stages to rerun even if
unchanged, or true for all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.atomic import write_text
from pipeline.logs import setup_logging
from pipeline.ops.dvc_graph import stage_graph

log = logging.getLogger("pipeline.ops.task_runner")
LOCK_FILE = Path("dvc.lock")


def _xcom(value) -> dict:
    """An XCom as pushed by a task: the JSON line (str) or its parsed form; None -> no entries."""
    if value is None:
        return {"lock": {}}
    data = json.loads(value) if isinstance(value, str) else value
    if not isinstance(data, dict) or not isinstance(data.get("lock"), dict):
        raise ValueError(f"not a task_runner XCom: {str(value)[:200]}")
    return data


def received_entries(upstream: list, previous, stage: str) -> dict[str, dict]:
    """dvc.lock entries this task must start from: every upstream stage's entry of this run,
    and its own stage's entry from the latest earlier run (so an unchanged stage is skipped on
    any worker). Two upstream tasks never disagree on a stage: each entry comes from the one
    task that ran it."""
    entries: dict[str, dict] = {}
    for value in upstream:
        for name, entry in _xcom(value)["lock"].items():
            if name in entries and entries[name] != entry:
                raise ValueError(f"upstream tasks disagree on the dvc.lock entry of {name!r}")
            entries[name] = entry
    if isinstance(previous, list):  # xcom_pull(include_prior_dates=True): newest first
        previous = next((value for value in previous if value is not None), None)
    # Only saves work: a stale entry (another run's) makes DVC rerun the stage, never skip it.
    own = _xcom(previous)["lock"].get(stage)
    if own is not None and stage not in entries:
        entries[stage] = own
    return entries


def merge_into_lock(entries: dict[str, dict], lock_file: Path = LOCK_FILE) -> None:
    """Write ``entries`` into ``dvc.lock``, keeping the others; under DVC's own repo lock, so a
    ``dvc`` command running in the same folder never sees a half-merged file."""
    from dvc.repo import Repo

    with Repo(str(lock_file.parent), _wait_for_lock=True) as repo, repo.lock:
        lock = yaml.safe_load(lock_file.read_text()) if lock_file.exists() else None
        lock = lock or {"schema": "2.0", "stages": {}}
        lock.setdefault("stages", {}).update(entries)
        write_text(lock_file, yaml.safe_dump(lock, sort_keys=False))


def lock_entries(stages: list[str], lock_file: Path = LOCK_FILE) -> dict[str, dict]:
    lock = yaml.safe_load(lock_file.read_text()) if lock_file.exists() else {}
    known = (lock or {}).get("stages", {})
    return {name: known[name] for name in stages if name in known}


def has_remote(project: Path) -> bool:
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return bool(repo.config.get("remote"))


def is_up_to_date(stage: str, project: Path) -> bool:
    """True when ``dvc repro --single-item stage`` would skip it."""
    from dvc.repo import Repo

    with Repo(str(project), _wait_for_lock=True) as repo:
        return not repo.status(targets=[f"{Path(project).resolve() / 'dvc.yaml'}:{stage}"])


def _dvc(project: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", *args]  # the dvc of this environment
    log.info("$ dvc %s", " ".join(args))
    sys.stdout.flush()
    subprocess.run(cmd, cwd=project, check=True, stdout=sys.stderr)  # stdout: only the XCom line


def forced(stage: str, force) -> bool:
    return force is True or (isinstance(force, list) and stage in force)


def run_task(stage: str, upstream: list, previous, force, project: Path = Path(".")) -> dict:
    """Run ``stage`` as described in the module docstring; returns this task's XCom."""
    received = received_entries(upstream, previous, stage)
    upstream_stages = [name for name in received if name != stage]
    remote = has_remote(project)
    if remote:
        merge_into_lock(received, project / LOCK_FILE)
        # the outputs this stage reads (its direct upstream stages') and its own, to compare
        _dvc(project, "pull", "--allow-missing", *stage_graph(project)[stage], stage)
    rerun = forced(stage, force)
    ran = rerun or not is_up_to_date(stage, project)
    _dvc(project, "repro", "--single-item", *(["--force"] if rerun else []), stage)
    if remote:
        _dvc(project, "push", stage)
    log.info("stage %s %s", stage, "ran" if ran else "was up to date: skipped")
    own = lock_entries([stage], project / LOCK_FILE)
    return {"stage": stage, "ran": ran, "host": socket.gethostname(), "project": str(Path(project).resolve()),
            "lock": {**{n: received[n] for n in upstream_stages}, **own}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ops.task_runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", help="a stage of dvc.yaml, e.g. train or features@0")
    args = parser.parse_args()
    setup_logging()
    try:
        upstream = json.loads(os.environ.get("CAPTIONER_UPSTREAM") or "[]")
        previous = json.loads(os.environ.get("CAPTIONER_PREVIOUS") or "null")
        force = json.loads(os.environ.get("CAPTIONER_FORCE") or "[]")
        xcom = run_task(args.stage, upstream, previous, force)
    except subprocess.CalledProcessError as err:
        print(f"task_runner: {' '.join(err.cmd)} failed with status {err.returncode}", file=sys.stderr)
        sys.exit(err.returncode or 1)
    except (ValueError, OSError) as err:
        print(f"task_runner: error: {err}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(xcom, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
