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
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.atomic import atomic_path, write_json, write_parquet
from pipeline.captioning import confidence as conf
from pipeline.captioning.caption_choice import CaptionChooser
from pipeline.captioning.cider import CiderD
from pipeline.captioning.consensus import Neighbours
from pipeline.captioning.decoder import StepModels, decoder_rows, decoding_models, load_decoder
from pipeline.captioning.metrics import JavaMissingError
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import ConfidenceSettings, DecodingSettings, Settings
from pipeline.data.caption_text import references_by_image
from pipeline.data.features_file import read_feature_rows, row_index, rows_of
from pipeline.data.sources import prepared_captions
from pipeline.registry.tracking import resume_run
from pipeline.stages._cli import reported, require, stage_main

log = logging.getLogger("pipeline.calibrate")


@dataclass
class Observed:
    """A split's photos captioned as the served model captions them, with what a confidence is
    fitted on and judged by: per photo its caption, signals, METEOR (the mean over its sets of
    four references), CIDEr-D, and the METEOR of each human caption against the other four."""

    names: list[str]
    captions: list[str]
    signals: np.ndarray
    meteor: np.ndarray
    cider: np.ndarray
    human_meteor: np.ndarray
    references: list

    def acceptable(self, line: float) -> np.ndarray:
        return (self.meteor >= line).astype(int)

    @property
    def novelty(self) -> np.ndarray:
        return self.signals[:, conf.SIGNALS.index("novelty")]


def observe(models: StepModels, vocab: Vocabulary, captions: pd.DataFrame, images: list[str], features: np.ndarray,
            neighbours: Neighbours, decoding: DecodingSettings, cfg: ConfidenceSettings, split: str = "dev") -> Observed:
    """Caption ``split``'s photos as the served model will and score them (``Observed``).
    ValueError when the split is empty or a photo has no features."""
    names, references = references_by_image(captions, split)
    if not names:
        raise ValueError(f"the {split} split has no captions to calibrate on")
    feats = features[rows_of(row_index(images), names)]
    chooser = CaptionChooser(models, vocab, decoding, neighbours)
    log.info("captioning %d %s photos as the served model will (beam %d)", len(names), split, decoding.beam_size)
    pools = chooser.choose(feats, progress=True)
    signals = conf.SignalMaker(neighbours, cfg.novelty_neighbours).signals(feats, pools, vocab.decode)
    texts = [vocab.decode(pool[0].caption.tokens) for pool in pools]
    words = [t.split() for t in texts]
    log.info("scoring every %s caption, people's and the model's, by METEOR (Java)", split)
    human, meteor = conf.leave_one_out_meteor(words, references)
    cider = CiderD(references).score(words, range(len(texts)))
    return Observed(names, texts, signals, meteor, np.asarray(cider, np.float64), human, references)


def novelty_threshold(novelty: np.ndarray, quantile: float) -> float:
    """The novelty ``quantile`` of in-domain photos stay under (never below one of them for a tiny split)."""
    return float(np.quantile(novelty, quantile, method="higher"))


def fit_observed(seen: Observed, cfg: ConfidenceSettings, beam_size: int,
                 rows: np.ndarray | None = None) -> conf.Calibration:
    """The calibration (and novelty threshold) fitted on ``seen``'s photos (``rows`` of them)."""
    rows = np.arange(len(seen.names)) if rows is None else rows
    line = float(np.quantile(seen.human_meteor, cfg.human_quantile)) if len(seen.human_meteor) else 0.0
    return conf.fit(seen.signals[rows], seen.acceptable(line)[rows],
                    novelty_threshold=novelty_threshold(seen.novelty[rows], cfg.novelty_quantile),
                    novelty_quantile=cfg.novelty_quantile, novelty_neighbours=cfg.novelty_neighbours,
                    acceptable_meteor=line, beam_size=beam_size, seed=cfg.seed)


def cross_fitted(seen: Observed, cfg: ConfidenceSettings, beam_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(each photo's confidence, whether it abstains), both from a fit on the other folds
    (``confidence.folds``): the calibration and the novelty threshold never see the photo they judge."""
    n = len(seen.names)
    folds = max(2, min(cfg.folds, n))
    order = np.random.default_rng(cfg.seed).permutation(n)
    prob, abstained = np.empty(n), np.zeros(n, bool)
    for f in range(folds):
        held = order[f::folds]
        fitted = fit_observed(seen, cfg, beam_size, np.setdiff1d(order, held))
        prob[held] = fitted.probability(seen.signals[held])
        abstained[held] = seen.novelty[held] > fitted.novelty_threshold
    return prob, abstained


def calibrate_model(models: StepModels, vocab: Vocabulary, captions: pd.DataFrame, images: list[str],
                    features: np.ndarray, neighbours: Neighbours, decoding: DecodingSettings,
                    cfg: ConfidenceSettings, min_confidence: float) -> tuple[conf.Calibration, dict, pd.DataFrame]:
    """Pure core: (the calibration fitted on every dev photo, the cross-fitted report, one row per
    dev photo). ValueError when the dev split is empty or a photo has no features."""
    seen = observe(models, vocab, captions, images, features, neighbours, decoding, cfg)
    calibration = fit_observed(seen, cfg, decoding.beam_size)
    line = calibration.acceptable_meteor
    acceptable = seen.acceptable(line)
    crossed, abstained = cross_fitted(seen, cfg, decoding.beam_size)
    report = {"dev_photos": len(seen.names), "acceptable_meteor": line, "human_quantile": cfg.human_quantile,
              "human_captions_scored": int(len(seen.human_meteor)), "acceptable_share": float(acceptable.mean()),
              "novelty_threshold": calibration.novelty_threshold, "novelty_quantile": cfg.novelty_quantile,
              "abstain_dev": float(abstained.mean()), "folds": cfg.folds,
              **conf.judged(crossed, acceptable, abstained, seen.cider, min_confidence),
              "coefficients": dict(zip(conf.SIGNALS, calibration.coef))}
    table = pd.DataFrame({"image": seen.names, "caption": seen.captions,
                          **{s: seen.signals[:, i] for i, s in enumerate(conf.SIGNALS)},
                          "meteor": seen.meteor, "cider": seen.cider, "acceptable": acceptable.astype(bool),
                          "confidence": crossed, "abstained": abstained,
                          "references": [" | ".join(" ".join(r) for r in refs) for refs in seen.references]})
    return calibration, report, table


def run(settings: Settings) -> dict:
    feature_file = paths.features_file(settings.features.backbone)
    require(paths.DECODER, paths.VOCAB, paths.NEIGHBOURS, paths.CAPTIONS, feature_file)
    captions = prepared_captions()
    images, rows, _, grid = read_feature_rows(feature_file)
    with reported(JavaMissingError, ValueError):
        decoder = load_decoder(paths.DECODER)
        features = decoder_rows(decoder, rows, grid, feature_file, paths.DECODER)
        calibration, report, table = calibrate_model(
            decoding_models(decoder), Vocabulary.load(paths.VOCAB), captions, images, features,
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
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
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
