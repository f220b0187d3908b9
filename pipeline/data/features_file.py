"""The features file format, shared by the features stage (writer) and train/evaluate
(readers): ``data/features/<backbone>.parquet`` with columns

    image      string
    embedding  fixed_size_list<float32>[D]

one row per image, sorted by name, and the backbone's provenance (weights, input size,
preprocessing, library versions) as schema metadata. Shard files (``features@i``) have the
same format and hold the images ``shard_of(name, N) == i``.
"""

from __future__ import annotations

import hashlib
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
