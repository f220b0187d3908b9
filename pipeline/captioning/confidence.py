"""How sure the model is of a caption, and when it should not caption at all.

Two separate questions, answered from what the model already computes:

* **Is the photo like the ones it learnt from?** ``novelty``: one minus the mean cosine
  similarity of the photo's pooled CNN features to its ``novelty_neighbours`` nearest train
  photos (the same unit-length vectors consensus reranking compares with). The threshold is a
  quantile of the dev photos' novelty (``confidence.novelty_quantile``), so it is set from
  in-domain photos alone and follows every retrained model; above it the model *abstains*: the
  candidate caption is still returned, with ``abstained: true`` and the reason.
* **Is the caption acceptable?** ``confidence``: a calibrated probability, a logistic regression
  fitted on dev over the caption's ``SIGNALS``: its mean log-probability per word, its consensus
  (CIDEr-D against the captions people wrote for the most similar train photos), how much the
  decoder's other candidates (beam and samples) agree with it, the photo's novelty, its length,
  and how generic it is (its CIDEr-D against 100 random train photos' captions: a caption that
  fits any photo says little). "Acceptable" is defined against people: the caption's METEOR
  against four of the photo's references reaches the 25th percentile (``human_quantile``) of
  what each human caption reaches against the other four (``stages/calibrate.py``).

The fitted model is one JSON file (``models/confidence.json``, no pickle) that the registered
model carries; ``Confidence.describe`` is the one place a chosen caption becomes
``{confidence, abstained, reason}``, and ``in_words`` the one place a number becomes words.
This module imports numpy and ``captioning.consensus`` only (not Keras);
fitting (scikit-learn) is imported where it is done.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the decoder's modules load Keras: not for the words alone
    from pipeline.captioning.caption_choice import Candidate
from pipeline.captioning.consensus import ConsensusScorer, Neighbours, unit_rows
from pipeline.config import ConsensusSettings

FORMAT = 1
SIGNALS = ("log_prob_per_word", "consensus", "agreement", "novelty", "length", "generic")
CONSENSUS_NEIGHBOURS = 25  # the train photos whose captions a caption is compared with
# what people are told; the bands are the calibrated probability that the caption is acceptable
HIGH, MODERATE = 0.8, 0.5
NO_CALIBRATION = "this model has no confidence calibration"
OLDER_MODEL = NO_CALIBRATION + " (registered before it existed)"


class CalibrationError(ValueError):
    """A confidence file that is missing, damaged or made for another model."""


def novelty(neighbours: Neighbours, features: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``features``: 1 - mean cosine similarity to its ``k`` nearest train photos
    (0: among them; larger: farther from anything the model learnt from)."""
    features = neighbours.comparable(features)
    train = neighbours.features
    k = min(k, len(train))
    out = np.empty(len(features))
    for lo in range(0, len(features), 256):  # bounded memory: 256 photos x train photos at a time
        sims = unit_rows(features[lo:lo + 256]) @ train.T
        top = np.partition(sims, len(train) - k, axis=1)[:, len(train) - k:]
        out[lo:lo + 256] = 1.0 - top.mean(axis=1)
    return out


def _overlap(a: list[str], b: list[str]) -> float:
    """F1 of the unigrams and bigrams two captions share (0..1)."""
    def grams(t):
        return {*((w,) for w in t), *zip(t, t[1:])}
    ga, gb = grams(a), grams(b)
    if not ga or not gb:
        return 0.0
    common = len(ga & gb)
    return 2 * common / (len(ga) + len(gb))


class SignalMaker:
    """The signals of each photo's chosen caption (``SIGNALS``, in that order), from its
    features and its ranked candidates."""

    def __init__(self, neighbours: Neighbours, novelty_neighbours: int):
        self.neighbours, self.k = neighbours, novelty_neighbours
        # plain consensus, whatever the decoding's reranking uses: the signal means the same for
        # every model; seed 0 picks the generic train photos
        self.scorer = ConsensusScorer(neighbours, ConsensusSettings(
            neighbours=CONSENSUS_NEIGHBOURS, weight=0.0, samples=0, top_k=0, contrast=0.0, sharpness=0.0, seed=0))

    def signals(self, features: np.ndarray, pools: Sequence[Sequence[Candidate]], decode) -> np.ndarray:
        """(N, len(SIGNALS)); ``decode(tokens)`` turns a candidate's word ids into text."""
        chosen = [[decode(pool[0].caption.tokens).split()] for pool in pools]
        close, generic = self.scorer.agreement_with_generic(features, chosen)
        rows = []
        for pool, words, c, g in zip(pools, chosen, close, generic):
            best = pool[0].caption
            others = [decode(p.caption.tokens).split() for p in pool[1:]]
            agreement = float(np.mean([_overlap(words[0], o) for o in others])) if others else 1.0
            rows.append([best.log_prob / (len(best.tokens) + 1), float(c[0]), agreement, 0.0,
                         float(len(words[0])), float(g[0])])
        out = np.asarray(rows, np.float64).reshape(len(pools), len(SIGNALS))
        out[:, SIGNALS.index("novelty")] = novelty(self.neighbours, features, self.k)
        return out


@dataclass(frozen=True)
class Calibration:
    """A logistic regression over standardised signals, and the novelty threshold."""

    signals: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    novelty_neighbours: int
    novelty_threshold: float
    novelty_quantile: float
    acceptable_meteor: float  # the line between acceptable and not (what the weaker people reach)
    beam_size: int  # the decoding it was fitted with: other beam sizes get no confidence
    format: int = FORMAT

    def probability(self, signals: np.ndarray) -> np.ndarray:
        z = (np.asarray(signals, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.coef) + self.intercept)))

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> "Calibration":
        """CalibrationError naming the file when it is missing, not JSON, or not one ``save`` wrote."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CalibrationError(f"{path}: no confidence calibration file") from None
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CalibrationError(f"{path}: not a confidence calibration ({type(err).__name__}: {err})") from None
        fields = cls.__dataclass_fields__
        try:
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT}")
            made = cls(**{k: raw[k] for k in fields})
            n = len(made.signals)
            if list(made.signals) != list(SIGNALS) or not all(len(v) == n for v in (made.mean, made.scale, made.coef)):
                raise ValueError(f"signals {made.signals} do not match {list(SIGNALS)}")
            numbers = [*made.mean, *made.scale, *made.coef, made.intercept, made.novelty_threshold]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers) or min(made.scale) <= 0:
                raise ValueError("a value that is not a finite number (or a scale <= 0)")
            if not (isinstance(made.novelty_neighbours, int) and made.novelty_neighbours >= 1):
                raise ValueError(f"novelty_neighbours {made.novelty_neighbours!r}")
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"{path}: not a confidence calibration this code reads ({err})") from None
        return made


def in_words(confidence: float | None, abstained: bool) -> str:
    """What a person is told of how sure the model is."""
    if abstained:
        return "not sure what this shows"
    if confidence is None:
        return "confidence unknown"
    if confidence >= HIGH:
        return "high confidence"
    if confidence >= MODERATE:
        return "moderate confidence"
    return "low confidence"


def spoken(caption: str, confidence: float | None, abstained: bool) -> str:
    """The caption as a reader should take it: asserted only when the model is sure enough."""
    if abstained:
        return f"Not sure what this shows (perhaps: {caption})"
    if confidence is not None and confidence < MODERATE:
        return f"May show: {caption}"
    return caption


def said_of(row: dict) -> dict:
    """``confidence``, ``abstained``, ``reason``, ``confidence_words`` and ``spoken`` (the caption
    as a reader should take it) of one row a model answered: the app's, the CLI's and search's
    one reading of it. A model registered before confidence existed answers caption (and error)
    only: its rows say so."""
    value = row.get("confidence")
    confidence = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    abstained = bool(row.get("abstained") or False)
    reason = row.get("reason") or ("" if "confidence" in row else OLDER_MODEL)
    return {"confidence": confidence, "abstained": abstained, "reason": reason,
            "confidence_words": in_words(confidence, abstained),
            "spoken": spoken(row.get("caption") or "", confidence, abstained)}


class Confidence:
    """``describe(features, pools, decode, beam_size)``: per photo ``{"confidence", "abstained",
    "reason"}``. Built from a calibration and the model's neighbours file."""

    def __init__(self, calibration: Calibration, neighbours: Neighbours):
        self.calibration = calibration
        self.maker = SignalMaker(neighbours, calibration.novelty_neighbours)

    def describe(self, features: np.ndarray, pools: Sequence[Sequence[Candidate]], decode,
                 beam_size: int | None = None) -> list[dict]:
        cal = self.calibration
        signals = self.maker.signals(features, pools, decode)
        novel = signals[:, SIGNALS.index("novelty")]
        fitted_decoding = beam_size is None or beam_size == cal.beam_size
        probs = cal.probability(signals) if fitted_decoding else [None] * len(pools)
        out = []
        for n, p in zip(novel, probs):
            abstained = bool(n > cal.novelty_threshold)
            if abstained:
                reason = (f"unlike the photos it learnt from (novelty {n:.3f} > {cal.novelty_threshold:.3f}, "
                          f"which {cal.novelty_quantile:.0%} of dev photos stay under)")
            elif p is None:
                reason = f"confidence is calibrated for beam size {cal.beam_size}, not {beam_size}"
            else:
                reason = ""
            out.append({"confidence": None if p is None else round(float(p), 4), "abstained": abstained,
                        "reason": reason})
        return out


def without_confidence(n: int, reason: str = NO_CALIBRATION) -> list[dict]:
    """What a model without a (readable) calibration says of each of ``n`` photos."""
    return [{"confidence": None, "abstained": False, "reason": reason} for _ in range(n)]


# ---- fitting and judging (stages/calibrate.py, evaluate, benchmarks) ----

def fit(signals: np.ndarray, acceptable: np.ndarray, *, novelty_threshold: float, novelty_quantile: float,
        novelty_neighbours: int, acceptable_meteor: float, beam_size: int, seed: int = 0) -> Calibration:
    """A logistic regression of ``acceptable`` (0/1) on standardised ``signals``; with one class
    only (a tiny dev split), its rate as a constant."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(signals, np.float64)
    y = np.asarray(acceptable, int)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    if len(np.unique(y)) < 2:
        rate = float(np.clip(y.mean() if len(y) else 0.5, 1e-3, 1 - 1e-3))
        coef, intercept = np.zeros(x.shape[1]), math.log(rate / (1 - rate))
    else:
        model = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit((x - mean) / scale, y)
        coef, intercept = model.coef_[0], float(model.intercept_[0])
    return Calibration(list(SIGNALS), mean.tolist(), scale.tolist(), [float(c) for c in coef], intercept,
                       novelty_neighbours, float(novelty_threshold), novelty_quantile, float(acceptable_meteor),
                       beam_size)


def expected_calibration_error(prob: np.ndarray, acceptable: np.ndarray, bins: int = 10) -> float:
    """Mean |predicted - observed| over equal-width probability bins, weighted by their photos."""
    return float(sum(r["count"] * abs(r["mean_confidence"] - r["acceptable"])
                     for r in reliability(prob, acceptable, bins) if r["count"]) / max(len(prob), 1))


def reliability(prob: np.ndarray, acceptable: np.ndarray, bins: int = 10) -> list[dict]:
    """Per bin of predicted probability: its range, photos, mean prediction, share acceptable."""
    prob, acceptable = np.asarray(prob, float), np.asarray(acceptable, float)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": int(mask.sum()),
                     "mean_confidence": float(prob[mask].mean()) if mask.any() else None,
                     "acceptable": float(acceptable[mask].mean()) if mask.any() else None})
    return rows


def precision_coverage(prob: np.ndarray, acceptable: np.ndarray, abstained: np.ndarray | None = None,
                       thresholds: Sequence[float] = tuple(np.round(np.arange(0.1, 1.0, 0.1), 2))) -> list[dict]:
    """At each threshold: the share of photos whose caption passes (coverage; abstained ones never
    do) and the share of those that are acceptable (precision)."""
    prob, acceptable = np.asarray(prob, float), np.asarray(acceptable, bool)
    kept_ok = np.ones(len(prob), bool) if abstained is None else ~np.asarray(abstained, bool)
    rows = []
    for t in thresholds:
        passed = (prob >= t) & kept_ok
        rows.append({"threshold": float(t), "coverage": float(passed.mean()) if len(prob) else 0.0,
                     "precision": float(acceptable[passed].mean()) if passed.any() else None})
    return rows


def leave_one_out_meteor(captions: list[list[str]], references: list[list[list[str]]],
                         with_people: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(each human caption's METEOR against the photo's other references, flattened, empty without
    ``with_people``; each ``captions[i]``'s mean METEOR over the same sets of references), in one
    Java run."""
    pairs, humans, owner = [], 0, []
    for refs in references if with_people else ():
        for j in range(len(refs)):
            if len(refs) > 1:
                pairs.append((refs[j], refs[:j] + refs[j + 1:]))
                humans += 1
    for i, (caption, refs) in enumerate(zip(captions, references)):
        sets = [refs[:j] + refs[j + 1:] for j in range(len(refs))] if len(refs) > 1 else [refs]
        for others in sets:
            pairs.append((caption, others))
            owner.append(i)
    from pipeline.captioning.metrics import per_item_meteor

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
    at_default = precision_coverage(prob, acceptable, abstained, [min_confidence])[0]
    rho = spearmanr(prob, cider).statistic if len(prob) > 2 and np.ptp(prob) > 0 else 0.0
    return {"ece": expected_calibration_error(prob, acceptable),
            "spearman": float(0.0 if np.isnan(rho) else rho),
            "top_half_cider": float(top), "bottom_half_cider": float(bottom),
            "top_bottom_ratio": float(top / bottom) if bottom > 0 else None,
            "min_confidence": min_confidence,
            "precision_at_default": at_default["precision"], "coverage_at_default": at_default["coverage"],
            "reliability": reliability(prob, acceptable),
            "precision_coverage": precision_coverage(prob, acceptable, abstained)}


def plot_reliability(rows: list[dict], path: Path | str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    shown = [r for r in rows if r["count"]]
    ax.plot([r["mean_confidence"] for r in shown], [r["acceptable"] for r in shown], marker="o",
            label="captions (per bin)")
    for r in shown:
        ax.annotate(str(r["count"]), (r["mean_confidence"], r["acceptable"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("confidence (predicted probability acceptable)")
    ax.set_ylabel("share acceptable")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
