"""pipeline/ops/task_runner.py with real DVC: two clones of one repo ("workers" with their own
dvc.lock) sharing a folder remote, the DAG's XCom handover played by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ops.task_runner import received_entries, run_task
from tests.helpers import PROJECT, sh

GIT = ["git", "-c", "user.email=test@localhost", "-c", "user.name=test"]
DVC_YAML = """stages:
  make:
    cmd: python -c "import pathlib; pathlib.Path('a.txt').write_text(pathlib.Path('seed.txt').read_text() * 2)"
    deps: [seed.txt]
    outs: [a.txt]
  use:
    cmd: python -c "import pathlib; pathlib.Path('b.txt').write_text(pathlib.Path('a.txt').read_text().upper())"
    deps: [a.txt]
    outs: [b.txt]
"""


def commit(repo: Path, message: str) -> None:
    sh([*GIT, "add", "-A"], repo)
    sh([*GIT, "commit", "-qm", message], repo)


@pytest.fixture
def workers(tmp_path):
    origin = tmp_path / "origin"
    origin.mkdir()
    sh(["git", "init", "-q"], origin)
    sh(["dvc", "init", "-q"], origin)
    (origin / "dvc.yaml").write_text(DVC_YAML)
    (origin / "seed.txt").write_text("old ")
    commit(origin, "old seed")
    clones = []
    for name in ("a", "b"):
        sh(["git", "clone", "-q", str(origin), name], tmp_path)
        sh(["dvc", "remote", "add", "-d", "--local", "shared", str(tmp_path / "remote")], tmp_path / name)
        clones.append(tmp_path / name)
    return origin, clones


def test_a_worker_uses_the_upstream_outputs_of_this_run_not_its_own_stale_ones(workers, monkeypatch):
    origin, (a, b) = workers
    # worker b ran the whole pipeline on the old commit: its dvc.lock and files are stale now
    first_b = run_task("make", [], None, [], project=b)
    run_task("use", [first_b], None, [], project=b)
    assert (b / "b.txt").read_text() == "OLD OLD "
    (origin / "seed.txt").write_text("new ")
    commit(origin, "new seed")
    for clone in (a, b):
        sh(["git", "pull", "-q"], clone)

    made = run_task("make", [], None, [], project=a)  # on worker a
    assert made["ran"] and (a / "a.txt").read_text() == "new new "
    used = run_task("use", [json.dumps(made)], None, [], project=b)  # on worker b
    assert used["ran"]
    assert (b / "a.txt").read_text() == "new new "
    assert (b / "b.txt").read_text() == "NEW NEW "
    assert used["lock"]["make"] == made["lock"]["make"]
    assert used["lock"]["use"]["deps"][0]["md5"] == made["lock"]["make"]["outs"][0]["md5"]

    # the next DAG run with nothing changed, stages swapped between workers: nothing runs
    again_make = run_task("make", [], json.dumps(made), [], project=b)
    again_use = run_task("use", [json.dumps(again_make)], json.dumps(used), [], project=a)
    assert not again_make["ran"] and not again_use["ran"]
    assert (a / "b.txt").read_text() == "NEW NEW "
    assert again_use["lock"] == used["lock"]

    forced = run_task("use", [json.dumps(again_make)], json.dumps(used), ["use"], project=a)
    assert forced["ran"]


def test_without_the_handover_the_stale_lock_would_win(workers):
    """What went wrong before: worker b's own dvc.lock decides, and b.txt is the old one."""
    origin, (a, b) = workers
    run_task("use", [run_task("make", [], None, [], project=b)], None, [], project=b)
    (origin / "seed.txt").write_text("new ")
    commit(origin, "new seed")
    for clone in (a, b):
        sh(["git", "pull", "-q"], clone)
    run_task("make", [], None, [], project=a)
    sh(["dvc", "pull", "--allow-missing", "--with-deps", "use"], b)
    sh(["dvc", "repro", "--single-item", "use"], b)
    assert (b / "b.txt").read_text() == "OLD OLD "


def test_upstream_tasks_that_disagree_are_refused():
    one = {"stage": "x", "ran": True, "lock": {"make": {"cmd": "1"}}}
    two = {"stage": "y", "ran": True, "lock": {"make": {"cmd": "2"}}}
    with pytest.raises(ValueError, match="disagree on the dvc.lock entry of 'make'"):
        received_entries([json.dumps(one), json.dumps(two)], None, "use")
    with pytest.raises(ValueError, match="not a task_runner XCom"):
        received_entries(['"some other line"'], None, "use")


def test_cli_prints_the_xcom_as_its_last_line(workers):
    _, (a, _) = workers
    result = subprocess.run([sys.executable, "-m", "pipeline.ops.task_runner", "make"], cwd=a,
                            capture_output=True, text=True, env={**__import__("os").environ,
                            "PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}",
                            "PYTHONPATH": str(PROJECT),
                            "CAPTIONER_UPSTREAM": "[]", "CAPTIONER_PREVIOUS": "null",
                            "CAPTIONER_FORCE": "[]"})
    assert result.returncode == 0, result.stderr
    xcom = json.loads(result.stdout.strip().splitlines()[-1])
    assert xcom["stage"] == "make" and xcom["ran"] and "make" in xcom["lock"]
    assert "Running stage 'make'" in result.stderr


def test_previous_run_xcoms_as_a_list_use_the_newest():
    newest = {"stage": "use", "ran": False, "lock": {"use": {"cmd": "new"}}}
    older = {"stage": "use", "ran": True, "lock": {"use": {"cmd": "old"}}}
    entries = received_entries([], [None, json.dumps(newest), json.dumps(older)], "use")
    assert entries == {"use": {"cmd": "new"}}
