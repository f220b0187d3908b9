"""MLflow plumbing shared by train, evaluate, register, the CLI and the app.

``use_store`` is the one way a process points MLflow at a tracking store: an HTTP server that
refuses the connection fails at once with its URI named (MLflow's own client would retry it for
minutes), and requests that time out or get a 5xx are retried ``mlflow.request_retries`` times.
A store that cannot be opened or read (a damaged ``mlflow.db``, a server down) is a
``TrackingStoreError`` whose message names the store and the way out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import warnings
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import MlflowSettings, Settings, absolute_location, sqlite_file
from pipeline.errors import ReportedError, first_line

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5  # a tracking server that does not accept a connection this fast is down


def tracking_uri(settings: Settings) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` from params; always absolute
    (``load_settings`` resolved the params' value against the project folder; a relative value in
    the environment or in settings built in code is taken against the working directory)."""
    return absolute_location(os.environ.get("MLFLOW_TRACKING_URI") or settings.mlflow.tracking_uri, Path.cwd())


def current_tracking_uri() -> str:
    """The URI this process's MLflow uses, absolute: what a process started from here is handed."""
    import mlflow

    return absolute_location(mlflow.get_tracking_uri(), Path.cwd())


class TrackingStoreError(ReportedError):
    """The tracking store cannot be reached, opened or read."""


def store_error(uri: str, err: BaseException) -> TrackingStoreError:
    """One paragraph: which store, what went wrong, and the way out."""
    path = sqlite_file(uri)
    if path is not None:
        way_out = (f"if {path} is damaged, move it aside (mv {path} {path}.bad) and rerun: MLflow starts a new, "
                   "empty store there, and `dvc repro -f -s register` registers the current model in it again")
    elif uri.startswith(("http://", "https://")):
        way_out = "start the server (make ui, or the team stack) or check the address"
    else:
        way_out = "check that the store exists and this user may read it"
    return TrackingStoreError(f"cannot use the MLflow tracking store {uri} ({first_line(err)}); "
                              f"{way_out}; or point mlflow.tracking_uri in params.yaml (or MLFLOW_TRACKING_URI) "
                              "at another store")


def check_sqlite_store(uri: str) -> None:
    """A SQLite store that exists must read as a database end to end (``PRAGMA quick_check``):
    damage found later, mid-command, surfaces as an SQLAlchemy error with a web link, or as "no
    such model", which sends people the wrong way. A file not there yet is fine (MLflow makes it)."""
    import sqlite3

    path = sqlite_file(uri)
    if path is None or not path.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)) as conn:
            verdict = conn.execute("PRAGMA quick_check").fetchone()
    except sqlite3.Error as err:
        raise store_error(uri, err) from None
    if verdict is None or verdict[0] != "ok":
        raise store_error(uri, sqlite3.DatabaseError(f"integrity check failed: {verdict[0] if verdict else 'no answer'}"))


def use_store(uri: str, requests: MlflowSettings | None = None) -> None:
    """Point this process's MLflow at ``uri``. An HTTP(S) server is probed first: a refused
    connection or an unknown host is a TrackingStoreError within seconds. ``requests`` bounds
    MLflow's retries and timeouts (the environment's MLFLOW_HTTP_REQUEST_* win when set). A
    relative location is made absolute here (against the working directory), so that anything this
    process hands on names the same store."""
    import mlflow

    uri = absolute_location(uri, Path.cwd())

    if requests is not None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(requests.request_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(requests.request_timeout_s))
    parsed = urlparse(uri)
    check_sqlite_store(uri)
    if parsed.scheme in ("http", "https"):
        try:
            socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                     timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            raise store_error(uri, err) from None
    mlflow.set_tracking_uri(uri)


# The experiment tag MLflow's UI reads to choose its view: with it the experiment opens on the
# training runs, not on the GenAI overview (traces, sessions, judges) that MLflow 3 shows otherwise.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


# Which process has a run open: a later stage on the same host marks the runs of killed processes
# FAILED (a killed stage cannot close its own run; the UI would show it RUNNING forever).
OWNER_HOST, OWNER_PID = "captioner.host", "captioner.pid"


def owner_tags() -> dict[str, str]:
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fail_pending_models(client, experiment_id: str, run_id: str | None = None) -> list[str]:
    """Logged models still PENDING (their upload never finished) -> FAILED: those of ``run_id``,
    or with no run given, those whose run is no longer RUNNING. Returns their ids."""
    running = {r.info.run_id for r in client.search_runs([experiment_id], "attributes.status = 'RUNNING'")}
    failed = []
    for model in client.search_logged_models([experiment_id]):
        pending = str(getattr(model.status, "value", model.status)) == "PENDING"
        if pending and (model.source_run_id == run_id if run_id else model.source_run_id not in running):
            client.finalize_logged_model(model.model_id, "FAILED")
            failed.append(model.model_id)
    return failed


def clear_ghosts(client, experiment_id: str) -> dict[str, list[str]]:
    """Runs that a process of this host left RUNNING when it was killed (its pid is gone) ->
    FAILED, with a tag saying so; then their PENDING logged models -> FAILED."""
    host, runs = socket.gethostname(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        pid = tags.get(OWNER_PID, "")
        if tags.get(OWNER_HOST) == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "captioner.note",
                           f"process {pid} ended without closing this run (killed); marked FAILED by a later stage")
            client.set_terminated(run.info.run_id, "FAILED")
            runs.append(run.info.run_id)
    models = fail_pending_models(client, experiment_id)
    if runs or models:
        log.warning("marked FAILED what killed stages left open: runs %s, logged models %s", runs, models)
    return {"runs": runs, "models": models}


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: ``mlruns/`` beside the
    database file (MLflow's own default is ``./mlruns`` of whichever folder the process that creates
    the experiment runs in). None for other stores: a tracking server has its own artifact root."""
    database = sqlite_file(uri)
    if database is None:
        return None
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment).strip(".") or "experiment"
    return (database.parent / "mlruns" / slug).as_uri()


def ensure_experiment(name: str):
    """The experiment ``name`` of the current store, created (artifacts beside a local SQLite
    store: ``default_artifact_location``) when missing."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = default_artifact_location(current_tracking_uri(), name)
        mlflow.create_experiment(name, artifact_location=location)
        experiment = mlflow.get_experiment_by_name(name)
    return experiment


def setup(settings: Settings):
    """Point MLflow at the configured store and experiment (tagged as model training, also when
    it already existed); returns the mlflow module. TrackingStoreError when the store cannot be
    reached or read: the first contact of every stage, before it writes anything."""
    import mlflow

    uri = tracking_uri(settings)
    use_store(uri, settings.mlflow)
    try:
        experiment = mlflow.set_experiment(experiment_id=ensure_experiment(settings.mlflow.experiment).experiment_id)
        key, value = EXPERIMENT_KIND
        client = mlflow.MlflowClient()
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
        clear_ghosts(client, experiment.experiment_id)
    except Exception as err:  # sqlalchemy's DatabaseError, MlflowException, requests' errors, ...
        raise store_error(uri, err) from None
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
    active = None
    if run_id:
        try:
            mlflow.get_run(run_id)
            active = mlflow.start_run(run_id=run_id)
        except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST
            log.warning("training run %s is not in %s; logging to a new run", run_id, tracking_uri(settings))
    active = active or mlflow.start_run(run_name=run_name)
    mlflow.set_tags(owner_tags())  # this process has it open now
    return active


def data_identity(settings: Settings, captions_file: Path, features_file: Path,
                  feedback_file: Path | None = None) -> dict[str, str]:
    """Tags that say which code and data a training run used; ``short_id`` names the run and
    changes with the data, the corrections, the features or the training params (not with the clock)."""
    identity = {"data.source": settings.data.source, "dvc.captions_md5": file_md5(captions_file),
                "dvc.features_md5": file_md5(features_file), "git.commit": git_commit() or "unknown"}
    if feedback_file is not None and feedback_file.exists():
        identity["dvc.feedback_md5"] = file_md5(feedback_file)
    recipe = json.dumps({"train": settings.train.model_dump(), **identity, "git.commit": None,
                         "train_repeats": settings.feedback.train_repeats}, sort_keys=True)
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
