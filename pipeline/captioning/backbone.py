"""The CNN that turns an image into a feature vector, and the image preprocessing that goes
with it. Shared by the features stage and the served model so both see images alike.

Weights: ``imagenet`` (Keras downloads them once into ~/.keras/models), ``none`` (random
init from ``seed``: the offline default) or a path to a local weights file (air-gapped).

Runtime: ``keras`` runs the Keras model; ``tflite`` runs the same weights converted to a float32
TFLite model on the LiteRT interpreter (XNNPack), which gives the same embeddings faster on CPUs;
``tflite_int8`` is a full-integer quantised model (faster again, embeddings only close).
The backbone stage saves everything a runtime needs in one folder (``BackboneFolder``), and
both the features stage and the served model load it from there.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

# isort: off
from pipeline.captioning import quiet_tensorflow  # noqa: F401  (must come before keras)
import keras  # noqa: E402
# isort: on

from pipeline import cpu  # noqa: E402
from pipeline.config import FeaturesSettings  # noqa: E402
from pipeline.data.images import ImageSource, load_rgb  # noqa: E402

log = logging.getLogger(__name__)

FEATURE_DIM = {"xception": 2048}


class BackboneError(RuntimeError):
    """The CNN could not be built (e.g. ImageNet weights unavailable offline)."""


@dataclass(frozen=True)
class BackboneSpec:
    """The exact CNN: made from ``features`` params by ``from_settings`` (the one place its values
    come from) or read back from a backbone folder's spec.json."""

    name: str
    weights: str  # imagenet | none | a weights file
    image_size: int
    seed: int
    # float32 (exact) | bfloat16 (keras runtime only: faster on CPUs with AVX512-BF16 or AMX,
    # slower elsewhere; embeddings differ slightly, so features and serving must agree: they
    # share this spec through the backbone folder)
    precision: str
    runtime: str  # keras | tflite | tflite_int8

    @classmethod
    def from_settings(cls, cfg: FeaturesSettings, cpu_flags: frozenset[str] | None = None) -> "BackboneSpec":
        """The spec ``cfg`` asks for on this CPU: ``precision: auto`` becomes bfloat16 only for the
        keras runtime on a CPU with native bf16, else float32 (TFLite has no bf16 path on x86)."""
        precision = cfg.precision
        if precision == "auto":
            native = cpu.has_native_bf16(cpu_flags)
            precision = "bfloat16" if cfg.runtime == "keras" and native else "float32"
        return cls(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed, precision, cfg.runtime)

    def agrees_with(self, cfg: FeaturesSettings) -> bool:
        """Whether a saved spec is what ``cfg`` asks for (``auto`` accepts the saved choice)."""
        wanted = replace(BackboneSpec.from_settings(cfg), precision=self.precision) \
            if cfg.precision == "auto" else BackboneSpec.from_settings(cfg)
        return wanted == self

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
            "precision": self.precision, "runtime": self.runtime,
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
        # oneDNN computes a batch's last image (and a batch of one) through other kernels, whose
        # last bits differ on some CPUs (on an AVX2-only AMD EPYC: the last image of every batch):
        # a copy of the last image goes last, so every real image is computed alike
        n = len(batch_uint8)
        return infer(preprocess(np.concatenate([batch_uint8, batch_uint8[-1:]]))).numpy()[:n]

    return embed


class TFLiteEmbedder:
    """A TFLite backbone on the LiteRT interpreter (XNNPack, one thread per core). Same contract
    as ``embedder``: uint8 batch in, float32 features out, batch-size independent (XNNPack's
    kernels compute each image alike; a test checks it). Thread-safe: one interpreter, one lock."""

    def __init__(self, model_file: Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interpreter = Interpreter(model_path=str(model_file), num_threads=threads or cpu.cores())
        except (ValueError, RuntimeError) as err:
            raise BackboneError(f"the LiteRT interpreter cannot load {model_file}: {err}") from None
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = 0
        self._lock = threading.Lock()

    def __call__(self, batch_uint8: np.ndarray) -> np.ndarray:
        x = preprocess(batch_uint8)
        with self._lock:
            if len(x) != self._batch:  # resizing re-plans the graph: only when the size changes
                self._interpreter.resize_tensor_input(self._input, list(x.shape))
                self._interpreter.allocate_tensors()
                self._batch = len(x)
            self._interpreter.set_tensor(self._input, x)
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output).astype(np.float32, copy=True)


def to_tflite(model: keras.Model, calibration: np.ndarray | None = None) -> bytes:
    """The Keras backbone as a TFLite flatbuffer: float32 (same maths), or, given ``calibration``
    (uint8 images from the train split), full-integer int8 inside with float32 input and output,
    so the embedder feeds both alike."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([preprocess(img[None])] for img in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints every variable
            return converter.convert()
    except Exception as err:  # the converter raises ConverterError or plain Exceptions
        raise BackboneError(f"TFLite conversion failed: {type(err).__name__}: {str(err)[:500]}") from None


@dataclass(frozen=True)
class BackboneFolder:
    """The backbone stage's output: the exact weights, the TFLite model (tflite runtimes) and the
    spec chosen on the machine that built it (``precision: auto`` resolved once, so every shard
    and the served model use the same choice even on other CPUs)."""

    path: Path

    @property
    def weights(self) -> Path:
        return self.path / "backbone.weights.h5"

    @property
    def tflite(self) -> Path:
        return self.path / "backbone.tflite"

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    def spec(self) -> BackboneSpec:
        try:
            saved = json.loads(self.spec_file.read_text())
            return BackboneSpec(**saved["spec"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BackboneError(f"{self.spec_file} is missing or unreadable ({err}); rerun the "
                                "backbone stage (dvc repro backbone)") from None

    def embedder(self, fallback_to_keras: bool = False) -> Callable[[np.ndarray], np.ndarray]:
        """The embedder of the saved runtime. ``fallback_to_keras`` (the served model): when the
        float32 TFLite model cannot load, run the saved weights in Keras (same embeddings,
        slower) rather than fail; an int8 model never falls back (its embeddings differ)."""
        spec = self.spec()
        if spec.runtime == "keras":
            return embedder(load_saved(self.weights, spec))
        try:
            return TFLiteEmbedder(self.tflite)
        except (BackboneError, ImportError) as err:
            if not fallback_to_keras or spec.runtime != "tflite":
                raise BackboneError(f"{err}; set features.runtime: keras to run without LiteRT") from None
            log.warning("%s; falling back to the Keras runtime (same embeddings, slower)", err)
            return embedder(load_saved(self.weights, spec))
