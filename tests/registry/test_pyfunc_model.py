"""The registered model behind a real `mlflow models serve`: image data only (never a server
path), per-row limits on bytes and pixels, a per-request row limit, validated parameters, and a
server that keeps answering after every bad request."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pipeline.registry.pyfunc_model import NOT_BASE64, image_bytes
from tests.helpers import jpeg_bytes, wait_for_http

NAME = "flickr8k-captioner"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(registered):
    root, _, _ = registered
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [f"{bin_dir}/mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", proc, 480, "model server")  # ready in ~10 s on a quiet machine
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def post(url: str, body: bytes) -> tuple[int, dict | str]:
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=240) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def invoke(url: str, images: list, **params) -> tuple[int, dict | str]:
    payload = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}
    if params:
        payload["params"] = params
    status, body = post(url, json.dumps(payload).encode())
    assert urllib.request.urlopen(f"{url}/ping", timeout=60).status == 200  # still answering
    return status, body


def test_a_valid_image_gets_a_caption(server):
    url, _ = server
    status, body = invoke(url, [b64(jpeg_bytes(size=(100, 80)))])
    assert status == 200
    row = body["predictions"][0]
    assert row["caption"] and not row["error"]
    # how sure the model is travels with every caption over REST
    assert 0 <= row["confidence"] <= 1 and isinstance(row["abstained"], bool) and isinstance(row["reason"], str)


def test_every_request_form_mlflow_documents_gets_one_answer_per_image(server):
    url, _ = server
    red, blue = b64(jpeg_bytes(colour=(220, 30, 30))), b64(jpeg_bytes(colour=(30, 60, 220)))
    for payload in ({"inputs": {"image": [red, blue]}},  # the column form: one list per column
                    {"dataframe_records": [{"image": red}, {"image": blue}]},
                    {"dataframe_split": {"columns": ["image"], "data": [[red], [blue]]}}):
        status, body = post(url, json.dumps(payload).encode())
        assert status == 200, (payload.keys(), body)
        rows = body["predictions"]
        assert len(rows) == 2 and all(r["caption"] and not r["error"] for r in rows), (payload.keys(), rows)


def test_server_paths_are_never_opened_and_cannot_be_probed(server):
    url, root = server
    server_jpeg = next((root / "data/raw/synthetic/Images").glob("*.jpg"))
    status, body = invoke(url, [str(server_jpeg), "/etc/hostname", "/no/such/file.jpg",
                                "!!! not base64 ###"])
    assert status == 200
    errors = [r["error"] for r in body["predictions"]]
    assert errors == [NOT_BASE64] * 4  # the same words whether the file exists or not
    assert not any(r["caption"] for r in body["predictions"])


def test_oversized_image_and_pixel_bomb_are_refused_per_row(server):
    url, _ = server
    bomb = io.BytesIO()
    Image.new("L", (2000, 2000)).save(bomb, format="PNG")  # 4 Mpx in a few kB: above 1 Mpx
    status, body = invoke(url, [b64(os.urandom(300_000)), b64(bomb.getvalue()),
                                b64(jpeg_bytes(size=(60, 40)))])
    assert status == 200
    rows = body["predictions"]
    assert "over the limit of 200,000 bytes" in rows[0]["error"]
    assert rows[1]["error"].startswith("image too large: 2000x2000")
    assert rows[2]["caption"] and not rows[2]["error"]  # the good row of the batch is captioned


def test_too_many_rows_is_a_400(server):
    url, _ = server
    status, body = invoke(url, [b64(jpeg_bytes())] * 5)
    assert status == 400
    assert "too many rows: 5 in one request, the limit is 4" in body["message"]
    assert "stack_trace" not in body


@pytest.mark.parametrize("beam", [-3, 0, 11, "three"])
def test_bad_beam_size_is_a_400_without_a_stack_trace(server, beam):
    url, _ = server
    status, body = invoke(url, [b64(jpeg_bytes())], beam_size=beam)
    assert status == 400
    assert "beam_size" in body["message"] and "stack_trace" not in body
    assert "Traceback" not in json.dumps(body)


def test_greedy_beam_size_is_accepted(server):
    url, _ = server
    status, body = invoke(url, [b64(jpeg_bytes())], beam_size=1)
    assert status == 200 and body["predictions"][0]["caption"]


@pytest.mark.parametrize("body", [b"", b"{not json", b'{"dataframe_split": {"columns": ["x"], "data": [[1]]}}'])
def test_malformed_requests_are_refused_and_the_server_keeps_answering(server, body):
    url, _ = server
    status, _ = post(url, body)
    assert 400 <= status < 500
    assert urllib.request.urlopen(f"{url}/ping", timeout=60).status == 200


def test_paths_only_as_explicit_path_objects(tmp_path):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(jpeg_bytes())
    assert image_bytes(photo, 10**6) == photo.read_bytes()
    for text in (str(photo), str(tmp_path / "missing.jpg")):
        with pytest.raises(ValueError) as err:
            image_bytes(text, 10**6)
        assert str(err.value) == NOT_BASE64
    with pytest.raises(ValueError, match="over the limit of 10 bytes"):
        image_bytes(b64(b"x" * 100), 10)


def test_models_registered_before_consensus_or_sampling_still_caption(registered, tmp_path):
    """A model registered before consensus reranking has no neighbours artifact: it ranks by the
    decoder. One registered before sampling has no consensus_samples: it reranks the beam alone."""
    import mlflow
    from mlflow.pyfunc import PythonModelContext

    from pipeline.registry.pyfunc_model import CONFIG_NAME, CaptionModel

    root, _, _ = registered
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "model"),
                                                     tracking_uri=f"sqlite:///{root}/mlflow.db"))
    artifacts = {}
    for name in ("decoder", "vocab", "backbone", "neighbours"):
        (path,) = [p for p in (local / "artifacts").iterdir() if p.name.startswith({
            "decoder": "decoder.keras", "vocab": "vocab.json", "backbone": "xception.backbone",
            "neighbours": "neighbours.npz"}[name])]
        artifacts[name] = str(path)
    config = json.loads((local / "artifacts" / CONFIG_NAME).read_text())
    today = config["decoding"]
    assert today["consensus"]["samples"] > 0  # today's model samples
    # what register stored before sampling existed: flat evaluate.* keys, no samples
    config["decoding"] = {"beam_size": today["beam_size"], "length_penalty": today["length_penalty"],
                          "no_repeat_ngram": today["no_repeat_ngram"],
                          "consensus_neighbours": today["consensus"]["neighbours"],
                          "consensus_weight": today["consensus"]["weight"]}
    old_config = tmp_path / CONFIG_NAME
    old_config.write_text(json.dumps(config))
    older_config = tmp_path / "older.json"  # before consensus: no consensus keys, no neighbours file
    older_config.write_text(json.dumps({**config, "decoding": {k: v for k, v in config["decoding"].items()
                                                                if not k.startswith("consensus")}}))
    photo = jpeg_bytes(size=(120, 90))

    before_sampling = CaptionModel()
    before_sampling.load_context(PythonModelContext({**artifacts, "config": str(old_config)}, None))
    assert before_sampling.chooser.scorer is not None and before_sampling.decoding.consensus.samples == 0
    (result,) = before_sampling.caption_images([photo], beam_size=3)
    assert result["caption"] and len(result["candidates"]) <= 3
    assert all("consensus" in c for c in result["candidates"])

    before_consensus = CaptionModel()
    del artifacts["neighbours"]
    before_consensus.load_context(PythonModelContext({**artifacts, "config": str(older_config)}, None))
    assert before_consensus.chooser.scorer is None
    (result,) = before_consensus.caption_images([photo], beam_size=3)
    scores = [c["score"] for c in result["candidates"]]
    assert result["caption"] and len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert not any("consensus" in c for c in result["candidates"])


def test_a_missing_or_damaged_calibration_leaves_a_model_that_captions_and_says_so(registered, tmp_path):
    """The confidence file of a registered model gone or damaged: the model still loads and
    captions, with no confidence and the reason (alt text then applies nothing without a person)."""
    import mlflow
    from mlflow.pyfunc import PythonModelContext

    from pipeline.registry.pyfunc_model import CaptionModel

    root, _, _ = registered
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "model"),
                                                     tracking_uri=f"sqlite:///{root}/mlflow.db"))
    names = {"decoder": "decoder.keras", "vocab": "vocab.json", "backbone": "xception.backbone",
             "neighbours": "neighbours.npz", "config": "caption_config.json", "confidence": "confidence.json"}
    artifacts = {name: str(next(p for p in (local / "artifacts").iterdir() if p.name.startswith(prefix)))
                 for name, prefix in names.items()}
    photo = jpeg_bytes(size=(120, 90))
    whole = CaptionModel()
    whole.load_context(PythonModelContext(artifacts, None))
    (sure,) = whole.caption_images([photo])
    assert sure["confidence"] is not None and sure["caption"]
    damaged = tmp_path / "confidence.json"
    damaged.write_text('{"format": 1, "signals": ["log_prob_per_word"')
    cases = {"missing": {k: v for k, v in artifacts.items() if k != "confidence"},
             "damaged": {**artifacts, "confidence": str(damaged)}}
    for case, given in cases.items():
        model = CaptionModel()
        model.load_context(PythonModelContext(given, None))
        (result,) = model.caption_images([photo])
        assert result["caption"] == sure["caption"], case  # the same caption, without a confidence
        assert result["confidence"] is None and result["abstained"] is False, case
        assert ("unreadable" in result["reason"] and "confidence.json" in result["reason"]) if case == "damaged" \
            else result["reason"] == "this model has no confidence calibration", (case, result["reason"])
