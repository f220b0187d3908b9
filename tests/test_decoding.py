import keras
import numpy as np
import pytest

from pipeline.decoding import _banned, beam_search, greedy, one_at_a_time_greedy
from pipeline.model import DecoderConfig, StepModels, build_decoder
from pipeline.text import Vocabulary

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
    for caption in greedy(models, feats, vocab):
        assert len(caption.tokens) <= vocab.max_length
        assert not {vocab.pad_id, vocab.start_id, vocab.unk_id, vocab.end_id} & set(caption.tokens)


def test_no_repeat_ngram_blocks_loops(setup):
    models, vocab, feats = setup
    for caption in greedy(models, feats, vocab, no_repeat_ngram=2):
        bigrams = list(zip(caption.tokens, caption.tokens[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_batched_greedy_equals_one_image_at_a_time(setup):
    models, vocab, feats = setup
    batched = greedy(models, feats, vocab, batch_size=5)
    single = one_at_a_time_greedy(models, feats, vocab)
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    np.testing.assert_allclose([c.log_prob for c in batched], [c.log_prob for c in single], atol=1e-4)


def test_beam_best_scores_at_least_greedy(setup):
    models, vocab, feats = setup
    g = greedy(models, feats, vocab)
    b = beam_search(models, feats, vocab, beam_size=4, length_penalty=0.0)
    for gc, bc in zip(g, b):
        assert bc.log_prob >= gc.log_prob - 1e-4
        assert not {vocab.pad_id, vocab.start_id, vocab.unk_id} & set(bc.tokens)


def test_beam_of_one_is_greedy(setup):
    models, vocab, feats = setup
    assert [c.tokens for c in beam_search(models, feats, vocab, beam_size=1, length_penalty=0.0)] == \
        [c.tokens for c in greedy(models, feats, vocab)]


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

    for decode in (greedy, beam_search):
        assert all(len(c.tokens) == 1 for c in decode(EndFirst(), feats, vocab))
