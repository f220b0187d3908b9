"""The confidence of a caption and the novelty of a photo (pipeline/captioning/confidence.py)."""

import json

import numpy as np
import pytest

from pipeline.captioning import confidence as conf
from pipeline.captioning.caption_choice import Candidate
from pipeline.captioning.consensus import Neighbours, unit_rows
from pipeline.captioning.decoding import Caption


def neighbours(n=40, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    feats = unit_rows(np.abs(rng.normal(size=(n, dim))).astype(np.float32) + 1.0)
    refs = [[["a", "dog", "runs", "on", "grass"], ["a", "brown", "dog", "in", "the", "grass"]] if i % 2 else
            [["a", "man", "rides", "a", "bike"], ["a", "person", "on", "a", "bicycle"]] for i in range(n)]
    return Neighbours(feats, refs)


def test_novelty_is_small_near_train_photos_and_large_far_from_them():
    near = neighbours()
    inside = near.features[:3] * 2.0  # the same directions: cosine 1
    outside = -near.features[:3]  # the opposite direction
    assert np.allclose(conf.novelty(near, inside, 1), 0.0, atol=1e-6)
    assert (conf.novelty(near, outside, 5) > 1.5).all()
    with pytest.raises(ValueError, match="another backbone"):  # narrower than the train photos' 8-d vectors
        conf.novelty(near, np.ones((1, 5), np.float32), 5)
    # a row that carries a grid of regions after its pooled vector is compared by the pooled vector
    with_grid = np.concatenate([outside, np.full((3, 12), 9.0, np.float32)], axis=1)
    np.testing.assert_allclose(conf.novelty(near, with_grid, 5), conf.novelty(near, outside, 5), rtol=1e-6)


def test_signals_describe_the_chosen_caption_and_its_agreement_with_the_others():
    near = neighbours()
    words = ["<pad>", "a", "dog", "runs", "on", "grass", "man", "rides", "bike"]
    decode = lambda tokens: " ".join(words[t] for t in tokens)  # noqa: E731
    dog, man = Caption([1, 2, 3, 4, 5], -2.0), Caption([1, 6, 7, 1, 8], -9.0)
    pools = [[Candidate(dog, -0.4), Candidate(dog, -0.5)], [Candidate(man, -1.5), Candidate(dog, -2.0)]]
    signals = conf.SignalMaker(near, 5).signals(near.features[[1, 1]], pools, decode)
    by = dict(zip(conf.SIGNALS, signals.T))
    assert by["log_prob_per_word"] == pytest.approx([-2.0 / 6, -9.0 / 6])
    assert by["agreement"][0] == pytest.approx(1.0) and by["agreement"][1] < 0.5  # the same vs another caption
    # photo 1's neighbours wrote about dogs: the dog caption agrees with them more than the man caption
    assert by["consensus"][0] > by["consensus"][1]
    assert list(by["length"]) == [5.0, 5.0]


def test_a_logistic_fit_on_signals_is_calibrated_and_ranks_as_the_truth_does():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, len(conf.SIGNALS)))
    truth = 1 / (1 + np.exp(-(1.5 * x[:, 1] - x[:, 0])))
    y = (rng.random(2000) < truth).astype(int)
    args = dict(novelty_threshold=0.3, novelty_quantile=0.99, novelty_neighbours=10, acceptable_meteor=0.2,
                beam_size=3, seed=0)
    fitted = conf.fit(x[:1000], y[:1000], **args)
    crossed = fitted.probability(x[1000:])  # judged on photos it was not fitted on
    y, truth = y[1000:], truth[1000:]
    assert conf.expected_calibration_error(crossed, y) < 0.06
    assert np.corrcoef(crossed, truth)[0, 1] > 0.9
    assert fitted.coef[1] > 0 > fitted.coef[0]
    rows = conf.precision_coverage(crossed, y)
    assert [r["threshold"] for r in rows] == pytest.approx([0.1 * i for i in range(1, 10)])
    assert rows[0]["coverage"] > rows[-1]["coverage"]
    assert rows[-1]["precision"] > rows[0]["precision"]


def test_one_class_only_gives_its_rate_not_an_error():
    args = dict(novelty_threshold=0.3, novelty_quantile=0.99, novelty_neighbours=10, acceptable_meteor=0.2,
                beam_size=3)
    fitted = conf.fit(np.zeros((5, len(conf.SIGNALS))), np.zeros(5, int), **args)
    assert fitted.probability(np.ones((2, len(conf.SIGNALS)))) == pytest.approx([1e-3, 1e-3])


def test_a_damaged_or_foreign_calibration_file_is_refused_by_name(tmp_path):
    args = dict(novelty_threshold=0.3, novelty_quantile=0.99, novelty_neighbours=10, acceptable_meteor=0.2,
                beam_size=3)
    good = tmp_path / "confidence.json"
    conf.fit(np.eye(len(conf.SIGNALS)).repeat(2, 0), np.tile([0, 1], len(conf.SIGNALS)), **args).save(good)
    assert conf.Calibration.load(good).novelty_threshold == 0.3
    raw = json.loads(good.read_text())
    cases = {"missing.json": None, "truncated.json": good.read_text()[:40], "list.json": "[1, 2]",
             "nan.json": json.dumps({**raw, "coef": [float("nan")] * len(conf.SIGNALS)}),
             "other-signals.json": json.dumps({**raw, "signals": ["a"] * len(conf.SIGNALS)}),
             "future.json": json.dumps({**raw, "format": 99}), "zero-scale.json": json.dumps({**raw, "scale": [0] * 6})}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(conf.CalibrationError, match=name):
            conf.Calibration.load(path)


def test_people_are_told_in_words_and_an_unsure_caption_is_not_asserted():
    assert conf.in_words(0.9, False) == "high confidence"
    assert conf.in_words(0.6, False) == "moderate confidence"
    assert conf.in_words(0.2, False) == "low confidence"
    assert conf.in_words(0.9, True) == "not sure what this shows"
    assert conf.in_words(None, False) == "confidence unknown"
    assert conf.spoken("a dog runs", 0.9, False) == "a dog runs"
    assert conf.spoken("a dog runs", 0.2, False) == "May show: a dog runs"
    assert conf.spoken("a dog runs", 0.9, True).startswith("Not sure what this shows")
    old = conf.said_of({"caption": "a dog", "error": ""})  # a model registered before confidence
    assert old["confidence"] is None and "no confidence" in old["reason"] and old["spoken"] == "a dog"
    assert conf.said_of({"caption": "a dog", "confidence": float("nan"), "abstained": False})["confidence"] is None


def test_reliability_bins_count_every_photo():
    rows = conf.reliability(np.array([0.05, 0.15, 0.95, 1.0]), np.array([0, 0, 1, 1]))
    assert sum(r["count"] for r in rows) == 4 and rows[-1]["count"] == 2
    assert conf.expected_calibration_error(np.array([0.95, 1.0]), np.array([1, 1])) == pytest.approx(0.025)


def test_leave_one_out_meteor_scores_people_against_each_other_and_the_model_against_the_same_sets():
    refs = [[["a", "dog", "runs", "on", "the", "grass"], ["a", "dog", "runs", "on", "grass"],
             ["a", "brown", "dog", "runs", "outside"]]]
    human, (model, unrelated) = conf.leave_one_out_meteor(  # one Java run
        [["a", "dog", "runs", "on", "the", "grass"], ["a", "red", "car", "parked", "by", "a", "wall"]], refs * 2)
    assert len(human) == 6 and (human > 0.2).all()
    # the model's caption is one of the references: scored against each set of the other two (never
    # against itself alone), so it does not get a perfect score for free
    assert 0.3 < model < 1.0
    assert unrelated < model
