"""Stage ``evaluate``: caption the test split and score it -> ``metrics/eval.json``.

Three decoders are scored on the same images and references: ``greedy``, ``beam``
(``evaluate.beam_size``) and ``baseline``, the same decoder and beam search fed the mean
train feature vector for every image (image-blind), which shows what the image adds.
Also writes ``reports/test_captions.parquet`` and ``reports/gallery.html``, and logs all of it
to the training run in MLflow.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from .. import paths
from ..config import Settings
from ..decoding import beam_search, greedy
from ..gallery import render
from ..metrics import JavaMissingError, score
from ..model import StepModels, load_decoder
from ..text import Vocabulary
from ..tracking import flatten, resume_run
from ._cli import StageError, stage_main
from .features import read_features

log = logging.getLogger("pipeline.evaluate")
MODES = ("greedy", "beam", "baseline")


def evaluate_model(models: StepModels, vocab: Vocabulary, captions: pd.DataFrame, images: list[str],
                   features: np.ndarray, settings: Settings) -> tuple[dict, pd.DataFrame]:
    """Pure core: (metrics per mode, one row per test image with its captions)."""
    cfg = settings.evaluate
    index = {name: i for i, name in enumerate(images)}
    test = captions[captions["split"] == "test"]
    if test.empty:
        raise StageError("the test split has no captions")
    refs = test.groupby("image")["caption"].apply(list)
    test_images = list(refs.index)
    feats = features[[index[n] for n in test_images]]
    train_images = captions.loc[captions["split"] == "train", "image"].unique()
    mean_feature = features[[index[n] for n in train_images]].mean(axis=0, keepdims=True)
    beam_kwargs = dict(beam_size=cfg.beam_size, length_penalty=cfg.length_penalty,
                       no_repeat_ngram=cfg.no_repeat_ngram, batch_size=cfg.batch_size)
    decoded = {
        "greedy": greedy(models, feats, vocab, no_repeat_ngram=cfg.no_repeat_ngram,
                         batch_size=cfg.batch_size),
        "beam": beam_search(models, feats, vocab, **beam_kwargs),
        # Image-blind: one caption for the mean train image, used for every test image.
        "baseline": beam_search(models, mean_feature, vocab, **beam_kwargs) * len(test_images),
    }
    texts = {mode: [vocab.decode(c.tokens) for c in decoded[mode]] for mode in MODES}
    references = [[r.split() for r in refs[n]] for n in test_images]
    metrics: dict = {"n_images": len(test_images), "beam_size": cfg.beam_size}
    for mode in MODES:
        metrics[mode] = score(references, [t.split() for t in texts[mode]])
    table = pd.DataFrame({
        "image": test_images,
        "greedy": texts["greedy"],
        "beam": texts["beam"],
        "beam_log_prob": [c.log_prob for c in decoded["beam"]],
        "references": [list(refs[n]) for n in test_images],
    })
    return metrics, table


def run(settings: Settings) -> dict:
    for needed in (paths.DECODER, paths.VOCAB, paths.CAPTIONS):
        if not needed.is_file():
            raise StageError(f"{needed} not found: run the earlier stages first (dvc repro)")
    vocab = Vocabulary.load(paths.VOCAB)
    models = StepModels.from_decoder(load_decoder(paths.DECODER))
    captions = pd.read_parquet(paths.CAPTIONS)
    images, features, _ = read_features(paths.features_file(settings.features.backbone))
    try:
        metrics, table = evaluate_model(models, vocab, captions, images, features, settings)
    except JavaMissingError as err:
        raise StageError(str(err)) from None
    paths.METRICS_DIR.mkdir(parents=True, exist_ok=True)
    paths.EVAL_METRICS.write_text(json.dumps(metrics, indent=2))
    table.to_parquet(paths.TEST_CAPTIONS, index=False)
    image_dir = paths.dataset_dir(settings.data.source) / paths.IMAGES_SUBDIR
    items = [{"path": image_dir / r.image, "image": r.image, "beam": r.beam, "greedy": r.greedy,
              "references": r.references} for r in table.head(settings.evaluate.gallery_size).itertuples()]
    b, base = metrics["beam"], metrics["baseline"]
    summary = (f"{metrics['n_images']} test images. Beam-{metrics['beam_size']}: BLEU-4 {b['bleu4']:.3f}, "
               f"METEOR {b['meteor']:.3f}, CIDEr {b['cider']:.3f}; image-blind baseline: "
               f"BLEU-4 {base['bleu4']:.3f}, CIDEr {base['cider']:.3f}.")
    paths.GALLERY.write_text(render(items, "captioner: test images", summary), encoding="utf-8")
    with resume_run(settings, paths.TRAIN_RUN, "evaluate") as active:
        import mlflow

        mlflow.log_metrics({k.replace(".", "_"): v for k, v in flatten("", {m: metrics[m] for m in MODES}).items()})
        for artifact in (paths.EVAL_METRICS, paths.GALLERY, paths.TEST_CAPTIONS):
            mlflow.log_artifact(str(artifact))
        log.info("logged to MLflow run %s", active.info.run_id)
    log.info(summary)
    return metrics


def main() -> None:
    stage_main("evaluate", __doc__, run)


if __name__ == "__main__":
    main()
