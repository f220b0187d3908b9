import keras
import numpy as np

from pipeline.model import (
    DecoderConfig,
    StepModels,
    build_decoder,
    feature_statistics,
    make_trainer,
)


def masked_mean_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Reference: mean negative log-likelihood over real (non-pad) target tokens only."""
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    real = np.argwhere(targets != 0)
    return float(-np.mean([log_probs[b, t, targets[b, t]] for b, t in real]))


def test_trainer_loss_is_the_mean_over_real_tokens_and_ignores_padding():
    """The trainer's loss (classifier run on real positions only) equals the mean over real
    tokens of the full padded logits; what sits in padded positions changes nothing; and
    fitting lowers it."""
    keras.utils.set_random_seed(0)
    cfg = DecoderConfig(vocab_size=9, feature_dim=5, sequence_length=4, embedding_dim=4, units=6, dropout=0)
    model = build_decoder(cfg, np.random.default_rng(3).normal(size=(8, 5)).astype("float32"))
    trainer = make_trainer(model, 3e-2)
    image = np.random.default_rng(1).normal(size=(2, 5)).astype("float32")
    tokens = np.array([[1, 5, 6, 0], [1, 7, 0, 0]], "int32")
    targets = np.array([[5, 6, 2, 0], [7, 2, 0, 0]], "int32")  # 0 = <pad>
    reported = trainer.evaluate([image, tokens], targets, batch_size=2, verbose=0)
    expected = masked_mean_nll(np.asarray(model([image, tokens])), targets)
    np.testing.assert_allclose(reported, expected, rtol=1e-5)
    assert not np.isclose(reported, masked_mean_nll(np.asarray(model([image, tokens])),
                                                   np.where(targets == 0, 3, targets)))  # pads would count
    junk = np.where(tokens == 0, 8, tokens).astype("int32")  # garbage after the caption ends
    np.testing.assert_allclose(trainer.evaluate([image, junk], targets, batch_size=2, verbose=0),
                               reported, rtol=1e-5)
    trainer.fit([image, tokens], targets, batch_size=2, epochs=20, verbose=0)
    assert trainer.evaluate([image, tokens], targets, batch_size=2, verbose=0) < reported / 2


def test_feature_statistics_floor_constant_dimensions():
    feats = np.random.default_rng(0).normal(1e-5, 4e-5, size=(50, 4))
    feats[:, 2] = 0.0  # a unit never active on the train split
    mean, variance = feature_statistics(feats)
    assert variance[2] > 0 and variance[2] >= np.median(feats.var(axis=0)) * 1e-4 * 0.999
    np.testing.assert_allclose(variance[[0, 1, 3]], feats.var(axis=0)[[0, 1, 3]], rtol=1e-5)
    np.testing.assert_allclose(mean, feats.mean(axis=0), rtol=1e-5, atol=1e-12)


def test_step_models_reproduce_the_teacher_forced_logits():
    keras.utils.set_random_seed(0)
    cfg = DecoderConfig(vocab_size=11, feature_dim=7, sequence_length=5, embedding_dim=4, units=8, dropout=0.2)
    rng = np.random.default_rng(2)
    decoder = build_decoder(cfg, rng.normal(size=(10, 7)).astype("float32"))
    image = rng.normal(size=(3, 7)).astype("float32")
    tokens = rng.integers(1, 11, size=(3, 5)).astype("int32")
    full = keras.ops.log_softmax(decoder([image, tokens], training=False), axis=-1).numpy()
    steps = StepModels.from_decoder(decoder)
    state = steps.encode(image)
    for t in range(5):
        lp, state = steps.step(tokens[:, t:t + 1], state)
        np.testing.assert_allclose(lp, full[:, t], atol=1e-5)
