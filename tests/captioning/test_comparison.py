import random

import pandas as pd
import pytest

from pipeline.captioning.comparison import corpus_value, paired_bootstrap, per_image_scores
from pipeline.captioning.metrics import coco_metrics, nltk_bleu

WORDS = "a dog cat man runs sits on the grass red blue ball in water".split()


def corpus(seed: int, n: int = 40):
    rng = random.Random(seed)
    refs = [[rng.choices(WORDS, k=rng.randint(4, 9)) for _ in range(5)] for _ in range(n)]
    hyps = [rng.choices(WORDS, k=rng.randint(3, 9)) for _ in range(n)]
    return refs, hyps


def test_corpus_scores_from_per_image_stats_equal_the_reported_metrics():
    refs, hyps = corpus(1)
    stats = per_image_scores(refs, hyps)
    bleu = nltk_bleu(refs, hyps)
    for name in ("bleu1", "bleu2", "bleu3", "bleu4"):
        assert corpus_value(stats, name) == pytest.approx(bleu[name], rel=1e-12, abs=1e-12)
    coco = coco_metrics(refs, hyps)
    assert corpus_value(stats, "cider") == pytest.approx(coco["cider"], rel=1e-9)
    assert corpus_value(stats, "rouge_l") == pytest.approx(coco["rouge_l"], rel=1e-9)


def test_bootstrap_is_seeded_and_paired():
    refs, hyps = corpus(2)
    good = per_image_scores(refs, [r[0] for r in refs])  # copies a reference: clearly better
    poor = per_image_scores(refs, hyps)
    first = paired_bootstrap(good, poor, "bleu4", resamples=200, seed=3)
    assert first == paired_bootstrap(good, poor, "bleu4", resamples=200, seed=3)
    assert first["ci95_low"] > 0 and first["difference"] > 0
    same = paired_bootstrap(poor, poor, "cider", resamples=200)
    assert same["difference"] == same["ci95_low"] == same["ci95_high"] == 0


def test_only_decomposable_metrics_and_aligned_images():
    stats = per_image_scores(*corpus(3, 5))
    with pytest.raises(ValueError, match="cannot compare"):
        corpus_value(stats, "meteor")
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(stats, stats.iloc[:3], "bleu4")
    assert isinstance(stats, pd.DataFrame) and len(stats) == 5
