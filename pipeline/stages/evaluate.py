"""Stage ``evaluate``: caption the test split and score it -> ``metrics/eval.json``.

Three decoders are scored on the same images and references: ``greedy``, ``beam`` (the
caption the ``decoding`` settings choose, as the registered model will: beam search, with
``decoding.consensus`` its candidates and sampled ones reranked by agreement with the captions
of similar train images, ``models/neighbours.npz``; see ``pipeline/captioning/caption_choice.py``)
and ``baseline``, the same decoder and beam search fed the mean train feature vector for every
image (image-blind), which shows what the image adds.
The registry's current champion (if any, and if it loads) captions the same test images in
the mode of ``register.metric``; ``reports/test_scores.parquet`` holds per-image scores of both
(``pipeline/captioning/comparison.py``), so ``register`` judges them on the same images. A champion whose
files are gone or whose code cannot run is recorded (``eval.json`` ``champion.status``/``cause``); a
registry that cannot say or hand over what the champion is stops the stage (nothing written), so
no model is promoted unjudged.
When people's corrections hold photos out (split ``feedback``, see the ``feedback`` stage), both
models are scored on them too, against the corrections (``eval.json`` ``feedback``, rows of
``test_scores.parquet`` with ``set`` = ``feedback``).
With the calibration the ``calibrate`` stage fitted on dev (``models/confidence.json``), each test
caption also gets the confidence and abstention the served model would give it, and ``eval.json``
``confidence`` says what they are worth on images the calibration never saw (calibration error,
precision and coverage at ``alt_text.min_confidence``, the share abstained).
Also writes ``reports/test_captions.parquet`` and ``reports/gallery.html``, and logs all of it
to the training run in MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.atomic import write_json, write_parquet, write_text
from pipeline.captioning.attention_strip import draw_strips, png_bytes
from pipeline.captioning.caption_choice import CaptionChooser
from pipeline.captioning.comparison import per_image_scores
from pipeline.captioning.confidence import (
    Calibration,
    Confidence,
    in_words,
    judged,
    leave_one_out_meteor,
)
from pipeline.captioning.consensus import Neighbours
from pipeline.captioning.decoder import (
    StepModels,
    decoder_rows,
    decoding_models,
    grid_of,
    load_decoder,
    members_of,
)
from pipeline.captioning.decoding import beam_search, greedy
from pipeline.captioning.gallery import render
from pipeline.captioning.metrics import JavaMissingError, caption_health, score
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import DecodingSettings, Settings
from pipeline.data.features_file import read_feature_rows, row_index, rows_of
from pipeline.data.sources import FEEDBACK_TEST, image_files, prepared_captions
from pipeline.registry.champion import caption_with_champion
from pipeline.registry.tracking import flatten, resume_run, setup
from pipeline.stages._cli import reported, require, stage_main

log = logging.getLogger("pipeline.evaluate")
MODES = ("greedy", "beam", "baseline")
HEALTH = "caption_health"  # per mode: distinct captions and words, repeats, length


def evaluate_model(models: StepModels, vocab: Vocabulary, captions: pd.DataFrame, images: list[str],
                   features: np.ndarray, decoding: DecodingSettings,
                   neighbours: Neighbours | None = None, split: str = "test",
                   calibration: Calibration | None = None, min_confidence: float = 0.8) -> tuple[dict, pd.DataFrame]:
    """Pure core: (metrics per mode, one row per image of ``split`` with its captions). With
    ``decoding.consensus.neighbours`` > 0 the beam is reranked by consensus with the
    ``neighbours`` (by default the train split of ``captions``; ``run`` passes the file the
    served model carries); the image-blind baseline keeps the decoder's ranking. With a
    ``calibration`` (stage calibrate, fitted on dev), each beam caption gets its confidence and
    abstention as served, and ``metrics["confidence"]`` says what they are worth on these images
    (calibration error, precision and coverage at ``min_confidence``, abstentions). Raises
    ValueError when the split is empty or an image has no features."""
    index = row_index(images)
    test = captions[captions["split"] == split]
    if test.empty:
        raise ValueError(f"the {split} split has no captions")
    refs = test.groupby("image")["caption"].apply(list)
    test_images = list(refs.index)
    feats = features[rows_of(index, test_images)]
    train_images = captions.loc[captions["split"] == "train", "image"].unique()
    mean_feature = features[rows_of(index, train_images)].mean(axis=0, keepdims=True)
    d = decoding
    if d.consensus.neighbours and neighbours is None:
        neighbours = Neighbours.from_split(captions, "train", images, features)
    chooser = CaptionChooser(models, vocab, d, neighbours)
    log.info("decoding %d %s images (greedy, beam-%d%s, image-blind baseline)", len(test_images), split,
             d.beam_size, f" reranked by consensus with {chooser.scorer.k} train images" if chooser.scorer else "")
    pools = chooser.choose(feats, progress=True)
    decoded = {
        "greedy": greedy(models, feats, vocab, no_repeat_ngram=d.no_repeat_ngram,
                         batch_size=d.batch_size, progress="greedy"),
        "beam": [ranked[0].caption for ranked in pools],
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
    if calibration is not None:
        table, metrics["confidence"] = judge_confidence(table, feats, pools, vocab, references, calibration,
                                                        neighbours or Neighbours.from_split(captions, "train", images, features),
                                                        min_confidence)
    return metrics, table


def judge_confidence(table: pd.DataFrame, feats: np.ndarray, pools, vocab: Vocabulary, references: list,
                     calibration: Calibration, neighbours: Neighbours, min_confidence: float) -> tuple[pd.DataFrame, dict]:
    """The served confidence of each beam caption, and what it is worth against people here."""
    from pipeline.captioning.cider import CiderD

    said = Confidence(calibration, neighbours).describe(feats, pools, vocab.decode)
    prob = np.array([s["confidence"] for s in said], float)
    abstained = np.array([s["abstained"] for s in said])
    beams = [t.split() for t in table["beam"]]
    log.info("scoring the beam captions' confidence against people (METEOR, Java)")
    _, meteor = leave_one_out_meteor(beams, references, with_people=False)  # the line was drawn on dev
    acceptable = (meteor >= calibration.acceptable_meteor).astype(int)
    found = judged(prob, acceptable, abstained, CiderD(references).score(beams, range(len(beams))), min_confidence)
    summary = {k: v for k, v in found.items() if not isinstance(v, list)}
    summary.update(abstained=float(abstained.mean()), acceptable_share=float(acceptable.mean()),
                   precision_coverage=found["precision_coverage"])
    return table.assign(confidence=prob, abstained=abstained, acceptable=acceptable.astype(bool)), summary


def scores_table(table: pd.DataFrame, references: list, model: str, mode: str,
                 captions: list[str]) -> pd.DataFrame:
    """Per-image scores of ``captions`` (one per row of ``table``) against the tokenised
    ``references`` of those rows."""
    stats = per_image_scores(references, [c.split() for c in captions])
    return pd.concat([pd.DataFrame({"image": table["image"], "model": model, "mode": mode}), stats],
                     axis=1)


def compare_with_champion(settings: Settings, tables: dict[str, pd.DataFrame],
                          files: dict[str, Path]) -> tuple[dict[str, dict], pd.DataFrame]:
    """The champion on the same images as the new model, for each image set of ``tables`` (the
    test split, the held-out corrections), captioned in one call in the mode of register.metric:
    ({set: champion summary with its metrics}, per-image scores of both models with a ``set``
    column)."""
    from mlflow import MlflowClient

    from pipeline.captioning.metrics import score

    mode = settings.registry.mode
    beam = settings.decoding.beam_size if mode == "beam" else 1
    names = [name for table in tables.values() for name in table["image"]]
    log.info("captioning %d images with the registry's champion (beam size %d)", len(names), beam)
    run = caption_with_champion(MlflowClient(), settings.registry.model_name, [files[n] for n in names], beam)
    summaries, frames, start = {}, [], 0
    for image_set, table in tables.items():
        references = [[r.split() for r in refs] for refs in table["references"]]
        frames.append(scores_table(table, references, "candidate", mode, table[mode].tolist()).assign(set=image_set))
        summaries[image_set] = {**run.summary(), "mode": mode}
        if run.status == "scored":
            captions = run.captions[start:start + len(table)]
            summaries[image_set][mode] = score(references, [c.split() for c in captions])
            frames.append(scores_table(table, references, "champion", mode, captions).assign(set=image_set))
        start += len(table)
    return summaries, pd.concat(frames, ignore_index=True)


CAPTION_TABLE = "test_captions.json"


def caption_table(table: pd.DataFrame) -> pd.DataFrame:
    """What the model wrote for each test image, next to what people wrote."""
    return pd.DataFrame({"image": table["image"], "beam": table["beam"], "greedy": table["greedy"],
                         "references": [" | ".join(refs) for refs in table["references"]]})


def run(settings: Settings) -> dict:
    feature_file = paths.features_file(settings.features.backbone)
    consensus = settings.decoding.consensus.neighbours > 0
    require(paths.DECODER, paths.VOCAB, paths.CAPTIONS, feature_file, *([paths.NEIGHBOURS] if consensus else []))
    captions = prepared_captions()
    with reported(ValueError):
        files = image_files(captions, settings.data.source)
    return evaluate(settings, captions, files)


def evaluate(settings: Settings, captions: pd.DataFrame, files: dict[str, Path]) -> dict:
    """Score the decoder in ``models/`` on the test split of ``captions`` with the features file,
    compare it with the champion, write and log the results (see the module docstring).
    ``files``: the photos of the images. The champion captions, and the gallery shows, the test
    images that have one: all of them in the pipeline; for ``captioner real-model``, whose
    features were computed elsewhere, the photos its folder holds."""
    consensus = settings.decoding.consensus.neighbours > 0
    vocab = Vocabulary.load(paths.VOCAB)
    feature_file = paths.features_file(settings.features.backbone)
    images, rows, _, grid = read_feature_rows(feature_file)
    setup(settings)
    with reported(JavaMissingError, ValueError):
        decoder = load_decoder(paths.DECODER)
        features = decoder_rows(decoder, rows, grid, feature_file, paths.DECODER)
        models = decoding_models(decoder)
        neighbours = Neighbours.load(paths.NEIGHBOURS) if consensus else None
        calibration = Calibration.load(paths.CONFIDENCE) if paths.CONFIDENCE.is_file() else None
        metrics, table = evaluate_model(models, vocab, captions, images, features, settings.decoding, neighbours,
                                        calibration=calibration, min_confidence=settings.alt_text.min_confidence)
        tables = {"test": table[table["image"].isin(files)].reset_index(drop=True)}
        if tables["test"].empty:
            raise ValueError("no test image has a photo to compare the champion on")
        if (captions["split"] == FEEDBACK_TEST).any():  # corrected photos held out from training
            feedback_metrics, tables["feedback"] = evaluate_model(
                models, vocab, captions, images, features, settings.decoding, neighbours, split=FEEDBACK_TEST)
            metrics["feedback"] = {k: feedback_metrics[k] for k in ("n_images", "greedy", "beam")}
        champion, scores = compare_with_champion(settings, tables, files)
        metrics["champion"] = champion["test"]
        if "feedback" in champion:
            metrics["feedback"]["champion"] = champion["feedback"]
    write_json(paths.EVAL_METRICS, metrics)
    write_parquet(table, paths.TEST_CAPTIONS)
    write_parquet(scores, paths.TEST_SCORES)
    shown = tables["test"].head(settings.evaluate.gallery_size)
    sure = (table.set_index("image")[["confidence", "abstained"]].to_dict("index") if "confidence" in table else {})
    items = [{"path": files[r.image], "image": r.image, "beam": r.beam, "greedy": r.greedy, "references": r.references,
              **({"sure": in_words(sure[r.image]["confidence"], bool(sure[r.image]["abstained"]))
                  + f" {sure[r.image]['confidence']:.2f}"} if r.image in sure else {})}
             for r in shown.itertuples()]
    strips = []
    if grid_of(members_of(decoder)[0]) is not None and items:  # where it looked, for each word
        shown_rows = features[rows_of(row_index(images), [item["image"] for item in items])]
        strips = draw_strips(decoder, vocab, shown_rows, [item["beam"] for item in items],
                             [item["path"] for item in items],
                             [item["beam"] + (f" ({item['sure']})" if "sure" in item else "") for item in items],
                             settings.validation.max_image_pixels)
        for item, strip in zip(items, strips):
            item["strip"] = png_bytes(strip)
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
    if "confidence" in metrics:
        c = metrics["confidence"]
        precision = "n/a" if c["precision_at_default"] is None else f"{c['precision_at_default']:.2f}"
        summary += (f" Confidence (calibrated on dev): expected calibration error {c['ece']:.3f} here; at "
                    f"{c['min_confidence']:g} precision {precision}, coverage {c['coverage_at_default']:.0%}; "
                    f"{c['abstained']:.0%} abstained.")
    if "feedback" in metrics:
        fb = metrics["feedback"]
        summary += (f" Held-out corrected photos ({fb['n_images']}): beam BLEU-4 {fb['beam']['bleu4']:.3f}, "
                    f"CIDEr {fb['beam']['cider']:.3f} against the corrections.")
    write_text(paths.GALLERY, render(items, "captioner: test images", summary, settings.validation.max_image_pixels))
    with resume_run(settings, paths.TRAIN_RUN, "evaluate") as active:
        import mlflow

        mlflow.log_metrics({k.replace(".", "_"): v for k, v in
                            flatten("", {m: metrics[m] for m in (*MODES, HEALTH)}).items()})
        if "feedback" in metrics:  # the held-out corrected photos, as feedback_beam_bleu4, ...
            mlflow.log_metrics({k.replace(".", "_"): v for k, v in flatten("feedback", {
                m: metrics["feedback"][m] for m in ("greedy", "beam")}).items()})
        if "confidence" in metrics:  # the dev-fitted confidence judged on the test images
            mlflow.log_metrics({f"test_confidence_{k}": v for k, v in metrics["confidence"].items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for artifact in (paths.EVAL_METRICS, paths.GALLERY, paths.TEST_CAPTIONS, paths.TEST_SCORES):
            mlflow.log_artifact(str(artifact))
        for item, strip in zip(items, strips):  # the run shows where it looked on a few test photos
            mlflow.log_image(strip, artifact_file=f"attention/{Path(item['image']).stem}.png")
        # The same captions as a table the UI shows (Artifacts, and Evaluation's table view)
        mlflow.log_table(caption_table(table), artifact_file=CAPTION_TABLE)
        log.info("logged to MLflow run %s", active.info.run_id)
    log.info(summary)
    return metrics


def main() -> None:
    stage_main("evaluate", __doc__, run)


if __name__ == "__main__":
    main()
