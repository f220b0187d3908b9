import keras
import numpy as np
import pytest

from pipeline.captioning.decoder import DecoderConfig, build_decoder, make_trainer
from pipeline.captioning.self_critical import (
    baseline,
    fine_tune,
    teacher_forcing,
    words_of,
)
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import SelfCriticalSettings

CAPTIONS = ["a dog runs on grass", "a man rides a red bike", "two girls play in water", "a black cat sleeps"]


@pytest.fixture()
def toy():
    """24 images in 4 kinds, each kind with its own caption; a decoder briefly trained on them."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    vocab = Vocabulary.build(CAPTIONS, 1, 8)
    kind = np.arange(24) % 4
    features = np.concatenate([np.eye(4)[kind] + 0.1 * rng.normal(size=(24, 4)),
                               rng.normal(size=(24, 4))], axis=1).astype("float32")
    references = [[CAPTIONS[k].split()] * 5 for k in kind]
    decoder = build_decoder(DecoderConfig(vocab.size, 8, vocab.sequence_length, 8, 16, 0.0), features)
    inputs, targets = vocab.teacher_forcing_arrays([CAPTIONS[k] for k in kind])
    make_trainer(decoder, 1e-2).fit([features, inputs], targets, epochs=6, batch_size=8, verbose=0)
    return decoder, vocab, features, references


def test_sampled_ids_are_teacher_forced_like_captions(toy):
    _, vocab, _, _ = toy
    ids = np.zeros((2, vocab.sequence_length), np.int32)
    for row, caption in enumerate(CAPTIONS[:2]):
        words = [vocab.words.index(w) for w in caption.split()]
        ids[row, :len(words) + 1] = [*words, vocab.end_id]
    expected = vocab.teacher_forcing_arrays(CAPTIONS[:2])
    for got, want in zip(teacher_forcing(ids, vocab), expected):
        np.testing.assert_array_equal(got, want)
    assert [" ".join(w) for w in words_of(ids, vocab)] == CAPTIONS[:2]


@pytest.mark.parametrize(("baseline", "top_k"), [("greedy", 0), ("samples", 0), ("samples", 3)])
def test_self_critical_training_raises_the_reward(toy, baseline, top_k):
    decoder, vocab, features, references = toy
    rows = np.arange(24)
    history = fine_tune(decoder, vocab, features, rows[:16], references[:16], rows[16:], references[16:],
                        SelfCriticalSettings(epochs=12, learning_rate=1e-2, samples=5, baseline=baseline, top_k=top_k,
                                             batch_images=8), seed=0)
    assert list(history["epoch"]) == list(range(13))
    assert history["sample_reward"].iloc[-3:].mean() > 1.3 * history["sample_reward"].iloc[1]
    assert history["dev_cider"].max() > 1.3 * history["dev_cider"].iloc[0]


def test_fine_tuning_that_hurts_keeps_the_cross_entropy_weights(toy):
    """A learning rate far too large wrecks the decoder; the weights of epoch 0 come back."""
    decoder, vocab, features, references = toy
    before = [w.copy() for w in decoder.get_weights()]
    rows = np.arange(24)
    history = fine_tune(decoder, vocab, features, rows[:16], references[:16], rows[16:], references[16:],
                        SelfCriticalSettings(epochs=2, learning_rate=50.0, samples=2, baseline="greedy", top_k=0, batch_images=16), seed=0)
    assert history["dev_cider"].iloc[1:].max() < history["dev_cider"].iloc[0]
    for got, want in zip(decoder.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def test_baselines():
    scores = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])  # two images, three samples each
    np.testing.assert_array_equal(baseline(scores, np.array([5.0, 7.0]), 3, "greedy"), [5, 5, 5, 7, 7, 7])
    np.testing.assert_array_equal(baseline(scores, np.array([5.0, 7.0]), 3, "samples"), [2.5, 2, 1.5, 25, 25, 10])
    with pytest.raises(ValueError, match="samples >= 2"):  # refused when the params are read
        SelfCriticalSettings(epochs=1, learning_rate=1e-4, samples=1, baseline="samples", top_k=0, batch_images=8)
    with pytest.raises(ValueError, match="top_k: 1"):
        SelfCriticalSettings(epochs=1, learning_rate=1e-4, samples=5, baseline="samples", top_k=1, batch_images=8)


def test_self_critical_training_works_on_an_attention_decoder():
    """An attention decoder (pooled vector + a grid of 2 regions) fine-tunes through the same
    code: its rewards rise as the pooled decoder's do."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    vocab = Vocabulary.build(CAPTIONS, 1, 8)
    kind = np.arange(24) % 4
    regions = np.concatenate([np.eye(4)[kind] + 0.1 * rng.normal(size=(24, 4)), rng.normal(size=(24, 4))], axis=1)
    features = np.concatenate([rng.normal(size=(24, 3)), regions], axis=1).astype("float32")  # pooled: noise
    references = [[CAPTIONS[k].split()] * 5 for k in kind]
    decoder = build_decoder(DecoderConfig(vocab.size, 3, vocab.sequence_length, 8, 16, 0.0, grid=(2, 4)), features)
    inputs, targets = vocab.teacher_forcing_arrays([CAPTIONS[k] for k in kind])
    make_trainer(decoder, 1e-2).fit([features, inputs], targets, epochs=6, batch_size=8, verbose=0)
    rows = np.arange(24)
    history = fine_tune(decoder, vocab, features, rows[:16], references[:16], rows[16:], references[16:],
                        SelfCriticalSettings(epochs=8, learning_rate=1e-2, samples=5, baseline="samples", top_k=0,
                                             batch_images=8), seed=0)
    assert history["dev_cider"].max() > 1.3 * history["dev_cider"].iloc[0]
