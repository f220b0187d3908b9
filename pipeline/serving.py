"""The model downstream apps use: an ``mlflow.pyfunc`` model, image in -> caption out.

It bundles the exact CNN weights the features were computed with, the decoder and the
vocabulary, so ``models:/<name>@champion`` captions a raw image with no other files.

Input: a DataFrame with a column ``image`` holding raw bytes, a base64 string (what a REST
call carries) or a path to an image file. Output: columns ``caption`` and ``error``; a row
whose image cannot be read gets an empty caption and the reason, the rest are captioned.
Optional param ``beam_size`` (1 = greedy).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

CONFIG_NAME = "caption_config.json"


def image_bytes(value) -> bytes:
    """Raw bytes for one input value (bytes, base64 text, or a file path)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        text = value.strip()
        if len(text) < 4096 and os.path.isfile(os.path.expanduser(text)):
            return Path(os.path.expanduser(text)).read_bytes()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            shown = text if len(text) < 80 else text[:77] + "..."
            raise ValueError(f"not an existing file path nor base64 image data: {shown!r}") from None
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


class CaptionModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: backbone + decoder + vocabulary + decoding settings."""

    def load_context(self, context) -> None:
        from .backbone import BackboneSpec, load_saved
        from .model import StepModels, load_decoder
        from .text import Vocabulary

        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.spec = BackboneSpec(**config["backbone"])
        self.decoding = config["decoding"]
        self.backbone = load_saved(Path(context.artifacts["backbone_weights"]), self.spec)
        self.models = StepModels.from_decoder(load_decoder(context.artifacts["decoder"]))
        self.vocab = Vocabulary.load(context.artifacts["vocab"])
        self.max_pixels = int(config["max_image_pixels"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from .backbone import embed, load_image
        from .decoding import beam_search, greedy

        if "image" not in model_input.columns:
            raise ValueError("input needs a column 'image' (bytes, base64 text or file path)")
        beam = int((params or {}).get("beam_size") or self.decoding["beam_size"])
        pixels, ok_rows, errors = [], [], [""] * len(model_input)
        for row, value in enumerate(model_input["image"].tolist()):
            try:
                pixels.append(load_image(image_bytes(value), self.spec, self.max_pixels))
                ok_rows.append(row)
            except Exception as err:  # one bad image must not sink the batch
                errors[row] = f"{type(err).__name__}: {err}"
        captions = [""] * len(model_input)
        if pixels:
            feats = np.concatenate([embed(self.backbone, np.stack(pixels[i:i + 32]))
                                    for i in range(0, len(pixels), 32)])
            ngram = self.decoding["no_repeat_ngram"]
            decoded = greedy(self.models, feats, self.vocab, no_repeat_ngram=ngram) if beam == 1 else \
                beam_search(self.models, feats, self.vocab, beam_size=beam, no_repeat_ngram=ngram,
                            length_penalty=self.decoding["length_penalty"])
            for row, caption in zip(ok_rows, decoded):
                captions[row] = self.vocab.decode(caption.tokens)
        return pd.DataFrame({"caption": captions, "error": errors})


def signature_and_example(example_image: bytes):
    """Signature (image: any of bytes/base64/path -> caption, error; param beam_size) and an
    input example carrying one small base64 JPEG."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]),
        outputs=Schema([ColSpec("string", "caption"), ColSpec("string", "error")]),
        params=ParamSchema([ParamSpec("beam_size", "long", 3)]),
    )
    example = pd.DataFrame({"image": [base64.b64encode(example_image).decode()]})
    return signature, example


def pip_requirements() -> list[str]:
    """Explicit pins: inferred ones add unrelated packages and miss pillow (DESIGN §7)."""
    from importlib.metadata import version

    names = ["mlflow", "tensorflow-cpu", "keras", "numpy", "pandas", "pillow", "h5py", "pyarrow"]
    return [f"{n}=={version(n)}" for n in names]
