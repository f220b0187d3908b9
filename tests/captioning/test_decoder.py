import keras
import numpy as np
import pytest

from pipeline.captioning.decoder import (
    DecoderConfig,
    EnsembleSteps,
    StepModels,
    attention_maps,
    build_decoder,
    decoding_models,
    ensemble_decoder,
    feature_statistics,
    grid_of,
    load_decoder,
    make_trainer,
    members_of,
    require_feature_dim,
    require_grid,
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
    assert_steps_match(decoder, decoder, rng.normal(size=(3, 7)).astype("float32"),
                       rng.integers(1, 11, size=(3, 5)).astype("int32"))


def assert_steps_match(trained, stepped, image, tokens):
    """One word at a time, ``stepped``'s inference halves give ``trained``'s teacher-forced log-probs."""
    full = keras.ops.log_softmax(trained([image, tokens], training=False), axis=-1).numpy()
    steps = StepModels.from_decoder(stepped)
    state = steps.encode(image)
    for t in range(tokens.shape[1]):
        lp, state = steps.step(tokens[:, t:t + 1], state)
        np.testing.assert_allclose(lp, full[:, t], atol=1e-5)


def test_label_smoothing_spreads_the_target_over_the_vocabulary():
    """Smoothed loss = (1 - e) x cross-entropy + e x mean over words of -log p, at real tokens."""
    keras.utils.set_random_seed(0)
    cfg = DecoderConfig(vocab_size=9, feature_dim=5, sequence_length=4, embedding_dim=4, units=6, dropout=0)
    model = build_decoder(cfg, np.random.default_rng(3).normal(size=(8, 5)).astype("float32"))
    image = np.random.default_rng(1).normal(size=(2, 5)).astype("float32")
    tokens = np.array([[1, 5, 6, 0], [1, 7, 0, 0]], "int32")
    targets = np.array([[5, 6, 2, 0], [7, 2, 0, 0]], "int32")
    logits = np.asarray(model([image, tokens]))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    real = np.argwhere(targets != 0)
    uniform = float(np.mean([-log_probs[b, t].mean() for b, t in real]))
    trainer = make_trainer(model, 1e-3, label_smoothing=0.2)
    got = float(trainer.masked_loss((image, tokens), targets, training=False, smoothing=0.2))
    np.testing.assert_allclose(got, 0.8 * masked_mean_nll(logits, targets) + 0.2 * uniform, rtol=1e-5)
    # dev loss (test_step) stays plain cross-entropy, comparable across smoothing settings
    np.testing.assert_allclose(trainer.evaluate([image, tokens], targets, batch_size=2, verbose=0),
                               masked_mean_nll(logits, targets), rtol=1e-5)


def two_decoders():
    keras.utils.set_random_seed(0)
    cfg = DecoderConfig(vocab_size=12, feature_dim=6, sequence_length=7, embedding_dim=8, units=16, dropout=0)
    rng = np.random.default_rng(5)
    return [build_decoder(cfg, rng.normal(size=(20, 6)).astype("float32")) for _ in range(2)]


def test_an_ensemble_of_copies_decodes_exactly_as_the_model():
    from pipeline.captioning.decoding import beam_search, greedy
    from pipeline.captioning.vocabulary import Vocabulary

    decoder, _ = two_decoders()
    vocab = Vocabulary(("<pad>", "<start>", "<end>", "<unk>", *"abcdefgh"), 6)
    features = np.random.default_rng(1).normal(size=(9, 6)).astype("float32")
    alone, three = decoding_models(decoder), decoding_models(ensemble_decoder([decoder] * 3))
    assert isinstance(three, EnsembleSteps) and len(three.members) == 3
    plain = dict(no_repeat_ngram=0, batch_size=16)
    for decode in (lambda m: greedy(m, features, vocab, **plain),
                   lambda m: beam_search(m, features, vocab, beam_size=3, length_penalty=0.7, **plain)):
        want, got = decode(alone), decode(three)
        assert [c.tokens for c in got] == [c.tokens for c in want]
        np.testing.assert_allclose([c.log_prob for c in got], [c.log_prob for c in want], rtol=1e-5)


def test_an_ensemble_averages_its_members_and_survives_save_and_load(tmp_path):
    first, second = two_decoders()
    ensemble = ensemble_decoder([first, second])
    image = np.random.default_rng(2).normal(size=(3, 6)).astype("float32")
    tokens = np.random.default_rng(3).integers(1, 12, size=(3, 7)).astype("int32")
    members = [keras.ops.log_softmax(m([image, tokens]), axis=-1).numpy() for m in (first, second)]
    np.testing.assert_allclose(ensemble([image, tokens]).numpy(), np.mean(members, axis=0), atol=1e-6)
    ensemble.save(tmp_path / "decoder.keras")
    loaded = load_decoder(tmp_path / "decoder.keras")
    assert len(members_of(loaded)) == 2 and members_of(first) == [first]
    np.testing.assert_allclose(loaded([image, tokens]).numpy(), ensemble([image, tokens]).numpy(), atol=1e-6)
    steps = decoding_models(loaded)  # step by step, the mean of the members' log-probs
    state = steps.encode(image)
    log_probs, state = steps.step(tokens[:, :1], state)
    np.testing.assert_allclose(log_probs, np.mean([m[:, 0] for m in members], axis=0), atol=1e-5)


def test_a_decoder_given_another_cnns_features_is_refused_naming_its_file():
    """Xception's 2,048-d decoder behind MobileNetV2's 1,280-d vectors would fail deep in
    TensorFlow; it is refused at registration and load with what is wrong."""
    cfg = DecoderConfig(vocab_size=9, feature_dim=2048, sequence_length=4, embedding_dim=4, units=6, dropout=0)
    model = build_decoder(cfg)
    require_feature_dim(model, 2048, "xception", "models/decoder.keras")
    with pytest.raises(ValueError, match=r"models/decoder\.keras was trained on 2048-d image features, but its "
                                         r"CNN mobilenet_v2_int8 makes 1280-d ones"):
        require_feature_dim(model, 1280, "mobilenet_v2_int8", "models/decoder.keras")


def attention_decoder(seed: int = 0):
    """A tiny attention decoder: 5-d pooled vectors followed by a grid of 4 regions x 3 channels."""
    keras.utils.set_random_seed(seed)
    cfg = DecoderConfig(vocab_size=11, feature_dim=5, sequence_length=6, embedding_dim=4, units=8, dropout=0.2,
                        grid=(4, 3))
    rng = np.random.default_rng(seed)
    return build_decoder(cfg, rng.normal(size=(12, cfg.input_width)).astype("float32")), cfg


def test_attention_steps_reproduce_the_teacher_forced_logits_and_survive_save_and_load(tmp_path):
    decoder, cfg = attention_decoder()
    assert grid_of(decoder) == (4, 3)
    rng = np.random.default_rng(1)
    decoder.save(tmp_path / "decoder.keras")
    loaded = load_decoder(tmp_path / "decoder.keras")
    assert grid_of(loaded) == (4, 3)
    assert_steps_match(decoder, loaded, rng.normal(size=(3, cfg.input_width)).astype("float32"),
                       rng.integers(1, 11, size=(3, 6)).astype("int32"))


def test_the_attention_decoder_looks_at_the_regions():
    """Changing one region of the grid (pooled vector kept) changes what it says next, and
    training moves each word's attention toward the region that tells that word."""
    decoder, cfg = attention_decoder()
    rng = np.random.default_rng(4)
    image = rng.normal(size=(1, cfg.input_width)).astype("float32")
    moved = image.copy()
    moved[0, cfg.feature_dim:cfg.feature_dim + 3] += 5.0  # region 0 only
    tokens = np.array([[1, 5, 6, 7, 0, 0]], "int32")
    assert not np.allclose(decoder([image, tokens]).numpy(), decoder([moved, tokens]).numpy(), atol=1e-4)

    # word 5 and then word 6 are told by region 2's first channel (+1 -> 5, -1 -> 6); the pooled
    # vector and the other regions are noise, so only looking at region 2 helps
    n = 256
    images = rng.normal(size=(n, cfg.input_width)).astype("float32")
    sign = rng.choice([-1.0, 1.0], size=n)
    images[:, cfg.feature_dim + 2 * 3] = 3 * sign
    first = np.where(sign > 0, 5, 6)
    inputs = np.stack([np.ones(n), first, np.full(n, 9), np.zeros(n), np.zeros(n), np.zeros(n)], 1).astype("int32")
    targets = np.stack([first, np.full(n, 9), np.full(n, 2), np.zeros(n), np.zeros(n), np.zeros(n)], 1).astype("int32")
    before = attention_maps(decoder, images[:32], [[int(f), 9] for f in first[:32]], 1, 6)
    make_trainer(decoder, 1e-2).fit([images, inputs], targets, batch_size=32, epochs=30, verbose=0)
    after = attention_maps(decoder, images[:32], [[int(f), 9] for f in first[:32]], 1, 6)
    assert all(m.shape == (3, 4) and np.allclose(m.sum(axis=1), 1, atol=1e-5) for m in after)
    on_region_2 = lambda maps: float(np.mean([m[0, 2] for m in maps]))  # noqa: E731  (the first word's look)
    assert on_region_2(after) > 0.5 > on_region_2(before)


def test_attention_maps_are_refused_for_a_pooled_only_decoder_and_averaged_over_an_ensemble():
    pooled, _ = two_decoders()
    with pytest.raises(ValueError, match="no attention to show"):
        attention_maps(pooled, np.zeros((1, 6), "float32"), [[3]], 1, 7)
    first, cfg = attention_decoder(0)
    second, _ = attention_decoder(1)
    image = np.random.default_rng(2).normal(size=(2, cfg.input_width)).astype("float32")
    captions = [[3, 4], [5]]
    alone = [attention_maps(m, image, captions, 1, 6) for m in (first, second)]
    both = attention_maps(ensemble_decoder([first, second]), image, captions, 1, 6)
    for row in range(2):
        np.testing.assert_allclose(both[row], (alone[0][row] + alone[1][row]) / 2, atol=1e-6)
    assert both[1].shape == (2, 4)  # one word and <end>


def test_an_attention_decoder_checks_the_pooled_width_of_its_cnn():
    decoder, _ = attention_decoder()
    require_feature_dim(decoder, 5, "some cnn", "models/decoder.keras")
    with pytest.raises(ValueError, match="trained on 5-d image features"):
        require_feature_dim(decoder, 17, "some cnn", "models/decoder.keras")


def test_an_attention_decoder_refuses_a_grid_of_another_shape_or_none_naming_both_files():
    decoder, _ = attention_decoder()
    require_grid(decoder, (4, 3), "grid.parquet", "decoder.keras")
    with pytest.raises(ValueError, match=r"decoder\.keras attends over a grid of 4 regions x 3 channels, but "
                                         r"grid\.parquet holds grids of 49 regions x 320 channels"):
        require_grid(decoder, (49, 320), "grid.parquet", "decoder.keras")
    with pytest.raises(ValueError, match=r"but pooled\.parquet holds no grid"):
        require_grid(decoder, None, "pooled.parquet", "decoder.keras")
    pooled, _ = two_decoders()
    require_grid(pooled, None, "pooled.parquet", "decoder.keras")  # reads the pooled part of any rows
    require_grid(pooled, (49, 320), "grid.parquet", "decoder.keras")
