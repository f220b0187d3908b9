import os
import sqlite3  # noqa: F401  (before any TensorFlow import: see pipeline/captioning/quiet_tensorflow.py)

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import warnings  # noqa: E402

from tests.helpers import FixtureServer  # noqa: E402


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run a test inside an empty project directory (stages use relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def http_server():
    with FixtureServer() as server:
        yield server


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory):
    """A tiny project taken through download -> evaluate once per session (about 30 s).
    Tests chdir into a copy-free shared folder, so they must not delete its outputs."""
    from pipeline.stages import calibrate, download, evaluate, train, validate
    from tests.helpers import run_features, tiny_settings

    root = tmp_path_factory.mktemp("trained")
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    try:
        settings = tiny_settings(**{"data.synthetic.n_images": 60, "train.epochs": 25,
                                     "train.units": 64, "train.learning_rate": 0.003,
                                     "train.self_critical.epochs": 2,
                                     # 60 random-init images plateau for epochs before they learn:
                                     # a constant learning rate, no smoothing (the real-data defaults
                                     # gave up there and left a model no better than the baseline)
                                     "train.lr_decay": 1.0, "train.label_smoothing": 0.0})
        download.run(settings)
        validate.run(settings)
        run_features(settings)
        train.run(settings)
        calibrate.run(settings)
        evaluate.run(settings)
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return root, settings


@pytest.fixture
def in_trained(trained_project, monkeypatch):
    root, settings = trained_project
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    import mlflow

    # another fixture's stage run may have set MLflow's process-wide URI, which wins over the env
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return root, settings


SERVING_LIMITS = {"serving.max_image_bytes": 200_000, "serving.max_image_pixels": 1_000_000,
                  "serving.max_rows": 4}


@pytest.fixture(scope="session")
def registered(trained_project):
    """The session's trained model registered once (the first version is champion), with small
    serving limits for the serving tests."""
    root, settings = trained_project
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={
        k.split(".")[1]: v for k, v in SERVING_LIMITS.items()})})
    old = os.getcwd()
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from pipeline.stages import evaluate, register

            evaluate.run(settings)  # compare with the (absent) champion
            report = register.run(settings)
    finally:
        os.chdir(old)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root, report, caught


# The end-to-end modules, longest first: `make test` runs the suite on two pytest-xdist workers,
# one module at a time each (--dist loadscope, so a module's fixtures are built once), and
# handing out the long modules first keeps one worker from starting a 6-minute module last.
LONGEST_FIRST = ("tests/ops/test_team.py", "tests/stages/test_real_model.py", "tests/stages/test_register.py",
                 "tests/stages/test_feedback.py", "tests/dags/test_caption_retraining.py",
                 "tests/test_dvc_pipeline.py", "tests/registry/test_pyfunc_model.py", "tests/stages/test_features.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: file order otherwise
