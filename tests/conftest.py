import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

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
