"""register: champion and challenger judged on the same test images (paired bootstrap), a
champion that cannot be loaded is replaced, and the model is logged from code."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline import paths
from pipeline.stages import calibrate, download, evaluate, register, train, validate
from pipeline.stages._cli import StageError
from tests.helpers import jpeg_bytes, run_features, tiny_settings

NAME = "flickr8k-captioner"
def test_first_model_is_promoted_and_logged_from_code(registered):
    root, report, caught = registered
    assert report["decision"] == "promoted" and report["reason"] == "there was no champion"
    assert not [w for w in caught if "cloudpickle" in str(w.message).lower()]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == report["version"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}",
                                                     tracking_uri=f"sqlite:///{root}/mlflow.db"))
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
    assert (local / "pyfunc_model_code.py").is_file()
    assert list(local.rglob("neighbours.npz"))  # it reranks its beam as evaluate did
    assert not list(local.rglob("*.pkl"))  # nothing pickled, nothing unpickled at load


@pytest.fixture(scope="module")
def contest(tmp_path_factory):
    """A strong and a weak model on 200 synthetic images (20 test images), registered in turn:
    weak first (no champion), then strong, then weak again, then against a broken champion."""
    root = tmp_path_factory.mktemp("contest")
    old, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    # CIDEr (a per-image mean) rather than corpus BLEU-4, which is 0 on many resamples of 20
    # images of a weak model and so gives a wide interval.
    common = {"data.synthetic.n_images": 200, "train.units": 64, "train.learning_rate": 0.003,
              "register.metric": "beam_cider"}
    strong = tiny_settings(**{**common, "train.epochs": 25})
    weak = tiny_settings(**{**common, "train.epochs": 1, "train.units": 4, "train.embedding_dim": 4})
    reports = {}
    try:
        download.run(strong)
        validate.run(strong)
        run_features(strong)
        for name, settings in (("weak_first", weak), ("strong", strong), ("weak_again", weak)):
            train.run(settings)
            calibrate.run(settings)
            evaluate.run(settings)
            reports[name] = register.run(settings)
        client = mlflow.MlflowClient()
        broken = client.create_model_version(NAME, source=str(root / "no-such-model"), run_id=None)
        client.set_registered_model_alias(NAME, "champion", broken.version)
        evaluate.run(weak)
        reports["broken"] = register.run(weak)
        reports["broken_eval"] = json.loads(paths.EVAL_METRICS.read_text())
        reports["scores"] = pd.read_parquet(paths.TEST_SCORES)
    finally:
        os.chdir(old)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return root, reports


@pytest.mark.slow
def test_better_model_on_the_same_images_is_promoted(contest):
    _, reports = contest
    assert reports["weak_first"]["decision"] == "promoted"
    strong = reports["strong"]
    assert strong["decision"] == "promoted" and strong["alias"] == "champion", strong["reason"]
    comparison = strong["comparison"]
    assert comparison["images"] == 20 and comparison["resamples"] == 1000
    assert comparison["candidate"] > comparison["champion"]
    assert comparison["ci95_low"] > 0 and comparison["ci95_low"] <= comparison["difference"] <= comparison["ci95_high"]
    assert strong["old_champion"]["version"] == reports["weak_first"]["version"]


@pytest.mark.slow
def test_worse_model_on_the_same_images_keeps_the_champion(contest):
    root, reports = contest
    weak = reports["weak_again"]
    assert weak["decision"] == "kept_champion" and weak["alias"] == "challenger"
    assert weak["champion"] == reports["strong"]["version"]
    comparison = weak["comparison"]
    assert comparison["candidate"] < comparison["champion"] and comparison["ci95_low"] < 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    tags = client.get_model_version(NAME, weak["version"]).tags
    assert tags["decision"] == "kept_champion" and float(tags["vs_champion.ci95_high"]) == comparison["ci95_high"]
    run = client.get_run(weak["run_id"])
    assert run.data.metrics["vs_champion.difference"] == pytest.approx(comparison["difference"])


@pytest.mark.slow
def test_champion_that_cannot_be_loaded_is_reported_and_replaced(contest):
    root, reports = contest
    assert reports["broken_eval"]["champion"]["status"] == "unloadable"
    assert reports["broken_eval"]["champion"]["cause"] == "files"  # the registry answered; the files are gone
    broken = reports["broken"]
    assert broken["decision"] == "promoted"
    assert "could not be loaded: its files cannot be fetched" in broken["reason"]
    assert set(reports["scores"]["model"]) == {"candidate"}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == broken["version"]
    # loud, wherever someone looks: the report, the version's tag and its description
    assert "replaced WITHOUT a comparison" in broken["warning"]
    version = client.get_model_version(NAME, broken["version"])
    assert version.tags["warning"] == broken["warning"]
    assert version.description.startswith(f"**{broken['warning']}**")


def test_champion_loads_in_a_fresh_process_and_captions_images(registered, tmp_path):
    root, _, _ = registered
    good = tmp_path / "photo.jpg"
    good.write_bytes(jpeg_bytes(size=(120, 90)))
    script = f"""
import base64, json, pathlib, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
data = open({str(good)!r}, "rb").read()
rows = [pathlib.Path({str(good)!r}), data, base64.b64encode(data).decode(),
        "data:image/jpeg;base64," + base64.b64encode(data).decode(),
        b"not an image", {str(good)!r}, "/no/such/file.jpg"]
out = pd.concat([model.predict(pd.DataFrame({{"image": rows[:4]}})),  # 4 rows per request at most
                 model.predict(pd.DataFrame({{"image": rows[4:]}}))], ignore_index=True)
ranked = model.unwrap_python_model().caption_images([data], beam_size=3)[0]["candidates"]
print(json.dumps([c["consensus"] for c in ranked]))
print(out.to_json(orient="records"))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    consensus = json.loads(result.stdout.strip().splitlines()[-2])
    assert consensus and all(c >= 0 for c in consensus)  # candidates carry their consensus score
    captions = [r["caption"] for r in rows]
    assert captions[0] and captions[0] == captions[1] == captions[2] == captions[3]
    assert all(not r["error"] for r in rows[:4])
    assert rows[4]["caption"] == "" and "cannot decode" in rows[4]["error"]
    # a path given as text is never opened, whether or not the file exists: same message
    assert rows[5]["error"] == rows[6]["error"] and "not base64" in rows[5]["error"]


def test_captioner_cli_prints_one_caption_per_image(registered, tmp_path):
    root, _, _ = registered
    good, bad, text = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "notes.txt"
    good.write_bytes(jpeg_bytes(size=(90, 70)))
    bad.write_bytes(b"\xff\xd8 not really")
    text.write_text("hello")
    cli = Path(sys.executable).parent / "captioner"
    result = subprocess.run([str(cli), "caption", str(good), str(bad), str(text), "--beam", "1",
                             "--model", f"models:/{NAME}@champion", "--tracking-uri", f"sqlite:///{root}/mlflow.db"],
                            capture_output=True, text=True, cwd=root, timeout=400)
    assert result.returncode == 1  # one image failed
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{good}\t") and len(line.split("\t")[1]) > 0
    assert f"{bad}\tERROR:" in result.stderr
    assert f"{text}\tERROR: corrupt image: cannot decode" in result.stderr
    assert "BytesIO" not in result.stderr
    # --json: one object per photo, saying how sure the model is (in words too), errors included
    as_json = subprocess.run([str(cli), "caption", "--json", str(good), str(text), "--model", f"models:/{NAME}@champion",
                              "--tracking-uri", f"sqlite:///{root}/mlflow.db"], capture_output=True, text=True,
                             cwd=root, timeout=400)
    assert as_json.returncode == 1, as_json.stderr
    rows = {r["file"]: r for r in map(json.loads, as_json.stdout.splitlines())}
    assert set(rows[str(good)]) >= {"caption", "confidence", "abstained", "reason", "confidence_words"}
    assert 0 <= rows[str(good)]["confidence"] <= 1 and rows[str(good)]["caption"]
    assert rows[str(text)]["error"].startswith("corrupt image")
    # outside a project, with no model named: a usage error saying what to pass, not a guess
    nowhere = subprocess.run([str(cli), "caption", str(good)], capture_output=True, text=True, cwd=tmp_path,
                             timeout=120)
    assert nowhere.returncode == 2 and "--model models:/<name>@champion" in nowhere.stderr


def test_register_needs_the_per_image_scores(in_trained, tmp_path):
    _, settings = in_trained
    saved = tmp_path / "scores.parquet"
    shutil.copy(paths.TEST_SCORES, saved)
    paths.TEST_SCORES.unlink()
    try:
        with pytest.raises(StageError, match="test_scores.parquet not found"):
            register.run(settings)
    finally:
        shutil.copy(saved, paths.TEST_SCORES)
