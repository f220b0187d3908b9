"""The CNN that turns an image into a feature vector, and the image preprocessing that goes
with it. Shared by the features stage and the served model so both see images alike.

Weights: ``imagenet`` (Keras downloads them once into ~/.keras/models), ``none`` (random
init from ``seed``: the offline default) or a path to a local weights file (air-gapped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

# isort: off
from . import quiet_tensorflow  # noqa: F401  (must come before keras)
import keras  # noqa: E402
# isort: on

from .config import FeaturesSettings  # noqa: E402
from .images import ImageSource, load_rgb  # noqa: E402

log = logging.getLogger(__name__)

FEATURE_DIM = {"xception": 2048}


class BackboneError(RuntimeError):
    """The CNN could not be built (e.g. ImageNet weights unavailable offline)."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str = "xception"
    weights: str = "none"
    image_size: int = 299
    seed: int = 7
    # float32 (exact, the default) | bfloat16 (about 1.5x faster on CPUs with AVX512-BF16 or
    # AMX; embeddings differ by ~1% relative, so features and serving must agree: they share this)
    precision: str = "float32"

    @classmethod
    def from_settings(cls, cfg: FeaturesSettings) -> "BackboneSpec":
        return cls(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed, cfg.precision)

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM[self.name]

    def metadata(self) -> dict[str, str]:
        """Provenance stored with the features (Parquet schema metadata, MLflow params)."""
        import pyarrow
        import tensorflow as tf

        return {
            "backbone": self.name, "weights": self.weights, "input_size": str(self.image_size),
            "seed": str(self.seed), "feature_dim": str(self.feature_dim),
            "precision": self.precision,
            "preprocessing": "PIL decode (EXIF transpose, RGB), bilinear resize to "
                             f"{self.image_size}x{self.image_size}, xception.preprocess_input "
                             "(x/127.5 - 1), global average pooling",
            "keras_version": keras.__version__, "tensorflow_version": tf.__version__,
            "pyarrow_version": pyarrow.__version__,
        }

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _precision(precision: str) -> Iterator[None]:
    """Build layers under the dtype policy for ``precision``; restore the global one after."""
    if precision not in ("float32", "bfloat16"):
        raise BackboneError(f"features.precision must be float32 or bfloat16, not {precision!r}")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build(spec: BackboneSpec) -> keras.Model:
    """Xception without its classifier, average pooled: (N, S, S, 3) -> (N, 2048)."""
    with _precision(spec.precision):
        return _build(spec)


def _build(spec: BackboneSpec) -> keras.Model:
    shape = (spec.image_size, spec.image_size, 3)
    kwargs = dict(include_top=False, pooling="avg", input_shape=shape)
    if spec.weights == "none":
        keras.utils.set_random_seed(spec.seed)  # same seed, same random CNN
        return keras.applications.Xception(weights=None, **kwargs)
    if spec.weights == "imagenet":
        try:
            return keras.applications.Xception(weights="imagenet", **kwargs)
        except Exception as err:  # keras raises a bare Exception on a failed fetch
            raise BackboneError(
                "could not load the ImageNet weights for Xception "
                f"({type(err).__name__}: {err}). Offline, either set features.weights: none "
                "(random-init CNN, runs anywhere) or set features.weights to the path of a "
                "local weights file (xception_weights_tf_dim_ordering_tf_kernels_notop.h5), "
                "or copy that file into ~/.keras/models/.") from None
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise BackboneError(f"features.weights: {path} is not a file; use imagenet, none or a "
                            "path to a weights file")
    model = keras.applications.Xception(weights=None, **kwargs)
    try:
        model.load_weights(str(path))
    except Exception as err:
        raise BackboneError(f"cannot load Xception weights from {path}: {err}") from None
    return model


def load_saved(weights_file: Path, spec: BackboneSpec) -> keras.Model:
    """Rebuild the exact CNN whose weights the features stage saved."""
    return build(replace(spec, weights=str(weights_file)))


def preprocess(batch_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB (N, S, S, 3) -> float32 in [-1, 1], as Xception was trained."""
    return keras.applications.xception.preprocess_input(batch_uint8.astype(np.float32))


def load_image(source: ImageSource, spec: BackboneSpec, max_pixels: int | None) -> np.ndarray:
    """One image -> (S, S, 3) uint8, exactly as the features stage reads it."""
    return load_rgb(source, spec.image_size, max_pixels)


def embedder(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """(N, S, S, 3) uint8 -> (N, D) float32 features, bit for bit the same vector for an image
    whatever batch it comes in (so shards, resumed runs and the served model all agree)."""
    import tensorflow as tf

    infer = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)

    def embed(batch_uint8: np.ndarray) -> np.ndarray:
        n = len(batch_uint8)
        if n == 1:  # oneDNN runs a batch of one through other kernels, whose last bits differ
            batch_uint8 = np.concatenate([batch_uint8, batch_uint8])
        return infer(preprocess(batch_uint8)).numpy()[:n]

    return embed
