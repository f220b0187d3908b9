"""Real `dvc repro` of the project's dvc.yaml in a temporary git copy of the project."""

import json
from pathlib import Path

import pytest

from tests.helpers import git_project, jpeg_bytes, sh, write_flickr_dataset, write_params


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    # the default backbone runtime, measured by the backbone stage (the other tests pin tflite)
    return git_project(tmp_path_factory.mktemp("project"), **{"features.runtime": "auto"})


def assert_run_names_its_data(repo):
    """The training run's data tags are the hashes in dvc.lock and its commit is the repo's."""
    import yaml
    from mlflow import MlflowClient

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    outs = {o["path"]: o["md5"] for stage in ("validate", "merge_features") for o in lock[stage]["outs"]}
    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("captioner").experiment_id])
    assert run.data.tags["dvc.captions_md5"] == outs["data/prepared/captions.parquet"]
    assert run.data.tags["dvc.features_md5"] == outs["data/features/xception.parquet"]
    head = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert run.data.tags["git.commit"].startswith(head)
    # the default runtime (auto) measured the CNN's runtimes here: the run says which it chose and why
    assert run.data.params["features.runtime_requested"] == "auto"
    assert "chosen" in run.data.params["features.runtime_choice"] and "keras float32 1.00x" in \
        run.data.params["features.runtime_choice"]


def running(repro) -> list[str]:
    """The stages a `dvc repro` ran, in order."""
    return [line.split("'")[1] for line in repro.stdout.splitlines() if line.startswith("Running stage")]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 70 s on a quiet machine; 4x and more for a loaded one
def test_dvc_repro_runs_the_stages_then_is_a_no_op(repo):
    first = sh(["dvc", "repro"], repo)
    for stage in ("download", "validate", "backbone", "features@0", "feedback", "feedback_features",
                  "merge_features", "train", "calibrate", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (repo / "data/features/xception.parquet").is_file()
    report = json.loads((repo / "reports/validation.json").read_text())
    assert report["success"] and report["kept"] == 200
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert {"greedy", "beam", "baseline"} <= set(metrics)
    assert json.loads((repo / "reports/registry.json").read_text())["decision"] == "promoted"
    shown = sh(["dvc", "metrics", "show", "--json"], repo)
    assert "bleu4" in shown.stdout
    assert_run_names_its_data(repo)
    second = sh(["dvc", "repro"], repo)
    # the feedback database is outside DVC: its export runs every time, writes the same bytes
    # (no corrections here), and nothing after it runs
    assert running(second) == ["feedback"]
    assert "Stage 'train' didn't change, skipping" in second.stdout
    # register's real output is the MLflow registry: it reruns (not restored from DVC's
    # cache) when its report is gone, e.g. together with a reset MLflow store
    (repo / "reports/registry.json").unlink()
    (repo / "mlflow.db").unlink()
    third = sh(["dvc", "repro"], repo)
    assert "Running stage 'register'" in third.stdout
    assert running(third) == ["feedback", "register"]
    assert json.loads((repo / "reports/registry.json").read_text())["version"] == "1"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_retraining_from_a_subfolder_under_the_default_store_is_judged_against_the_champion(repo):
    """params.yaml's own relative `sqlite:///mlflow.db`, no MLFLOW_TRACKING_URI, `dvc repro` run
    from a subfolder: the champion's scoring process (in a temporary folder) must open the
    project's store, so the second model is compared with the first, never crowned unjudged."""
    import os
    import subprocess
    import sys

    if not (repo / "reports/registry.json").is_file():
        sh(["dvc", "repro"], repo)
    first = json.loads((repo / "reports/registry.json").read_text())
    write_params(repo, **{"features.runtime": "auto", "train.seed": 8})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    try:
        done = subprocess.run(["dvc", "repro", "../dvc.yaml"], cwd=repo / "docs", env=env, capture_output=True, text=True)
    finally:
        write_params(repo, **{"features.runtime": "auto"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage '../dvc.yaml:train'" in done.stdout  # DVC names stages by the file it was given
    report = json.loads((repo / "reports/registry.json").read_text())
    assert report["old_champion"]["version"] == first["champion"]
    assert report["old_champion"]["status"] == "scored", report["old_champion"]
    comparison = report["comparison"]
    assert comparison is not None and comparison["images"] > 0
    assert comparison["ci95_low"] <= comparison["difference"] <= comparison["ci95_high"]
    assert report["tracking_uri"] == f"sqlite:///{repo.resolve()}/mlflow.db"
    assert not (repo / "docs/mlflow.db").exists()  # no second store beside the folder it ran in


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 10 s on a quiet machine
def test_failing_validate_under_dvc_repro_keeps_the_last_good_outputs(repo, tmp_path):
    """DVC deletes a stage's outputs before running it unless they are `persist: true`: a
    failing validate used to leave no captions.parquet behind, whatever its message said."""
    if not (repo / "data/prepared/captions.parquet").is_file():
        sh(["dvc", "repro", "validate"], repo)
    good = {p: (repo / p).read_bytes() for p in ("data/prepared/captions.parquet",
                                                  "data/prepared/rejects.parquet")}
    names = [f"{i}_x.jpg" for i in range(10)]
    bad = write_flickr_dataset(tmp_path / "bad", {n: jpeg_bytes() for n in names},
                               [f"{n}#{k} no tab here" for n in names for k in range(5)],
                               {"train": names[:8], "dev": names[8:9], "test": names[9:]})
    write_params(repo, **{"features.runtime": "auto", "data.source": "local", "data.local_path": str(bad)})
    failed = sh(["dvc", "repro", "validate"], repo, check=False)
    assert failed.returncode != 0 and "were left as they were" in failed.stderr
    assert {p: (repo / p).read_bytes() for p in good} == good
    report = json.loads((repo / "reports/validation.json").read_text())
    assert report["success"] is False
    assert report["reject_reasons"]["malformed line: no tab between key and caption"] == 50
    assert (repo / "reports/validation_rejects.parquet").is_file()
    write_params(repo, **{"features.runtime": "auto"})


def forced_dvc_commands() -> list[str]:
    """Every `dvc repro` command that forces a stage, as the docs and the code's own advice
    write them (README, docs/, error messages)."""
    import re

    from tests.helpers import PROJECT

    sources = [PROJECT / "README.md", *(PROJECT / "docs").glob("*.md"), *(PROJECT / "pipeline").rglob("*.py")]
    found = set()
    for path in sources:
        for command in re.findall(r"dvc repro[^`\n\"')]*", path.read_text()):
            words = command.split()
            if ("-f" in words or "--force" in words) and not any("<" in w or "{" in w for w in words):
                found.add(" ".join(words))
    return sorted(found)


def test_the_forcing_commands_the_docs_give_are_found():
    assert "dvc repro -f -s register" in forced_dvc_commands()


@pytest.mark.parametrize("command", forced_dvc_commands())
def test_every_forcing_command_in_the_docs_runs_only_the_stages_it_names(repo, command):
    """`dvc repro -f register` forces every stage upstream too (training included): advice to
    rerun a stage must force that stage alone (`-s`)."""
    words = command.split()
    targets = [w for w in words[2:] if not w.startswith("-")]
    dry = sh([*words, "--dry"], repo)
    ran = running(dry)
    assert ran == targets, f"{command!r} would run {ran}"
