"""MLflow plumbing shared by train, evaluate and register."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import warnings
from pathlib import Path

from pipeline.config import Settings

log = logging.getLogger(__name__)


def tracking_uri(settings: Settings) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` from params."""
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.mlflow.tracking_uri


# The experiment tag MLflow's UI reads to choose its view: with it the experiment opens on the
# training runs, not on the GenAI overview (traces, sessions, judges) that MLflow 3 shows otherwise.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def setup(settings: Settings):
    """Point MLflow at the configured store and experiment (tagged as model training, also when
    it already existed); returns the mlflow module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(settings))
    experiment = mlflow.set_experiment(settings.mlflow.experiment)
    key, value = EXPERIMENT_KIND
    if experiment.tags.get(key) != value:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return mlflow


def file_md5(path: Path) -> str:
    """The hash DVC 3 records for a file output in dvc.lock (md5 of its bytes), so a run's tag
    can be matched with ``dvc.lock`` and the DVC cache."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(cwd: Path | None = None) -> str | None:
    """The checked-out commit (with ``+dirty`` when tracked files other than dvc.lock changed:
    ``dvc repro`` itself rewrites the lock), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"], cwd=cwd,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def run_name(settings: Settings, short_id: str) -> str:
    """What a run is, readable in the runs table: data source, backbone, decoder size and a short
    id, e.g. ``flickr8k-xception-lstm256-3f2a1c``."""
    return f"{settings.data.source}-{settings.features.backbone}-lstm{settings.train.units}-{short_id[:6]}"


def flatten(prefix: str, data: dict) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(name, value))
        else:
            out[name] = value
    return out


def run_ref(run_id: str, settings: Settings) -> str:
    """The text of models/train_run.json: which MLflow run trained the model."""
    return json.dumps({"run_id": run_id, "tracking_uri": tracking_uri(settings),
                       "experiment": settings.mlflow.experiment}, indent=1)


def resume_run(settings: Settings, ref_path: Path, run_name: str):
    """Reopen the training run named in ``ref_path``; start a new run (with a warning) when
    that run is not in the current store (e.g. a fresh MLflow database)."""
    mlflow = setup(settings)
    run_id = json.loads(ref_path.read_text())["run_id"] if ref_path.is_file() else None
    if run_id:
        try:
            mlflow.get_run(run_id)
            return mlflow.start_run(run_id=run_id)
        except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST
            log.warning("training run %s is not in %s; logging to a new run", run_id, tracking_uri(settings))
    return mlflow.start_run(run_name=run_name)


def data_identity(settings: Settings, captions_file: Path, features_file: Path) -> dict[str, str]:
    """Tags that say which code and data a training run used; ``short_id`` names the run and
    changes with the data, the features or the training params (not with the clock)."""
    identity = {"data.source": settings.data.source, "dvc.captions_md5": file_md5(captions_file),
                "dvc.features_md5": file_md5(features_file), "git.commit": git_commit() or "unknown"}
    recipe = json.dumps({"train": settings.train.model_dump(), **identity, "git.commit": None}, sort_keys=True)
    identity["short_id"] = hashlib.sha256(recipe.encode()).hexdigest()[:6]
    return identity


def log_training_data(captions, identity: dict[str, str], captions_file: Path, features_file: Path) -> None:
    """The prepared captions and the features as MLflow dataset inputs of the active run: the
    runs table's Dataset column then names the data (digest = the DVC hash) that trained each
    model; split sizes go with each input as tags."""
    import mlflow

    per_split = captions.groupby("split").agg(images=("image", "nunique"), captions=("image", "size"))
    sizes = {f"{split}_{what}": str(int(n)) for split, row in per_split.iterrows() for what, n in row.items()}
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        prepared = mlflow.data.from_pandas(captions[["image", "split", "caption"]], source=str(captions_file),
                                           name=f"{identity['data.source']}-captions",
                                           digest=identity["dvc.captions_md5"])
        embeddings = mlflow.data.from_pandas(
            captions[["image"]].drop_duplicates().reset_index(drop=True), source=str(features_file),
            name=f"{identity['data.source']}-{features_file.stem}-features", digest=identity["dvc.features_md5"])
    mlflow.log_input(prepared, context="training", tags=sizes)
    mlflow.log_input(embeddings, context="training", tags=sizes)
