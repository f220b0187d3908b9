"""What ``make run`` prints after ``dvc repro``: captions for a few test images by the
champion model, and where the metrics, gallery and MLflow store are."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from pipeline import paths
from pipeline.config import load_settings


def main() -> None:
    settings = load_settings()
    test = pd.read_parquet(paths.CAPTIONS)
    images = sorted(test.loc[test["split"] == "test", "image"].unique())[:4]
    folder = paths.dataset_dir(settings.data.source) / paths.IMAGES_SUBDIR
    print("\n== Captions by the champion model (captioner caption ...) ==", flush=True)
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "caption",
                           *[str(folder / i) for i in images]], check=False)
    if done.returncode == 2:
        print("(the MLflow store has no champion: it was reset after the pipeline ran; "
              "`source .venv/bin/activate && dvc repro -f -s register` registers the model again)")
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    registry = json.loads(paths.REGISTRY_REPORT.read_text())
    print("\n== Test-split scores (metrics/eval.json) ==")
    shown = ("bleu1", "bleu4", "meteor", "rouge_l", "cider")
    print(f"{'':10s}" + "".join(f"{k:>9s}" for k in shown))
    for mode in ("greedy", "beam", "baseline"):
        print(f"{mode:10s}" + "".join(f"{metrics[mode][k]:9.3f}" for k in shown))
    health = metrics.get("caption_health", {}).get("beam")
    if health:
        print(f"caption health (beam): {health['distinct_captions']} distinct captions for "
              f"{health['images']} images, {health['distinct_words']} distinct words, "
              f"{health['repeated_bigram_share']:.0%} repeat a bigram, mean length "
              f"{health['mean_length']:.1f} (references {health['reference_mean_length']:.1f})")
    sure = metrics.get("confidence")
    if sure:
        precision = "n/a" if sure["precision_at_default"] is None else f"{sure['precision_at_default']:.2f}"
        print(f"confidence (calibrated on dev, judged on test): calibration error {sure['ece']:.3f}; at "
              f"{sure['min_confidence']:g}, precision {precision}, coverage {sure['coverage_at_default']:.0%}; "
              f"{sure['abstained']:.0%} abstained (reports/confidence.json, reports/reliability.png)")
    print(f"\nregistry: {registry['model_name']} v{registry['version']} -> {registry['decision']} "
          f"(champion: v{registry['champion']})")
    print(f"gallery:  {paths.GALLERY}\nmetrics:  {paths.EVAL_METRICS}\n"
          f"MLflow:   {registry['tracking_uri']}  (make ui -> http://127.0.0.1:5000)")


if __name__ == "__main__":
    main()
