import keras
import numpy as np
import pytest

from pipeline.captioning.decoder import DecoderConfig, StepModels, build_decoder
from pipeline.captioning.decoding import (
    NEG_INF,
    _banned,
    beam_search,
    greedy,
    sample,
    sample_candidates,
    top_k_only,
)
from pipeline.captioning.vocabulary import Vocabulary

# the keyword arguments every decoding call takes (params.yaml sets them for the pipeline)
PLAIN = dict(no_repeat_ngram=0, batch_size=64)
FREE = dict(top_k=0, no_repeat_ngram=0)  # sampling from the whole softmax
WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "white", "hat"]


@pytest.fixture(scope="module")
def setup():
    keras.utils.set_random_seed(1)
    vocab = Vocabulary.build([" ".join(WORDS)], min_count=1, max_length=8)
    cfg = DecoderConfig(vocab.size, 6, vocab.sequence_length, embedding_dim=8, units=16, dropout=0)
    rng = np.random.default_rng(0)
    decoder = build_decoder(cfg, rng.normal(size=(20, 6)).astype("float32"))
    return StepModels.from_decoder(decoder), vocab, rng.normal(size=(12, 6)).astype("float32")


def test_banned_ngrams():
    assert _banned([5, 6, 7, 5, 6], 3) == {7}
    assert _banned([5, 6, 7], 3) == set()
    assert _banned([5, 6], 0) == set()


def test_greedy_never_emits_special_tokens_and_respects_max_length(setup):
    models, vocab, feats = setup
    for caption in greedy(models, feats, vocab, **PLAIN):
        assert len(caption.tokens) <= vocab.max_length
        assert not {vocab.pad_id, vocab.start_id, vocab.unk_id, vocab.end_id} & set(caption.tokens)


def test_no_repeat_ngram_blocks_loops(setup):
    models, vocab, feats = setup
    for caption in greedy(models, feats, vocab, no_repeat_ngram=2, batch_size=64):
        bigrams = list(zip(caption.tokens, caption.tokens[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_batched_greedy_equals_one_image_at_a_time(setup):
    models, vocab, feats = setup
    batched = greedy(models, feats, vocab, no_repeat_ngram=0, batch_size=5)
    single = [greedy(models, feats[i:i + 1], vocab, **PLAIN)[0] for i in range(len(feats))]
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    np.testing.assert_allclose([c.log_prob for c in batched], [c.log_prob for c in single], atol=1e-4)


def test_beam_best_scores_at_least_greedy(setup):
    models, vocab, feats = setup
    g = greedy(models, feats, vocab, **PLAIN)
    b = beam_search(models, feats, vocab, beam_size=4, length_penalty=0.0, **PLAIN)
    for gc, bc in zip(g, b):
        assert bc.log_prob >= gc.log_prob - 1e-4
        assert not {vocab.pad_id, vocab.start_id, vocab.unk_id} & set(bc.tokens)


def test_beam_of_one_is_greedy(setup):
    models, vocab, feats = setup
    assert [c.tokens for c in beam_search(models, feats, vocab, beam_size=1, length_penalty=0.0, **PLAIN)] == \
        [c.tokens for c in greedy(models, feats, vocab, **PLAIN)]


def test_no_caption_is_empty_even_when_the_model_would_stop_at_once(setup):
    """A barely trained decoder may rank <end> first at step 0: it still writes a word."""
    models, vocab, feats = setup

    class EndFirst:
        def encode(self, features):
            return models.encode(features)

        def step(self, tokens, state):
            log_probs, state = models.step(tokens, state)
            log_probs = log_probs.copy()
            log_probs[:, vocab.end_id] = 0.0  # probability ~1 for <end>, every step
            return log_probs, state

    beam = dict(beam_size=3, length_penalty=0.7)
    for found in (greedy(EndFirst(), feats, vocab, **PLAIN), beam_search(EndFirst(), feats, vocab, **beam, **PLAIN)):
        assert all(len(c.tokens) == 1 for c in found)


def test_samples_are_well_formed_and_follow_the_seed(setup):
    models, vocab, feats = setup
    ids, log_probs = sample(models, np.repeat(feats, 4, axis=0), vocab, np.random.default_rng(1), **FREE)
    assert ids.shape == (48, vocab.sequence_length) and log_probs.shape == (48,)
    for row in ids:
        end = np.flatnonzero(row == vocab.end_id)
        assert len(end) == 1  # every caption ends, once (forced at max_length)
        assert not {vocab.pad_id, vocab.start_id, vocab.unk_id} & set(row[:end[0]])
        assert (row[end[0] + 1:] == vocab.pad_id).all()
    again, again_log_probs = sample(models, np.repeat(feats, 4, axis=0), vocab, np.random.default_rng(1), **FREE)
    np.testing.assert_array_equal(ids, again)
    np.testing.assert_array_equal(log_probs, again_log_probs)
    assert len({tuple(r) for r in ids}) > 12  # sampling, not greedy: more than one caption per image
    per_image, _ = sample(models, np.repeat(feats, 4, axis=0), vocab, [np.random.default_rng(i) for i in range(12)], **FREE)
    np.testing.assert_array_equal(  # one generator per image: its 4 rows draw from it alone
        per_image[:4], sample(models, np.repeat(feats[:1], 4, axis=0), vocab, [np.random.default_rng(0)], **FREE)[0])


def test_top_k_only_keeps_the_likeliest_words():
    log_probs = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = top_k_only(log_probs, 2)
    assert (kept > NEG_INF).sum(axis=1).tolist() == [2, 2]
    np.testing.assert_array_equal(kept[0, :2], log_probs[0, :2])
    np.testing.assert_array_equal(kept[1, 2:], log_probs[1, 2:])
    assert top_k_only(log_probs, 0) is log_probs


def test_a_sample_of_the_likeliest_word_is_the_greedy_caption_with_its_score(setup):
    models, vocab, feats = setup
    expected = greedy(models, feats, vocab, no_repeat_ngram=2, batch_size=64)
    for seed in (1, 2):  # k = 1 is greedy, whatever the noise
        found = sample_candidates(models, feats, vocab, samples=2, seed=seed, top_k=1,
                                  length_penalty=0.7, no_repeat_ngram=2, batch_size=5)
        assert len(found) == len(feats)
        for drawn, want in zip(found, expected):
            assert [c.tokens for c, _ in drawn] == [want.tokens] * 2
            caption, normalised = drawn[0]
            # summed like greedy's and beam search's scores, normalised like beam candidates
            assert caption.log_prob == pytest.approx(want.log_prob, abs=1e-4)
            assert normalised == pytest.approx(want.log_prob / (len(want.tokens) + 1) ** 0.7, abs=1e-4)


def test_samples_respect_no_repeat_ngram(setup):
    models, vocab, feats = setup
    ids, _ = sample(models, np.repeat(feats, 8, axis=0), vocab, np.random.default_rng(3), top_k=0, no_repeat_ngram=2)
    for row in ids:
        tokens = row[: np.argmax(row == vocab.end_id)].tolist()
        bigrams = list(zip(tokens, tokens[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_an_image_gets_the_same_samples_alone_or_anywhere_in_a_batch(setup):
    models, vocab, feats = setup
    kwargs = dict(samples=3, seed=5, top_k=0, length_penalty=0.7, no_repeat_ngram=2)
    together = sample_candidates(models, feats, vocab, batch_size=4, **kwargs)
    reversed_order = sample_candidates(models, feats[::-1].copy(), vocab, batch_size=7, **kwargs)[::-1]
    alone = [sample_candidates(models, feats[i:i + 1], vocab, batch_size=64, **kwargs)[0] for i in range(len(feats))]

    def tokens(found):
        return [[c.tokens for c, _ in drawn] for drawn in found]

    assert tokens(together) == tokens(reversed_order) == tokens(alone)
    np.testing.assert_allclose([s for drawn in together for _, s in drawn],  # batches differ in round-off only
                               [s for drawn in alone for _, s in drawn], rtol=1e-5)
    assert tokens(sample_candidates(models, feats, vocab, batch_size=64, **{**kwargs, "seed": 6})) != tokens(together)


def test_many_samples_are_decoded_in_bounded_batches(setup, monkeypatch):
    import pipeline.captioning.decoding

    models, vocab, feats = setup
    expected = sample_candidates(models, feats, vocab, samples=4, seed=1, top_k=0, length_penalty=0.7, **PLAIN)
    monkeypatch.setattr(pipeline.captioning.decoding, "MAX_SAMPLE_ROWS", 8)  # 2 images (8 rows) per batch
    calls = []
    original = pipeline.captioning.decoding.sample
    monkeypatch.setattr(pipeline.captioning.decoding, "sample", lambda m, f, *a, **k: calls.append(len(f)) or original(m, f, *a, **k))
    bounded = sample_candidates(models, feats, vocab, samples=4, seed=1, top_k=0, length_penalty=0.7, **PLAIN)
    assert max(calls) == 8 and sum(calls) == 4 * len(feats)
    assert [[c.tokens for c, _ in found] for found in bounded] == [[c.tokens for c, _ in found] for found in expected]
