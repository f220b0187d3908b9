import pytest

from pipeline.config import (
    ConfigError,
    ConsensusSettings,
    DecodingSettings,
    load_settings,
    parse_settings,
)
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


def test_types_are_strict():
    for key, value in (("train.epochs", True), ("train.units", "64"), ("decoding.beam_size", 2.0)):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_settings(tiny_params(**{key: value}))


def test_sha256_read_as_a_number_gets_a_hint_to_quote_it():
    raw = tiny_params(**{"data.flickr8k.images_sha256": int("1" * 64)})
    with pytest.raises(ConfigError, match=r"images_sha256: YAML read this checksum as a number; quote it"):
        parse_settings(raw)
    with pytest.raises(ConfigError, match="64 hex digits"):
        parse_settings(tiny_params(**{"data.flickr8k.text_sha256": "abc"}))
    assert parse_settings(tiny_params(**{"data.flickr8k.text_sha256": "0" * 64}))


def test_every_key_comes_from_params_yaml():
    """Defaults live in params.yaml only: a key missing there is an error, not a silent default."""
    raw = tiny_params()
    del raw["train"]["vocab_min_count"]
    with pytest.raises(ConfigError, match=r"train\.vocab_min_count: missing"):
        parse_settings(raw)


def test_exponent_float_that_yaml_reads_as_text_is_explained():
    with pytest.raises(ConfigError, match="write 0.001"):
        parse_settings(tiny_params(**{"train.learning_rate": "1e-3"}))


def test_register_metric_must_be_comparable_image_by_image():
    assert parse_settings(tiny_params(**{"register.metric": "greedy_cider"})).registry.mode == "greedy"
    for bad in ("beam_meteor", "baseline_bleu4", "bleu4"):
        with pytest.raises(ConfigError, match=r"register\.metric"):
            parse_settings(tiny_params(**{"register.metric": bad}))


def test_feature_shards_are_listed_and_numbered_from_zero():
    assert parse_settings(tiny_params(**{"features.shards": [0, 1, 2]})).features.shards == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"write the shard numbers, not their count: shards: \[0, 1\]"):
        parse_settings(tiny_params(**{"features.shards": 2}))
    with pytest.raises(ConfigError, match=r"0, 1, \.\.\., N-1 in order"):
        parse_settings(tiny_params(**{"features.shards": [1, 2]}))
    with pytest.raises(ConfigError, match="features.shards"):
        parse_settings(tiny_params(**{"features.shards": []}))


def test_bfloat16_is_refused_on_the_tflite_runtimes():
    with pytest.raises(ConfigError, match=r"bfloat16 runs on runtimes keras, openvino and auto, not tflite"):
        parse_settings(tiny_params(**{"features.runtime": "tflite", "features.precision": "bfloat16"}))
    keras_bf16 = parse_settings(tiny_params(**{"features.runtime": "keras", "features.precision": "bfloat16"}))
    assert keras_bf16.features.precision == "bfloat16"


def test_self_critical_sample_baseline_needs_other_samples():
    """Refused when params are read, not after the cross-entropy phase has run."""
    with pytest.raises(ConfigError, match=r"train\.self_critical.*samples >= 2"):
        parse_settings(tiny_params(**{"train.self_critical.samples": 1, "train.self_critical.baseline": "samples"}))
    parse_settings(tiny_params(**{"train.self_critical.samples": 1, "train.self_critical.baseline": "greedy"}))


def test_consensus_samples_need_a_choice_of_words_and_a_consensus_to_rank_them():
    with pytest.raises(ConfigError, match=r"decoding.consensus.*top_k: 1 samples the greedy caption"):
        parse_settings(tiny_params(**{"decoding.consensus.samples": 4, "decoding.consensus.top_k": 1}))
    with pytest.raises(ConfigError, match=r"decoding.consensus.*samples need neighbours > 0"):
        parse_settings(tiny_params(**{"decoding.consensus.samples": 4, "decoding.consensus.neighbours": 0}))
    off = parse_settings(tiny_params(**{"decoding.consensus.samples": 0, "decoding.consensus.top_k": 1,
                                        "decoding.consensus.neighbours": 0}))
    assert off.decoding.consensus.samples == 0


def test_decoding_settings_are_stored_and_read_back_as_the_same_object():
    """register stores the decoding section as it is; the served model reads it back typed."""
    import json

    decoding = parse_settings(tiny_params()).decoding
    assert DecodingSettings.from_stored(json.loads(json.dumps(decoding.model_dump()))) == decoding
    assert decoding.with_beam(1).beam_size == 1 and decoding.with_beam(1).consensus == decoding.consensus


def test_decoding_keys_of_models_registered_before_the_decoding_section_are_mapped_once():
    oldest = {"beam_size": 3, "length_penalty": 0.7, "no_repeat_ngram": 3}  # before consensus
    before_sampling = {**oldest, "consensus_neighbours": 25, "consensus_weight": 0.25}
    last_flat = {**before_sampling, "consensus_samples": 10, "consensus_top_k": 5, "consensus_contrast": 2.5,
                 "consensus_sharpness": 20.0}
    assert DecodingSettings.from_stored(oldest).consensus.neighbours == 0
    mapped = DecodingSettings.from_stored(before_sampling)
    assert (mapped.consensus.neighbours, mapped.consensus.weight, mapped.consensus.samples) == (25, 0.25, 0)
    assert (mapped.consensus.contrast, mapped.consensus.sharpness) == (0.0, 0.0)
    latest = DecodingSettings.from_stored(last_flat)
    assert (latest.beam_size, latest.length_penalty, latest.no_repeat_ngram) == (3, 0.7, 3)
    assert latest.consensus == ConsensusSettings(neighbours=25, weight=0.25, samples=10, top_k=5, contrast=2.5,
                                                 sharpness=20.0, seed=0)


@pytest.mark.parametrize("value, expected", [
    ("sqlite:///mlflow.db", "sqlite:////proj/mlflow.db"),
    ("sqlite:///./stores/m.db?timeout=30", "sqlite:////proj/stores/m.db?timeout=30"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("file:mlruns", "file:///proj/mlruns"),
    ("file:///abs/mlruns", "file:///abs/mlruns"),
    ("mlruns", "/proj/mlruns"),
    ("../data/flickr8k.zip", "/data/flickr8k.zip"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql://u@127.0.0.1/db", "postgresql://u@127.0.0.1/db"),
    ("imagenet", "imagenet"),
    ("none", "none"),
])
def test_relative_locations_are_taken_against_the_project_folder(value, expected):
    from pathlib import Path

    from pipeline.config import absolute_location

    assert absolute_location(value, Path("/proj")) == expected


def test_params_read_from_another_folder_name_the_projects_stores(tmp_path, monkeypatch):
    """The same params.yaml gives the same stores from any working directory (a subfolder,
    an Airflow task, the champion's scoring process in a temporary folder)."""
    import yaml

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    raw = tiny_params(**{"data.source": "local", "data.local_path": "incoming/photos"})
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("CAPTIONER_FEEDBACK_DB", raising=False)
    settings = load_settings(project / "params.yaml")
    real = project.resolve()
    assert settings.mlflow.tracking_uri == f"sqlite:///{real}/mlflow.db"
    assert settings.feedback.store_url == str(real / "feedback.db")
    assert settings.data.local_path == str(real / "incoming/photos")
    assert settings.features.weights == "none"
    # a relative location given in the environment is the shell's: the working directory's
    monkeypatch.setenv("CAPTIONER_FEEDBACK_DB", "fb.db")
    assert settings.feedback.store_url == str(elsewhere.resolve() / "fb.db")
