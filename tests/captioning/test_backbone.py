"""The backbone runtimes: which precision ``auto`` picks on which CPU, the served model's
fallback when LiteRT cannot load, and captions that do not change with the runtime."""

import logging
import shutil

import numpy as np
import pytest

from pipeline import paths
from pipeline.captioning.backbone import (
    BackboneError,
    BackboneFolder,
    BackboneSpec,
    embedder,
    load_image,
    load_saved,
)
from pipeline.config import parse_settings
from tests.helpers import tiny_params

NATIVE = frozenset({"avx2", "avx512f", "avx512_bf16"})
AMX = frozenset({"avx2", "amx_bf16"})
AVX2_ONLY = frozenset({"avx2", "fma"})


def features_cfg(**overrides):
    return parse_settings(tiny_params(**{f"features.{k}": v for k, v in overrides.items()})).features


@pytest.mark.parametrize("runtime,flags,expected", [
    ("keras", NATIVE, "bfloat16"), ("keras", AMX, "bfloat16"), ("keras", AVX2_ONLY, "float32"),
    ("tflite", NATIVE, "float32"), ("tflite_int8", AMX, "float32")])
def test_auto_precision_uses_bf16_only_where_the_cpu_has_it(runtime, flags, expected):
    spec = BackboneSpec.from_settings(features_cfg(runtime=runtime, precision="auto"), flags)
    assert (spec.runtime, spec.precision) == (runtime, expected)


def test_a_saved_auto_choice_is_accepted_on_another_cpu():
    """Shards on a CPU without bf16 follow the choice the backbone stage made, not their own."""
    cfg = features_cfg(runtime="keras", precision="auto")
    chosen_on_bf16_cpu = BackboneSpec.from_settings(cfg, NATIVE)
    assert chosen_on_bf16_cpu.agrees_with(cfg)
    assert not chosen_on_bf16_cpu.agrees_with(features_cfg(runtime="keras", precision="float32"))
    assert not chosen_on_bf16_cpu.agrees_with(features_cfg(runtime="tflite", precision="auto"))


@pytest.fixture
def backbone_copy(in_trained, tmp_path):
    root, _ = in_trained
    copy = tmp_path / "xception.backbone"
    shutil.copytree(root / paths.backbone_dir("xception"), copy)
    return BackboneFolder(copy)


def test_served_model_falls_back_to_keras_when_litert_cannot_load(backbone_copy, caplog):
    backbone_copy.tflite.write_bytes(b"not a flatbuffer")
    image = np.random.default_rng(0).integers(0, 255, (1, 71, 71, 3), dtype=np.uint8)
    with pytest.raises(BackboneError, match=r"cannot load .*backbone.tflite.*runtime: keras"):
        backbone_copy.embedder()
    with caplog.at_level(logging.WARNING, logger="pipeline.captioning.backbone"):
        fallback = backbone_copy.embedder(fallback_to_keras=True)
    assert "falling back to the Keras runtime" in caplog.text
    assert fallback(image).shape == (1, 2048)


def test_captions_do_not_change_with_the_runtime(in_trained):
    """The trained decoder captions the test images identically from keras and tflite features."""
    from pipeline.captioning.decoder import StepModels, load_decoder
    from pipeline.captioning.decoding import beam_search, greedy
    from pipeline.captioning.vocabulary import Vocabulary

    root, settings = in_trained
    folder = BackboneFolder(paths.backbone_dir("xception"))
    spec = folder.spec()
    assert spec.runtime == "tflite"
    images_dir = paths.dataset_dir("synthetic") / paths.IMAGES_SUBDIR
    pixels = np.stack([load_image(p, spec, None) for p in sorted(images_dir.iterdir())[:24]])
    lite = folder.embedder()(pixels)
    exact = embedder(load_saved(folder.weights, spec))(pixels)
    assert not np.array_equal(lite, exact)  # two runtimes really ran
    models = StepModels.from_decoder(load_decoder(paths.DECODER))
    vocab = Vocabulary.load(paths.VOCAB)
    for decode in (lambda m, f, v: greedy(m, f, v, no_repeat_ngram=0, batch_size=64),
                   lambda m, f, v: beam_search(m, f, v, beam_size=3, length_penalty=0.7, no_repeat_ngram=0,
                                               batch_size=64)):
        from_lite = [vocab.decode(c.tokens) for c in decode(models, lite, vocab)]
        from_keras = [vocab.decode(c.tokens) for c in decode(models, exact, vocab)]
        assert from_lite == from_keras
        assert len(set(from_lite)) > 1  # a decoder that writes one caption for all would prove nothing
