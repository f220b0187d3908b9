import json
from collections import Counter

import mlflow
import pandas as pd

from pipeline import paths
from pipeline.text import Vocabulary


def test_vocabulary_comes_from_the_train_split_only(in_trained):
    _, settings = in_trained
    vocab = Vocabulary.load(paths.VOCAB)
    captions = pd.read_parquet(paths.CAPTIONS)
    counts = Counter(w for c in captions.loc[captions["split"] == "train", "caption"] for w in c.split())
    frequent = {w for w, n in counts.items() if n >= settings.train.vocab_min_count}
    assert set(vocab.words[4:]) == frequent
    other = {w for c in captions.loc[captions["split"] != "train", "caption"] for w in c.split()}
    assert not (set(vocab.words) & (other - set(counts)))  # no dev/test-only word
    assert vocab.words[:4] == ("<pad>", "<start>", "<end>", "<unk>")


def test_training_lowers_dev_loss_and_writes_history(in_trained):
    history = pd.read_csv(paths.TRAIN_HISTORY)
    assert list(history.columns) == ["epoch", "loss", "val_loss"]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    assert paths.TRAIN_CURVE.stat().st_size > 1000
    assert paths.DECODER.is_file()


def test_training_is_logged_to_mlflow(in_trained):
    run_id = json.loads(paths.TRAIN_RUN.read_text())["run_id"]
    run = mlflow.get_run(run_id)
    assert run.data.params["train.units"] == "64"
    assert run.data.params["features.backbone"] == "xception"
    assert "features.keras_version" in run.data.params
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "dev_loss")) == len(pd.read_csv(paths.TRAIN_HISTORY))
    assert run.data.metrics["beam_bleu4"] >= 0  # evaluate logged into the same run
