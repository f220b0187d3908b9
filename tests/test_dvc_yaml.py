"""dvc.yaml cannot drift from the code: every stage depends on every `pipeline/` module it
imports (directly or through other modules, lazily or not), no stage imports another stage,
and every output survives a failing run (`persist: true`: DVC would otherwise delete it before
running the stage)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT

# Modules every stage uses that cannot change what a stage writes: package markers, the
# shared CLI wrapper, the typed params loader (params are tracked by DVC themselves), file
# locations (mirrored by dvc.yaml's own paths), the atomic-write helper, the quiet TF import.
ALLOWED = {"pipeline/__init__.py", "pipeline/stages/__init__.py", "pipeline/stages/_cli.py",
           "pipeline/config.py", "pipeline/paths.py", "pipeline/atomic.py", "pipeline/logs.py", "pipeline/errors.py",
           "pipeline/captioning/quiet_tensorflow.py",
           # subpackage markers: docstrings only
           *(f"pipeline/{room}/__init__.py" for room in ("data", "captioning", "registry", "search", "alttext", "ops", "app"))}


def _module_file(module: str, root: Path) -> str | None:
    base = root / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def imported_modules(path: Path, root: Path) -> set[str]:
    """Project files that ``path`` imports anywhere in its body (function-level too)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == "pipeline" and (found_file := _module_file(name, root)):
                found.add(found_file)
    return found


def import_closure(start: str, root: Path = PROJECT) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += imported_modules(root / current, root) - seen
    return seen


def stages() -> dict:
    """Stage definitions of dvc.yaml; a foreach stage is checked through its ``do`` template."""
    raw = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in raw.items()}


def _entries(items) -> list[str]:
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]


def stage_module(stage: dict) -> str:
    module = stage["cmd"].split("python -m ", 1)[1].split()[0]
    return _module_file(module, PROJECT)


def missing_deps(stage: dict) -> set[str]:
    deps = set(_entries(stage.get("deps")))
    covered = {m for m in import_closure(stage_module(stage))
               if any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps)}
    return import_closure(stage_module(stage)) - covered - ALLOWED


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_cover_every_module_it_imports(name):
    assert missing_deps(stages()[name]) == set(), (
        f"stage {name!r} imports these modules but does not list them in dvc.yaml deps")


def test_the_check_notices_a_missing_dep():
    register = dict(stages()["register"])
    register["deps"] = [d for d in register["deps"] if d != "pipeline/data/images.py"]
    assert missing_deps(register) == {"pipeline/data/images.py"}  # served model decodes images


@pytest.mark.parametrize("name", list(stages()))
def test_no_stage_imports_another_stage(name):
    own = stage_module(stages()[name])
    others = {f for f in import_closure(own) if f.startswith("pipeline/stages/")}
    assert others <= {own, "pipeline/stages/__init__.py", "pipeline/stages/_cli.py"}


@pytest.mark.parametrize("name", list(stages()))
def test_every_output_survives_a_failing_run(name):
    for out in stages()[name].get("outs", []):
        assert isinstance(out, dict) and next(iter(out.values())).get("persist") is True, (
            f"{name}: output {out!r} must be persist: true (the stage replaces it atomically)")
