"""A folder of real Flickr8k captions with features computed elsewhere (the layout of the shared
``flickr8k_real/``): the token file, the train and dev split lists, the pooled embeddings
Parquet, optionally the grid Parquet and ``dev_photos/``. No photos are needed to train on it.

Read by ``captioner real-model`` and ``benchmarks/bench_quality.py`` alike, so the model the CLI
registers and the figures the benchmark reports come from the same captions and features.
Imports the ground floor and ``data`` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.caption_text import clean_caption
from pipeline.data.features_file import (
    GRID_COLUMN,
    grid_shape,
    read_features,
    read_grid,
    row_index,
    with_grid,
)
from pipeline.data.flickr8k import parse_token_file, read_split_list
from pipeline.data.photo_folder import PHOTO_SUFFIXES

EMBEDDINGS = "mobilenet_v2_224.trainval.parquet"
GRID = "mobilenet_v2_224_grid.trainval.parquet"
PHOTOS = "dev_photos"
SPLITS = ("train", "dev")


class RealFolderError(ValueError):
    """The folder lacks a file of the layout, or a file is not what it should be."""


def _one(data: Path, pattern: str, what: str) -> Path:
    found = sorted(data.glob(pattern))
    if not found:
        raise RealFolderError(f"{data} holds no {what} ({pattern}); a real-features folder holds the token file, "
                              f"the split lists Flickr_8k.trainImages.txt and Flickr_8k.devImages.txt, and {EMBEDDINGS}")
    return found[0]


def embeddings_file(data: Path) -> Path:
    """The pooled embeddings of ``data``: ``mobilenet_v2_224.trainval.parquet``, or else the first
    Parquet by name that is not a grid's (a held-out folder may name its files otherwise)."""
    if not data.is_dir():
        raise RealFolderError(f"{data} is not a folder")
    if (data / EMBEDDINGS).is_file():
        return data / EMBEDDINGS
    candidates = [p for p in sorted(data.glob("*.parquet")) if "grid" not in p.name]
    if not candidates:
        raise RealFolderError(f"{data} holds no embeddings Parquet file; expected {EMBEDDINGS}")
    return candidates[0]


def grid_file(data: Path) -> Path | None:
    """The grid of regions beside the pooled embeddings (``mobilenet_v2_224_grid.trainval.parquet``
    beside ``mobilenet_v2_224.trainval.parquet``: the pooled file's name with ``_grid`` before its
    first dot), or None when the folder holds none."""
    pooled = embeddings_file(data)
    stem, dot, rest = pooled.name.partition(".")
    candidate = pooled.with_name(f"{stem}_grid{dot}{rest}")
    return candidate if candidate.is_file() else None


def read_grid_rows(data: Path, images: list[str], pooled: np.ndarray
                   ) -> tuple[Path, np.ndarray, tuple[int, int, int]] | None:
    """With a grid beside the pooled embeddings (``grid_file``): (its path, each of ``images``'
    rows as an attention decoder reads them: the ``pooled`` vector then the grid, (rows, columns,
    channels)); None when the folder holds no grid. GridFileError naming the file otherwise."""
    path = grid_file(data)
    if path is None:
        return None
    grid_images, regions, shape = read_grid(path)
    return path, with_grid(images, pooled, grid_images, regions, path), shape


def stored_grid(data: Path, images: list[str], metadata: dict[str, str]) -> np.ndarray:
    """The folder's grid of ``images`` as stored, (N, rows, columns, channels) uint8, for a
    features file whose grid ``metadata`` (shape, scale, zero point: the serving CNN's) it must
    match: a grid made another way would be read one way in training and computed another in
    serving. RealFolderError naming the file otherwise."""
    path = grid_file(data)
    if path is None:
        raise RealFolderError(f"{data} holds no grid of regions ({GRID} beside {EMBEDDINGS}), so no attention "
                              "decoder can be trained on it: use train.decoder: lstm")
    table = pq.read_table(path)
    if GRID_COLUMN not in table.schema.names or "image" not in table.schema.names:
        raise RealFolderError(f"{path}: no 'image' and '{GRID_COLUMN}' columns: not a grid file")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    kind = table.schema.field(GRID_COLUMN).type
    shape = grid_shape(meta, getattr(kind, "list_size", -1), path)
    wanted = grid_shape(metadata, -1, path, check_width=False)
    same_scale = all(key in meta and np.isclose(float(meta[key]), float(metadata[key]), rtol=1e-6, atol=0)
                     for key in ("scale", "zero_point"))
    if getattr(kind, "value_type", None) != pa.uint8() or shape != wanted or not same_scale:
        raise RealFolderError(f"{path} holds grids of {list(shape)} {getattr(kind, 'value_type', kind)} with scale "
                              f"{meta.get('scale')} and zero point {meta.get('zero_point')}; the CNN that serves this "
                              f"model makes {list(wanted)} uint8 with scale {metadata.get('scale')} and zero point "
                              f"{metadata.get('zero_point')}: they were made by another CNN or recipe")
    index = row_index(table.column("image").to_pylist())
    missing = [name for name in images if name not in index]
    if missing:
        raise RealFolderError(f"{path}: no grid for {len(missing)} of the {len(images)} images, e.g. {missing[:3]}")
    raw = table.column(GRID_COLUMN).combine_chunks().flatten().to_numpy().reshape(-1, *shape)
    return raw[[index[name] for name in images]]


def read_captions(data: Path, min_tokens: int, max_tokens: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Cleaned train + dev captions in the stages' layout (image, split, caption_idx,
    caption_raw, caption), with validate's token-count bounds, and the count of lines dropped
    and why."""
    token_file = _one(data, "*.token*.txt", "token file")
    rows = parse_token_file(token_file)
    split_of = {name: split for split in SPLITS
                for name in read_split_list(_one(data, f"Flickr_8k.{split}Images.txt", f"{split} split list"))}
    rows["split"] = rows["image"].map(split_of)
    rows["caption"] = rows["caption_raw"].map(clean_caption)
    length = rows["caption"].str.split().str.len()
    dropped = {"malformed line": int(rows["error"].notna().sum()),
               "not in train/dev": int(rows["split"].isna().sum()),
               f"outside {min_tokens}..{max_tokens} tokens": int(((length < min_tokens) | (length > max_tokens)).sum())}
    kept = rows[rows["error"].isna() & rows["split"].notna() & length.between(min_tokens, max_tokens)]
    return kept[["image", "split", "caption_idx", "caption_raw", "caption"]].reset_index(drop=True), dropped


def read_embeddings(data: Path, feature_dim: int, backbone_words: str = "mobilenet_v2") -> tuple[list[str], np.ndarray, dict]:
    """(names, (N, D) float32, schema metadata) of ``data``'s embeddings, refused with the reason
    when they are not ``feature_dim`` wide or their metadata names another CNN than one whose
    name holds ``backbone_words`` (a decoder trained on them would be served with the wrong CNN)."""
    path = embeddings_file(data)
    try:
        images, features, meta = read_features(path)
    except (OSError, KeyError, ValueError) as err:
        raise RealFolderError(f"{path} is not an embeddings Parquet (image, embedding): {err}") from None
    made_by = meta.get("backbone", "")
    if features.shape[1] != feature_dim or (made_by and backbone_words not in made_by):
        raise RealFolderError(f"{path} holds {features.shape[1]}-d embeddings made by {made_by or 'an unnamed CNN'}; "
                              f"this backbone makes {feature_dim}-d ones ({backbone_words}): a decoder trained on "
                              "them would be served with another CNN than the one they came from")
    if not np.isfinite(features).all():
        raise RealFolderError(f"{path} holds non-finite embedding values")
    return images, features, meta


def dev_photos(data: Path, names: set[str]) -> dict[str, Path]:
    """Photo files in ``data/dev_photos/`` whose names are dev images of the captions (others,
    and links leading out of the folder, are left out)."""
    folder = data / PHOTOS
    if not folder.is_dir():
        return {}
    root = folder.resolve()
    return {p.name: p for p in sorted(folder.iterdir())
            if p.name in names and p.suffix.lower() in PHOTO_SUFFIXES and p.is_file()
            and p.resolve().parent == root}
