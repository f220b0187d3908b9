"""params.yaml -> typed, validated settings. The one place configuration is read.

Every section is a frozen pydantic model with ``extra="forbid"``, so an unknown key or a
bad value fails early with an error that names the key (``data.source: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitRatios(_Section):
    train: float = Field(0.75, ge=0, le=1)
    dev: float = Field(0.125, ge=0, le=1)
    test: float = Field(0.125, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitRatios":
        total = self.train + self.dev + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + dev + test must be 1.0, got {total:g}")
        return self


class Flickr8kSource(_Section):
    images_url: str
    text_url: str
    images_sha256: str | None = None
    text_sha256: str | None = None
    timeout_s: float = Field(60, gt=0)
    retries: int = Field(5, ge=0, le=100)


class SyntheticSource(_Section):
    n_images: int = Field(500, ge=10, le=100_000)
    image_size: int = Field(128, ge=32, le=1024)
    seed: int = 7
    split: SplitRatios = SplitRatios(train=0.8, dev=0.1, test=0.1)


class DataSettings(_Section):
    source: Literal["synthetic", "flickr8k", "local"] = "synthetic"
    local_path: str | None = None
    # Splits for a Kaggle-layout dataset, which ships no split lists (Flickr8k: 6000/1000/1000).
    kaggle_split: SplitRatios = SplitRatios()
    flickr8k: Flickr8kSource
    synthetic: SyntheticSource = SyntheticSource()

    @model_validator(mode="after")
    def _local_needs_path(self) -> "DataSettings":
        if self.source == "local" and not self.local_path:
            raise ValueError("source 'local' needs data.local_path (a directory or .zip)")
        return self


class ValidateSettings(_Section):
    captions_per_image: int = Field(5, ge=1)
    min_tokens: int = Field(1, ge=1)
    max_tokens: int = Field(40, ge=1)
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    decode_workers: int = Field(2, ge=1, le=64)


class FeaturesSettings(_Section):
    backbone: Literal["xception"] = "xception"
    # imagenet | none (random init, offline) | path to a local .h5 / .weights.h5 file
    weights: str = "none"
    image_size: int = Field(299, ge=71, le=1024)
    precision: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = Field(32, ge=1, le=1024)
    seed: int = 7
    rows_per_part: int = Field(256, ge=1)


class TrainSettings(_Section):
    vocab_min_count: int = Field(1, ge=1)
    max_length: int = Field(24, ge=4, le=200)
    embedding_dim: int = Field(128, ge=4)
    units: int = Field(256, ge=4)
    dropout: float = Field(0.3, ge=0, lt=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(30, ge=1)
    patience: int = Field(4, ge=1)
    seed: int = 7


class EvaluateSettings(_Section):
    beam_size: int = Field(3, ge=1, le=20)
    length_penalty: float = Field(0.7, ge=0, le=3)
    no_repeat_ngram: int = Field(3, ge=0, le=10)
    batch_size: int = Field(256, ge=1)
    gallery_size: int = Field(24, ge=0)


class RegisterSettings(_Section):
    model_name: str = "flickr8k-captioner"
    metric: str = "beam_bleu4"


class MlflowSettings(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "captioner"


class Settings(_Section):
    data: DataSettings
    validate_: ValidateSettings = Field(ValidateSettings(), alias="validate")
    features: FeaturesSettings = FeaturesSettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    register_: RegisterSettings = Field(RegisterSettings(), alias="register")
    mlflow: MlflowSettings = MlflowSettings()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

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
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_settings(raw: dict) -> Settings:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    try:
        return Settings.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid params.yaml:\n" + _format_errors(err)) from None


def load_settings(path: str | Path = DEFAULT_PARAMS) -> Settings:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found (run from the project root)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_settings(raw)
