"""Stage ``backbone``: build the CNN once and save everything its runtime needs.

Output folder ``data/features/<backbone>.backbone/``: the exact weights, the TFLite model
(``features.runtime: tflite`` or ``tflite_int8``) and ``spec.json`` (runtime and precision as
chosen on this machine's CPU). Every feature shard and the served model load this folder, so all
shards (on any machine) use the same CNN, and ImageNet weights are fetched once, here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import cpu, paths
from pipeline.atomic import atomic_dir
from pipeline.captioning.backbone import (
    BackboneError,
    BackboneFolder,
    BackboneSpec,
    build,
    load_image,
    to_tflite,
)
from pipeline.config import Settings
from pipeline.data.flickr8k import image_file
from pipeline.data.images import ImageError
from pipeline.stages._cli import reported, require, stage_main

log = logging.getLogger("pipeline.captioning.backbone")


def calibration_set(captions: pd.DataFrame, image_dir: Path, spec: BackboneSpec, count: int,
                    max_pixels: int) -> np.ndarray:
    """``count`` train images, spread by a hash of their names (not the first ones of a sorted
    list, which may all come from one photographer), decoded as the features stage decodes."""
    train = sorted(set(captions.loc[captions["split"] == "train", "image"]))
    if not train:
        raise ValueError("no train images in data/prepared/captions.parquet to calibrate tflite_int8")
    chosen = sorted(train, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:count]
    return np.stack([load_image(image_file(image_dir, name), spec, max_pixels) for name in chosen])


def save_backbone(spec: BackboneSpec, out: Path, calibration: np.ndarray | None = None) -> dict:
    """Build the CNN of ``spec`` and write its folder to ``out`` (replaced only when complete);
    raises BackboneError."""
    model = build(spec)
    stats = {"parameters": model.count_params(), "runtime": spec.runtime, "precision": spec.precision}
    with atomic_dir(out) as tmp:
        folder = BackboneFolder(tmp)
        model.save_weights(str(folder.weights))
        if spec.runtime != "keras":
            start = time.perf_counter()
            folder.tflite.write_bytes(to_tflite(model, calibration if spec.runtime == "tflite_int8" else None))
            stats["conversion_seconds"] = round(time.perf_counter() - start, 1)
        folder.spec_file.write_text(json.dumps({"spec": spec.to_dict(), "chosen_on": cpu.describe()}, indent=2))
    log.info("wrote %s (%s, weights %s, runtime %s, %s, %d parameters; CPU %s)", out, spec.name,
             spec.weights, spec.runtime, spec.precision, model.count_params(), cpu.describe())
    return stats


def run(settings: Settings) -> dict:
    cfg = settings.features
    spec = BackboneSpec.from_settings(cfg)
    calibration = None
    with reported(BackboneError, ImageError, ValueError, OSError):
        if spec.runtime == "tflite_int8":
            require(paths.CAPTIONS)
            calibration = calibration_set(
                pd.read_parquet(paths.CAPTIONS, columns=["image", "split"]),
                paths.dataset_dir(settings.data.source) / paths.IMAGES_SUBDIR, spec,
                cfg.calibration_images, settings.validation.max_image_pixels)
        return save_backbone(spec, paths.backbone_dir(spec.name), calibration)


def main() -> None:
    stage_main("backbone", __doc__, run)


if __name__ == "__main__":
    main()
