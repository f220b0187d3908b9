"""The rooms' layering (pipeline/__init__.py) holds: import-linter's contract in pyproject.toml
passes on the code as it is, and breaks when a lower room imports a higher one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import PROJECT


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the ``pipeline`` package found first on the path from ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True)


def test_the_rooms_keep_their_layers():
    result = lint_imports(PROJECT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_lower_room_importing_a_higher_one_breaks_the_contract(tmp_path):
    shutil.copytree(PROJECT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", tmp_path / "pyproject.toml")
    images = tmp_path / "pipeline" / "data" / "images.py"
    images.write_text(images.read_text() + "\nfrom pipeline.registry import tracking  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "BROKEN" in result.stdout and "pipeline.data.images -> pipeline.registry.tracking" in result.stdout
