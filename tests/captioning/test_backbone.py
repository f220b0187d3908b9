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


def test_a_saved_auto_choice_is_accepted_on_another_cpu(tmp_path):
    """Shards on a CPU without bf16 follow the choice the backbone stage made, not their own."""
    import json
    from dataclasses import asdict

    cfg = features_cfg(runtime="keras", precision="auto")
    chosen_on_bf16_cpu = BackboneSpec.from_settings(cfg, NATIVE)
    folder = BackboneFolder(tmp_path)
    folder.spec_file.write_text(json.dumps({"spec": asdict(chosen_on_bf16_cpu), "chosen_on": "a bf16 CPU",
                                            "requested": {"runtime": "keras", "precision": "auto"}}))
    assert folder.agrees_with(cfg) and folder.spec().precision == "bfloat16"
    assert not folder.agrees_with(features_cfg(runtime="keras", precision="float32"))
    assert not folder.agrees_with(features_cfg(runtime="tflite", precision="auto"))
    assert not folder.agrees_with(features_cfg(runtime="keras", precision="auto", image_size=99))


@pytest.fixture
def backbone_copy(in_trained, tmp_path):
    root, _ = in_trained
    copy = tmp_path / "xception.backbone"
    shutil.copytree(root / paths.backbone_dir("xception"), copy)
    return BackboneFolder(copy)


def test_served_model_falls_back_to_keras_when_litert_cannot_load(backbone_copy, caplog):
    backbone_copy.tflite.write_bytes(b"not a flatbuffer")
    image = np.random.default_rng(0).integers(0, 255, (1, 71, 71, 3), dtype=np.uint8)
    with pytest.raises(BackboneError, match=r"cannot load .*backbone.tflite.*rerun the backbone stage"):
        backbone_copy.embedder()
    with caplog.at_level(logging.WARNING, logger="pipeline.captioning.backbone"):
        fallback = backbone_copy.embedder(fallback_to_keras=True)
    assert "falling back to the Keras runtime" in caplog.text
    assert fallback(image).shape == (1, 2048)


def saved_for(settings, runtime: str, precision: str, folder) -> BackboneFolder:
    from pipeline.stages.backbone import save_backbone

    save_backbone(settings.features.model_copy(update={"runtime": runtime, "precision": precision}), folder)
    return BackboneFolder(folder)


@pytest.fixture(scope="module")
def openvino_backbone(trained_project, tmp_path_factory):
    """The trained project's CNN saved again for the openvino runtime, float32."""
    return saved_for(trained_project[1], "openvino", "float32", tmp_path_factory.mktemp("ov") / "xception.backbone")


def test_a_served_model_whose_ir_is_missing_or_damaged_falls_back_to_keras(openvino_backbone, tmp_path, caplog):
    copy = BackboneFolder(tmp_path / "xception.backbone")
    shutil.copytree(openvino_backbone.path, copy.path)
    image = np.random.default_rng(0).integers(0, 255, (2, 71, 71, 3), dtype=np.uint8)
    expected = openvino_backbone.embedder()(image)
    for damage in (lambda: copy.openvino.write_text("<net>not an IR"), lambda: copy.openvino.unlink()):
        damage()
        with pytest.raises(BackboneError, match=r"OpenVINO cannot load"):
            copy.embedder()  # a feature shard never falls back: it would mix runtimes
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.captioning.backbone"):
            fallback = copy.embedder(fallback_to_keras=True)
        assert "falling back to the Keras runtime in " + copy.spec().precision in caplog.text
        got = fallback(image)
        cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        assert cos.min() >= 0.9999


def test_captions_do_not_change_with_the_runtime(in_trained, openvino_backbone):
    """The trained decoder captions the test images identically from keras, tflite and openvino
    float32 features."""
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
    ir = openvino_backbone.embedder()(pixels)
    assert not np.array_equal(lite, exact) and not np.array_equal(ir, exact)  # three runtimes really ran
    models = StepModels.from_decoder(load_decoder(paths.DECODER))
    vocab = Vocabulary.load(paths.VOCAB)
    for decode in (lambda m, f, v: greedy(m, f, v, no_repeat_ngram=0, batch_size=64),
                   lambda m, f, v: beam_search(m, f, v, beam_size=3, length_penalty=0.7, no_repeat_ngram=0,
                                               batch_size=64)):
        from_lite = [vocab.decode(c.tokens) for c in decode(models, lite, vocab)]
        from_keras = [vocab.decode(c.tokens) for c in decode(models, exact, vocab)]
        from_openvino = [vocab.decode(c.tokens) for c in decode(models, ir, vocab)]
        assert from_lite == from_keras == from_openvino
        assert len(set(from_lite)) > 1  # a decoder that writes one caption for all would prove nothing


def test_openvino_bfloat16_captions_stay_close(in_trained, tmp_path):
    """bfloat16 is close, not equal (cosine >= 0.9999): on the test set's barely trained decoder,
    whose captions repeat words, a few ties flip (19-20 of 24 captions stayed the same when
    measured); a real decoder's captions change less."""
    from pipeline import cpu
    from pipeline.captioning.decoder import StepModels, load_decoder
    from pipeline.captioning.decoding import beam_search
    from pipeline.captioning.vocabulary import Vocabulary

    if not cpu.has_native_bf16():
        pytest.skip(f"this CPU has no native bf16 ({cpu.describe()}): OpenVINO bfloat16 is not run here")
    _, settings = in_trained
    folder = BackboneFolder(paths.backbone_dir("xception"))
    fast = saved_for(settings, "openvino", "bfloat16", tmp_path / "xception.backbone")
    images_dir = paths.dataset_dir("synthetic") / paths.IMAGES_SUBDIR
    pixels = np.stack([load_image(p, folder.spec(), None) for p in sorted(images_dir.iterdir())[:24]])
    exact, half = embedder(load_saved(folder.weights, folder.spec()))(pixels), fast.embedder()(pixels)
    cos = (exact * half).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(half, axis=1)
    assert cos.min() >= 0.9999 and not np.array_equal(exact, half)
    models, vocab = StepModels.from_decoder(load_decoder(paths.DECODER)), Vocabulary.load(paths.VOCAB)
    beam = dict(beam_size=3, length_penalty=0.7, no_repeat_ngram=3, batch_size=64)
    same = sum(vocab.decode(a.tokens) == vocab.decode(b.tokens) for a, b in
               zip(beam_search(models, exact, vocab, **beam), beam_search(models, half, vocab, **beam)))
    assert same >= 18, f"{same} of 24 captions the same"
