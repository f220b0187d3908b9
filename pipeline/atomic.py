"""The one way a stage writes an output file: to a temporary name beside it, then an atomic
rename. A reader (or DVC) never sees a half-written file, and a failed or killed stage leaves
the previous good file where it was (DVC's ``persist: true`` keeps DVC from deleting it first).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder that keeps its full name as a suffix (Keras
    insists on ``.keras`` / ``.weights.h5``); on success it replaces ``path``, on error it is
    removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like ``atomic_path`` for a folder: fill the yielded empty folder; on success it takes the
    place of ``path`` (the old folder is moved aside first, then removed), on error it is removed
    and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    old = path.with_name(f".old-{os.getpid()}-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_parquet(frame, path: str | Path) -> None:
    """A pandas DataFrame to Parquet (no index)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
