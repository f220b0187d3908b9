import math

import pytest

from pipeline.captioning.metrics import caption_health, coco_metrics, nltk_bleu, score

REFS = [[["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "is", "running"]],
        [["two", "kids", "play", "in", "the", "snow"]]]


def test_perfect_match_scores_one():
    hyps = [["a", "dog", "runs", "on", "the", "grass"], ["two", "kids", "play", "in", "the", "snow"]]
    assert all(v == pytest.approx(1.0) for v in nltk_bleu(REFS, hyps).values())


def test_hand_checked_bleu1_and_bleu2():
    # hyp "a dog is on grass": unigrams a, dog, is, on, grass all in refs -> p1 = 5/5;
    # bigrams: "a dog" yes, "dog is" yes (ref 2), "is on" no, "on grass" no -> p2 = 2/4.
    # closest ref length to 5 is 5 -> brevity penalty 1.
    scores = nltk_bleu([REFS[0]], [["a", "dog", "is", "on", "grass"]])
    assert scores["bleu1"] == pytest.approx(1.0)
    assert scores["bleu2"] == pytest.approx(math.sqrt(1.0 * 0.5))


def test_no_matching_4gram_gives_zero_bleu4_not_an_error():
    scores = nltk_bleu([REFS[0]], [["a", "dog", "on", "grass", "runs"]])
    assert scores["bleu4"] == 0.0 and scores["bleu1"] > 0


def test_coco_metrics_agree_with_nltk_bleu_and_include_meteor():
    hyps = [["a", "dog", "runs", "on", "grass"], ["kids", "play", "in", "the", "snow"]]
    both = score(REFS, hyps)
    assert both["coco_bleu4"] == pytest.approx(both["bleu4"], abs=1e-6)
    assert 0 < both["meteor"] < 1 and 0 < both["rouge_l"] < 1 and both["cider"] > 0


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="needs Java"):
        coco_metrics(REFS, [["a"], ["b"]])


def test_caption_health_counts_what_bleu_hides():
    hyps = [["a", "dog", "a", "dog", "runs"], ["a", "dog", "a", "dog", "runs"], ["a", "<unk>", "plays"]]
    refs = [[["a", "dog", "runs", "on", "grass"]], [["two", "kids", "play"]], [["a", "cat", "sleeps", "here"]]]
    health = caption_health(hyps, refs)
    assert health["images"] == 3 and health["distinct_captions"] == 2
    assert health["distinct_caption_share"] == pytest.approx(2 / 3)
    assert health["distinct_words"] == 5  # a, dog, runs, <unk>, plays
    assert health["repeated_bigram_share"] == pytest.approx(2 / 3)  # "a dog" twice in the first two
    assert health["unk_share"] == pytest.approx(1 / 3)
    assert health["mean_length"] == pytest.approx(13 / 3)
    assert health["reference_mean_length"] == pytest.approx(4)
    assert health["length_ratio"] == pytest.approx(13 / 12)
