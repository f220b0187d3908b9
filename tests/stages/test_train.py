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


def region_told_captions(n_images: int = 48, seed: int = 0):
    """Captions whose subject only one region of a 2x2 grid tells (the pooled vector is noise):
    (captions table, image names, rows of pooled vector + grid)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = [f"{i:03d}.jpg" for i in range(n_images)]
    rows = rng.normal(size=(n_images, 4 + 4 * 3)).astype("float32")
    dog = rng.random(n_images) < 0.5
    rows[:, 4 + 2 * 3] = np.where(dog, 3.0, -3.0)  # region 2, channel 0
    captions = pd.DataFrame([
        {"image": name, "split": "dev" if i % 4 == 0 else "train", "caption_idx": k,
         "caption": f"a {'dog' if dog[i] else 'cat'} {verb} on the grass"}
        for i, name in enumerate(images) for k, verb in enumerate(("runs", "sits", "plays"))])
    return captions, images, rows


def test_the_attention_decoder_trains_on_rows_with_a_grid_and_decodes_with_consensus():
    """train.decoder: attention trains on pooled vectors + grid, and evaluate's choice of caption
    (beam + consensus with photos compared by the pooled vector) works with it."""
    from pipeline.captioning.consensus import Neighbours
    from pipeline.captioning.decoder import decoding_models, grid_of
    from pipeline.stages.evaluate import evaluate_model
    from pipeline.stages.train import train_decoder
    from tests.helpers import tiny_settings

    captions, images, rows = region_told_captions()
    settings = tiny_settings(**{"train.decoder": "attention", "train.epochs": 12, "train.vocab_min_count": 1,
                                "train.batch_size": 16, "train.patience": 12, "train.learning_rate": 0.01})
    decoder, vocab, history, _ = train_decoder(captions, images, rows, settings.train, grid=(4, 3))
    assert grid_of(decoder) == (4, 3)
    scored = captions.assign(split=captions["split"].replace({"dev": "test"}))
    metrics, table = evaluate_model(decoding_models(decoder), vocab, scored, images, rows, settings.decoding,
                                    Neighbours.from_split(scored, "train", images, rows[:, :4]))
    # the subject is told by the region only: right on the dev photos means it looked there (greedy:
    # the decoder's own words; consensus may prefer what neighbours by the noisy pooled vector say)
    told = {name: ("dog" if rows[images.index(name), 4 + 6] > 0 else "cat") for name in table["image"]}
    right = [told[name] in caption.split() for name, caption in zip(table["image"], table["greedy"])]
    assert sum(right) >= 0.9 * len(right), list(zip(table["image"].map(told), table["greedy"]))
    assert all(caption.split()[1] in ("dog", "cat") for caption in table["beam"])


def test_an_attention_decoder_without_a_grid_is_refused_and_lstm_reads_the_pooled_vector_only():
    import pytest

    from pipeline.captioning.decoder import grid_of, pooled_width
    from pipeline.stages.train import decoder_features, train_decoder
    from tests.helpers import tiny_settings

    captions, images, rows = region_told_captions()
    attention = tiny_settings(**{"train.decoder": "attention"}).train
    with pytest.raises(ValueError, match=r"train\.decoder is attention, but data/features/x\.parquet hold no grid "
                                         r"of regions, only one pooled 16-d vector per photo"):
        decoder_features(rows, None, attention, "data/features/x.parquet")
    lstm = tiny_settings(**{"train.epochs": 1, "train.vocab_min_count": 1}).train
    pooled, grid = decoder_features(rows, (4, 3), lstm)
    assert grid is None and pooled.shape == (len(images), 4)
    decoder, *_ = train_decoder(captions, images, rows, lstm, grid=(4, 3))
    assert grid_of(decoder) is None and pooled_width(decoder) == 4
