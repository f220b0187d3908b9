import pytest

from pipeline.config import ConfigError, load_settings, parse_settings
from tests.helpers import PROJECT, tiny_params


def test_project_params_load_with_offline_defaults():
    settings = load_settings(PROJECT / "params.yaml")
    assert settings.data.source == "synthetic"
    assert settings.features.weights == "none"
    assert settings.validation.captions_per_image == 5


def test_unknown_key_is_named():
    raw = tiny_params()
    raw["features"]["batchsize"] = 8
    with pytest.raises(ConfigError, match=r"features\.batchsize: unknown key"):
        parse_settings(raw)


def test_bad_value_is_named():
    raw = tiny_params(**{"data.source": "s3"})
    with pytest.raises(ConfigError, match=r"data\.source"):
        parse_settings(raw)


def test_split_ratios_must_sum_to_one():
    raw = tiny_params(**{"data.kaggle_split": {"train": 0.9, "dev": 0.2, "test": 0.1}})
    with pytest.raises(ConfigError, match="data.kaggle_split"):
        parse_settings(raw)


def test_local_source_needs_a_path():
    with pytest.raises(ConfigError, match="local_path"):
        parse_settings(tiny_params(**{"data.source": "local"}))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "params.yaml")
