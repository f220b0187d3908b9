"""MLflow plumbing shared by train, evaluate and register."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .config import Settings

log = logging.getLogger(__name__)


def tracking_uri(settings: Settings) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` from params."""
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.mlflow.tracking_uri


def setup(settings: Settings):
    """Point MLflow at the configured store and experiment; returns the mlflow module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(settings))
    mlflow.set_experiment(settings.mlflow.experiment)
    return mlflow


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
