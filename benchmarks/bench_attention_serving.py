"""Serving an attention decoder against the pooled one, on the same CNN runtime: one photo's
latency in-process, the two registered models called in turn.

Builds both in one temporary project: synthetic photos, the vendored int8 MobileNetV2 (the one
CNN that gives grids) with ``features.grid: true``, then the pooled LSTM decoder and the attention
decoder, each with params.yaml's sizes and decoding (beam, consensus reranking, samples) and one
epoch (latency depends on the sizes, not on how well it learnt), each registered under its own
name. Then, calls interleaved, over --requests photos (the real dev photos where they are, else synthetic JPEGs):
  * one photo through ``predict`` (decode, CNN, decoding, confidence), p50 and p95;
  * the CNN alone: pooled vector, against pooled vector + grid dequantised;
  * the attention model asked where it looked (``caption_images(..., attention=True)``).
Target: attention p50 / pooled p50 <= 1.3.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_serving import percentiles, photo  # noqa: E402
from benchmarks.common import Timer, append_report  # noqa: E402

NAMES = {"lstm": "bench-pooled", "attention": "bench-attention"}
REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "flickr8k_real" / "dev_photos"


def build_models(root: Path, images: int) -> dict:
    """Register the pooled and the attention decoder (see the module docstring) in ``root``."""
    from pipeline.config import parse_settings
    from pipeline.stages import calibrate, download, evaluate, register, train, validate
    from tests.helpers import run_features

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["data"]["synthetic"].update(n_images=images, image_size=128)
    raw["features"].update(backbone="mobilenet_v2_int8", weights="imagenet", image_size=224, runtime="tflite_int8",
                           precision="auto", grid=True)
    raw["train"].update(epochs=1)
    settings = parse_settings(raw)
    download.run(settings)
    validate.run(settings)
    run_features(settings)
    for decoder, name in NAMES.items():
        raw["train"]["decoder"], raw["register"]["model_name"] = decoder, name
        settings = parse_settings(raw)
        for stage in (train, calibrate, evaluate, register):
            stage.run(settings)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="photos captioned by each model (default: 30)")
    parser.add_argument("--images", type=int, default=120, help="synthetic photos the models are trained on")
    parser.add_argument("--photos", type=Path, default=REAL_PHOTOS,
                        help="JPEGs to caption (default: the real dev photos of ../shared; synthetic ones where absent)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
        old = os.getcwd()
        os.chdir(root)
        try:
            raw = build_models(root, args.images)
        finally:
            os.chdir(old)
        models = {decoder: mlflow.pyfunc.load_model(f"models:/{name}@champion") for decoder, name in NAMES.items()}
        served = {decoder: model.unwrap_python_model() for decoder, model in models.items()}
        found = sorted(args.photos.glob("*.jpg")) if args.photos.is_dir() else []
        jpegs = ([p.read_bytes() for p in found[:args.requests]] if found
                 else [photo(i) for i in range(args.requests)])
        frames = [pd.DataFrame({"image": [base64.b64encode(j).decode()]}) for j in jpegs]
        pixels = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        for model in models.values():
            model.predict(frames[0])  # first call
        served["attention"].caption_images([jpegs[0]], attention=True)
        one = {decoder: [] for decoder in NAMES}
        cnn = {decoder: [] for decoder in NAMES}
        looked = []
        for k, frame in enumerate(frames):
            order = list(NAMES) if k % 2 == 0 else list(reversed(NAMES))  # neither always goes first
            for decoder in order:
                with Timer() as t:
                    models[decoder].predict(frame)
                one[decoder].append(t.seconds)
                with Timer() as t:
                    served[decoder].embed(pixels)
                cnn[decoder].append(t.seconds)
            with Timer() as t:
                served["attention"].caption_images([jpegs[k]], attention=True)
            looked.append(t.seconds)
        words = len(served["attention"].caption_images([jpegs[0]])[0]["caption"].split())
    ratio = np.median(one["attention"]) / np.median(one["lstm"])
    decoding = raw["decoding"]
    append_report("Serving the attention decoder (bench_attention_serving.py)", [
        ("one photo, pooled LSTM decoder", percentiles(one["lstm"])),
        ("one photo, attention decoder", percentiles(one["attention"])),
        ("attention p50 / pooled p50 (target <= 1.3)", f"{ratio:.2f}"),
        ("CNN alone: pooled vector / pooled + grid", f"{percentiles(cnn['lstm'])} / {percentiles(cnn['attention'])}"),
        ("one photo, attention decoder, with where it looked (?attention=1)", percentiles(looked)),
    ], [f"{len(jpegs)} photos ({'real Flickr8k dev photos' if found else 'synthetic JPEGs 500x375'}), calls interleaved; MobileNetV2 int8 (LiteRT) for both; decoders of "
        f"params.yaml's sizes (units {raw['train']['units']}, embedding {raw['train']['embedding_dim']}), beam "
        f"{decoding['beam_size']}, consensus {decoding['consensus']['neighbours']} neighbours and "
        f"{decoding['consensus']['samples']} samples; trained {args.images} synthetic photos for one epoch "
        f"(captions of about {words} words)"])


if __name__ == "__main__":
    main()
