"""The model downstream apps use: an ``mlflow.pyfunc`` model, image in -> caption out.

It bundles the exact CNN weights the features were computed with, the decoder and the
vocabulary, so ``models:/<name>@champion`` captions a raw image with no other files. It is
logged as *models-from-code* (``pipeline/registry/pyfunc_model_code.py`` names this class), so loading
it runs this package's code and unpickles nothing.

Input: a DataFrame with a column ``image`` (over REST: ``{"dataframe_split": {"columns": ["image"],
"data": [[b64], ...]}}``, ``{"dataframe_records": [{"image": b64}, ...]}`` or the column form
``{"inputs": {"image": [b64, ...]}}``). Each value is
  * ``str``: base64 image data or a ``data:image/...;base64,`` URL: what a REST call carries.
    Never a path: a server must not open files a caller names, and a string that is not valid
    base64 image data gets the same error whether or not such a file exists;
  * ``bytes``: the raw file content (Python callers);
  * ``pathlib.Path``: a local file, read here. Only Python callers on their own machine can
    send one (JSON has no such type), so this is the explicit opt-in for paths.
Output: columns ``caption``, ``error``, ``confidence``, ``abstained`` and ``reason``; a row whose
image is unusable (not base64, too many bytes or pixels, not an image) gets an empty caption and a
one-line reason in ``error``, the other rows are captioned. ``confidence`` is the calibrated
probability that the caption is acceptable (``pipeline/captioning/confidence.py``); ``abstained``
is true when the photo is unlike the photos the model learnt from, and ``reason`` says why (or why
there is no confidence: a model without a readable calibration still captions, with
``confidence`` null and that reason). Images are decoded and embedded ``batch_size`` at a time,
so memory stays bounded.

Request-level errors (too many rows, a bad ``beam_size``) raise an MlflowException with
INVALID_PARAMETER_VALUE: HTTP 400 from ``mlflow models serve``, with no stack trace.
Param ``beam_size``: 1 (greedy) .. 10; absent means the model's default.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline.config import DecodingSettings, ServingSettings

CONFIG_NAME = "caption_config.json"
# run by MLflow when the model loads (models-from-code); the whole `pipeline` package travels with
# the model as its code, so a champion captions with the code it was registered with
MODEL_CODE = Path(__file__).with_name("pyfunc_model_code.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
MAX_BEAM = 10
NOT_BASE64 = "not base64 image data: send the file's bytes base64-encoded, or a data: URL"
_BASE64 = re.compile(r"^[A-Za-z0-9+/\r\n]*={0,2}\s*$")


def too_large(max_bytes: int) -> str:
    return f"image is over the limit of {max_bytes:,} bytes"


def image_bytes(value, max_bytes: int) -> bytes:
    """Raw bytes of one input value (see the module docstring); ValueError with the reason."""
    if isinstance(value, Path):
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        if value.stat().st_size > max_bytes:
            raise ValueError(too_large(max_bytes))
        return value.read_bytes()
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            header, text = text.split(",", 1)
            if not header.endswith(";base64"):
                raise ValueError(NOT_BASE64)
        # Refuse before decoding when the text alone is too long (3 bytes per 4 characters).
        if len(text) * 3 // 4 > max_bytes + 3:
            raise ValueError(too_large(max_bytes))
        if not text or not _BASE64.match(text):
            raise ValueError(NOT_BASE64)
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            raise ValueError(NOT_BASE64) from None
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}: send base64 text")
    if len(data) > max_bytes:
        raise ValueError(too_large(max_bytes))
    if not data:
        raise ValueError("empty image data (0 bytes)")
    return data


def request_error(message: str) -> Exception:
    """An error about the whole request: HTTP 400 with this one-line message, no stack trace."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def beam_param(params: dict | None, default: int) -> int:
    value = (params or {}).get("beam_size")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_BEAM:
        raise request_error(f"beam_size must be an integer from 1 to {MAX_BEAM} (1 = greedy), got {value!r}")
    return int(value)


class CaptionModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: backbone + decoder + vocabulary + decoding settings + input limits."""

    def load_context(self, context) -> None:
        from pipeline.captioning.backbone import BackboneFolder
        from pipeline.captioning.caption_choice import CaptionChooser
        from pipeline.captioning.consensus import Neighbours
        from pipeline.captioning.decoder import (
            decoding_models,
            grid_of,
            load_decoder,
            members_of,
            require_feature_dim,
            require_grid,
        )
        from pipeline.captioning.vocabulary import Vocabulary

        config = json.loads(Path(context.artifacts["config"]).read_text())
        backbone = BackboneFolder(Path(context.artifacts["backbone"]))
        self.spec = backbone.spec()
        self.backbone_digest = backbone.digest()  # photo search reuses embeddings of the same CNN
        self.decoding = DecodingSettings.from_stored(config["decoding"])
        self.limits = ServingSettings.model_validate(config["limits"])
        self.vocab = Vocabulary.load(context.artifacts["vocab"])
        neighbours = None
        if self.decoding.consensus.neighbours and "neighbours" not in context.artifacts:
            raise ValueError("this model reranks by consensus but carries no neighbours file")
        if "neighbours" in context.artifacts:
            neighbours = Neighbours.load(context.artifacts["neighbours"])
        self.confidence, self.no_confidence = self._confidence(context.artifacts, neighbours)
        decoder = load_decoder(context.artifacts["decoder"])
        require_feature_dim(decoder, self.spec.feature_dim, self.spec.name, context.artifacts["decoder"])
        self.decoder, self.grid_hw = decoder, None
        if grid_of(members_of(decoder)[0]) is None:
            self.embed = backbone.embedder(fallback_to_keras=True)
        else:  # an attention decoder: each photo's row is its pooled vector, then its grid of regions
            grids = backbone.grid_embedder()
            require_grid(decoder, grids.grid, f"the CNN in {backbone.path}", context.artifacts["decoder"])
            self.embed, self.grid_hw = grids.rows, grids.grid_hw
            self.backbone_digest += "+grid"  # rows of another width: stored embeddings of a pooled model are not reused
        self.chooser = CaptionChooser(decoding_models(decoder), self.vocab,
                                      self.decoding, neighbours)
        self._warm_up()

    def _confidence(self, artifacts: dict, neighbours):
        """(the model's Confidence, None) or (None, why it has none): a missing or damaged
        calibration leaves a model that captions and says so, never one that fails to load."""
        import logging

        from pipeline.captioning.confidence import (
            NO_CALIBRATION,
            Calibration,
            CalibrationError,
            Confidence,
        )

        if "confidence" not in artifacts or neighbours is None:
            return None, NO_CALIBRATION
        try:
            calibration = Calibration.load(artifacts["confidence"])
            if len(neighbours.features) < 1:
                raise CalibrationError("the neighbours file holds no train photo")
            return Confidence(calibration, neighbours), ""
        except CalibrationError as err:
            logging.getLogger("pipeline.serving").warning("serving without confidence: %s", err)
            return None, f"this model's confidence calibration is unreadable: {str(err).splitlines()[0]}"

    def _warm_up(self) -> None:
        """Run the CNN and the decoding of both modes (with sampling and reranking) once on a
        blank image: the first call builds TensorFlow's kernels (about a second), which belongs
        to the load, not to the first request a user sends."""
        size = self.spec.image_size
        feats = self.embed(np.zeros((1, size, size, 3), np.uint8))
        self.chooser.choose(feats, beam_size=1)
        self.describe(feats)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise request_error("input needs a column 'image' (base64 image data)")
        values = model_input["image"].tolist()
        if len(values) == 1 and isinstance(values[0], (list, tuple, np.ndarray)):
            # the column form MLflow documents, {"inputs": {"image": [b64, b64, ...]}}, arrives as
            # one row holding the whole column: one image per item
            values = list(values[0])
        results = self.caption_images(values, beam_param(params, self.decoding.beam_size))
        return pd.DataFrame({key: pd.Series([r[key] for r in results], dtype=object)
                             for key in ("caption", "error", "confidence", "abstained", "reason")})

    def caption_images(self, values: list, beam_size: int | None = None, attention: bool = False) -> list[dict]:
        """Each image value -> {"caption", "candidates": [{"caption", "score"}], "error", "confidence",
        "abstained", "reason"} (``describe``), with the same limits and per-row errors as ``predict`` (apps call this to show the other beam
        candidates, ``beam_size`` of them; ``score`` is the length-normalised log-probability; a
        model that reranks by consensus adds ``consensus``, the CIDEr-D against similar train
        images' captions, and lists the best by consensus + consensus.weight x score, sampled
        captions among them when it samples). With ``attention``, each captioned row also gets
        ``attention``: where the model looked for each word (``describe``)."""
        beam = beam_param({"beam_size": beam_size}, self.decoding.beam_size)
        rows, limit = len(values), self.limits.max_rows
        if rows > limit:
            raise request_error(f"too many rows: {rows} in one request, the limit is {limit}")
        results = [{"caption": "", "candidates": [], "error": "", "confidence": None, "abstained": False,
                    "reason": ""} for _ in values]
        step = self.limits.batch_size
        for lo in range(0, rows, step):
            self._caption_batch(values[lo:lo + step], results[lo:lo + step], beam, attention)
        return results

    def _caption_batch(self, values: list, results: list[dict], beam: int, attention: bool = False) -> None:
        from pipeline.captioning.backbone import load_image

        pixels, ok = [], []
        for value, result in zip(values, results):
            try:
                data = image_bytes(value, self.limits.max_image_bytes)
                pixels.append(load_image(data, self.spec, self.limits.max_image_pixels))
                ok.append(result)
            except ValueError as err:  # ImageError is a ValueError; one bad image must not sink the batch
                result["error"] = str(err).splitlines()[0]
        if not pixels:
            return
        for result, described in zip(ok, self.describe(self.embed(np.stack(pixels)), beam, attention)):
            result.update(described)

    def describe(self, features: np.ndarray, beam_size: int | None = None, attention: bool = False) -> list[dict]:
        """Per row of ``features`` (what ``embed`` gives: the pooled vector, then the grid for an
        attention decoder): {"caption", "candidates" (the best ``beam_size``, with their scores),
        "confidence", "abstained", "reason"}: the one way the app, search and alt text caption
        what the CNN saw. With ``attention``, also "attention": ``attention_of``'s maps of the
        caption, or None for a model that reads one pooled vector per photo."""
        beam = beam_size or self.decoding.beam_size
        ranked = self.chooser.choose(features, beam_size=beam)
        if self.confidence is None:
            from pipeline.captioning.confidence import without_confidence

            notes = without_confidence(len(ranked), self.no_confidence)
        else:
            notes = self.confidence.describe(features, ranked, self.vocab.decode, beam)
        out = with_candidates(self.vocab, ranked, beam, notes)
        if attention:
            maps = self.attention_of(features, [pool[0].caption.tokens for pool in ranked])
            for row, found in zip(out, maps):
                row["attention"] = found
        return out

    def attention_of(self, features: np.ndarray, captions: list[list[int]]) -> list[dict | None]:
        """Where the decoder looked for each word of each caption (token ids), compactly:
        {"grid": [rows, columns], "words": [...], "maps": one list of rows x columns integers per
        word, row-major, 0..100 = percent of that word's strongest region}; None for each when the
        model reads one pooled vector per photo (it has no attention to show)."""
        if self.grid_hw is None:
            return [None] * len(captions)
        from pipeline.captioning.decoder import attention_maps

        maps = attention_maps(self.decoder, features, captions, self.vocab.start_id, self.vocab.sequence_length)
        out = []
        for tokens, weights in zip(captions, maps):
            words = self.vocab.decode(tokens).split()
            peak = np.maximum(weights[:len(words)].max(axis=1, keepdims=True), 1e-12)
            out.append({"grid": list(self.grid_hw), "words": words,
                        "maps": np.rint(100 * weights[:len(words)] / peak).astype(int).tolist()})
        return out


def with_candidates(vocab, ranked: list, beam: int, notes: list[dict]) -> list[dict]:
    """Each image's best ``beam`` candidates as the app shows them (text, score, consensus; the
    samples that lost are noise), its caption, and its note on confidence."""
    out = []
    for pool, note in zip(ranked, notes):
        candidates = [{"caption": vocab.decode(c.caption.tokens), "score": round(c.score, 4),
                       **({"consensus": round(c.consensus, 4)} if c.consensus is not None else {})}
                      for c in pool[:beam]]
        out.append({"caption": candidates[0]["caption"], "candidates": candidates, "confidence": note["confidence"],
                    "abstained": note["abstained"], "reason": note["reason"]})
    return out


def described(model, features: np.ndarray) -> list[dict]:
    """``model.describe(features)``, also for a champion registered before models said how sure
    they are (its own chooser; no confidence, and the reason)."""
    if hasattr(model, "describe"):
        return model.describe(features)
    from pipeline.captioning.confidence import OLDER_MODEL, without_confidence

    ranked = model.chooser.choose(features)
    return with_candidates(model.vocab, ranked, model.decoding.beam_size, without_confidence(len(ranked), OLDER_MODEL))


def signature_and_example(example_image: bytes):
    """Signature (image: base64 text, bytes or Path -> caption, error, confidence, abstained,
    reason; param beam_size) and an input example carrying one small base64 JPEG."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]),
        outputs=Schema([ColSpec("string", "caption"), ColSpec("string", "error"),
                        ColSpec("double", "confidence", required=False), ColSpec("boolean", "abstained"),
                        ColSpec("string", "reason")]),
        params=ParamSchema([ParamSpec("beam_size", "long", None)]),
    )
    example = pd.DataFrame({"image": [base64.b64encode(example_image).decode()]})
    return signature, example


def pip_requirements() -> list[str]:
    """Explicit pins: inferred ones add unrelated packages and miss pillow (MLflow's inference would list scikit-learn and matplotlib and miss pillow)."""
    from importlib.metadata import version

    names = ["mlflow", "tensorflow-cpu", "keras", "numpy", "pandas", "pillow", "h5py", "pyarrow",
             "ai-edge-litert", "openvino"]
    return [f"{n}=={version(n)}" for n in names]
