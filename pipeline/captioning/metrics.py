"""Caption metrics.

* BLEU-1..4 (``bleu1``..``bleu4``): nltk ``corpus_bleu``, references = all reference token
  lists of an image, uniform weights summing to 1, no smoothing (corpus-level BLEU needs none;
  a corpus with no matching n-gram of some order scores 0 for that BLEU: nltk returns a
  value around 1e-155 there, which is reported as 0.0).
* ``coco_bleu4``, ``meteor``, ``rouge_l``, ``cider``: pycocoevalcap on the same tokens
  (METEOR 1.5 runs in Java). With the same tokens, nltk and coco BLEU-4 agree.
Captions are tokenised by ``clean_caption`` on both sides; ``nltk.download`` is never used.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
from nltk.translate.bleu_score import corpus_bleu

BLEU_WEIGHTS = {
    "bleu1": (1.0,),
    "bleu2": (0.5, 0.5),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}


class JavaMissingError(RuntimeError):
    pass


def nltk_bleu(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 of tokenised hypotheses against lists of tokenised references."""
    with warnings.catch_warnings():  # nltk warns when an n-gram order has no match
        warnings.simplefilter("ignore")
        scores = {name: float(corpus_bleu(references, hypotheses, weights=w))
                  for name, w in BLEU_WEIGHTS.items()}
    return {name: (0.0 if value < 1e-12 else value) for name, value in scores.items()}


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's METEOR 1.5 (Java) on prepared texts: (corpus score, per-item scores)."""
    if shutil.which("java") is None:
        raise JavaMissingError("METEOR needs Java (pycocoevalcap runs meteor-1.5.jar): install a "
                               "Java runtime, e.g. apt-get install openjdk-17-jre-headless")
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)
    finally:  # the wrapper has no close(); end the Java process now rather than at GC
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.wait(timeout=60)


def _coco_texts(references: list[list[list[str]]], hypotheses: list[list[str]]) -> tuple[dict, dict]:
    """pycocoevalcap's inputs: references and hypotheses by item, joined (an empty one as <empty>)."""
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h) if h else "<empty>"] for i, h in enumerate(hypotheses)}
    return gts, res


def coco_metrics(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    """coco BLEU-4, METEOR, ROUGE-L and CIDEr (pycocoevalcap) on pre-tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_texts(references, hypotheses)
    meteor_score, _ = _meteor(gts, res)  # first: no Java, no scoring at all
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"coco_bleu4": float(bleu[3]), "meteor": float(meteor_score),
            "rouge_l": float(rouge), "cider": float(cider)}


def per_item_meteor(pairs: list[tuple[list[str], list[list[str]]]]) -> np.ndarray:
    """METEOR 1.5 (Java, as ``coco_metrics``) of each (hypothesis, its references) pair, all in
    one Java process."""
    if not pairs:
        return np.zeros(0)
    _, scores = _meteor(*_coco_texts([refs for _, refs in pairs], [h for h, _ in pairs]))
    return np.asarray(scores, np.float64)


def score(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    return {**nltk_bleu(references, hypotheses), **coco_metrics(references, hypotheses)}


def caption_health(hypotheses: list[list[str]], references: list[list[list[str]]], unk: str = "<unk>") -> dict:
    """What BLEU and CIDEr do not show: does the model write one caption for everything, use few
    words, stutter, or write too short? ``hypotheses[i]`` is image i's caption, ``references[i]``
    its reference captions, all tokenised."""
    n = len(hypotheses)
    if n == 0:
        return {}

    def repeats_a_bigram(tokens: list[str]) -> bool:
        bigrams = list(zip(tokens, tokens[1:]))
        return len(bigrams) != len(set(bigrams))

    ref_lengths = [len(r) for refs in references for r in refs]
    mean_length = sum(map(len, hypotheses)) / n
    ref_mean = sum(ref_lengths) / len(ref_lengths) if ref_lengths else 0.0
    return {
        "images": n,
        "distinct_captions": len({" ".join(h) for h in hypotheses}),
        "distinct_caption_share": len({" ".join(h) for h in hypotheses}) / n,
        "distinct_words": len({w for h in hypotheses for w in h}),
        "repeated_bigram_share": sum(map(repeats_a_bigram, hypotheses)) / n,
        "unk_share": sum(unk in h for h in hypotheses) / n,
        "mean_length": mean_length,
        "reference_mean_length": ref_mean,
        "length_ratio": mean_length / ref_mean if ref_mean else 0.0,
    }
