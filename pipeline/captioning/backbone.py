"""The CNN that turns an image into a feature vector, the runtimes that run it, and the choice
among them. Shared by the features stage and the served model so both see images alike.

Weights: ``imagenet`` (Keras downloads them once into ~/.keras/models), ``none`` (random
init from ``seed``: the offline default) or a path to a local weights file (air-gapped).

Runtimes, all running the same weights:
  * ``keras``: the Keras model (oneDNN), float32 or bfloat16 (``mixed_bfloat16``);
  * ``tflite``: converted to a float32 TFLite model, run by LiteRT (XNNPack);
  * ``tflite_int8``: a full-integer quantised TFLite model (faster, embeddings only close);
  * ``openvino``: converted once to OpenVINO IR (from the SavedModel Keras exports), run by
    OpenVINO's CPU plugin in float32 or bfloat16 (``INFERENCE_PRECISION_HINT``), with its thread
    pinning off: pinned threads fight any other process on the cores (a training job, the app's
    own threads, a second shard) and swung 3x between rounds when measured;
  * ``auto``: the backbone stage times every runtime and precision this CPU offers (bfloat16 only
    where it is native: ``avx512_bf16`` or ``amx_bf16``; emulated bf16 is slower) in interleaved
    rounds on train images, keeps those whose embeddings agree with Keras float32 to a cosine of
    at least ``features.min_cosine`` on every image, and picks the fastest. Keras float32 is
    always a candidate, so ``auto`` is never slower than the reference it is measured against.

The choice is made once, by the backbone stage, and written with its measurements to the
backbone folder's ``spec.json`` (``BackboneFolder``): every shard, on any machine, and the
served model run exactly that runtime and precision; a machine that cannot (OpenVINO bfloat16 on
a CPU without native bf16 silently runs float32) is an error for a shard, never a silent mix.
The served model falls back to Keras, with the same precision and a warning, when LiteRT or
OpenVINO cannot load its file.

Two CNNs:
  * ``xception`` (the default): Keras Xception, 2,048 numbers per image at 299x299, with ImageNet
    weights where Keras can fetch them, or random weights offline;
  * ``mobilenet_v2_int8``: ImageNet MobileNetV2 1.0 as an int8 TFLite file that runs offline
    (vendored in ``vendor/mobilenet_v2/`` with its license and provenance; ``weights: imagenet``
    runs that copy, a path runs another). It has one runtime, LiteRT (``tflite_int8``), and one
    recipe, the one the real Flickr8k features in the shared data were made with: RGB over white,
    224x224 bilinear, uint8 in; the pooled 1,280-d vector dequantised; the 7x7x320 grid kept as
    uint8 (``MobileNetV2Int8Embedder``). A file that is not this model is refused, naming what it
    lacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import threading
import time
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
from pipeline.data.features_file import dequantize, grid_metadata  # noqa: E402
from pipeline.data.images import ImageSource, load_rgb  # noqa: E402

log = logging.getLogger(__name__)

XCEPTION, MOBILENET = "xception", "mobilenet_v2_int8"
FEATURE_DIM = {XCEPTION: 2048, MOBILENET: 1280}
# the vendored ImageNet MobileNetV2 (``weights: imagenet``), checked against its published digest
MOBILENET_FILE = Path(__file__).resolve().parents[2] / "vendor" / "mobilenet_v2" / "mobilenet_v2_1.0_224_quant.tflite"
MOBILENET_SHA256 = "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776"
MOBILENET_SIZE = 224
MOBILENET_POOLED = "MobilenetV2/Logits/AvgPool"  # (1, 1, 1, 1280) uint8: the embedding
MOBILENET_GRID = "MobilenetV2/expanded_conv_16/project"  # name prefix of the (1, 7, 7, 320) uint8 grid
MOBILENET_GRID_SHAPE = (1, 7, 7, 320)
Embedder = Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8 -> (N, D) float32


class BackboneError(RuntimeError):
    """The CNN could not be built or run (ImageNet weights unavailable offline, a runtime that
    cannot load its file or cannot run the chosen precision here)."""


@dataclass(frozen=True)
class BackboneSpec:
    """The exact CNN and how it runs: made from ``features`` params by ``from_settings`` (the one
    place its values come from) and resolved by the backbone stage, or read back from a backbone
    folder's spec.json."""

    name: str
    weights: str  # imagenet | none | a weights file
    image_size: int
    seed: int
    precision: str  # float32 | bfloat16 (bfloat16: keras and openvino only) | int8 (mobilenet_v2_int8)
    runtime: str  # keras | tflite | tflite_int8 | openvino; "auto" until the backbone stage chose

    @classmethod
    def from_settings(cls, cfg: FeaturesSettings, cpu_flags: frozenset[str] | None = None) -> "BackboneSpec":
        """The spec ``cfg`` asks for on this CPU. ``precision: auto`` becomes bfloat16 for the
        keras and openvino runtimes on a CPU with native bf16, else float32 (TFLite has no bf16
        path on x86); with ``runtime: auto`` both stay to be measured (``choose_runtime``)."""
        if cfg.backbone == MOBILENET:  # one runtime, one precision: the int8 file as it is
            return cls(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed, "int8", "tflite_int8")
        precision = cfg.precision
        if precision == "auto" and cfg.runtime != "auto":
            native = cpu.has_native_bf16(cpu_flags)
            precision = "bfloat16" if cfg.runtime in ("keras", "openvino") and native else "float32"
        return cls(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed, precision, cfg.runtime)

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM[self.name]

    def metadata(self) -> dict[str, str]:
        """Provenance stored with the features (Parquet schema metadata, MLflow params)."""
        import pyarrow
        import tensorflow as tf

        if self.name == MOBILENET:
            preprocessing = (f"PIL decode (EXIF transpose, RGB over white), bilinear resize to {self.image_size}x"
                             f"{self.image_size}, uint8 into the int8 TFLite model; {MOBILENET_POOLED} dequantised "
                             "with its scale and zero point")
        else:
            preprocessing = ("PIL decode (EXIF transpose, RGB), bilinear resize to "
                             f"{self.image_size}x{self.image_size}, xception.preprocess_input "
                             "(x/127.5 - 1), global average pooling")
        return {
            "backbone": self.name, "weights": self.weights, "input_size": str(self.image_size),
            "seed": str(self.seed), "feature_dim": str(self.feature_dim),
            "precision": self.precision, "runtime": self.runtime, "preprocessing": preprocessing,
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
    """Rebuild the exact CNN whose weights the backbone stage saved, in ``spec``'s precision."""
    return build(replace(spec, weights=str(weights_file)))


def preprocess(batch_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB (N, S, S, 3) -> float32 in [-1, 1], as Xception was trained."""
    return keras.applications.xception.preprocess_input(batch_uint8.astype(np.float32))


def load_image(source: ImageSource, spec: BackboneSpec, max_pixels: int | None) -> np.ndarray:
    """One image -> (S, S, 3) uint8, exactly as the features stage reads it."""
    return load_rgb(source, spec.image_size, max_pixels)


def embedder(model: keras.Model) -> Embedder:
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


def mobilenet_file(weights: str) -> Path:
    """The .tflite file ``features.weights`` names for ``mobilenet_v2_int8``: ``imagenet`` is the
    vendored copy (its bytes checked against the published digest), a path is taken as it is
    (its tensors are checked when it loads). BackboneError otherwise."""
    if weights == "none":
        raise BackboneError("features.weights: none has no meaning for mobilenet_v2_int8 (there is no random-init "
                            "int8 MobileNetV2): use imagenet (the vendored file) or the path of a .tflite file")
    path = MOBILENET_FILE if weights == "imagenet" else Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(f"features.weights: {path} is not a file; mobilenet_v2_int8 needs imagenet (the copy in "
                            "vendor/mobilenet_v2/) or the path of mobilenet_v2_1.0_224_quant.tflite")
    if weights == "imagenet":
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != MOBILENET_SHA256:
            raise BackboneError(f"{path} has sha256 {digest}, not the vendored model's {MOBILENET_SHA256}: the file "
                                "was changed or damaged; restore it from git (git checkout -- vendor/mobilenet_v2)")
    return path


class MobileNetV2Int8Embedder:
    """The int8 ImageNet MobileNetV2 TFLite file on LiteRT, read as the shared real features were
    made: uint8 (N, 224, 224, 3) in; ``__call__`` gives the pooled vector dequantised to float32
    ((q - zero_point) * scale, in float32), ``grid`` the 7x7x320 region tensor as the model's own
    uint8. The intermediate tensors are readable after ``invoke()`` only with
    ``experimental_preserve_all_tensors``. One image per invoke: the file's input is batch 1, and
    each image is computed alike whatever batch it came in. Thread-safe: one interpreter, one lock.
    BackboneError, naming the file and what it lacks, for a file that is not this model."""

    def __init__(self, model_file: Path, threads: int | None = None):
        import warnings

        from ai_edge_litert.interpreter import Interpreter

        self.model_file = model_file
        try:
            with warnings.catch_warnings():  # preserving tensors "is for debugging": here it is the recipe
                warnings.simplefilter("ignore", UserWarning)
                self._interpreter = Interpreter(model_path=str(model_file), num_threads=threads or cpu.cores(),
                                                experimental_preserve_all_tensors=True)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise BackboneError(f"the LiteRT interpreter cannot load {model_file} as a TFLite model: "
                                f"{str(err).strip()[:300]}") from None
        inputs = self._interpreter.get_input_details()
        wanted = (1, MOBILENET_SIZE, MOBILENET_SIZE, 3)
        if len(inputs) != 1 or tuple(inputs[0]["shape"]) != wanted or inputs[0]["dtype"] != np.uint8:
            found = ", ".join(f"{tuple(int(d) for d in i['shape'])} {np.dtype(i['dtype']).name}" for i in inputs) or "none"
            raise BackboneError(f"{model_file} is not the MobileNetV2 int8 model: its input is {found}, not one "
                                f"{wanted} uint8 image")
        tensors = self._interpreter.get_tensor_details()
        pooled = [t for t in tensors if t["name"] == MOBILENET_POOLED and tuple(t["shape"]) == (1, 1, 1, 1280)
                  and t["dtype"] == np.uint8]
        grid = [t for t in tensors if t["name"].startswith(MOBILENET_GRID)
                and tuple(t["shape"]) == MOBILENET_GRID_SHAPE and t["dtype"] == np.uint8]
        lacks = [what for what, found in ((f"the tensor {MOBILENET_POOLED} of shape (1, 1, 1, 1280) uint8", pooled),
                                          (f"a tensor {MOBILENET_GRID}... of shape {MOBILENET_GRID_SHAPE} uint8", grid))
                 if not found]
        if lacks:
            raise BackboneError(f"{model_file} is not the MobileNetV2 int8 model: it lacks {' and '.join(lacks)} "
                                f"({len(tensors)} tensors)")
        self._input = inputs[0]["index"]
        self._pooled, self._grid = pooled[0]["index"], grid[0]["index"]
        scale, zero_point = pooled[0]["quantization"]
        self._scale, self._zero_point = np.float32(scale), np.float32(zero_point)
        self.grid_quantization = tuple(grid[0]["quantization"])  # (scale, zero point) of ``grid``'s values
        self.grid_hw = MOBILENET_GRID_SHAPE[1:3]  # rows, columns of regions
        self.grid = (MOBILENET_GRID_SHAPE[1] * MOBILENET_GRID_SHAPE[2], MOBILENET_GRID_SHAPE[3])  # regions, channels
        self._lock = threading.Lock()

    def _run(self, batch_uint8: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            for image in batch_uint8:
                self._interpreter.set_tensor(self._input, np.ascontiguousarray(image[None], dtype=np.uint8))
                self._interpreter.invoke()
                yield (self._interpreter.get_tensor(self._pooled).reshape(-1).copy(),
                       self._interpreter.get_tensor(self._grid)[0].copy())

    def __call__(self, batch_uint8: np.ndarray) -> np.ndarray:
        pooled = np.stack([p for p, _ in self._run(batch_uint8)])
        return (pooled.astype(np.float32) - self._zero_point) * self._scale

    def with_grid(self, batch_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pooled float32 (N, 1280), grid uint8 (N, 7, 7, 320)) from one pass."""
        found = list(self._run(batch_uint8))
        pooled = np.stack([p for p, _ in found]).astype(np.float32)
        return (pooled - self._zero_point) * self._scale, np.stack([g for _, g in found])

    def grid_metadata(self) -> dict[str, str]:
        """How ``with_grid``'s grids are stored in a features file (shape, scale, zero point)."""
        return grid_metadata(MOBILENET_GRID_SHAPE[1:], self.grid_quantization)

    def rows(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(N, 1280 + 7 x 7 x 320) float32: the pooled vector, then the grid dequantized, as the
        attention decoder reads an image (the layout ``read_feature_rows`` gives the stages)."""
        pooled, grid = self.with_grid(batch_uint8)
        return np.concatenate([pooled, dequantize(grid.reshape(len(grid), -1), *self.grid_quantization)], axis=1)


OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}


class OpenVINOEmbedder:
    """An OpenVINO IR on the CPU plugin, in ``precision`` (float32 | bfloat16), thread pinning
    off, one thread per core. Same contract as ``embedder``. BackboneError when the IR cannot be
    read or this CPU cannot run ``precision`` (OpenVINO would silently run float32 for bf16 on a
    CPU without it: the plugin is asked what it actually runs)."""

    def __init__(self, model_file: Path, precision: str, threads: int | None = None,
                 cpu_flags: frozenset[str] | None = None):
        if precision == "bfloat16" and not cpu.has_native_bf16(cpu_flags):
            raise BackboneError(f"OpenVINO bfloat16 needs a CPU with native bf16 (avx512_bf16 or amx_bf16); "
                                f"this one has none ({cpu.describe()}) and would run float32 or emulate it")
        try:
            import openvino as ov
        except ImportError as err:
            raise BackboneError(f"OpenVINO is not installed ({err})") from None
        try:
            compiled = ov.Core().compile_model(str(model_file), "CPU", {
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision], "ENABLE_CPU_PINNING": False,
                "INFERENCE_NUM_THREADS": threads or cpu.cores()})
        except (RuntimeError, ValueError, OSError) as err:
            raise BackboneError(f"OpenVINO cannot load {model_file}: {str(err).strip()[:300]}") from None
        actual = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if (precision == "bfloat16") != ("bf" in actual):
            raise BackboneError(f"OpenVINO runs {actual} here, not {precision}: this CPU ({cpu.describe()}) "
                                "has no native bf16")
        self._request = compiled.create_infer_request()
        self._output = compiled.output(0)
        self._lock = threading.Lock()

    def __call__(self, batch_uint8: np.ndarray) -> np.ndarray:
        x = preprocess(batch_uint8)
        with self._lock:
            result = self._request.infer({0: x})
            return np.array(result[self._output], dtype=np.float32, copy=True)


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


def to_openvino(model: keras.Model, out_xml: Path) -> None:
    """The float32 Keras backbone as OpenVINO IR (``out_xml`` and its .bin): exported as a
    SavedModel, converted by ``ov.convert_model``, saved with its float32 weights (OpenVINO's
    default would store them as float16). The precision is chosen when it is compiled."""
    try:
        import openvino as ov
    except ImportError as err:
        raise BackboneError(f"OpenVINO is not installed ({err})") from None
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                model.export(str(saved), format="tf_saved_model", verbose=False)
            ov.save_model(ov.convert_model(str(saved)), str(out_xml), compress_to_fp16=False)
        except Exception as err:  # the exporter and converter raise many kinds
            raise BackboneError(f"OpenVINO conversion failed: {type(err).__name__}: {str(err)[:500]}") from None


def candidates(cpu_flags: frozenset[str] | None = None) -> list[tuple[str, str]]:
    """(runtime, precision) pairs ``auto`` measures on this CPU: bfloat16 only where it is native,
    OpenVINO only where it is installed; Keras float32 (the reference) first."""
    native = cpu.has_native_bf16(cpu_flags)
    found = [("keras", "float32"), *([("keras", "bfloat16")] if native else []), ("tflite", "float32")]
    try:
        import openvino  # noqa: F401
    except ImportError:
        return found
    return found + [("openvino", "float32"), *([("openvino", "bfloat16")] if native else [])]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) matrices."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def measure(embedders: dict[tuple[str, str], Embedder], images: np.ndarray, batch_size: int,
            rounds: int) -> list[dict]:
    """Each embedder's seconds per image (median of ``rounds`` interleaved rounds over
    ``images`` in batches of ``batch_size``, the order rotating each round, after one warm-up
    batch) and its lowest cosine to the first one's embeddings (the reference)."""
    keys = list(embedders)
    outputs, times = {}, {k: [] for k in keys}
    for key in keys:  # warm-up: graph building, plugin compilation, first allocations
        embedders[key](images[:batch_size])
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            out = np.concatenate([embedders[key](images[lo:lo + batch_size])
                                  for lo in range(0, len(images), batch_size)])
            times[key].append((time.perf_counter() - start) / len(images))
            outputs[key] = out
    reference = outputs[keys[0]]
    ref_time = float(np.median(times[keys[0]]))
    return [{"runtime": runtime, "precision": precision, "seconds_per_image": float(np.median(times[(runtime, precision)])),
             "ratio": ref_time / float(np.median(times[(runtime, precision)])),
             "min_cosine": round(float(cosines(outputs[(runtime, precision)], reference).min()), 9)}
            for runtime, precision in keys]


@dataclass(frozen=True)
class BackboneFolder:
    """The backbone stage's output: the exact weights, the file the chosen runtime runs (TFLite
    model or OpenVINO IR), and ``spec.json``: the resolved spec (runtime and precision chosen on
    the machine that built it, so every shard and the served model use the same even on other
    CPUs), what params asked for, and ``auto``'s measurements."""

    path: Path

    @property
    def weights(self) -> Path:
        return self.path / "backbone.weights.h5"

    @property
    def tflite(self) -> Path:
        return self.path / "backbone.tflite"

    @property
    def openvino(self) -> Path:
        return self.path / "backbone.xml"  # with backbone.bin beside it

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    def record(self) -> dict:
        try:
            record = json.loads(self.spec_file.read_text())
            BackboneSpec(**record["spec"])
            return record
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BackboneError(f"{self.spec_file} is missing or unreadable ({err}); rerun the "
                                "backbone stage (dvc repro backbone)") from None

    def spec(self) -> BackboneSpec:
        return BackboneSpec(**self.record()["spec"])

    def digest(self) -> str:
        """What the embeddings depend on: the weights' bytes and how they run (runtime, precision,
        input size). Two folders with the same digest embed every image alike."""
        spec = self.spec()
        h = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
        with (self.tflite if spec.name == MOBILENET else self.weights).open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        """The spec's provenance, plus how ``auto`` chose (each runtime's speed and cosine), for the
        features file and the MLflow run."""
        record = self.record()
        found = record.get("measurements") or []
        choice = "; ".join(f"{r['runtime']} {r['precision']} {r['ratio']:.2f}x cos {r['min_cosine']:.6f}"
                           f"{' chosen' if r.get('chosen') else ''}" for r in found)
        return {**self.spec().metadata(), "runtime_requested": record.get("requested", {}).get("runtime", ""),
                "runtime_choice": choice or "as configured", "chosen_on": record.get("chosen_on", "")}

    def agrees_with(self, cfg: FeaturesSettings) -> bool:
        """Whether the saved folder is what ``cfg`` asks for: the same CNN, and the runtime and
        precision params asked for (``auto`` accepts the choice made when the folder was built)."""
        record, spec = self.record(), self.spec()
        asked = record.get("requested", {"runtime": spec.runtime, "precision": spec.precision})
        base = BackboneSpec.from_settings(cfg)
        same_cnn = (spec.name, spec.weights, spec.image_size, spec.seed) == (
            base.name, base.weights, base.image_size, base.seed)
        return same_cnn and asked == {"runtime": cfg.runtime, "precision": cfg.precision}

    def grid_embedder(self) -> MobileNetV2Int8Embedder:
        """The embedder that also gives each image's grid of regions (``with_grid``, ``rows``,
        ``grid_metadata``). Built for the int8 MobileNetV2; BackboneError naming the folder for
        another CNN (Xception's 10x10 map is not extracted yet: its decoders read pooled vectors)."""
        spec = self.spec()
        if spec.name != MOBILENET:
            raise BackboneError(f"{self.path} holds {spec.name} run by {spec.runtime}: grids of regions are extracted "
                                f"from {MOBILENET} only so far (features.grid: true and attention decoders need it); "
                                f"use features.backbone: {MOBILENET}, or train.decoder: lstm with features.grid: false")
        return self.embedder()

    def embedder(self, fallback_to_keras: bool = False, cpu_flags: frozenset[str] | None = None) -> Embedder:
        """The embedder of the saved runtime and precision. ``fallback_to_keras`` (the served
        model): when the TFLite or OpenVINO file cannot be loaded or run here, run the saved
        weights in Keras with the same precision (embeddings within the cosine bound, slower)
        rather than fail; an int8 model never falls back (its embeddings differ)."""
        spec = self.spec()
        if spec.name == MOBILENET:
            if not self.tflite.is_file():
                raise BackboneError(f"{self.tflite} is missing: the backbone folder {self.path} of a "
                                    "mobilenet_v2_int8 model holds the .tflite it runs; rerun the backbone stage")
            return MobileNetV2Int8Embedder(self.tflite)
        try:
            if spec.runtime == "keras":
                if spec.precision == "bfloat16" and not cpu.has_native_bf16(cpu_flags):
                    log.warning("running Keras bfloat16 as chosen on %s; this CPU (%s) emulates bf16: slower, the same "
                                "maths", self.record().get("chosen_on", "another machine"), cpu.describe())
                return embedder(load_saved(self.weights, spec))
            if spec.runtime == "openvino":
                return OpenVINOEmbedder(self.openvino, spec.precision, cpu_flags=cpu_flags)
            return TFLiteEmbedder(self.tflite)
        except (BackboneError, ImportError) as err:
            if not fallback_to_keras or spec.runtime not in ("tflite", "openvino"):
                raise BackboneError(f"{err}; the features were computed with {spec.runtime} {spec.precision} on "
                                    f"{self.record().get('chosen_on', 'another machine')}: run this on such a "
                                    "machine, or rerun the backbone stage here (every shard then follows the "
                                    "new choice)") from None
            log.warning("%s; falling back to the Keras runtime in %s (embeddings within the cosine bound, slower)",
                        err, spec.precision)
            return embedder(load_saved(self.weights, spec))


def save_folder(model: keras.Model, spec: BackboneSpec, out: Path, requested: dict,
                measurements: list[dict] | None = None, calibration: np.ndarray | None = None) -> dict:
    """Write a backbone folder for the resolved ``spec`` into ``out`` (an empty folder): the
    weights, the runtime's file, spec.json. Returns conversion timings."""
    folder = BackboneFolder(out)
    model.save_weights(str(folder.weights))
    stats = {}
    start = time.perf_counter()
    if spec.runtime in ("tflite", "tflite_int8"):
        folder.tflite.write_bytes(to_tflite(model, calibration if spec.runtime == "tflite_int8" else None))
    elif spec.runtime == "openvino":
        to_openvino(model, folder.openvino)
    if spec.runtime != "keras":
        stats["conversion_seconds"] = round(time.perf_counter() - start, 1)
    _write_spec(folder, spec, requested, measurements)
    return stats


def _write_spec(folder: BackboneFolder, spec: BackboneSpec, requested: dict, measurements: list[dict] | None) -> None:
    folder.spec_file.write_text(json.dumps({"spec": spec.to_dict(), "requested": requested,
                                            "chosen_on": cpu.describe(), "measurements": measurements or []},
                                           indent=2))


def save_mobilenet_folder(spec: BackboneSpec, model_file: Path, out: Path, requested: dict,
                          measurements: list[dict] | None = None) -> None:
    """Write a ``mobilenet_v2_int8`` backbone folder into ``out`` (an empty folder): a copy of
    ``model_file`` (checked to be the model: ``MobileNetV2Int8Embedder``) and spec.json."""
    MobileNetV2Int8Embedder(model_file, threads=1)
    folder = BackboneFolder(out)
    shutil.copyfile(model_file, folder.tflite)
    _write_spec(folder, spec, requested, measurements)


def choose_runtime(model: keras.Model, spec: BackboneSpec, images: np.ndarray, batch_size: int, rounds: int,
                   min_cosine: float, precision: str = "auto",
                   cpu_flags: frozenset[str] | None = None) -> tuple[BackboneSpec, list[dict]]:
    """``runtime: auto``: every candidate of this CPU measured on ``images`` (``measure``); the
    fastest in ``precision`` (``auto``: either) whose embeddings agree with Keras float32 (always
    measured: the reference) to ``min_cosine`` on every image. Returns the resolved spec and the
    measurements (each marked ``eligible`` and ``chosen``); BackboneError when none qualifies."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "backbone.weights.h5"
        model.save_weights(str(weights))
        embedders: dict[tuple[str, str], Embedder] = {}
        wanted = [c for c in candidates(cpu_flags) if c == ("keras", "float32") or precision in ("auto", c[1])]
        for runtime, prec in wanted:
            try:
                if runtime == "keras":
                    embedders[(runtime, prec)] = embedder(
                        model if prec == "float32" else load_saved(weights, replace(spec, precision=prec)))
                elif runtime == "tflite":
                    path = Path(tmp) / "backbone.tflite"
                    if not path.exists():
                        path.write_bytes(to_tflite(model))
                    embedders[(runtime, prec)] = TFLiteEmbedder(path)
                else:
                    path = Path(tmp) / "backbone.xml"
                    if not path.exists():
                        to_openvino(model, path)
                    embedders[(runtime, prec)] = OpenVINOEmbedder(path, prec, cpu_flags=cpu_flags)
            except BackboneError as err:  # a runtime this machine cannot run is not a candidate
                log.warning("runtime %s %s left out: %s", runtime, prec, err)
        found = measure(embedders, images, batch_size, rounds)
        del embedders
    for row in found:
        row["eligible"] = row["min_cosine"] >= min_cosine and precision in ("auto", row["precision"])
    eligible = [r for r in found if r["eligible"]]
    if not eligible:
        raise BackboneError(f"features.runtime auto found no runtime that runs {precision} on this CPU "
                            f"({cpu.describe()}) with embeddings within features.min_cosine {min_cosine}: "
                            f"{found}; use precision auto or float32")
    best = max(eligible, key=lambda r: r["ratio"])
    for row in found:
        row["chosen"] = row is best
    log.info("runtime auto on %s: %s", cpu.describe(), "; ".join(
        f"{r['runtime']} {r['precision']} {r['ratio']:.2f}x cos {r['min_cosine']:.6f}"
        f"{' (chosen)' if r['chosen'] else '' if r['eligible'] else ' (below min_cosine)'}" for r in found))
    return replace(spec, runtime=best["runtime"], precision=best["precision"]), found
