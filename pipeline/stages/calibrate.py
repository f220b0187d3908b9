"""Stage ``calibrate``: how sure the decoder is of its captions, fitted on dev -> ``models/confidence.json``.

The dev photos are captioned as the registered model will caption them (``decoding``), and each
caption's signals are measured (``pipeline/captioning/confidence.py``). Whether a caption is
*acceptable* is decided against people, never by a number picked here: every human caption of a
dev photo is scored (METEOR 1.5) against the photo's other four, and the ``confidence.human_quantile``
of those scores (the weaker quarter of people) is the line; the model's caption is scored against
the same sets of four references (the mean over them) and is acceptable when it reaches the line.

A logistic regression from the signals to acceptable is fitted on all dev photos and stored with
the novelty threshold (the ``confidence.novelty_quantile`` of the dev photos' novelty) in
``models/confidence.json``, which ``register`` packs into the served model. What is reported is
cross-fitted (``confidence.folds``: each photo's confidence comes from a fit on the other folds):
``reports/confidence.json`` (expected calibration error, reliability per bin, precision and
coverage at each threshold and at ``alt_text.min_confidence``, Spearman correlation with each
caption's CIDEr-D, the CIDEr-D of the most and least confident halves), ``reports/reliability.png``
and ``reports/dev_confidence.parquet`` (per photo: caption, signals, METEOR, confidence); all logged
to the training run in MLflow.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.atomic import atomic_path, write_json, write_parquet
from pipeline.captioning import confidence as conf
from pipeline.captioning.caption_choice import CaptionChooser
from pipeline.captioning.cider import CiderD
from pipeline.captioning.consensus import Neighbours
from pipeline.captioning.decoder import StepModels, decoding_models, load_decoder
from pipeline.captioning.metrics import JavaMissingError, per_item_meteor
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import ConfidenceSettings, DecodingSettings, Settings
from pipeline.data.caption_text import references_by_image
from pipeline.data.features_file import read_features, row_index, rows_of
from pipeline.data.sources import prepared_captions
from pipeline.registry.tracking import resume_run
from pipeline.stages._cli import reported, require, stage_main

log = logging.getLogger("pipeline.calibrate")


def leave_one_out_meteor(captions: list[list[str]], references: list[list[list[str]]]) -> tuple[np.ndarray, np.ndarray]:
    """(each human caption's METEOR against the photo's other references, flattened; each
    ``captions[i]``'s mean METEOR over the same sets of references), in one Java run."""
    pairs, humans, owner = [], 0, []
    for refs in references:
        for j in range(len(refs)):
            if len(refs) > 1:
                pairs.append((refs[j], refs[:j] + refs[j + 1:]))
                humans += 1
    for i, (caption, refs) in enumerate(zip(captions, references)):
        sets = [refs[:j] + refs[j + 1:] for j in range(len(refs))] if len(refs) > 1 else [refs]
        for others in sets:
            pairs.append((caption, others))
            owner.append(i)
    scores = per_item_meteor(pairs)
    model = np.bincount(owner, weights=scores[humans:], minlength=len(captions)) / np.bincount(owner, minlength=len(captions))
    return scores[:humans], model


def judged(prob: np.ndarray, acceptable: np.ndarray, abstained: np.ndarray, cider: np.ndarray,
           min_confidence: float) -> dict:
    """What a confidence is worth on photos it was not fitted on (``prob``: cross-fitted)."""
    from scipy.stats import spearmanr

    order = np.argsort(-prob, kind="stable")
    half = len(prob) // 2
    top, bottom = cider[order[:half]].mean() if half else 0.0, cider[order[half:]].mean() if half else 0.0
    at_default = conf.precision_coverage(prob, acceptable, abstained, [min_confidence])[0]
    rho = spearmanr(prob, cider).statistic if len(prob) > 2 and np.ptp(prob) > 0 else 0.0
    return {"ece": conf.expected_calibration_error(prob, acceptable),
            "spearman": float(0.0 if np.isnan(rho) else rho),
            "top_half_cider": float(top), "bottom_half_cider": float(bottom),
            "top_bottom_ratio": float(top / bottom) if bottom > 0 else None,
            "min_confidence": min_confidence,
            "precision_at_default": at_default["precision"], "coverage_at_default": at_default["coverage"],
            "reliability": conf.reliability(prob, acceptable),
            "precision_coverage": conf.precision_coverage(prob, acceptable, abstained)}


def calibrate_model(models: StepModels, vocab: Vocabulary, captions: pd.DataFrame, images: list[str],
                    features: np.ndarray, neighbours: Neighbours, decoding: DecodingSettings,
                    cfg: ConfidenceSettings, min_confidence: float) -> tuple[conf.Calibration, dict, pd.DataFrame]:
    """Pure core: (the calibration fitted on every dev photo, the cross-fitted report, one row per
    dev photo). ValueError when the dev split is empty or a photo has no features."""
    names, references = references_by_image(captions, "dev")
    if not names:
        raise ValueError("the dev split has no captions to calibrate on")
    feats = features[rows_of(row_index(images), names)]
    chooser = CaptionChooser(models, vocab, decoding, neighbours)
    log.info("captioning %d dev photos as the served model will (beam %d)", len(names), decoding.beam_size)
    pools = chooser.choose(feats, progress=True)
    signals = conf.SignalMaker(neighbours, cfg.novelty_neighbours).signals(feats, pools, vocab.decode)
    texts = [vocab.decode(pool[0].caption.tokens) for pool in pools]
    log.info("scoring every dev caption, people's and the model's, by METEOR (Java)")
    human, model_meteor = leave_one_out_meteor([t.split() for t in texts], references)
    line = float(np.quantile(human, cfg.human_quantile)) if len(human) else 0.0
    acceptable = (model_meteor >= line).astype(int)
    novelty = signals[:, conf.SIGNALS.index("novelty")]
    threshold = float(np.quantile(novelty, cfg.novelty_quantile, method="higher"))  # never below a dev photo for a tiny split
    fit_args = dict(novelty_threshold=threshold, novelty_quantile=cfg.novelty_quantile,
                    novelty_neighbours=cfg.novelty_neighbours, acceptable_meteor=line,
                    beam_size=decoding.beam_size, seed=cfg.seed)
    crossed = conf.cross_fitted(signals, acceptable, cfg.folds, **fit_args)
    calibration = conf.fit(signals, acceptable, **fit_args)
    cider = CiderD(references).score([t.split() for t in texts], range(len(texts)))
    abstained = novelty > threshold
    report = {"dev_photos": len(names), "acceptable_meteor": line, "human_quantile": cfg.human_quantile,
              "human_captions_scored": int(len(human)), "acceptable_share": float(acceptable.mean()),
              "novelty_threshold": threshold, "novelty_quantile": cfg.novelty_quantile,
              "abstain_dev": float(abstained.mean()), "folds": cfg.folds,
              **judged(crossed, acceptable, abstained, cider, min_confidence),
              "coefficients": dict(zip(conf.SIGNALS, calibration.coef))}
    table = pd.DataFrame({"image": names, "caption": texts, **{s: signals[:, i] for i, s in enumerate(conf.SIGNALS)},
                          "meteor": model_meteor, "cider": cider, "acceptable": acceptable.astype(bool),
                          "confidence": crossed, "abstained": abstained,
                          "references": [" | ".join(" ".join(r) for r in refs) for refs in references]})
    return calibration, report, table


def run(settings: Settings) -> dict:
    feature_file = paths.features_file(settings.features.backbone)
    require(paths.DECODER, paths.VOCAB, paths.NEIGHBOURS, paths.CAPTIONS, feature_file)
    captions = prepared_captions()
    images, features, _ = read_features(feature_file)
    with reported(JavaMissingError, ValueError):
        calibration, report, table = calibrate_model(
            decoding_models(load_decoder(paths.DECODER)), Vocabulary.load(paths.VOCAB), captions, images, features,
            Neighbours.load(paths.NEIGHBOURS), settings.decoding, settings.confidence, settings.alt_text.min_confidence)
    with atomic_path(paths.CONFIDENCE) as tmp:
        calibration.save(tmp)
    write_json(paths.CONFIDENCE_REPORT, report)
    write_parquet(table, paths.DEV_CONFIDENCE)
    with atomic_path(paths.RELIABILITY_PLOT) as tmp:
        conf.plot_reliability(report["reliability"], tmp, f"dev, cross-fitted ({report['folds']} folds): "
                              f"ECE {report['ece']:.3f}")
    with resume_run(settings, paths.TRAIN_RUN, "calibrate"):
        import mlflow

        mlflow.log_metrics({f"confidence_{k}": v for k, v in report.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None})
        for artifact in (paths.CONFIDENCE, paths.CONFIDENCE_REPORT, paths.RELIABILITY_PLOT):
            mlflow.log_artifact(str(artifact))
    precision = report["precision_at_default"]
    log.info("dev, cross-fitted: ECE %.3f, Spearman with CIDEr-D %.2f, most/least confident half CIDEr-D %.2fx; "
             "at confidence >= %.2f precision %s, coverage %.0f%%; %.1f%% of dev photos abstain",
             report["ece"], report["spearman"], report["top_bottom_ratio"] or 0.0, report["min_confidence"],
             "n/a" if precision is None else f"{precision:.2f}", 100 * report["coverage_at_default"],
             100 * report["abstain_dev"])
    return report


def main() -> None:
    stage_main("calibrate", __doc__, run)


if __name__ == "__main__":
    main()
