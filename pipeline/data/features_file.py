"""The features file format, shared by the features stage (writer) and train/evaluate
(readers): ``data/features/<backbone>.parquet`` with columns

    image      string
    embedding  fixed_size_list<float32>[D]

one row per image, sorted by name, and the backbone's provenance (weights, input size,
preprocessing, library versions) as schema metadata. Shard files (``features@i``) have the
same format and hold the images ``shard_of(name, N) == i``.

A grid file (``*_grid.*.parquet`` beside the pooled one in a real-features folder) holds each
image's last feature map before pooling, for the attention decoder:

    image  string
    grid   fixed_size_list<uint8 | float16 | float32>[rows x columns x channels], row-major

with ``shape`` ("[7, 7, 320] ...") and, for uint8, ``scale`` and ``zero_point`` in the schema
metadata. ``with_grid`` lays an image's row out as the attention decoder reads it: the pooled
vector, then the grid.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path


def shard_of(image: str, shards: int) -> int:
    """The shard an image belongs to: stable across machines, Python versions and runs
    (unlike ``hash()``), and independent of which other images exist."""
    return int.from_bytes(hashlib.sha256(image.encode()).digest()[:8], "big") % shards


def embedding_table(images: list[str], embeddings: np.ndarray) -> pa.Table:
    """Names and an (N, D) matrix -> an Arrow table in the features format."""
    dim = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    return pa.table({"image": pa.array(images, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})


def sorted_by_image(table: pa.Table) -> pa.Table:
    return table.take(pa.compute.sort_indices(table, [("image", "ascending")]))


def write_table(table: pa.Table, path: Path, row_group_size: int | None = None) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


def read_features(path: Path) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(image names, (N, D) float32 matrix, schema metadata) of a features file."""
    table = pq.read_table(path)
    dim = table.schema.field("embedding").type.list_size
    matrix = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return table.column("image").to_pylist(), matrix, meta


def row_index(images: list[str]) -> dict[str, int]:
    """Image name -> its row in the feature matrix."""
    return {name: i for i, name in enumerate(images)}


def rows_of(index: dict[str, int], names) -> list[int]:
    """Rows of ``names``; a name with no features is a ValueError naming a few of them."""
    missing = sorted({n for n in names if n not in index})
    if missing:
        raise ValueError(f"{len(missing)} images have no features, e.g. {missing[:3]}; "
                         "rerun the features stage (dvc repro)")
    return [index[n] for n in names]


GRID_COLUMN = "grid"


class GridFileError(ValueError):
    """A grid file that cannot be read as one: no grid column, no shape, a shape that does not
    match the stored width."""


def grid_shape(meta: dict[str, str], width: int, path: Path) -> tuple[int, int, int]:
    """(rows, columns, channels) of a grid file from its ``shape`` metadata ("[7, 7, 320] ...")."""
    found = re.match(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]", meta.get("shape", ""))
    if not found:
        raise GridFileError(f"{path}: no 'shape' in its schema metadata ('[rows, columns, channels]'), "
                            "so its grid cannot be laid out")
    shape = tuple(int(x) for x in found.groups())
    if shape[0] * shape[1] * shape[2] != width or min(shape) < 1:
        raise GridFileError(f"{path}: its shape {list(shape)} does not hold the {width} values each row stores")
    return shape


def read_grid(path: Path) -> tuple[list[str], np.ndarray, tuple[int, int, int]]:
    """(image names, (N, rows x columns x channels) float32 matrix, (rows, columns, channels)) of a
    grid file: column ``grid``, a fixed-size list of float16/float32, or of uint8 with ``scale`` and
    ``zero_point`` in the schema metadata (value = (q - zero_point) x scale), row-major (row,
    column, channel). GridFileError naming the file otherwise."""
    table = pq.read_table(path)
    if GRID_COLUMN not in table.schema.names or "image" not in table.schema.names:
        raise GridFileError(f"{path}: no '{GRID_COLUMN}' column beside 'image' "
                            f"(it holds {', '.join(table.schema.names)}): not a grid file")
    kind = table.schema.field(GRID_COLUMN).type
    if not pa.types.is_fixed_size_list(kind):
        raise GridFileError(f"{path}: its '{GRID_COLUMN}' column is {kind}, not a fixed-size list")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    shape = grid_shape(meta, kind.list_size, path)
    raw = table.column(GRID_COLUMN).combine_chunks().flatten().to_numpy().reshape(-1, kind.list_size)
    if raw.dtype == np.uint8:
        try:
            scale, zero = float(meta["scale"]), float(meta["zero_point"])
        except (KeyError, ValueError):
            raise GridFileError(f"{path}: a uint8 grid needs 'scale' and 'zero_point' in its metadata") from None
        matrix = (raw.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    elif raw.dtype in (np.float16, np.float32):
        matrix = raw.astype(np.float32)
        bad = ~np.isfinite(matrix).all(axis=1)
        if bad.any():  # a NaN would turn every caption of that photo into noise, silently
            names = table.column("image").to_pylist()
            raise GridFileError(f"{path}: {int(bad.sum())} rows hold NaN or infinite values, e.g. "
                                f"{[names[i] for i in np.flatnonzero(bad)[:3]]}")
    else:
        raise GridFileError(f"{path}: grid values of type {raw.dtype}; expected float16, float32 or uint8")
    return table.column("image").to_pylist(), matrix, shape


def with_grid(images: list[str], features: np.ndarray, grid_images: list[str], grid: np.ndarray,
              grid_path: Path) -> np.ndarray:
    """Each image's row: its pooled vector followed by its grid (the layout an attention decoder
    reads). ValueError naming the grid file when it lacks an image the features have."""
    index = row_index(grid_images)
    missing = [name for name in images if name not in index]
    if missing:
        raise GridFileError(f"{grid_path}: no grid for {len(missing)} of the {len(images)} images, "
                            f"e.g. {missing[:3]}")
    return np.concatenate([features, grid[[index[name] for name in images]]], axis=1)
