import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import paths
from pipeline.captioning.backbone import BackboneError, BackboneFolder, BackboneSpec, build
from pipeline.data.features_file import read_features
from pipeline.stages import backbone, download, features, feedback, merge_features, validate
from pipeline.stages._cli import StageError
from tests.helpers import PROJECT, run_features, tiny_settings, write_params

SHARD0 = paths.feature_shard_file("xception", 0)
PARTS0 = paths.feature_parts_dir("xception", 0)


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory):
    """A 20-image project through validate and the backbone stage, built once per module."""
    import os

    root, old = tmp_path_factory.mktemp("prepared"), os.getcwd()
    settings = tiny_settings(**{"data.synthetic.n_images": 20})
    os.chdir(root)
    try:
        download.run(settings)
        validate.run(settings)
        backbone.run(settings)
        feedback.run(settings)  # no corrections yet: an empty export
        features.run(settings, paths.FEEDBACK_SHARD)
    finally:
        os.chdir(old)
    return root, settings


@pytest.fixture
def prepared(prepared_once, workdir):
    """A copy of that project of the test's own (tests break images, change the backbone)."""
    import shutil

    root, settings = prepared_once
    shutil.copytree(root, workdir, dirs_exist_ok=True)
    return settings


def test_features_schema_rows_and_metadata(prepared):
    stats = features.run(prepared)
    merge_features.run(prepared)
    table = pq.read_table(paths.features_file("xception"))
    assert table.num_rows == stats["images"] == 20
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[2048]"
    assert table.column("image").to_pylist() == sorted(table.column("image").to_pylist())
    meta = table.schema.metadata
    assert meta[b"backbone"] == b"xception" and meta[b"weights"] == b"none"
    assert meta[b"input_size"] == b"71" and b"keras_version" in meta and b"preprocess_input" in meta[b"preprocessing"]
    assert meta[b"runtime"] == b"tflite" and meta[b"precision"] == b"float32"  # the tests' default
    assert BackboneFolder(paths.backbone_dir("xception")).tflite.is_file()
    assert not PARTS0.exists()


def test_rerun_after_a_failure_resumes_and_names_the_bad_image(prepared):
    images_dir = paths.dataset_dir("synthetic") / "Images"
    last = sorted(images_dir.iterdir())[-1]
    good = last.read_bytes()
    last.write_bytes(good[:100])  # broken after validation ran
    with pytest.raises(StageError, match=rf"undecodable image .*{last.name}"):
        features.run(prepared)
    assert not SHARD0.exists()
    last.write_bytes(good)
    stats = features.run(prepared)
    assert stats["reused"] == 16 and stats["extracted"] == 4  # parts of 8 rows were kept
    assert pq.read_table(SHARD0).num_rows == 20


@pytest.mark.parametrize("runtime", ["keras", "tflite", "openvino"])
def test_embedding_is_bit_identical_whatever_the_batch_size(prepared, runtime):
    """Shards, resumed runs and the served model embed an image in different batches (a
    batch of one included); its vector must not change in the last bit."""
    settings = tiny_settings(**{"data.synthetic.n_images": 20, "features.runtime": runtime})
    backbone.run(settings)
    features.run(settings)
    names, one, _ = read_features(SHARD0)
    for batch_size in (3, 1):
        SHARD0.unlink()
        features.run(tiny_settings(**{"data.synthetic.n_images": 20, "features.batch_size": batch_size,
                                      "features.runtime": runtime}))
        names2, other, _ = read_features(SHARD0)
        assert names == names2
        assert np.array_equal(one, other), f"batch size {batch_size} changed the embeddings"


def test_sharded_features_merge_to_the_same_bytes_as_one_shard(prepared, tmp_path):
    run_features(prepared)
    single = paths.features_file("xception").read_bytes()
    sharded = tiny_settings(**{"data.synthetic.n_images": 20, "features.shards": [0, 1, 2]})
    stats = [features.run(sharded, shard) for shard in sharded.features.shards]
    assert sorted(s["images"] for s in stats) != [0, 0, 20] and sum(s["images"] for s in stats) == 20
    merge_features.run(sharded)
    assert paths.features_file("xception").read_bytes() == single


def test_merge_refuses_shards_of_another_layout(prepared):
    two = tiny_settings(**{"data.synthetic.n_images": 20, "features.shards": [0, 1]})
    for shard in (0, 1):
        features.run(two, shard)
    paths.feature_shard_file("xception", 1).unlink()
    with pytest.raises(StageError, match=r"xception-1.parquet not found"):
        merge_features.run(two)
    three = tiny_settings(**{"data.synthetic.n_images": 20, "features.shards": [0, 1, 2]})
    features.run(three, 1)
    features.run(three, 2)  # shard 0 is still the 2-shard one
    with pytest.raises(StageError, match=r"xception-0.parquet holds \d+ images of other shards"):
        merge_features.run(three)


def test_a_shard_outside_features_shards_is_an_error(prepared):
    with pytest.raises(StageError, match=r"--shard 3 is not one of features.shards \[0\] or feedback"):
        features.run(prepared, 3)


def test_a_corrected_photo_is_embedded_as_the_same_photo_in_the_dataset(prepared):
    """The corrections' shard: only the corrected photos, each vector bit-identical to the one
    the dataset's shard has for the same image, merged beside the dataset's."""
    from pipeline.feedback.store import FeedbackStore, sha256_of

    run_features(prepared)
    names, vectors, _ = read_features(paths.features_file("xception"))
    image = sorted((paths.dataset_dir("synthetic") / "Images").iterdir())[3]
    data = image.read_bytes()
    store = FeedbackStore("feedback.db")
    store.served([{"id": "c1", "model": "m/1", "caption": "x", "image_sha256": sha256_of(data), "trace_id": None}])
    store.add("c1", "wrong", "a green circle in the middle", None, data)
    feedback.run(prepared)
    stats = features.run(prepared, paths.FEEDBACK_SHARD)
    assert stats["images"] == 1
    merge_features.run(prepared)
    merged, merged_vectors, _ = read_features(paths.features_file("xception"))
    assert len(merged) == len(names) + 1 and f"{sha256_of(data)}.jpg" in merged
    same = merged_vectors[merged.index(f"{sha256_of(data)}.jpg")]
    assert np.array_equal(same, vectors[names.index(image.name)])


def spec(**fields) -> BackboneSpec:
    """The tiny test CNN's spec, as the backbone stage makes it from params, with ``fields`` changed."""
    from dataclasses import replace

    return replace(BackboneSpec.from_settings(tiny_settings().features), **fields)


def test_imagenet_offline_names_both_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and no way to fetch them
    with pytest.raises(BackboneError, match=r"features\.weights: none.*path"):
        build(spec(weights="imagenet"))


def test_local_weights_file_is_used(tmp_path):
    model = build(spec(weights="none", seed=3))
    path = tmp_path / "w.weights.h5"
    model.save_weights(path)
    loaded = build(spec(weights=str(path)))
    x = np.random.default_rng(0).random((1, 71, 71, 3)).astype("float32")
    np.testing.assert_allclose(model(x), loaded(x), rtol=1e-5)


def features_with(**features_params) -> tuple[np.ndarray, dict, dict]:
    """(embeddings, Parquet metadata, backbone stats) of shard 0 after the backbone and features
    stages ran with these ``features.*`` params (the default ones when none are given)."""
    settings = tiny_settings(**{"data.synthetic.n_images": 20,
                                **{f"features.{k}": v for k, v in features_params.items()}})
    stats = backbone.run(settings)
    features.run(settings)
    _, embeddings, meta = read_features(SHARD0)
    return embeddings, meta, stats


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_tflite_features_are_the_keras_features(prepared):
    """The float32 TFLite runtime must not change what the decoder sees."""
    lite, meta, _ = features_with()
    exact, keras_meta, _ = features_with(runtime="keras", precision="float32")
    assert (meta["runtime"], keras_meta["runtime"]) == ("tflite", "keras")
    assert cosines(lite, exact).min() >= 0.99999
    np.testing.assert_allclose(lite, exact, rtol=1e-3, atol=1e-3 * np.abs(exact).max())


def test_a_grid_from_a_cnn_without_one_is_refused_before_any_image_is_read(prepared):
    """By params.yaml's check, naming the key; and by the stage, for settings made past it."""
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"features.*grid: true is built for backbone mobilenet_v2_int8 only"):
        tiny_settings(**{"features.grid": True})
    asked = prepared.model_copy(update={"features": prepared.features.model_copy(update={"grid": True})})
    with pytest.raises(StageError, match=r"grids of regions are extracted from mobilenet_v2_int8 only so far"):
        features.run(asked)
    assert not paths.feature_shard_file("xception", 0).exists() and not PARTS0.exists()


def test_features_refuse_a_backbone_built_for_other_params(prepared):
    other = tiny_settings(**{"data.synthetic.n_images": 20, "features.runtime": "keras"})
    with pytest.raises(StageError, match=r"rerun the backbone stage"):
        features.run(other)


def test_int8_runtime_is_calibrated_on_train_images_and_stays_close(prepared):
    exact, _, _ = features_with()
    approx, meta, stats = features_with(runtime="tflite_int8", calibration_images=4)
    assert stats["runtime"] == meta["runtime"] == "tflite_int8"
    assert cosines(approx, exact).mean() > 0.9 and not np.array_equal(approx, exact)


def test_bfloat16_precision_is_recorded_and_close_to_float32(prepared):
    exact, _, _ = features_with()
    fast, meta, _ = features_with(runtime="keras", precision="bfloat16")
    assert meta["precision"] == "bfloat16" and fast.dtype == np.float32
    assert np.corrcoef(exact.ravel(), fast.ravel())[0, 1] > 0.999
    assert not np.array_equal(exact, fast)


def test_torn_part_is_redone_without_overwriting_later_parts(tmp_path):
    parts = features._Parts(tmp_path / "x.parts", {"spec": 1})
    vec = np.ones((2, 4), np.float32)
    parts.write(["a", "b"], vec)
    parts.write(["c", "d"], vec)
    parts.write(["e", "f"], vec)
    (tmp_path / "x.parts" / "part-00001.parquet").write_bytes(b"torn write")
    assert parts.done() == {"a", "b", "e", "f"}
    parts.write(["c", "d"], vec)
    assert [p.name for p in parts.files()] == ["part-00000.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert features._Parts(tmp_path / "x.parts", {"spec": 1}).done() == set("abcdef")
    assert features._Parts(tmp_path / "x.parts", {"spec": 2}).done() == set()  # other config: discarded


def test_sigterm_before_the_first_part_keeps_the_finished_images(workdir):
    """A stage stopped by SIGTERM (Airflow, kill) before its first part of rows_per_part images
    used to keep nothing; it now saves what it computed and the rerun resumes from there."""
    overrides = {"data.synthetic.n_images": 300, "features.batch_size": 4,
                 "features.rows_per_part": 100_000}
    settings = tiny_settings(**overrides)
    download.run(settings)
    validate.run(settings)
    backbone.run(settings)
    write_params(workdir, **overrides)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.stages.features"], cwd=workdir,
                            env={**__import__("os").environ, "PYTHONPATH": str(PROJECT)},
                            stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(64), "")),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(n) for n in re.findall(r"(\d+)/300", "".join(seen))]
        if done and max(done) >= 8:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "features finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 143
    reader.join(timeout=30)
    log = "".join(seen)
    assert "interrupted" in log and "Traceback" not in log
    assert "absl::InitializeLog" not in log and "oneDNN" not in log  # quiet TensorFlow start-up
    parts = list(PARTS0.glob("part-*.parquet"))
    kept = sum(pq.read_table(p).num_rows for p in parts)
    assert 8 <= kept < 300
    stats = features.run(settings)
    assert stats["reused"] == kept and stats["extracted"] == 300 - kept


def test_a_name_that_leads_outside_the_image_folder_is_never_opened(prepared, tmp_path):
    """A captions table edited by hand after validate: features refuses the name, reads nothing."""
    import pandas as pd

    secret = tmp_path / "secret.jpg"
    secret.write_bytes((paths.dataset_dir("synthetic") / "Images").glob("*.jpg").__next__().read_bytes())
    table = pd.read_parquet(paths.CAPTIONS)
    hostile = table.iloc[:1].assign(image=str(secret))
    pd.concat([table, hostile]).to_parquet(paths.CAPTIONS, index=False)
    opened = []
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and args and
                     str(args[0]).endswith("secret.jpg") else None)
    with pytest.raises(StageError, match=r"refusing image name .*secret\.jpg.*is a path"):
        features.run(prepared)
    assert opened == [] and not SHARD0.exists()


def test_openvino_features_agree_with_keras_float32(prepared):
    """The IR converted from the same weights: float32 equal to the cosine bound, and bfloat16
    within it where the CPU has native bf16."""
    from pipeline import cpu

    exact, _, _ = features_with(runtime="keras", precision="float32")
    ir, meta, stats = features_with(runtime="openvino", precision="float32")
    assert meta["runtime"] == "openvino" and BackboneFolder(paths.backbone_dir("xception")).openvino.is_file()
    assert cosines(ir, exact).min() >= 0.99999 and stats["conversion_seconds"] > 0
    if cpu.has_native_bf16():
        fast, meta, _ = features_with(runtime="openvino", precision="auto")
        assert meta["precision"] == "bfloat16"
        assert cosines(fast, exact).min() >= 0.9999 and not np.array_equal(fast, exact)


def test_auto_measures_every_runtime_records_them_and_picks_the_fastest_that_agrees(prepared):
    import json

    from pipeline import cpu

    _, meta, stats = features_with(runtime="auto")
    found = stats["measurements"]
    ran = {(r["runtime"], r["precision"]) for r in found}
    assert {("keras", "float32"), ("tflite", "float32"), ("openvino", "float32")} <= ran
    assert (("keras", "bfloat16") in ran) == cpu.has_native_bf16()  # bf16 only where it is native
    (chosen,) = [r for r in found if r["chosen"]]
    assert chosen["eligible"] and chosen["min_cosine"] >= 0.9999
    assert chosen["ratio"] == max(r["ratio"] for r in found if r["eligible"])
    assert (meta["runtime"], meta["precision"]) == (chosen["runtime"], chosen["precision"])
    assert meta["runtime_requested"] == "auto" and f"{chosen['runtime']} {chosen['precision']}" in meta["runtime_choice"]
    record = json.loads(BackboneFolder(paths.backbone_dir("xception")).spec_file.read_text())
    assert record["requested"] == {"runtime": "auto", "precision": "auto"} and record["measurements"] == found
    assert all(r["eligible"] == (r["min_cosine"] >= 0.9999) for r in found)


def test_auto_measures_bf16_only_on_a_cpu_that_has_it_natively():
    from pipeline.captioning.backbone import candidates

    for flags in (frozenset({"avx2", "fma"}), frozenset({"avx2", "avx512f"})):
        assert {precision for _, precision in candidates(flags)} == {"float32"}
    for flags in (frozenset({"avx512_bf16"}), frozenset({"amx_bf16"})):
        assert ("keras", "bfloat16") in candidates(flags) and ("openvino", "bfloat16") in candidates(flags)
    assert candidates(frozenset())[0] == ("keras", "float32")  # the reference, measured first


def test_a_shard_follows_the_recorded_choice_or_says_why_it_cannot(prepared):
    """A shard on another CPU runs what spec.json says; OpenVINO bf16 on a CPU without native
    bf16 is refused with the way out, never silently run in float32."""
    import json

    settings = tiny_settings(**{"data.synthetic.n_images": 20, "features.runtime": "openvino",
                                "features.precision": "float32"})
    backbone.run(settings)
    folder = BackboneFolder(paths.backbone_dir("xception"))
    record = json.loads(folder.spec_file.read_text())
    record["spec"]["precision"] = "bfloat16"  # as if chosen on a bf16 machine
    record["chosen_on"] = "a CPU with avx512_bf16"
    folder.spec_file.write_text(json.dumps(record))
    with pytest.raises(BackboneError, match=r"native bf16.*computed with openvino bfloat16 on a CPU with avx512_bf16.*rerun the backbone"):
        folder.embedder(cpu_flags=frozenset({"avx2"}))


def test_shards_with_and_without_grids_are_not_merged(tmp_path):
    """A shard extracted with ``features.grid`` and one without (params changed between them)
    would give the decoders rows of two layouts: the merge refuses, naming the file."""
    from pipeline.data.features_file import embedding_table, grid_metadata, write_table

    meta = {"backbone": "mobilenet_v2_int8"}
    write_table(embedding_table(["a.jpg"], np.ones((1, 4), np.float32)).replace_schema_metadata(meta),
                tmp_path / "shard-0.parquet")
    with_grid = embedding_table(["b.jpg"], np.ones((1, 4), np.float32), np.zeros((1, 1, 1, 2), np.uint8))
    write_table(with_grid.replace_schema_metadata({**meta, **grid_metadata((1, 1, 2), (0.5, 3))}),
                tmp_path / "feedback.parquet")
    with pytest.raises(ValueError, match=r"feedback.parquet was computed with another CNN or settings"):
        merge_features.merge_shards([tmp_path / "shard-0.parquet"], {"a.jpg", "b.jpg"}, tmp_path / "out.parquet",
                                    64, tmp_path / "feedback.parquet")
    assert not (tmp_path / "out.parquet").exists()
