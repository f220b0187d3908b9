"""The real captioner (``captioner real-model``) as a user meets it, on real photos.

Needs a project folder whose MLflow store's champion is a model ``captioner real-model`` made
(``--project``, default: this project; ``--work``: its work folder, default ``PROJECT/real``) and a
folder of real photos (``--photos``, default: the shared ``flickr8k_real/dev_photos``). Measures:

* one real photo through the champion as ``captioner caption`` calls it (the pyfunc model's
  ``predict`` on the photo's bytes), warm: p50 / p95 over ``--requests`` calls, beside the CNN
  alone on the same photo (decode + MobileNetV2) in the same run;
* ``captioner index`` of the photos into a fresh index, end to end as a subprocess, against the
  same command on an empty folder (the model load alone): photos/s = photos / (full - empty);
* dev quality: the champion's ``metrics/eval.json`` (the real-model run) beside what
  ``benchmarks/bench_quality.py --load WORK/models`` scores for the same decoder on the same
  folder, so the two paths' figures can be read side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import PROJECT, Timer, append_report  # noqa: E402

PHOTOS = PROJECT.parent / "shared" / "flickr8k_real" / "dev_photos"
BIN = Path(sys.executable).parent


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=PROJECT, help="project folder (params.yaml, the store)")
    parser.add_argument("--work", type=Path, default=None, help="real-model's work folder (default: PROJECT/real)")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help=f"real photos (default: {PHOTOS})")
    parser.add_argument("--requests", type=int, default=50, help="one-photo calls timed (default: 50)")
    args = parser.parse_args()
    project, photos_dir = args.project.resolve(), args.photos.resolve()
    work = (args.work or project / "real").resolve()
    os.chdir(project)
    import mlflow

    from pipeline.captioning import quiet_tensorflow  # noqa: F401
    from pipeline.captioning.backbone import load_image
    from pipeline.config import load_settings
    from pipeline.registry.champion import load_champion_model
    from pipeline.registry.tracking import tracking_uri, use_store

    settings = load_settings()
    use_store(tracking_uri(settings), settings.mlflow)
    photos = sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    version, inner = load_champion_model(settings.registry.model_name)
    if inner.spec.name != "mobilenet_v2_int8":
        raise SystemExit(f"the champion ({version}) runs {inner.spec.name}, not the real model: "
                         "run captioner real-model --data DIR --promote first")
    data = photos[0].read_bytes()
    import pandas as pd

    frame = pd.DataFrame({"image": [data]})
    for _ in range(3):
        inner.predict(None, frame)
    # the same model with cheaper decodings, to show what the registered decoding costs
    from pipeline.captioning.caption_choice import CaptionChooser
    from pipeline.captioning.consensus import Neighbours

    registered, sure = inner.chooser, getattr(inner, "confidence", None)
    d = inner.decoding
    neighbours = Neighbours.load(work / "models" / "neighbours.npz") if d.consensus.neighbours else None
    variants = {"as registered": registered}
    if sure is not None:  # what saying how sure it is costs: the same caption without the confidence
        variants["as registered, without its confidence"] = registered
    if d.consensus.neighbours and d.consensus.samples:
        no_samples = d.model_copy(update={"consensus": d.consensus.model_copy(update={"samples": 0})})
        variants["consensus over the beam only (samples 0)"] = CaptionChooser(registered.models, inner.vocab,
                                                                              no_samples, neighbours)
    if d.consensus.neighbours:
        plain = d.model_copy(update={"consensus": d.consensus.model_copy(update={"neighbours": 0})})
        variants["plain beam (no consensus)"] = CaptionChooser(registered.models, inner.vocab, plain)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cnn_s = []
    for name, chooser in variants.items():  # warm: a variant's first call builds its graphs
        inner.chooser, inner.confidence = chooser, None if "without its confidence" in name else sure
        inner.predict(None, frame)
    for _ in range(args.requests):  # interleaved: the same load on the machine for all
        for name, chooser in variants.items():
            inner.chooser, inner.confidence = chooser, None if "without its confidence" in name else sure
            with Timer() as t:
                inner.predict(None, frame)
            times[name].append(t.seconds)
        with Timer() as t:
            inner.embed(load_image(data, inner.spec, None)[None])
        cnn_s.append(t.seconds)
    inner.chooser, inner.confidence = registered, sure
    caption_s = times["as registered"]

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty"
        empty.mkdir()

        def index(folder: Path, db: str) -> float:
            start = time.perf_counter()
            subprocess.run([str(BIN / "captioner"), "index", str(folder), "--db", str(Path(tmp) / db), "-q"],
                           cwd=project, env=env, check=True, capture_output=True)
            return time.perf_counter() - start

        load_only = index(empty, "empty.db")
        full = index(photos_dir, "photos.db")
    rate = len(photos) / max(full - load_only, 1e-9)

    rows = [("champion", f"{version} ({inner.spec.name}, runtime {inner.spec.runtime})"),
            (f"one real photo, captioned as registered: beam {d.beam_size}, consensus {d.consensus.neighbours} "
             f"neighbours, {d.consensus.samples} samples (p50 / p95)", f"{percentile(caption_s, 50):.1f} / {percentile(caption_s, 95):.1f} ms"),
            *[(f"the same photo, {name} (p50 / p95)", f"{percentile(v, 50):.1f} / {percentile(v, 95):.1f} ms"
               + (f"; with it: {percentile(caption_s, 50) / percentile(v, 50):.2f}x" if "confidence" in name else ""))
              for name, v in times.items() if name != "as registered"],
            ("the CNN alone on it, decode + MobileNetV2 (p50)", f"{percentile(cnn_s, 50):.1f} ms "
             f"({percentile(cnn_s, 50) / percentile(caption_s, 50):.0%} of the caption's time)"),
            (f"captioner index, {len(photos)} photos", f"{full:.1f} s end to end; model load alone {load_only:.1f} s; "
             f"{rate:.1f} photos/s once loaded")]
    metrics_file = work / "metrics" / "eval.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        b = metrics["beam"]
        rows.append(("real-model's evaluate on dev (BLEU-4 / METEOR / CIDEr, beam)",
                     f"{b['bleu4']:.3f} / {b['meteor']:.3f} / {b['cider']:.3f} on {metrics['n_images']} dev images"))
    append_report("The real captioner on real photos (bench_real.py)", rows, [
        f"photos: {photos_dir} ({len(photos)}); warm = the champion loaded once, {args.requests} calls of "
        "predict on the first photo's bytes, as captioner caption hands them over",
        "index: `captioner index DIR --db NEW -q` as a subprocess, minus the same on an empty folder "
        "(Python start, MLflow, model load)",
        f"dev quality beside bench_quality.py: `benchmarks/bench_quality.py --load {work / 'models'} --data DIR` "
        "scores the same decoder on the same folder"])


if __name__ == "__main__":
    main()
