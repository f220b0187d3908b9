"""Stage ``evaluate``: caption the test split and score it -> ``metrics/eval.json``.

Three decoders are scored on the same images and references: ``greedy``, ``beam`` (the
caption the ``decoding`` settings choose, as the registered model will: beam search, with
``decoding.consensus`` its candidates and sampled ones reranked by agreement with the captions
of similar train images, ``models/neighbours.npz``; see ``pipeline/captioning/caption_choice.py``)
and ``baseline``, the same decoder and beam search fed the mean train feature vector for every
image (image-blind), which shows what the image adds.
The registry's current champion (if any, and if it loads) captions the same test images in
the mode of ``register.metric``; ``reports/test_scores.parquet`` holds per-image scores of both
(``pipeline/captioning/comparison.py``), so ``register`` judges them on the same images. A champion that
cannot be loaded is recorded (``eval.json`` ``champion.status``), never fatal.
Also writes ``reports/test_captions.parquet`` and ``reports/gallery.html``, and logs all of it
to the training run in MLflow.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.atomic import write_json, write_parquet, write_text
from pipeline.captioning.caption_choice import CaptionChooser
from pipeline.captioning.comparison import per_image_scores
from pipeline.captioning.consensus import Neighbours
from pipeline.captioning.decoder import StepModels, decoding_models, load_decoder
from pipeline.captioning.decoding import beam_search, greedy
from pipeline.captioning.gallery import render
from pipeline.captioning.metrics import JavaMissingError, caption_health, score
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import DecodingSettings, Settings
from pipeline.data.features_file import read_features, row_index, rows_of
from pipeline.data.flickr8k import image_file
from pipeline.registry.champion import caption_with_champion
from pipeline.registry.tracking import flatten, resume_run, setup
from pipeline.stages._cli import reported, require, stage_main

log = logging.getLogger("pipeline.evaluate")
MODES = ("greedy", "beam", "baseline")
HEALTH = "caption_health"  # per mode: distinct captions and words, repeats, length


def evaluate_model(models: StepModels, vocab: Vocabulary, captions: pd.DataFrame, images: list[str],
                   features: np.ndarray, decoding: DecodingSettings,
                   neighbours: Neighbours | None = None) -> tuple[dict, pd.DataFrame]:
    """Pure core: (metrics per mode, one row per test image with its captions). With
    ``decoding.consensus.neighbours`` > 0 the beam is reranked by consensus with the
    ``neighbours`` (by default the train split of ``captions``; ``run`` passes the file the
    served model carries); the image-blind baseline keeps the decoder's ranking. Raises
    ValueError when the test split is empty or an image has no features."""
    index = row_index(images)
    test = captions[captions["split"] == "test"]
    if test.empty:
        raise ValueError("the test split has no captions")
    refs = test.groupby("image")["caption"].apply(list)
    test_images = list(refs.index)
    feats = features[rows_of(index, test_images)]
    train_images = captions.loc[captions["split"] == "train", "image"].unique()
    mean_feature = features[rows_of(index, train_images)].mean(axis=0, keepdims=True)
    d = decoding
    if d.consensus.neighbours and neighbours is None:
        neighbours = Neighbours.from_split(captions, "train", images, features)
    chooser = CaptionChooser(models, vocab, d, neighbours)
    log.info("decoding %d test images (greedy, beam-%d%s, image-blind baseline)", len(test_images),
             d.beam_size, f" reranked by consensus with {chooser.scorer.k} train images" if chooser.scorer else "")
    decoded = {
        "greedy": greedy(models, feats, vocab, no_repeat_ngram=d.no_repeat_ngram,
                         batch_size=d.batch_size, progress="greedy"),
        "beam": [ranked[0].caption for ranked in chooser.choose(feats, progress=True)],
        # Image-blind: one caption for the mean train image, used for every test image.
        "baseline": beam_search(models, mean_feature, vocab, beam_size=d.beam_size, length_penalty=d.length_penalty,
                                no_repeat_ngram=d.no_repeat_ngram, batch_size=d.batch_size) * len(test_images),
    }
    texts = {mode: [vocab.decode(c.tokens) for c in decoded[mode]] for mode in MODES}
    references = [[r.split() for r in refs[n]] for n in test_images]
    metrics: dict = {"n_images": len(test_images), "beam_size": d.beam_size,
                     "consensus_neighbours": d.consensus.neighbours, "consensus_samples": d.consensus.samples,
                     "consensus_contrast": d.consensus.contrast}
    for mode in MODES:
        log.info("scoring %s captions (BLEU, METEOR in Java, ROUGE-L, CIDEr)", mode)
        metrics[mode] = score(references, [t.split() for t in texts[mode]])
    metrics[HEALTH] = {mode: caption_health([t.split() for t in texts[mode]], references)
                       for mode in ("greedy", "beam")}
    table = pd.DataFrame({
        "image": test_images,
        "greedy": texts["greedy"],
        "beam": texts["beam"],
        "beam_log_prob": [c.log_prob for c in decoded["beam"]],
        "references": [list(refs[n]) for n in test_images],
    })
    return metrics, table


def scores_table(table: pd.DataFrame, references: list, model: str, mode: str,
                 captions: list[str]) -> pd.DataFrame:
    """Per-image scores of ``captions`` (one per row of ``table``) against the tokenised
    ``references`` of those rows."""
    stats = per_image_scores(references, [c.split() for c in captions])
    return pd.concat([pd.DataFrame({"image": table["image"], "model": model, "mode": mode}), stats],
                     axis=1)


def compare_with_champion(settings: Settings, table: pd.DataFrame, image_dir) -> tuple[dict, pd.DataFrame]:
    """(champion summary with its metrics, per-image scores of the new model and the champion)
    on the test images of ``table``, in the mode of register.metric."""
    from mlflow import MlflowClient

    from pipeline.captioning.metrics import score

    mode = settings.registry.mode
    beam = settings.decoding.beam_size if mode == "beam" else 1
    references = [[r.split() for r in refs] for refs in table["references"]]
    scores = scores_table(table, references, "candidate", mode, table[mode].tolist())
    log.info("captioning the test images with the registry's champion (beam size %d)", beam)
    run = caption_with_champion(MlflowClient(), settings.registry.model_name,
                                [image_file(image_dir, name) for name in table["image"]], beam)
    summary = {**run.summary(), "mode": mode}
    if run.status == "scored":
        summary[mode] = score(references, [c.split() for c in run.captions])
        scores = pd.concat([scores, scores_table(table, references, "champion", mode, run.captions)],
                           ignore_index=True)
    return summary, scores


CAPTION_TABLE = "test_captions.json"


def caption_table(table: pd.DataFrame) -> pd.DataFrame:
    """What the model wrote for each test image, next to what people wrote."""
    return pd.DataFrame({"image": table["image"], "beam": table["beam"], "greedy": table["greedy"],
                         "references": [" | ".join(refs) for refs in table["references"]]})


def run(settings: Settings) -> dict:
    feature_file = paths.features_file(settings.features.backbone)
    consensus = settings.decoding.consensus.neighbours > 0
    require(paths.DECODER, paths.VOCAB, paths.CAPTIONS, feature_file, *([paths.NEIGHBOURS] if consensus else []))
    vocab = Vocabulary.load(paths.VOCAB)
    models = decoding_models(load_decoder(paths.DECODER))
    captions = pd.read_parquet(paths.CAPTIONS)
    images, features, _ = read_features(feature_file)
    image_dir = paths.dataset_dir(settings.data.source) / paths.IMAGES_SUBDIR
    setup(settings)
    with reported(JavaMissingError, ValueError):
        neighbours = Neighbours.load(paths.NEIGHBOURS) if consensus else None
        metrics, table = evaluate_model(models, vocab, captions, images, features, settings.decoding, neighbours)
        metrics["champion"], scores = compare_with_champion(settings, table, image_dir)
    write_json(paths.EVAL_METRICS, metrics)
    write_parquet(table, paths.TEST_CAPTIONS)
    write_parquet(scores, paths.TEST_SCORES)
    items = [{"path": image_file(image_dir, r.image), "image": r.image, "beam": r.beam, "greedy": r.greedy,
              "references": r.references} for r in table.head(settings.evaluate.gallery_size).itertuples()]
    b, base, health = metrics["beam"], metrics["baseline"], metrics[HEALTH]["beam"]
    samples = f" (+ {metrics['consensus_samples']} samples per image)" if metrics["consensus_samples"] else ""
    reranked = (f" reranked by consensus with {metrics['consensus_neighbours']} train images{samples}"
                if metrics["consensus_neighbours"] else "")
    summary = (f"{metrics['n_images']} test images. Beam-{metrics['beam_size']}{reranked}: BLEU-4 {b['bleu4']:.3f}, "
               f"METEOR {b['meteor']:.3f}, CIDEr {b['cider']:.3f}; image-blind baseline: "
               f"BLEU-4 {base['bleu4']:.3f}, CIDEr {base['cider']:.3f}. Caption health (beam): "
               f"{health['distinct_captions']} distinct captions for {health['images']} images, "
               f"{health['distinct_words']} distinct words, {health['repeated_bigram_share']:.0%} with a "
               f"repeated bigram, {health['unk_share']:.0%} with <unk>, mean length "
               f"{health['mean_length']:.1f} words (references {health['reference_mean_length']:.1f}).")
    write_text(paths.GALLERY, render(items, "captioner: test images", summary))
    with resume_run(settings, paths.TRAIN_RUN, "evaluate") as active:
        import mlflow

        mlflow.log_metrics({k.replace(".", "_"): v for k, v in
                            flatten("", {m: metrics[m] for m in (*MODES, HEALTH)}).items()})
        for artifact in (paths.EVAL_METRICS, paths.GALLERY, paths.TEST_CAPTIONS, paths.TEST_SCORES):
            mlflow.log_artifact(str(artifact))
        # The same captions as a table the UI shows (Artifacts, and Evaluation's table view)
        mlflow.log_table(caption_table(table), artifact_file=CAPTION_TABLE)
        log.info("logged to MLflow run %s", active.info.run_id)
    log.info(summary)
    return metrics


def main() -> None:
    stage_main("evaluate", __doc__, run)


if __name__ == "__main__":
    main()
