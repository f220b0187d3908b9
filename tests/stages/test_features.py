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
from pipeline.backbone import BackboneError, BackboneSpec, build
from pipeline.features_file import read_features
from pipeline.stages import download, features, validate
from pipeline.stages._cli import StageError
from tests.helpers import PROJECT, tiny_settings, write_params


@pytest.fixture
def prepared(workdir):
    settings = tiny_settings(**{"data.synthetic.n_images": 20})
    download.run(settings)
    validate.run(settings)
    return settings


def test_features_schema_rows_and_metadata(prepared):
    stats = features.run(prepared)
    table = pq.read_table(paths.features_file("xception"))
    assert table.num_rows == stats["images"] == 20
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[2048]"
    assert table.column("image").to_pylist() == sorted(table.column("image").to_pylist())
    meta = table.schema.metadata
    assert meta[b"backbone"] == b"xception" and meta[b"weights"] == b"none"
    assert meta[b"input_size"] == b"71" and b"keras_version" in meta and b"preprocess_input" in meta[b"preprocessing"]
    assert paths.backbone_weights_file("xception").is_file()
    assert not paths.features_file("xception").with_suffix(".parts").exists()


def test_rerun_after_a_failure_resumes_and_names_the_bad_image(prepared):
    images_dir = paths.dataset_dir("synthetic") / "Images"
    last = sorted(images_dir.iterdir())[-1]
    good = last.read_bytes()
    last.write_bytes(good[:100])  # broken after validation ran
    with pytest.raises(StageError, match=rf"undecodable image .*{last.name}"):
        features.run(prepared)
    assert not paths.features_file("xception").exists()
    last.write_bytes(good)
    stats = features.run(prepared)
    assert stats["reused"] == 16 and stats["extracted"] == 4  # parts of 8 rows were kept
    assert pq.read_table(paths.features_file("xception")).num_rows == 20


def test_embedding_does_not_depend_on_batch_size(prepared):
    features.run(prepared)
    names, one, _ = read_features(paths.features_file("xception"))
    paths.features_file("xception").unlink()
    features.run(tiny_settings(**{"data.synthetic.n_images": 20, "features.batch_size": 3}))
    names2, other, _ = read_features(paths.features_file("xception"))
    assert names == names2
    scale = np.abs(one).max()
    assert np.abs(one - other).max() / scale < 1e-5


def test_imagenet_offline_names_both_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and no way to fetch them
    with pytest.raises(BackboneError, match=r"features\.weights: none.*path"):
        build(BackboneSpec(weights="imagenet", image_size=71))


def test_local_weights_file_is_used(tmp_path):
    spec = BackboneSpec(weights="none", image_size=71, seed=3)
    model = build(spec)
    path = tmp_path / "w.weights.h5"
    model.save_weights(path)
    loaded = build(BackboneSpec(weights=str(path), image_size=71))
    x = np.random.default_rng(0).random((1, 71, 71, 3)).astype("float32")
    np.testing.assert_allclose(model(x), loaded(x), rtol=1e-5)


def test_bfloat16_precision_is_recorded_and_close_to_float32(prepared):
    features.run(prepared)
    _, exact, _ = read_features(paths.features_file("xception"))
    features.run(tiny_settings(**{"data.synthetic.n_images": 20, "features.precision": "bfloat16"}))
    _, fast, meta = read_features(paths.features_file("xception"))
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
    parts = list(paths.features_file("xception").with_suffix(".parts").glob("part-*.parquet"))
    kept = sum(pq.read_table(p).num_rows for p in parts)
    assert 8 <= kept < 300
    stats = features.run(settings)
    assert stats["reused"] == kept and stats["extracted"] == 300 - kept
