"""The int8 ImageNet MobileNetV2 backbone: the vendored file is the published one, the features
the project computes for real pictures equal the shared ones to the last bit (shards and all),
and a file that is not this model, or a backbone folder that lost it, is refused by name."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.captioning.backbone import (
    MOBILENET_FILE,
    MOBILENET_SHA256,
    BackboneError,
    BackboneFolder,
    BackboneSpec,
    MobileNetV2Int8Embedder,
    mobilenet_file,
)
from pipeline.config import ConfigError, parse_settings
from pipeline.data.features_file import read_feature_rows, read_features
from pipeline.stages.backbone import save_backbone
from pipeline.stages.features import extract_features
from tests.helpers import PROJECT, tiny_params

OUT_OF_DOMAIN = PROJECT.parent / "shared" / "out_of_domain"
MOBILENET_PARAMS = {"features.backbone": "mobilenet_v2_int8", "features.weights": "imagenet",
                    "features.image_size": 224, "features.runtime": "auto"}


def mobilenet_cfg(**overrides):
    return parse_settings(tiny_params(**{**MOBILENET_PARAMS, **overrides})).features


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> BackboneFolder:
    out = tmp_path_factory.mktemp("mobilenet") / "mobilenet_v2_int8.backbone"
    save_backbone(mobilenet_cfg(), out)
    return BackboneFolder(out)


def test_the_vendored_file_is_the_published_model_with_its_license():
    assert hashlib.sha256(MOBILENET_FILE.read_bytes()).hexdigest() == MOBILENET_SHA256
    assert mobilenet_file("imagenet") == MOBILENET_FILE
    assert "Apache License" in (MOBILENET_FILE.parent / "LICENSE").read_text()
    assert "104342d2d3480b3e66203073dac24f4e2dbb4c41" in (MOBILENET_FILE.parent / "README.md").read_text()


@pytest.mark.skipif(not (OUT_OF_DOMAIN / "images").is_dir(), reason=f"no shared pictures in {OUT_OF_DOMAIN}")
@pytest.mark.parametrize("grid", [False, True], ids=["pooled", "with-grid"])
def test_features_of_real_pictures_equal_the_shared_ones_to_the_last_bit(folder, tmp_path, grid):
    """The features stage's own path (decode, resize, LiteRT, dequantise), in two shards of
    different batch sizes, against the Parquet made by the recipe in the shared README; with
    ``features.grid`` each picture's 7x7x320 grid too, against the shared grid file, as stored."""
    table = pq.read_table(OUT_OF_DOMAIN / "mobilenet_v2_224.parquet")
    expected = dict(zip(table.column("image").to_pylist(),
                        np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))
    shared = pq.read_table(OUT_OF_DOMAIN / "mobilenet_v2_224_grid.parquet")
    expected_grid = dict(zip(shared.column("image").to_pylist(),
                             shared.column("grid").combine_chunks().flatten().to_numpy().reshape(len(shared), -1)))
    names = sorted(expected)
    files = {n: OUT_OF_DOMAIN / "images" / n for n in names}
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    found, found_grid = {}, {}
    for i, (half, batch) in enumerate(zip(halves, (32, 7))):
        out = tmp_path / f"shard-{i}.parquet"
        extract_features(files, half, out, tmp_path / f"parts-{i}", folder, batch_size=batch, rows_per_part=50,
                         grid=grid)
        images, features, meta = read_features(out)
        assert meta["backbone"] == "mobilenet_v2_int8" and features.dtype == np.float32
        found.update(zip(images, features))
        stored = pq.read_table(out)
        assert ("grid" in stored.schema.names) == grid
        if grid:
            assert stored.schema.field("grid").type.value_type == "uint8"  # stored as the CNN gives it: 15,680 bytes
            assert meta["shape"].startswith("[7, 7, 320]") and float(meta["scale"]) == float(shared.schema.metadata[b"scale"])
            found_grid.update(zip(images, stored.column("grid").combine_chunks().flatten().to_numpy().reshape(len(images), -1)))
    assert sorted(found) == names
    differing = [n for n in names if not np.array_equal(found[n], expected[n])]
    assert differing == [], f"{len(differing)} of {len(names)} differ, e.g. {differing[:3]}"
    if grid:
        differing = [n for n in names if not np.array_equal(found_grid[n], expected_grid[n])]
        assert differing == [], f"{len(differing)} grids of {len(names)} differ, e.g. {differing[:3]}"


def test_the_grid_comes_from_the_same_pass_as_the_pooled_vector(folder):
    embed = MobileNetV2Int8Embedder(folder.tflite)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    pooled, grid = embed.with_grid(batch)
    assert pooled.shape == (3, 1280) and grid.shape == (3, 7, 7, 320) and grid.dtype == np.uint8
    assert np.array_equal(pooled, embed(batch))
    assert np.array_equal(embed(batch[1:2]), pooled[1:2])  # the same vector whatever batch it comes in
    assert embed.grid_quantization == pytest.approx((0.11694499105215073, 130))


def test_a_file_that_is_not_this_model_is_refused_naming_it(tmp_path):
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(BackboneError, match=r"cannot load .*junk\.tflite as a TFLite model"):
        MobileNetV2Int8Embedder(junk)
    import tensorflow as tf

    from pipeline.captioning.backbone import keras

    tiny = keras.Sequential([keras.Input((224, 224, 3)), keras.layers.GlobalAveragePooling2D()])
    other = tmp_path / "other.tflite"
    other.write_bytes(tf.lite.TFLiteConverter.from_keras_model(tiny).convert())
    with pytest.raises(BackboneError, match=r"other\.tflite is not the MobileNetV2 int8 model: its input is "
                                            r"\(1, 224, 224, 3\) float32"):
        MobileNetV2Int8Embedder(other)
    with pytest.raises(BackboneError, match="is not a file"):
        mobilenet_file(str(tmp_path / "absent.tflite"))
    with pytest.raises(BackboneError, match="no random-init"):
        mobilenet_file("none")


def test_a_backbone_folder_that_lost_its_file_says_which(folder, tmp_path):
    copy = BackboneFolder(tmp_path / "mobilenet_v2_int8.backbone")
    shutil.copytree(folder.path, copy.path)
    copy.tflite.unlink()
    with pytest.raises(BackboneError, match=r"mobilenet_v2_int8\.backbone/backbone\.tflite is missing"):
        copy.embedder()


def test_the_folder_records_one_runtime_and_a_digest_of_the_file(folder):
    spec = folder.spec()
    assert (spec.name, spec.runtime, spec.precision, spec.feature_dim) == ("mobilenet_v2_int8", "tflite_int8", "int8", 1280)
    assert folder.agrees_with(mobilenet_cfg())
    assert not folder.agrees_with(parse_settings(tiny_params()).features)  # xception params
    assert folder.metadata()["runtime_choice"] == "as configured"  # no images given to measure on
    assert len(folder.digest()) == 64


def test_auto_measures_the_one_runtime_it_has(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    stats = save_backbone(mobilenet_cfg(**{"features.batch_size": 2, "features.auto_rounds": 1}), tmp_path / "b", images)
    [row] = stats["measurements"]
    assert (row["runtime"], row["chosen"], row["min_cosine"]) == ("tflite_int8", True, 1.0)
    assert BackboneFolder(tmp_path / "b").record()["measurements"][0]["seconds_per_image"] > 0


@pytest.mark.parametrize("key,value,named", [("image_size", 299, "image_size: 299"),
                                              ("runtime", "openvino", "runtime: openvino"),
                                              ("weights", "none", "weights: none")])
def test_params_that_cannot_run_it_are_refused_by_key(key, value, named):
    with pytest.raises(ConfigError, match=named):
        mobilenet_cfg(**{f"features.{key}": value})


def test_the_spec_says_what_it_runs():
    spec = BackboneSpec.from_settings(mobilenet_cfg())
    assert "uint8 into the int8 TFLite model" in spec.metadata()["preprocessing"]
    assert Path(mobilenet_file(spec.weights)).name == "mobilenet_v2_1.0_224_quant.tflite"


@pytest.mark.parametrize("decoder", ["lstm", "attention"])
def test_the_pipeline_runs_on_it_from_photos_to_a_served_caption(workdir, monkeypatch, decoder):
    """The DVC stages with ``features.backbone: mobilenet_v2_int8``: two shards (merged equal to
    embedding each photo alone), training, the registered model, which captions a photo with the
    vendored CNN it carries. With ``train.decoder: attention`` (and ``features.grid``) the same
    stages carry each photo's grid, and the served model computes it and says where it looked."""
    import mlflow
    import pandas as pd

    from pipeline import paths
    from pipeline.captioning.backbone import load_image
    from pipeline.stages import calibrate, download, evaluate, register, train, validate
    from tests.helpers import jpeg_bytes, run_features

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    settings = parse_settings(tiny_params(**{**MOBILENET_PARAMS, "features.runtime": "tflite_int8",
                                             "features.shards": [0, 1], "data.synthetic.n_images": 30,
                                             "train.epochs": 1, "decoding.consensus.samples": 0,
                                             "train.decoder": decoder, "features.grid": decoder == "attention"}))
    download.run(settings)
    validate.run(settings)
    run_features(settings)
    images, features, meta, grid = read_feature_rows(paths.features_file("mobilenet_v2_int8"))
    assert features.shape == (30, 1280 + (49 * 320 if grid else 0)) and meta["backbone"] == "mobilenet_v2_int8"
    assert grid == ((49, 320) if decoder == "attention" else None)
    folder = BackboneFolder(paths.backbone_dir("mobilenet_v2_int8"))
    photo = paths.dataset_dir("synthetic") / paths.IMAGES_SUBDIR / images[3]
    alone = load_image(photo, folder.spec(), None)[None]
    assert np.array_equal(folder.embedder()(alone)[0], features[3, :1280])
    if grid:  # the rows the served model computes are the rows the stages trained on
        assert np.array_equal(folder.grid_embedder().rows(alone)[0], features[3])
    train.run(settings)
    calibrate.run(settings)
    evaluate.run(settings)
    report = register.run(settings)
    model = mlflow.pyfunc.load_model(report["model_uri"])
    assert model.unwrap_python_model().spec.name == "mobilenet_v2_int8"
    out = model.predict(pd.DataFrame({"image": [jpeg_bytes()]}))
    assert out["error"].iloc[0] == "" and out["caption"].iloc[0].strip()
    served = model.unwrap_python_model()
    (said,) = served.caption_images([photo.read_bytes()], attention=True)
    if decoder == "lstm":
        assert said["attention"] is None  # nothing to show, and said so rather than made up
        assert "where it looked" not in paths.GALLERY.read_text()
        return
    # the evaluation gallery shows where it looked for each test photo, and the run keeps the strips
    gallery = paths.GALLERY.read_text()
    shown = gallery.count("<figure>")
    assert shown >= 1 and gallery.count("<summary>where it looked</summary>") == shown
    assert gallery.count('<img class="strip" src="data:image/png;base64,') == shown
    strips = mlflow.MlflowClient().list_artifacts(report["run_id"], "attention")
    assert len(strips) == shown and all(a.path.endswith(".png") for a in strips)
    looked = said["attention"]
    assert looked["grid"] == [7, 7] and looked["words"] == said["caption"].split()
    assert len(looked["maps"]) == len(looked["words"]) and all(len(m) == 49 for m in looked["maps"])
    assert all(max(m) == 100 and min(m) >= 0 for m in looked["maps"])  # percent of each word's strongest region
    # a model of another width reusing this one's stored embeddings would caption noise: its key differs
    assert served.backbone_digest == folder.digest() + "+grid"
