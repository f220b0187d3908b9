"""Stage ``merge_features``: the feature shards -> ``data/features/<backbone>.parquet``.

Concatenates ``data/features/shards/<backbone>-<i>.parquet`` for every i in
``features.shards`` and the corrected photos' shard (``<backbone>-feedback.parquet``), sorts by image name and writes the file train and evaluate read. The
result is the same, byte for byte, whatever the number of shards: each image's vector does not
depend on the batch or shard it was computed in, and the order and row groups are fixed here.
Refuses to merge when a shard is missing, holds images of another shard, lacks an image, or
was computed with another CNN.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import paths
from pipeline.config import Settings
from pipeline.data.features_file import shard_of, sorted_by_image, write_table
from pipeline.data.sources import prepared_captions
from pipeline.stages._cli import reported, require, stage_main

log = logging.getLogger("pipeline.merge_features")


def merge_shards(shard_files: list[Path], images: set[str], out: Path, rows_per_part: int,
                 feedback_file: Path | None = None) -> dict:
    """Check and join ``shard_files`` (shard i at index i) and the corrected photos'
    ``feedback_file`` into ``out``; raises ValueError."""
    tables, metadata = [], None
    for shard, file in enumerate([*shard_files, *([feedback_file] if feedback_file else [])]):
        table = pq.read_table(file)
        names = table.column("image").to_pylist()
        strays = [n for n in names if shard < len(shard_files) and shard_of(n, len(shard_files)) != shard]
        if strays:
            raise ValueError(f"{file} holds {len(strays)} images of other shards, e.g. {strays[:3]}; "
                             "it was made with another features.shards: rerun its features stage")
        if metadata is None:
            metadata = table.schema.metadata
        elif table.schema.metadata != metadata:
            raise ValueError(f"{file} was computed with another CNN or settings than {shard_files[0]}; "
                             "rerun the features stages (dvc repro)")
        tables.append(table)
    merged = sorted_by_image(pa.concat_tables(tables).combine_chunks())
    names = merged.column("image").to_pylist()
    if len(set(names)) != len(names):
        raise ValueError("an image appears in more than one shard")
    missing, extra = sorted(images - set(names)), sorted(set(names) - images)
    if missing or extra:
        raise ValueError(f"the shards do not match the prepared captions: {len(missing)} images "
                         f"missing (e.g. {missing[:3]}), {len(extra)} not in it (e.g. {extra[:3]}); "
                         "rerun the features stages (dvc repro)")
    write_table(merged.replace_schema_metadata(metadata), out, row_group_size=rows_per_part)
    log.info("wrote %s: %d images from %d shard(s)", out, len(names), len(shard_files))
    return {"images": len(names), "shards": len(shard_files)}


def run(settings: Settings) -> dict:
    cfg = settings.features
    shard_files = [paths.feature_shard_file(cfg.backbone, i) for i in cfg.shards]
    feedback_file = paths.feature_shard_file(cfg.backbone, paths.FEEDBACK_SHARD)
    require(paths.CAPTIONS, paths.FEEDBACK_CAPTIONS, *shard_files, feedback_file)
    images = set(prepared_captions()["image"])
    with reported(ValueError, OSError, pa.ArrowInvalid):
        return merge_shards(shard_files, images, paths.features_file(cfg.backbone), cfg.rows_per_part,
                            feedback_file)


def main() -> None:
    stage_main("merge_features", __doc__, run)


if __name__ == "__main__":
    main()
