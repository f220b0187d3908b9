"""The features file format, shared by the features stage (writer) and train/evaluate
(readers): ``data/features/<backbone>.parquet`` with columns

    image      string
    embedding  fixed_size_list<float32>[D]

one row per image, sorted by name, and the backbone's provenance (weights, input size,
preprocessing, library versions) as schema metadata. Shard files (``features@i``) have the
same format and hold the images ``shard_of(name, N) == i``. With ``features.grid`` the file also
holds each image's grid of regions in a ``grid`` column, laid out as in a grid file (below,
``shape``, ``scale`` and ``zero_point`` joining the metadata); ``read_feature_rows`` reads both.

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

GRID_COLUMN = "grid"


def shard_of(image: str, shards: int) -> int:
    """The shard an image belongs to: stable across machines, Python versions and runs
    (unlike ``hash()``), and independent of which other images exist."""
    return int.from_bytes(hashlib.sha256(image.encode()).digest()[:8], "big") % shards


def embedding_table(images: list[str], embeddings: np.ndarray, grid: np.ndarray | None = None) -> pa.Table:
    """Names and an (N, D) matrix -> an Arrow table in the features format; with ``grid`` (N, rows,
    columns, channels) of uint8 or float16, its ``grid`` column too (values stored as given)."""
    dim = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    columns = {"image": pa.array(images, pa.string()), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
    if grid is not None:
        if grid.dtype not in (np.uint8, np.float16) or grid.ndim != 4 or len(grid) != len(images):
            raise ValueError(f"a grid is (images, rows, columns, channels) of uint8 or float16, not {grid.dtype} "
                             f"{grid.shape} for {len(images)} images")
        values = pa.array(np.ascontiguousarray(grid).reshape(-1))
        columns[GRID_COLUMN] = pa.FixedSizeListArray.from_arrays(values, int(np.prod(grid.shape[1:])))
    return pa.table(columns)


def grid_metadata(shape: tuple[int, int, int], quantization: tuple[float, float] | None = None) -> dict[str, str]:
    """The schema metadata that says how a ``grid`` column is laid out: its (rows, columns,
    channels) and, for uint8 values, (scale, zero point): value = (q - zero_point) x scale."""
    meta = {"shape": f"[{shape[0]}, {shape[1]}, {shape[2]}] (rows, columns, channels; row-major)"}
    if quantization is not None:
        meta.update(scale=repr(float(quantization[0])), zero_point=repr(int(quantization[1])))
    return meta


def sorted_by_image(table: pa.Table) -> pa.Table:
    return table.take(pa.compute.sort_indices(table, [("image", "ascending")]))


def write_table(table: pa.Table, path: Path, row_group_size: int | None = None) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


def read_features(path: Path) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(image names, (N, D) float32 matrix, schema metadata) of a features file: the pooled
    vectors only (a grid column, if any, is not read)."""
    table = pq.read_table(path, columns=["image", "embedding"])
    return table.column("image").to_pylist(), _pooled(table), _metadata(table)


def read_feature_rows(path: Path) -> tuple[list[str], np.ndarray, dict[str, str], tuple[int, int] | None]:
    """(image names, rows, schema metadata, grid): each row is the pooled vector, followed by the
    image's grid of regions when the file holds one (``grid`` is then (regions, channels), else
    None): the layout the decoders read. GridFileError, naming the file, for a grid that
    cannot be read."""
    table = pq.read_table(path)
    meta, pooled = _metadata(table), _pooled(table)
    if GRID_COLUMN not in table.schema.names:
        return table.column("image").to_pylist(), pooled, meta, None
    grid, shape = _grid_matrix(table, meta, path)
    return (table.column("image").to_pylist(), np.concatenate([pooled, grid], axis=1), meta,
            (shape[0] * shape[1], shape[2]))


def pooled_part(rows: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    """The pooled vectors of ``rows`` laid out as ``read_feature_rows`` gives them (the grid of
    ``grid`` = (regions, channels) values, if any, cut off)."""
    return rows[:, :rows.shape[1] - grid[0] * grid[1]] if grid else rows


def _pooled(table: pa.Table) -> np.ndarray:
    dim = table.schema.field("embedding").type.list_size
    return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)


def dequantize(raw: np.ndarray, scale: float, zero_point: float) -> np.ndarray:
    """uint8 grid values as the numbers they stand for, (q - zero_point) x scale in float32: the
    one formula for grids read from a file and grids the served model computes."""
    return (raw.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def _metadata(table: pa.Table) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}


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




class GridFileError(ValueError):
    """A grid file that cannot be read as one: no grid column, no shape, a shape that does not
    match the stored width."""


def grid_shape(meta: dict[str, str], width: int, path: Path, check_width: bool = True) -> tuple[int, int, int]:
    """(rows, columns, channels) of a grid file from its ``shape`` metadata ("[7, 7, 320] ..."),
    checked to hold the ``width`` values each row stores (unless not ``check_width``)."""
    found = re.match(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]", meta.get("shape", ""))
    if not found:
        raise GridFileError(f"{path}: no 'shape' in its schema metadata ('[rows, columns, channels]'), "
                            "so its grid cannot be laid out")
    shape = tuple(int(x) for x in found.groups())
    if (check_width and shape[0] * shape[1] * shape[2] != width) or min(shape) < 1:
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
    matrix, shape = _grid_matrix(table, _metadata(table), path)
    return table.column("image").to_pylist(), matrix, shape


def _grid_matrix(table: pa.Table, meta: dict[str, str], path: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The ``grid`` column of ``table`` as an (N, rows x columns x channels) float32 matrix, and
    the grid's shape (see ``read_grid``)."""
    kind = table.schema.field(GRID_COLUMN).type
    if not pa.types.is_fixed_size_list(kind):
        raise GridFileError(f"{path}: its '{GRID_COLUMN}' column is {kind}, not a fixed-size list")
    shape = grid_shape(meta, kind.list_size, path)
    raw = table.column(GRID_COLUMN).combine_chunks().flatten().to_numpy().reshape(-1, kind.list_size)
    if raw.dtype == np.uint8:
        try:
            scale, zero = float(meta["scale"]), float(meta["zero_point"])
        except (KeyError, ValueError):
            raise GridFileError(f"{path}: a uint8 grid needs 'scale' and 'zero_point' in its metadata") from None
        matrix = dequantize(raw, scale, zero)
    elif raw.dtype in (np.float16, np.float32):
        matrix = raw.astype(np.float32)
        bad = ~np.isfinite(matrix).all(axis=1)
        if bad.any():  # a NaN would turn every caption of that photo into noise, silently
            names = table.column("image").to_pylist()
            raise GridFileError(f"{path}: {int(bad.sum())} rows hold NaN or infinite values, e.g. "
                                f"{[names[i] for i in np.flatnonzero(bad)[:3]]}")
    else:
        raise GridFileError(f"{path}: grid values of type {raw.dtype}; expected float16, float32 or uint8")
    return matrix, shape


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
