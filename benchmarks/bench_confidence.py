"""How sure the model is, measured on real Flickr8k and on real pictures unlike it.

Runs the ``calibrate`` stage's own code (``pipeline/stages/calibrate.py``) on a folder in the layout
of ``../shared/flickr8k_real`` (``--data``, the ``bench_quality.py`` convention: its dev split is
scored) and on a folder of out-of-domain pictures with the same CNN's features (``--ood``, the
layout of ``../shared/out_of_domain``; only measured, never fitted on):

* the decoder: ``--load DIR`` (``decoder.keras`` + ``vocab.json``, and ``neighbours.npz`` when there,
  e.g. ``real/models`` of ``captioner real-model``), else trained on the train split with ``train.*``;
* every dev photo captioned as the served model captions it (``decoding.*``), its signals, its
  METEOR against its sets of four references and the human line (``confidence.human_quantile``);
* the calibration and the novelty threshold are fitted on dev photos only: cross-fitted
  (``confidence.folds``) when ``--fit`` is ``--data`` (the default), so no photo is judged by a fit
  that saw it; with ``--fit OTHER``, fitted on OTHER's dev split in full and judged on ``--data``'s.

``--json FILE`` gets ``{"auroc", "abstain_ood", "abstain_in", "spearman", "top_bottom_ratio", "ece",
"precision_at_default", "coverage_at_default"}`` (fractions 0..1; ``abstain_in`` over ``--data``'s dev
photos; ``precision/coverage_at_default`` at ``alt_text.min_confidence``). The table goes to
``reports/benchmarks.md``, the reliability diagram to ``reports/confidence_reliability.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_quality import override  # noqa: E402
from benchmarks.common import PROJECT, append_report  # noqa: E402

REAL = PROJECT.parent / "shared" / "flickr8k_real"
OOD = PROJECT.parent / "shared" / "out_of_domain"


def read_ood(folder: Path):
    """(names, categories, pooled features) of an out-of-domain folder."""
    import numpy as np
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    pooled = [f for f in files if "grid" not in f.name]
    if len(pooled) != 1:
        raise SystemExit(f"--ood {folder}: expected one pooled-features Parquet file, found {[f.name for f in pooled]}")
    table = pq.read_table(pooled[0])
    names = table.column("image").to_pylist()
    categories = table.column("category").to_pylist() if "category" in table.column_names else ["?"] * len(names)
    features = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return names, categories, features, pooled[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REAL, help=f"folder scored (its dev split; default: {REAL})")
    parser.add_argument("--ood", type=Path, default=OOD, help=f"out-of-domain pictures' features (default: {OOD})")
    parser.add_argument("--fit", type=Path, default=None,
                        help="folder whose dev split fits the calibration (default: --data, cross-fitted)")
    parser.add_argument("--load", type=Path, help="decoder.keras + vocab.json (+ neighbours.npz) from here")
    parser.add_argument("--json", type=Path, help="write the headline figures here")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a param for this run")
    parser.add_argument("--label", default="params.yaml", help="what this run is, for the report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import numpy as np
    import yaml
    from sklearn.metrics import roc_auc_score

    from pipeline.captioning import confidence as conf
    from pipeline.captioning.consensus import Neighbours
    from pipeline.captioning.decoder import decoding_models, load_decoder
    from pipeline.captioning.vocabulary import Vocabulary
    from pipeline.config import parse_settings
    from pipeline.data.features_file import read_features
    from pipeline.data.real_folder import embeddings_file, read_captions
    from pipeline.stages.calibrate import cross_fitted, fit_observed, observe
    from pipeline.stages.train import train_decoder

    settings = parse_settings(override(yaml.safe_load((PROJECT / "params.yaml").read_text()), args.assignments))
    cfg, decoding, val = settings.confidence, settings.decoding, settings.validation
    fit_dir = (args.fit or args.data).resolve()
    data_dir = args.data.resolve()

    def folder(path: Path):
        captions, dropped = read_captions(path, val.min_tokens, val.max_tokens)
        images, features, _ = read_features(embeddings_file(path))
        return captions, images, features

    fit_captions, fit_images, fit_features = folder(fit_dir)
    start = time.perf_counter()
    if args.load:
        decoder, vocab = load_decoder(args.load / "decoder.keras"), Vocabulary.load(args.load / "vocab.json")
        trained = f"loaded from {args.load}"
    else:
        decoder, vocab, history, _ = train_decoder(fit_captions, fit_images, fit_features, settings.train)
        trained = f"trained {len(history)} epochs in {(time.perf_counter() - start) / 60:.1f} min"
    models = decoding_models(decoder)
    if args.load and (args.load / "neighbours.npz").is_file():
        neighbours = Neighbours.load(args.load / "neighbours.npz")
    else:
        neighbours = Neighbours.from_split(fit_captions, "train", fit_images, fit_features)

    start = time.perf_counter()
    seen_fit = observe(models, vocab, fit_captions, fit_images, fit_features, neighbours, decoding, cfg)
    calibration = fit_observed(seen_fit, cfg, decoding.beam_size)
    if fit_dir == data_dir:
        seen = seen_fit
        prob, abstained = cross_fitted(seen, cfg, decoding.beam_size)
        how = f"cross-fitted on {data_dir.name} dev ({cfg.folds} folds)"
    else:
        seen = observe(models, vocab, *folder(data_dir), neighbours, decoding, cfg)
        prob = calibration.probability(seen.signals)
        abstained = seen.novelty > calibration.novelty_threshold
        how = f"fitted on {fit_dir.name} dev, judged on {data_dir.name} dev"
    acceptable = seen.acceptable(calibration.acceptable_meteor)
    found = conf.judged(prob, acceptable, abstained, seen.cider, settings.alt_text.min_confidence)
    ood_names, categories, ood_features, ood_file = read_ood(args.ood.resolve())
    ood_novelty = conf.novelty(neighbours, ood_features, cfg.novelty_neighbours)
    ood_abstains = ood_novelty > calibration.novelty_threshold
    auroc = float(roc_auc_score(np.r_[np.zeros(len(seen.novelty)), np.ones(len(ood_novelty))],
                                np.r_[seen.novelty, ood_novelty]))
    minutes = (time.perf_counter() - start) / 60
    headline = {"auroc": auroc, "abstain_ood": float(ood_abstains.mean()), "abstain_in": float(abstained.mean()),
                "spearman": found["spearman"], "top_bottom_ratio": found["top_bottom_ratio"], "ece": found["ece"],
                "precision_at_default": found["precision_at_default"],
                "coverage_at_default": found["coverage_at_default"]}
    print(json.dumps(headline, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(headline, indent=1) + "\n")
    conf.plot_reliability(found["reliability"], PROJECT / "reports" / "confidence_reliability.png",
                          f"{data_dir.name} dev, {how}: ECE {found['ece']:.3f}")

    order = np.argsort(-prob)
    wrong = [i for i in order if not acceptable[i] and not abstained[i]][:5]
    per_kind = {}
    for kind, flag in zip(categories, ood_abstains):
        per_kind.setdefault(kind, []).append(flag)
    rows = [
        ("out-of-domain detection", f"AUROC {auroc:.4f}; at the threshold {calibration.novelty_threshold:.4f} "
                                    f"({cfg.novelty_quantile:.0%} quantile of dev novelty): {ood_abstains.mean():.1%} of "
                                    f"{len(ood_novelty)} out-of-domain pictures abstain, {abstained.mean():.1%} of "
                                    f"{len(seen.novelty)} dev photos"),
        ("abstaining, per kind", ", ".join(f"{k} {np.mean(v):.0%}" for k, v in sorted(per_kind.items()))),
        ("ranking", f"Spearman (confidence, per-image CIDEr-D) {found['spearman']:.3f}; most confident half CIDEr-D "
                    f"{found['top_half_cider']:.3f} vs least {found['bottom_half_cider']:.3f} "
                    f"({found['top_bottom_ratio'] or 0:.2f}x)"),
        ("calibration", f"acceptable = METEOR >= {calibration.acceptable_meteor:.4f} (the {cfg.human_quantile:.0%} "
                        f"quantile of {len(seen_fit.human_meteor)} human captions, each against the other four); "
                        f"{acceptable.mean():.1%} of the model's captions acceptable; ECE {found['ece']:.4f}"),
        (f"at alt_text.min_confidence {settings.alt_text.min_confidence}",
         f"precision {found['precision_at_default'] if found['precision_at_default'] is not None else float('nan'):.3f}, "
         f"coverage {found['coverage_at_default']:.1%}"),
        ("precision / coverage", "; ".join(
            f">= {r['threshold']:.1f}: {'-' if r['precision'] is None else format(r['precision'], '.2f')} / "
            f"{r['coverage']:.0%}" for r in found["precision_coverage"])),
        ("reliability (bin: photos, mean confidence, share acceptable)", "; ".join(
            f"{r['low']:.1f}-{r['high']:.1f}: {r['count']}, {r['mean_confidence']:.2f}, {r['acceptable']:.2f}"
            for r in found["reliability"] if r["count"])),
        ("signals' weights (standardised)", ", ".join(f"{s} {c:+.2f}" for s, c in zip(conf.SIGNALS, calibration.coef))),
        ("confident and wrong (the failure that remains)", " | ".join(
            f"{seen.names[i]}: \"{seen.captions[i]}\" ({prob[i]:.2f}; METEOR {seen.meteor[i]:.3f})" for i in wrong)),
        ("decoder", trained),
        ("time", f"{minutes:.1f} min to caption, score and fit"),
    ]
    append_report(f"Confidence and abstention (bench_confidence.py, {args.label})", rows, [
        f"data: {embeddings_file(data_dir).name} of {data_dir}; out-of-domain: {ood_file}; {how}",
        f"decoding: beam {decoding.beam_size}, consensus {decoding.consensus.neighbours} neighbours, "
        f"{decoding.consensus.samples} samples; novelty over the {cfg.novelty_neighbours} nearest train photos"])


if __name__ == "__main__":
    main()
