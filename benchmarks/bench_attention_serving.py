"""Serving an attention decoder against the pooled one, on the same CNN runtime: one photo's
latency in-process, the two registered models called in turn.

Builds both in one temporary MLflow store with ``captioner real-model``'s code on the real
Flickr8k features and grids (``--data``, the vendored int8 MobileNetV2: the one CNN with grids):
the pooled LSTM decoder and the attention decoder, each with params.yaml's sizes and decoding
(beam, consensus reranking, samples) and ``--epochs`` epochs (enough for captions of a real
length, which the latency depends on), each registered under its own name. Then, calls
interleaved, over --requests real dev photos:
  * one photo through ``predict`` (decode, CNN, decoding, confidence), p50 and p95;
  * the CNN alone: pooled vector, against pooled vector + grid dequantised;
  * the attention model asked where it looked (``caption_images(..., attention=True)``).
Target: attention p50 / pooled p50 <= 1.3.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_serving import percentiles  # noqa: E402
from benchmarks.common import Timer, append_report  # noqa: E402

NAMES = {"lstm": "bench-pooled", "attention": "bench-attention"}
REAL = Path(__file__).resolve().parents[2] / "shared" / "flickr8k_real"


def build_models(data: Path, epochs: int) -> dict:
    """Register the pooled and the attention decoder (see the module docstring), trained by
    ``captioner real-model``'s own code on ``data``, in the working folder's store."""
    from pipeline.config import parse_settings
    from pipeline.stages import real_model

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["train"].update(epochs=epochs)
    for decoder, name in NAMES.items():
        raw["train"]["decoder"], raw["register"]["model_name"] = decoder, name
        real_model.run(parse_settings(raw), data, Path(decoder))
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="photos captioned by each model (default: 30)")
    parser.add_argument("--data", type=Path, default=REAL, help="a real-features folder with a grid file and "
                                                                "dev_photos/ (default: ../shared/flickr8k_real)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of each decoder (default: 2)")
    args = parser.parse_args()
    from pipeline.data.real_folder import grid_file

    photos = sorted((args.data / "dev_photos").glob("*.jpg"))[:args.requests]
    if not photos or grid_file(args.data) is None:
        raise SystemExit(f"{args.data} needs dev_photos/ and a grid file (*_grid.trainval.parquet) beside its embeddings")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"  # a store of its own
        with contextlib.chdir(tmp):  # the stages write their files relative to the project
            raw = build_models(args.data.resolve(), args.epochs)
        models = {decoder: mlflow.pyfunc.load_model(f"models:/{name}@champion") for decoder, name in NAMES.items()}
        served = {decoder: model.unwrap_python_model() for decoder, model in models.items()}
        jpegs = [p.read_bytes() for p in photos]
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
    ], [f"{len(jpegs)} real Flickr8k dev photos, calls interleaved; MobileNetV2 int8 (LiteRT) for both; decoders of "
        f"params.yaml's sizes (units {raw['train']['units']}, embedding {raw['train']['embedding_dim']}), beam "
        f"{decoding['beam_size']}, consensus {decoding['consensus']['neighbours']} neighbours and "
        f"{decoding['consensus']['samples']} samples; each trained by captioner real-model on {args.data.name} for "
        f"{args.epochs} epochs (the latency depends on the sizes and the caption's length, about {words} words here)"])


if __name__ == "__main__":
    main()
