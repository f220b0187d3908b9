"""Stage calibrate: a confidence fitted on dev against people's captions, and what it reports."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline import paths
from pipeline.captioning.confidence import SIGNALS, Calibration
from pipeline.stages import calibrate
from pipeline.stages._cli import StageError


def test_the_stage_writes_a_calibration_the_served_model_reads_and_a_report_of_it(in_trained):
    root, settings = in_trained
    calibration = Calibration.load(paths.CONFIDENCE)
    assert calibration.signals == list(SIGNALS) and calibration.beam_size == settings.decoding.beam_size
    report = json.loads(paths.CONFIDENCE_REPORT.read_text())
    table = pd.read_parquet(paths.DEV_CONFIDENCE)
    dev = pd.read_parquet(paths.CAPTIONS).query("split == 'dev'")["image"].nunique()
    assert len(table) == report["dev_photos"] == dev
    # acceptable is the human line, a quantile of what people's captions reach against each other
    assert report["acceptable_meteor"] == pytest.approx(calibration.acceptable_meteor)
    assert (table["acceptable"] == (table["meteor"] >= calibration.acceptable_meteor)).all()
    assert table["confidence"].between(0, 1).all()
    assert {"ece", "spearman", "top_bottom_ratio", "precision_at_default", "coverage_at_default",
            "reliability", "precision_coverage"} <= set(report)
    assert sum(r["count"] for r in report["reliability"]) == dev
    # the threshold is a quantile of dev photos' novelty: at most the share above it abstain
    assert calibration.novelty_threshold >= np.quantile(table["novelty"], settings.confidence.novelty_quantile) - 1e-9
    assert paths.RELIABILITY_PLOT.stat().st_size > 1000


def test_without_a_trained_decoder_the_stage_says_what_to_run(tmp_path, monkeypatch):
    from tests.helpers import tiny_settings

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match="run the earlier stages first"):
        calibrate.run(tiny_settings())
    assert not (tmp_path / paths.CONFIDENCE).exists()
