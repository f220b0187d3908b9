"""Stage ``features@<shard>``: the prepared images of one shard -> CNN feature vectors.

``python -m pipeline.stages.features --shard I`` embeds the images with
``shard_of(name, N) == I`` (N = len(features.shards)) with the CNN saved by the ``backbone``
stage, into ``data/features/shards/<backbone>-<I>.parquet`` (format of
``pipeline/data/features_file.py``); ``merge_features`` joins the shards. Shards are independent
DVC stages, so Airflow runs them in parallel, on different workers. With ``features.grid`` each
image's grid of regions is stored beside its vector, from the same pass of the CNN (the int8
MobileNetV2 only; another CNN is refused before any image is read).

Each batch is decoded and resized by a thread pool, then embedded (``_image_batches`` says
why the two do not overlap). Finished batches are written to
``data/features/parts/<backbone>-<I>/`` every ``rows_per_part`` images, and whatever is
buffered is written too when the stage fails or is stopped (SIGTERM, Ctrl-C), so a rerun
resumes where it stopped; the final file appears by atomic rename.

``--shard feedback`` (the stage ``feedback_features``) embeds the photos people corrected in the
app (``data/feedback/``) into ``data/features/shards/<backbone>-feedback.parquet``: new
corrections never recompute the dataset's features.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import cpu, paths
from pipeline.atomic import write_text
from pipeline.captioning.backbone import (
    MOBILENET_GRID_SHAPE,
    BackboneError,
    BackboneFolder,
    BackboneSpec,
)
from pipeline.config import Settings
from pipeline.data.features_file import embedding_table, shard_of, sorted_by_image, write_table
from pipeline.data.images import CORRUPT, ImageError, load_rgb
from pipeline.data.sources import FEEDBACK, RAW, image_files
from pipeline.stages._cli import StageError, reported, require, stage_main

log = logging.getLogger("pipeline.features")


def _image_batches(files: list[Path], size: int, batch_size: int) -> Iterator[np.ndarray]:
    """(batch, size, size, 3) uint8 arrays of ``files``, in order, each batch decoded and resized
    by a pool of one thread per core (PIL releases the GIL) before the CNN runs on it.

    Decoding is not overlapped with the CNN, on purpose: on 2 cores the tf.data pipeline this
    replaced (parallel map + prefetch) cut the TFLite backbone from 10.9 to 6.3 img/s, as its
    threads fought XNNPack's for the cores, and gained Keras nothing (9.6 against 9.9 img/s;
    64 photo-sized JPEGs, AMD EPYC). Decoding is about 2% of the time: 700 img/s on 2 threads
    against 10 for the CNN. Raises ImageError naming the first file that cannot be decoded."""
    def load(path: Path) -> np.ndarray:
        try:
            # No pixel limit here: validate already refused images above validate.max_image_pixels.
            return load_rgb(path, size, max_pixels=None)
        except ImageError as err:  # keeps its category: a file gone since validate is MISSING
            raise ImageError(err.category, f"undecodable image {path}: {err.detail}") from None
        except Exception as err:
            raise ImageError(CORRUPT, f"undecodable image {path}: {err}") from None

    with ThreadPoolExecutor(max_workers=cpu.cores(), thread_name_prefix="decode") as pool:
        for lo in range(0, len(files), batch_size):
            yield np.stack(list(pool.map(load, files[lo:lo + batch_size])))


class _Parts:
    """Completed batches on disk, so a rerun extracts only what is missing."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = folder
        manifest = folder / "manifest.json"
        if folder.exists() and (not manifest.exists() or json.loads(manifest.read_text()) != fingerprint):
            log.info("discarding parts from a different configuration in %s", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(manifest, json.dumps(fingerprint))

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def done(self) -> set[str]:
        names: set[str] = set()
        for part in self.files():
            try:
                names.update(pq.read_table(part, columns=["image"]).column("image").to_pylist())
            except (pa.ArrowInvalid, OSError):
                part.unlink()  # torn write: redo those images
        return names

    def write(self, images: list[str], embeddings: np.ndarray, grid: np.ndarray | None = None) -> None:
        existing = self.files()  # numbered after the highest, even if a torn part was removed
        index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        write_table(embedding_table(images, embeddings, grid), self.folder / f"part-{index:05d}.parquet")


def extract_features(files: dict[str, Path], images: list[str], out: Path, parts_dir: Path,
                     backbone: BackboneFolder, batch_size: int, rows_per_part: int, grid: bool = False) -> dict:
    """Write features of ``images`` (``files`` maps each name to its file) to ``out`` with the CNN
    saved in ``backbone``, with each image's grid of regions too when ``grid``; returns stats.
    Raises BackboneError (CNN unavailable, or no grid from it) or ImageError (an image cannot be
    decoded)."""
    spec = backbone.spec()
    grid_embedder = backbone.grid_embedder() if grid else None  # refused before any work for a CNN without
    parts = _Parts(parts_dir, {**spec.to_dict(), "images": len(images), "grid": grid})
    done = parts.done()
    todo = [n for n in images if n not in done]
    if done:
        log.info("resuming: %d of %d images already extracted", len(images) - len(todo), len(images))
    if grid_embedder is not None:
        embed = grid_embedder.with_grid
    else:  # nothing to do: no CNN to load
        embed = (lambda b, plain=backbone.embedder(): (plain(b), None)) if todo else None

    start, buffer_names, buffer_vecs, buffer_grids = time.perf_counter(), [], [], []
    names_iter = iter(todo)
    bar = tqdm(total=len(todo), desc="features", unit="img")

    def flush():
        parts.write(buffer_names, np.concatenate(buffer_vecs), np.concatenate(buffer_grids) if grid else None)

    try:
        for batch in _image_batches([files[n] for n in todo], spec.image_size, batch_size):
            vectors, grids = embed(batch)
            buffer_names += [next(names_iter) for _ in range(len(vectors))]
            buffer_vecs.append(vectors)
            buffer_grids.append(grids)
            if len(buffer_names) >= rows_per_part:
                flush()
                buffer_names, buffer_vecs, buffer_grids = [], [], []
            bar.update(len(vectors))
    except ImageError as err:
        raise ImageError(err.category, f"{err.detail}\n({bar.n} images before it are saved in "
                         f"{parts.folder}; fix or remove the image, rerun validate, then rerun "
                         "features to resume)") from None
    finally:  # also on SIGTERM / Ctrl-C: keep what was computed
        if buffer_names:
            flush()
        bar.close()
    elapsed = time.perf_counter() - start

    tables = [pq.read_table(p) for p in parts.files()]
    table = pa.concat_tables(tables).combine_chunks() if tables else embedding_table(
        [], np.zeros((0, spec.feature_dim), np.float32),
        np.zeros((0, *MOBILENET_GRID_SHAPE[1:]), np.uint8) if grid else None)
    table = sorted_by_image(table)
    missing = set(images) - set(table.column("image").to_pylist())
    if missing:
        raise ValueError(f"features missing for {len(missing)} images, e.g. {sorted(missing)[:3]}")
    meta = {**backbone.metadata(), **(grid_embedder.grid_metadata() if grid_embedder else {})}
    write_table(table.replace_schema_metadata(meta), out, row_group_size=rows_per_part)
    shutil.rmtree(parts.folder)
    rate = len(todo) / elapsed if todo and elapsed > 0 else float("nan")
    log.info("wrote %s: %d images (%d new at %.1f img/s)", out, len(images), len(todo), rate)
    return {"images": len(images), "extracted": len(todo), "reused": len(images) - len(todo),
            "seconds": elapsed, "images_per_s": rate}


def run(settings: Settings, shard: int | str = 0) -> dict:
    """Extract features for the images of ``data/prepared/captions.parquet`` in ``shard``, or,
    for ``--shard feedback``, of the corrected photos in ``data/feedback/captions.parquet``."""
    cfg = settings.features
    if shard == paths.FEEDBACK_SHARD:
        captions_file, folder = paths.FEEDBACK_CAPTIONS, FEEDBACK
    elif shard in cfg.shards:
        captions_file, folder = paths.CAPTIONS, RAW
    else:
        raise StageError(f"--shard {shard} is not one of features.shards {cfg.shards} or {paths.FEEDBACK_SHARD}")
    backbone = BackboneFolder(paths.backbone_dir(cfg.backbone))
    require(captions_file, backbone.spec_file)
    with reported(BackboneError):
        saved, agrees = backbone.spec(), backbone.agrees_with(cfg)
    if not agrees:
        raise StageError(f"{backbone.path} holds {saved} (made for {backbone.record().get('requested')}), but "
                         f"params.yaml asks for runtime {cfg.runtime}, precision {cfg.precision} of "
                         f"{BackboneSpec.from_settings(cfg)}: rerun the backbone stage first")
    table = pd.read_parquet(captions_file, columns=["image"]).assign(folder=folder)
    with reported(BackboneError, ImageError, ValueError, OSError):
        files = image_files(table, settings.data.source)  # a name that is a path: ValueError, nothing opened
        images = sorted(n for n in files if folder == FEEDBACK or shard_of(n, len(cfg.shards)) == shard)
        log.info("shard %s: %d of %d images", shard, len(images), len(files))
        return extract_features(files, images, paths.feature_shard_file(cfg.backbone, shard),
                                paths.feature_parts_dir(cfg.backbone, shard), backbone,
                                cfg.batch_size, cfg.rows_per_part, cfg.grid)


def _shard(text: str) -> int | str:
    return text if text == paths.FEEDBACK_SHARD else int(text)


def _add_shard(parser) -> None:
    parser.add_argument("--shard", type=_shard, default=0,
                        help=f"which shard to embed (default: 0; {paths.FEEDBACK_SHARD}: the corrected photos)")


def main() -> None:
    stage_main("features", __doc__, lambda settings, args: run(settings, args.shard), extra_args=_add_shard)


if __name__ == "__main__":
    main()
