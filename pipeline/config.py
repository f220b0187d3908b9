"""params.yaml -> typed, validated settings. The one place configuration is read.

Every section is a frozen, strict pydantic model with ``extra="forbid"`` and **no defaults**:
``params.yaml`` is the one place a value is set (DVC tracks it there), so a key missing from
it, an unknown key or a bad value fails early with an error that names the key
(``data.source: ...``). Types are strict: ``epochs: true`` is not read as 1, ``"8"`` is not
an int, and a sha256 that YAML read as a number is refused with a hint to quote it.

Each stage's pure core takes its own section (``settings.train`` ...), never the whole tree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS = Path("params.yaml")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SplitRatios(_Section):
    train: float = Field(ge=0, le=1)
    dev: float = Field(ge=0, le=1)
    test: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitRatios":
        total = self.train + self.dev + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + dev + test must be 1.0, got {total:g}")
        return self


class Flickr8kSource(_Section):
    images_url: str = Field(min_length=1)
    text_url: str = Field(min_length=1)
    images_sha256: str | None
    text_sha256: str | None
    timeout_s: float = Field(gt=0)
    retries: int = Field(ge=0, le=100)

    @field_validator("images_sha256", "text_sha256", mode="before")
    @classmethod
    def _sha256_text(cls, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML reads an all-digit hex string as a number and drops leading zeros.
            raise ValueError('YAML read this checksum as a number; quote it: "0123...abcd" '
                             "(64 hex digits)")
        if isinstance(value, str) and not _SHA256.match(value):
            raise ValueError(f"expected 64 hex digits (a sha256) or null, got {value!r}")
        return value


class SyntheticSource(_Section):
    n_images: int = Field(ge=10, le=100_000)
    image_size: int = Field(ge=32, le=1024)
    seed: int
    split: SplitRatios


class ArchiveLimits(_Section):
    """What a zip may unpack to (zip bombs: a 2.6 MB zip of 2.5 GiB of zeros passes every CRC)."""

    max_unpacked_bytes: int = Field(ge=1)  # the members' declared sizes, summed
    max_compression_ratio: float = Field(ge=1)  # unpacked / packed bytes (photos barely compress)


class DataSettings(_Section):
    source: Literal["synthetic", "flickr8k", "local"]
    local_path: str | None
    archive_limits: ArchiveLimits
    # Splits for a Kaggle-layout dataset, which ships no split lists (Flickr8k: 6000/1000/1000).
    kaggle_split: SplitRatios
    flickr8k: Flickr8kSource
    synthetic: SyntheticSource

    @model_validator(mode="after")
    def _local_needs_path(self) -> "DataSettings":
        if self.source == "local" and not self.local_path:
            raise ValueError("source 'local' needs data.local_path (a directory or .zip)")
        return self


class ValidateSettings(_Section):
    captions_per_image: int = Field(ge=1)
    min_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    max_reject_fraction: float = Field(ge=0, le=1)
    # An image above this many pixels is rejected as too large (a decompression bomb or a
    # scan); below it, large photos are decoded without PIL's DecompressionBombWarning.
    max_image_pixels: int = Field(ge=1)
    decode_workers: int = Field(ge=1, le=64)


class FeaturesSettings(_Section):
    # xception | mobilenet_v2_int8 (ImageNet, int8 TFLite, offline: pipeline/captioning/backbone.py)
    backbone: Literal["xception", "mobilenet_v2_int8"]
    # xception: imagenet | none (random init, offline) | path to a local .h5 / .weights.h5 file;
    # mobilenet_v2_int8: imagenet (the vendored .tflite) | path to mobilenet_v2_1.0_224_quant.tflite
    weights: str = Field(min_length=1)
    image_size: int = Field(ge=71, le=1024)
    # auto (the fastest measured here whose embeddings agree with keras float32 to min_cosine) |
    # keras | tflite | tflite_int8 (approximate) | openvino (pipeline/captioning/backbone.py)
    runtime: Literal["auto", "keras", "tflite", "tflite_int8", "openvino"]
    # auto: bfloat16 for keras and openvino on a CPU with native bf16, else float32
    precision: Literal["auto", "float32", "bfloat16"]
    # train images that calibrate tflite_int8 and on which runtime auto measures the runtimes
    calibration_images: int = Field(ge=1, le=4096)
    auto_rounds: int = Field(ge=1, le=20)  # interleaved timing rounds of runtime auto
    min_cosine: float = Field(gt=0, le=1)  # auto keeps runtimes whose embeddings agree this well
    batch_size: int = Field(ge=1, le=1024)
    seed: int
    rows_per_part: int = Field(ge=1)
    # One entry per shard, [0, 1, ..., N-1]: DVC makes one `features@i` stage per entry (its
    # foreach needs a list) and an image goes to shard stable_hash(name) % N.
    shards: list[int] = Field(min_length=1, max_length=64)
    # also store each image's grid of regions (the CNN's last feature map) beside the pooled
    # vector, for train.decoder: attention; mobilenet_v2_int8 only so far (7x7x320, uint8)
    grid: bool = False

    @model_validator(mode="after")
    def _mobilenet_as_it_was_made(self):
        if self.backbone != "mobilenet_v2_int8":
            return self
        wrong = [f"{key}: {value} ({need})" for key, value, ok, need in (
            ("image_size", self.image_size, self.image_size == 224, "its input is 224x224"),
            ("runtime", self.runtime, self.runtime in ("auto", "tflite_int8"), "it runs on LiteRT only: auto or tflite_int8"),
            ("precision", self.precision, self.precision in ("auto", "float32"), "it is int8 inside: auto"),
            ("weights", self.weights, self.weights != "none", "imagenet (the vendored file) or a .tflite path"))
            if not ok]
        if wrong:
            raise ValueError("backbone mobilenet_v2_int8 runs one file one way; set " + "; ".join(wrong))
        return self

    @model_validator(mode="after")
    def _grid_from_a_cnn_that_gives_one(self):
        if self.grid and self.backbone != "mobilenet_v2_int8":
            raise ValueError(f"grid: true is built for backbone mobilenet_v2_int8 only (its 7x7x320 grid); "
                             f"{self.backbone}'s map is not extracted yet: use grid: false with {self.backbone}")
        return self

    @model_validator(mode="after")
    def _bf16_needs_keras_or_openvino(self):
        if self.precision == "bfloat16" and self.runtime in ("tflite", "tflite_int8"):
            raise ValueError(f"precision bfloat16 runs on runtimes keras, openvino and auto, not {self.runtime} "
                             "(TFLite has no bf16 path on x86 CPUs): use precision auto or float32")
        return self

    @field_validator("shards", mode="before")
    @classmethod
    def _shards_list(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"write the shard numbers, not their count: shards: {list(range(value))} "
                             f"for {value} shard(s) (DVC makes one stage per entry)")
        return value

    @field_validator("shards")
    @classmethod
    def _shards_numbered(cls, value: list[int]) -> list[int]:
        if value != list(range(len(value))):
            raise ValueError(f"shards must be 0, 1, ..., N-1 in order, e.g. {list(range(len(value)))}; "
                             f"got {value}")
        return value


class SelfCriticalSettings(_Section):
    epochs: int = Field(ge=0)  # 0 = off
    learning_rate: float = Field(gt=0)
    samples: int = Field(ge=1)  # sampled captions per image and step
    baseline: Literal["greedy", "samples"]  # greedy caption's reward, or the mean of the other samples'
    top_k: int = Field(ge=0)  # sample among each step's k most likely words; 0 = the whole softmax
    batch_images: int = Field(ge=1)

    @model_validator(mode="after")
    def _others_to_average(self) -> "SelfCriticalSettings":
        if self.baseline == "samples" and self.samples < 2:
            raise ValueError("baseline: samples compares each sample with the image's other samples: "
                             f"it needs samples >= 2, got {self.samples}")
        if self.top_k == 1:
            raise ValueError("top_k: 1 samples the greedy caption every time, so no sample can beat "
                             "the baseline: use 0 (whole softmax) or k >= 2")
        return self


class TrainSettings(_Section):
    # lstm: one pooled vector per photo; attention: also looks at the CNN's grid of regions for
    # each word (needs features with a grid, ``pipeline/captioning/decoder.py``)
    decoder: Literal["lstm", "attention"]
    vocab_min_count: int = Field(ge=1)
    max_length: int = Field(ge=4, le=200)
    embedding_dim: int = Field(ge=4)
    units: int = Field(ge=4)
    dropout: float = Field(ge=0, lt=1)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    patience: int = Field(ge=1)
    label_smoothing: float = Field(ge=0, lt=1)
    lr_decay: float = Field(gt=0, le=1)  # 1 = constant learning rate
    lr_patience: int = Field(ge=1)
    ensemble: int = Field(ge=1, le=10)
    self_critical: SelfCriticalSettings
    seed: int


class ConsensusSettings(_Section):
    """Reranking a beam by agreement with the captions of similar train images
    (``pipeline/captioning/consensus.py``)."""

    neighbours: int = Field(ge=0, le=1000)  # similar train images compared with; 0 = off
    weight: float = Field(ge=0)  # x the decoder's length-normalised log-prob
    # captions sampled per image (among each step's top_k likeliest words; 0 = the whole
    # softmax) and reranked with the beam's; 0 = the beam's candidates only
    samples: int = Field(ge=0, le=100)
    top_k: int = Field(ge=0)
    # - this x the agreement with 100 random train images' captions (generic captions lose)
    contrast: float = Field(ge=0)
    # closer neighbours count more: weight exp(this x (cosine - the nearest one's)); 0 = all alike
    sharpness: float = Field(ge=0, le=1000)
    seed: int  # of the sampled captions (with each image's features: the same photo, the same caption)

    @model_validator(mode="after")
    def _samples_that_differ(self) -> "ConsensusSettings":
        if self.samples and self.top_k == 1:
            raise ValueError("top_k: 1 samples the greedy caption every time: use 0 (whole softmax) or k >= 2")
        if self.samples and not self.neighbours:
            raise ValueError("samples need neighbours > 0: samples are only ranked by consensus")
        return self


class DecodingSettings(_Section):
    """How a caption is chosen: one object, read by evaluate, stored as it is in the registered
    model, and read back by the served model, the app, search and alt text."""

    beam_size: int = Field(ge=1, le=20)  # 1 = greedy
    length_penalty: float = Field(ge=0, le=3)  # beam ranks logp / length ** this
    no_repeat_ngram: int = Field(ge=0, le=10)  # 0 = off
    batch_size: int = Field(ge=1)  # images decoded together
    consensus: ConsensusSettings

    def with_beam(self, beam_size: int) -> "DecodingSettings":
        """The same settings with another beam size (a request's own; 1 = greedy)."""
        return self.model_copy(update={"beam_size": beam_size})

    @classmethod
    def from_stored(cls, stored: dict) -> "DecodingSettings":
        """The settings a registered model carries. A model registered before this section
        existed carries flat ``evaluate.*`` keys (``consensus_neighbours`` ...), and the oldest
        ones fewer of them: each missing key gets the value that model captioned with (no
        samples, no contrast, no sharpness; no consensus at all; batches of 128, seed 0). The one
        place old keys are mapped."""
        if "consensus" in stored:
            return cls.model_validate(stored)
        legacy = {"consensus_neighbours": 0, "consensus_weight": 0.0, "consensus_samples": 0,
                  "consensus_top_k": 0, "consensus_contrast": 0.0, "consensus_sharpness": 0.0}
        old = {**legacy, **stored}
        return cls.model_validate({
            "beam_size": old["beam_size"], "length_penalty": float(old["length_penalty"]),
            "no_repeat_ngram": old["no_repeat_ngram"], "batch_size": 128,
            "consensus": {"neighbours": old["consensus_neighbours"], "weight": float(old["consensus_weight"]),
                          "samples": old["consensus_samples"], "top_k": old["consensus_top_k"],
                          "contrast": float(old["consensus_contrast"]),
                          "sharpness": float(old["consensus_sharpness"]), "seed": 0}})


class ConfidenceSettings(_Section):
    """How sure a caption is and when the model abstains (``pipeline/captioning/confidence.py``),
    fitted on dev by the ``calibrate`` stage."""

    novelty_neighbours: int = Field(ge=1, le=1000)  # train photos a photo's novelty is measured against
    novelty_quantile: float = Field(gt=0.5, le=1)  # dev photos that stay under the abstention threshold
    human_quantile: float = Field(gt=0, lt=1)  # acceptable = METEOR of the weaker human captions (this quantile)
    folds: int = Field(ge=2, le=20)  # cross-fitting: a photo's confidence never comes from a fit on itself
    seed: int


class EvaluateSettings(_Section):
    gallery_size: int = Field(ge=0)  # test images shown in reports/gallery.html


class RegisterSettings(_Section):
    model_name: str = Field(min_length=1)
    # <mode>_<metric>: the champion and the new model are compared on it, image by image
    metric: str = Field(pattern=r"^(greedy|beam)_(bleu[1-4]|cider|rouge_l)$")
    min_improvement: float = Field(ge=0)

    @property
    def mode(self) -> str:
        return self.metric.split("_", 1)[0]

    @property
    def metric_key(self) -> str:
        return self.metric.split("_", 1)[1]


class ServingSettings(_Section):
    max_image_bytes: int = Field(ge=1)
    max_image_pixels: int = Field(ge=1)
    max_rows: int = Field(ge=1)
    batch_size: int = Field(ge=1, le=256)


class AltTextSettings(_Section):
    """Conventions an alt text proposal must keep (``captioner alt-text``)."""

    max_length: int = Field(ge=10, le=1000)  # characters (screen readers read long ones poorly)
    banned_prefixes: list[str]  # screen readers already say it is an image
    capital_first: bool
    full_stop: bool
    max_page_bytes: int = Field(ge=1)  # pages above this are reported, not read
    # --apply --yes writes only proposals this sure (abstained or uncalibrated ones never)
    min_confidence: float = Field(ge=0, le=1)


class TagSettings(_Section):
    """``captioner tag``: what a photo's own metadata receives from the champion."""

    # fields written (pipeline/data/photo_metadata.FIELDS): alt_text = Iptc4xmpCore:AltTextAccessibility,
    # description = dc:description
    fields: list[Literal["alt_text", "description"]] = Field(min_length=1)
    min_confidence: float = Field(ge=0, le=1)  # below it (or abstained, or unknown) nothing is written
    max_xmp_bytes: int = Field(ge=1024)  # a photo carrying more XMP than this is left alone
    batch_size: int = Field(ge=1, le=512)  # photos captioned together


class FeedbackSettings(_Section):
    """People's word on served captions: the store, its limits, and how corrections train."""

    db: str = Field(min_length=1)  # SQLAlchemy URL or a SQLite file; CAPTIONER_FEEDBACK_DB wins
    max_correction_chars: int = Field(ge=10, le=10_000)
    max_per_minute: int = Field(ge=1)  # per client address
    max_photo_bytes: int = Field(ge=0)  # photos of corrections the store may hold (HTTP 507 above)
    test_share: float = Field(ge=0, lt=1)  # corrected photos held out (stable hash of the photo)
    train_repeats: int = Field(ge=1, le=100)  # a correction's weight in training, in captions
    min_new: int = Field(ge=1)  # corrections since the last export that ask for a retraining run
    experiment: str = Field(min_length=1)  # MLflow experiment of the app's traces
    trace: bool

    @property
    def store_url(self) -> str:
        """Where the feedback lives: ``CAPTIONER_FEEDBACK_DB`` if set, else ``db``; a relative
        location in the environment is relative to the working directory."""
        return absolute_location(os.environ.get("CAPTIONER_FEEDBACK_DB") or self.db, Path.cwd())


class AppSettings(_Section):
    """``captioner app``: what one client address may ask of it."""

    max_captions_per_minute: int = Field(ge=1)  # POST /api/caption per client address (HTTP 429 above)


class MlflowSettings(_Section):
    tracking_uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    # a tracking server that times out or answers 5xx is retried this often (with backoff) before a
    # command gives up; a refused connection fails at once
    request_retries: int = Field(ge=0, le=10)
    request_timeout_s: int = Field(ge=1)


class Settings(_Section):
    data: DataSettings
    validate_: ValidateSettings = Field(alias="validate")
    features: FeaturesSettings
    train: TrainSettings
    decoding: DecodingSettings
    confidence: ConfidenceSettings
    evaluate: EvaluateSettings
    register_: RegisterSettings = Field(alias="register")
    serving: ServingSettings
    alt_text: AltTextSettings
    tag: TagSettings
    feedback: FeedbackSettings
    app: AppSettings
    mlflow: MlflowSettings

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    # "validate" and "register" would shadow BaseModel attributes, hence the aliases.
    @property
    def validation(self) -> ValidateSettings:
        return self.validate_

    @property
    def registry(self) -> RegisterSettings:
        return self.register_


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        key = key.replace("validate_", "validate").replace("register_", "register")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "missing (every key is set in params.yaml; see the project's params.yaml)"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
            if e["type"] == "float_type" and _looks_like_number(e.get("input")):
                msg += "; YAML 1.1 reads 1e-3 as text: write 0.001 or 1.0e-3"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _looks_like_number(value) -> bool:
    try:
        float(value)
        return isinstance(value, str)
    except (TypeError, ValueError):
        return False


def parse_settings(raw: dict) -> Settings:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    try:
        return Settings.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid params.yaml:\n" + _format_errors(err)) from None


# Settings that name a file, a folder or a store (section, key): relative values mean relative to
# the project folder, whatever folder a command runs in.
LOCATION_SETTINGS = (("mlflow", "tracking_uri"), ("feedback", "db"), ("data", "local_path"),
                     ("features", "weights"))
_NOT_PATHS = {"imagenet", "none"}  # features.weights keywords


def absolute_location(value: str, base: Path) -> str:
    """``value`` (a store URI or a path) made independent of the working directory: a relative
    SQLite file (``sqlite:///mlflow.db``), ``file:`` URI or plain path is resolved against
    ``base``; absolute ones, server URLs (``http://``, ``postgresql://``...), in-memory SQLite and
    keywords (``imagenet``, ``none``) come back as they are.

    Why: a relative location means "relative to whichever folder the process runs in", and the
    processes this project starts run elsewhere (the champion's scoring process in a temporary
    folder, Airflow tasks, Celery workers): each would open a new, empty store of its own."""
    if not value or value in _NOT_PATHS:
        return value
    if value.startswith("sqlite:///"):
        path, sep, query = value[len("sqlite:///"):].partition("?")
        if not path or path == ":memory:" or path.startswith("/"):
            return value
        return f"sqlite:///{(base / Path(path).expanduser()).resolve()}{sep}{query}"
    parts = urlsplit(value)
    if parts.scheme == "file":
        if parts.netloc or parts.path.startswith("/"):
            return value
        return (base / parts.path).resolve().as_uri()
    if parts.scheme and len(parts.scheme) > 1:  # a URL of a server or a service (not C:\...)
        return value
    return str((base / Path(value).expanduser()).resolve())


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def database_url(location: str | Path) -> str:
    """A SQLAlchemy URL for ``location``: a URL as it is, a file path as SQLite (absolute: the same
    file from whatever folder a process runs in)."""
    text = str(location)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def _absolute_locations(raw: dict, base: Path) -> dict:
    """``raw`` params with every LOCATION_SETTINGS string made absolute against ``base``."""
    out = dict(raw)
    for section, key in LOCATION_SETTINGS:
        values = out.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            out[section] = {**values, key: absolute_location(values[key], base)}
    return out


def load_settings(path: str | Path = DEFAULT_PARAMS) -> Settings:
    """Read and validate params.yaml; relative locations in it (LOCATION_SETTINGS) are resolved
    against its folder, the project folder, once, here."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found (run from the project root)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_settings(_absolute_locations(raw, path.resolve().parent))
