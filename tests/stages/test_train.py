import json
from collections import Counter

import mlflow
import pandas as pd

from pipeline import paths
from pipeline.captioning.vocabulary import Vocabulary


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
    assert list(history.columns) == ["member", "epoch", "loss", "val_loss"]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    assert paths.TRAIN_CURVE.stat().st_size > 1000
    assert paths.DECODER.is_file()


def test_training_is_logged_to_mlflow(in_trained):
    run_id = json.loads(paths.TRAIN_RUN.read_text())["run_id"]
    run = mlflow.get_run(run_id)
    assert run.data.params["train.units"] == "64"
    assert run.data.params["features.backbone"] == "xception"
    # how the CNN ran: the runtime, its precision, and how it was chosen (auto: the measurements)
    assert run.data.params["features.runtime"] == "tflite" and run.data.params["features.precision"] == "float32"
    assert run.data.params["features.runtime_choice"] == "as configured"
    assert "features.keras_version" in run.data.params
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "dev_loss")) == len(pd.read_csv(paths.TRAIN_HISTORY))
    assert run.data.metrics["beam_bleu4"] >= 0  # evaluate logged into the same run


def test_self_critical_history_is_written_and_logged(in_trained):
    _, settings = in_trained
    history = pd.read_csv(paths.SELF_CRITICAL_HISTORY)
    assert list(history.columns) == ["epoch", "sample_reward", "greedy_reward", "dev_cider", "member"]
    assert list(history["epoch"]) == list(range(settings.train.self_critical.epochs + 1))
    run_id = json.loads(paths.TRAIN_RUN.read_text())["run_id"]
    logged = mlflow.MlflowClient().get_metric_history(run_id, "self_critical_dev_cider")
    assert [m.step for m in logged] == list(range(1, settings.train.self_critical.epochs + 1))
    assert mlflow.get_run(run_id).data.metrics["self_critical_best_dev_cider"] == history["dev_cider"].max()


def test_an_ensemble_is_trained_saved_and_evaluated_as_one_model(trained_project, tmp_path, monkeypatch):
    """train.ensemble: 2 trains two decoders with their own seeds into one model file that
    evaluate decodes with averaged log-probs; MLflow keeps each member's curves apart."""
    import shutil

    from pipeline.captioning.decoder import decoding_models, load_decoder, members_of
    from pipeline.stages import evaluate, train
    from tests.helpers import tiny_settings

    root, settings = trained_project
    for folder in ("data", "models"):
        shutil.copytree(root / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    ensemble = tiny_settings(**{"data.synthetic.n_images": 60, "train.epochs": 3, "train.ensemble": 2,
                                "train.self_critical.epochs": 1})
    summary = train.run(ensemble)
    assert summary["ensemble"] == 2
    decoder = load_decoder(paths.DECODER)
    first, second = members_of(decoder)
    assert any((a != b).any() for a, b in zip(first.get_weights(), second.get_weights()))  # own seeds
    assert len(decoding_models(decoder).members) == 2
    history = pd.read_csv(paths.TRAIN_HISTORY)
    assert sorted(history["member"].unique()) == [0, 1]
    assert sorted(pd.read_csv(paths.SELF_CRITICAL_HISTORY)["member"].unique()) == [0, 1]
    run_id = json.loads(paths.TRAIN_RUN.read_text())["run_id"]
    client = mlflow.MlflowClient()
    for member in (0, 1):
        assert len(client.get_metric_history(run_id, f"member_{member}/dev_loss")) == \
            int((history["member"] == member).sum())
    metrics = evaluate.run(ensemble)
    assert metrics["beam"]["bleu1"] > 0


def test_the_train_images_and_their_captions_are_saved_for_consensus(in_trained):
    from pipeline.captioning.consensus import Neighbours

    neighbours = Neighbours.load(paths.NEIGHBOURS)
    captions = pd.read_parquet(paths.CAPTIONS)
    train = captions[captions["split"] == "train"]
    assert len(neighbours.features) == train["image"].nunique()
    saved = sorted(" ".join(c) for refs in neighbours.references for c in refs)
    assert saved == sorted(train["caption"])
