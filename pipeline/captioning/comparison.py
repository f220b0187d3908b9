"""Two models judged on the same test images: per-image scores and a paired bootstrap.

``per_image_scores`` keeps, for every test image, what its corpus metrics are made of:
BLEU's clipped n-gram matches and counts (n = 1..4), hypothesis and closest reference lengths
(corpus BLEU is computed from their sums, exactly as nltk's ``corpus_bleu`` does), and the
per-image CIDEr-D and ROUGE-L (pycocoevalcap; their corpus value is the mean). So any resample
of images has an exact corpus score without decoding anything again.

``paired_bootstrap`` resamples test images with replacement (seeded), scores both models on
each resample, and returns the observed difference with a 95% percentile interval: how sure a
promotion is. METEOR is not decomposable this way (its corpus score is computed in Java) and
is not offered as a comparison metric.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from nltk.translate.bleu_score import closest_ref_length, modified_precision

COMPARABLE = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l")
_BLEU_ORDER = {"bleu1": 1, "bleu2": 2, "bleu3": 3, "bleu4": 4}


def per_image_scores(references: list[list[list[str]]], hypotheses: list[list[str]]) -> pd.DataFrame:
    """One row per image: m1..m4 (clipped matches), c1..c4 (n-gram counts), hyp_len, ref_len,
    cider, rouge_l."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rows = []
    for refs, hyp in zip(references, hypotheses, strict=True):
        row = {"hyp_len": len(hyp), "ref_len": closest_ref_length(refs, len(hyp))}
        for n in range(1, 5):
            p = modified_precision(refs, hyp, n)
            row[f"m{n}"], row[f"c{n}"] = p.numerator, p.denominator
        rows.append(row)
    stats = pd.DataFrame(rows)
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h) if h else "<empty>"] for i, h in enumerate(hypotheses)}
    stats["cider"] = np.asarray(Cider().compute_score(gts, res)[1], dtype=float)
    stats["rouge_l"] = np.asarray(Rouge().compute_score(gts, res)[1], dtype=float)
    return stats


def corpus_value(stats: pd.DataFrame | dict[str, np.ndarray], metric: str,
                 rows: np.ndarray | None = None) -> float:
    """The corpus ``metric`` of the images at ``rows`` (all by default; repeats allowed).
    ``stats`` is a per_image_scores table or its columns as arrays (``_columns``)."""
    if metric not in COMPARABLE:
        raise ValueError(f"cannot compare models on {metric!r}; choose one of {COMPARABLE}")
    take = (lambda col: np.asarray(stats[col])) if rows is None else (lambda col: np.asarray(stats[col])[rows])
    if metric in ("cider", "rouge_l"):
        return float(take(metric).mean())
    order = _BLEU_ORDER[metric]
    log_p = 0.0
    for n in range(1, order + 1):
        matches, counts = take(f"m{n}").sum(), take(f"c{n}").sum()
        if matches == 0 or counts == 0:
            return 0.0  # nltk returns ~1e-155 here; metrics.nltk_bleu reports it as 0.0
        log_p += math.log(matches / counts) / order
    hyp, ref = take("hyp_len").sum(), take("ref_len").sum()
    brevity = 1.0 if hyp > ref else (0.0 if hyp == 0 else math.exp(1 - ref / hyp))
    return brevity * math.exp(log_p)


def _columns(stats: pd.DataFrame) -> dict[str, np.ndarray]:
    return {col: stats[col].to_numpy() for col in stats.columns}


def paired_bootstrap(candidate: pd.DataFrame, champion: pd.DataFrame, metric: str, *,
                     resamples: int = 1000, seed: int = 0) -> dict:
    """Difference candidate - champion in ``metric`` on the same images (rows aligned), with
    a seeded 95% percentile interval over ``resamples`` resamples of the images."""
    if len(candidate) != len(champion) or len(candidate) == 0:
        raise ValueError("both models must be scored on the same, non-empty set of images")
    rng = np.random.default_rng(seed)
    n = len(candidate)
    cand_cols, champ_cols = _columns(candidate), _columns(champion)  # once, not per resample
    diffs = np.empty(resamples)
    for b in range(resamples):
        rows = rng.integers(0, n, n)
        diffs[b] = corpus_value(cand_cols, metric, rows) - corpus_value(champ_cols, metric, rows)
    cand, champ = corpus_value(candidate, metric), corpus_value(champion, metric)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"metric": metric, "images": n, "resamples": resamples, "seed": seed,
            "candidate": cand, "champion": champ, "difference": cand - champ,
            "ci95_low": float(low), "ci95_high": float(high)}
