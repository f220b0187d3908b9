"""Stage ``backbone``: build the CNN once, choose how it runs, and save everything that needs.

Output folder ``data/features/<backbone>.backbone/``: the exact weights, the file of the chosen
runtime (TFLite model or OpenVINO IR) and ``spec.json`` (runtime and precision as chosen on this
machine's CPU, what params asked for, and with ``features.runtime: auto`` the measurements the
choice was made on). Every feature shard and the served model load this folder, so all shards
(on any machine) use the same CNN the same way, and ImageNet weights are fetched once, here.

``auto`` times every runtime and precision this CPU offers on ``features.calibration_images``
train images (``features.auto_rounds`` interleaved rounds) and keeps the fastest whose
embeddings agree with Keras float32 to ``features.min_cosine`` (``pipeline/captioning/backbone.py``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import cpu, paths
from pipeline.atomic import atomic_dir
from pipeline.captioning.backbone import (
    MOBILENET,
    BackboneError,
    BackboneSpec,
    MobileNetV2Int8Embedder,
    build,
    choose_runtime,
    load_image,
    measure,
    mobilenet_file,
    save_folder,
    save_mobilenet_folder,
)
from pipeline.config import FeaturesSettings, Settings
from pipeline.data.flickr8k import image_file
from pipeline.data.images import ImageError
from pipeline.stages._cli import reported, require, stage_main

log = logging.getLogger("pipeline.backbone")


def calibration_set(captions: pd.DataFrame, image_dir: Path, spec: BackboneSpec, count: int,
                    max_pixels: int) -> np.ndarray:
    """``count`` train images, spread by a hash of their names (not the first ones of a sorted
    list, which may all come from one photographer), decoded as the features stage decodes."""
    train = sorted(set(captions.loc[captions["split"] == "train", "image"]))
    if not train:
        raise ValueError("no train images in data/prepared/captions.parquet to calibrate or measure on")
    chosen = sorted(train, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:count]
    return np.stack([load_image(image_file(image_dir, name), spec, max_pixels) for name in chosen])


def save_backbone(cfg: FeaturesSettings, out: Path, images: np.ndarray | None = None,
                  cpu_flags: frozenset[str] | None = None) -> dict:
    """Build the CNN ``cfg`` asks for, resolve its runtime and precision (measuring them on
    ``images`` for ``auto``; ``images`` also calibrate ``tflite_int8``) and write its folder to
    ``out`` (replaced only when complete). Returns stats, the measurements among them; raises
    BackboneError."""
    spec = BackboneSpec.from_settings(cfg, cpu_flags)
    if spec.name == MOBILENET:
        return save_mobilenet(cfg, spec, out, images)
    model = build(replace(spec, precision="float32"))  # the weights every runtime runs
    measurements = None
    start = time.perf_counter()
    if cfg.runtime == "auto":
        spec, measurements = choose_runtime(model, spec, images, cfg.batch_size, cfg.auto_rounds, cfg.min_cosine,
                                            cfg.precision, cpu_flags)
    stats = {"parameters": model.count_params(), "runtime": spec.runtime, "precision": spec.precision,
             "choice_seconds": round(time.perf_counter() - start, 1), "measurements": measurements or []}
    with atomic_dir(out) as tmp:
        stats.update(save_folder(model, spec, tmp, {"runtime": cfg.runtime, "precision": cfg.precision},
                                 measurements, images if spec.runtime == "tflite_int8" else None))
    log.info("wrote %s (%s, weights %s, runtime %s, %s, %d parameters; CPU %s)", out, spec.name,
             spec.weights, spec.runtime, spec.precision, model.count_params(), cpu.describe())
    return stats


def save_mobilenet(cfg: FeaturesSettings, spec: BackboneSpec, out: Path, images: np.ndarray | None) -> dict:
    """The int8 MobileNetV2 has one runtime (LiteRT) and one precision: nothing to choose. With
    ``runtime: auto`` and ``images``, its speed is still measured and recorded, as ``auto``
    records every choice it makes."""
    model_file = mobilenet_file(spec.weights)
    measurements = None
    if cfg.runtime == "auto" and images is not None:
        measurements = measure({(spec.runtime, spec.precision): MobileNetV2Int8Embedder(model_file)},
                               images, cfg.batch_size, cfg.auto_rounds)
        for row in measurements:
            row.update(eligible=True, chosen=True)
    with atomic_dir(out) as tmp:
        save_mobilenet_folder(spec, model_file, tmp, {"runtime": cfg.runtime, "precision": cfg.precision},
                              measurements)
    log.info("wrote %s (%s from %s, runtime %s; CPU %s)", out, spec.name, model_file, spec.runtime, cpu.describe())
    return {"runtime": spec.runtime, "precision": spec.precision, "model_file": str(model_file),
            "measurements": measurements or []}


def run(settings: Settings) -> dict:
    cfg = settings.features
    images = None
    with reported(BackboneError, ImageError, ValueError, OSError):
        if cfg.runtime in ("auto", "tflite_int8"):  # train images to measure on / calibrate with
            require(paths.CAPTIONS)
            images = calibration_set(
                pd.read_parquet(paths.CAPTIONS, columns=["image", "split"]),
                paths.dataset_dir(settings.data.source) / paths.IMAGES_SUBDIR, BackboneSpec.from_settings(cfg),
                cfg.calibration_images, settings.validation.max_image_pixels)
        return save_backbone(cfg, paths.backbone_dir(cfg.backbone), images)


def main() -> None:
    stage_main("backbone", __doc__, run)


if __name__ == "__main__":
    main()
