"""Stage ``train``: fit the caption decoder on the train split -> ``models/``.

Teacher forcing over whole captions (one example per caption), masked cross-entropy,
early stopping on dev loss with the best weights restored, fixed seeds. Caption rows only
hold an index into the feature table, so memory is bounded by that table, not by the number
of captions. Everything is logged to an MLflow run whose id goes to models/train_run.json.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from .. import paths
from ..atomic import atomic_path, write_text
from ..config import Settings, TrainSettings
from ..features_file import read_features, row_index, rows_of
from ..text import Vocabulary
from ..tracking import data_identity, flatten, log_training_data, run_name, run_ref, setup
from ._cli import reported, require, stage_main

log = logging.getLogger("pipeline.train")


def split_arrays(captions: pd.DataFrame, split: str, index: dict[str, int], vocab: Vocabulary):
    rows = captions[captions["split"] == split]
    image_idx = np.asarray(rows_of(index, rows["image"]), dtype=np.int32)
    inputs, targets = vocab.teacher_forcing_arrays(rows["caption"])
    return image_idx, inputs, targets


def make_dataset(features: np.ndarray, image_idx, inputs, targets, batch_size: int, shuffle: bool, seed: int):
    """tf.data of ((image features, input ids), target ids); features gathered per batch."""
    import tensorflow as tf

    table = tf.constant(features)
    ds = tf.data.Dataset.from_tensor_slices((image_idx, inputs, targets))
    if shuffle:
        ds = ds.shuffle(len(image_idx), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda i, x, y: ((tf.gather(table, i), x), y))
    return ds.prefetch(tf.data.AUTOTUNE)


def plot_history(history: pd.DataFrame, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["loss"], label="train loss")
    ax.plot(history["epoch"], history["val_loss"], label="dev loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_decoder(captions: pd.DataFrame, images: list[str], features: np.ndarray,
                  cfg: TrainSettings, on_epoch=None):
    """Pure core: (decoder, vocabulary, history DataFrame). Raises ValueError when a split
    is empty or a captioned image has no features."""
    import keras

    from ..model import DecoderConfig, build_decoder, make_trainer

    keras.utils.set_random_seed(cfg.seed)
    train_captions = captions.loc[captions["split"] == "train", "caption"]
    if train_captions.empty or not (captions["split"] == "dev").any():
        raise ValueError("need captions in both the train and the dev split")
    vocab = Vocabulary.build(train_captions, cfg.vocab_min_count, cfg.max_length)
    index = row_index(images)
    train = split_arrays(captions, "train", index, vocab)
    dev = split_arrays(captions, "dev", index, vocab)
    train_feats = features[np.unique(train[0])]
    model = build_decoder(DecoderConfig(
        vocab.size, features.shape[1], vocab.sequence_length, cfg.embedding_dim, cfg.units,
        cfg.dropout), train_features=train_feats)
    trainer = make_trainer(model, cfg.learning_rate)
    log.info("vocabulary %d words; %d train / %d dev captions; %d parameters",
             vocab.size, len(train[0]), len(dev[0]), model.count_params())
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                               restore_best_weights=True)]
    if on_epoch:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=on_epoch))
    fit = trainer.fit(make_dataset(features, *train, cfg.batch_size, True, cfg.seed),
                    validation_data=make_dataset(features, *dev, cfg.batch_size, False, cfg.seed),
                    epochs=cfg.epochs, callbacks=callbacks, shuffle=False, verbose=2)  # tf.data shuffles
    history = pd.DataFrame(fit.history)
    history.insert(0, "epoch", np.arange(1, len(history) + 1))
    return model, vocab, history


def run(settings: Settings) -> dict:
    """Train on data/prepared + data/features; write models/ and the history."""
    feature_file = paths.features_file(settings.features.backbone)
    require(paths.CAPTIONS, feature_file)
    captions = pd.read_parquet(paths.CAPTIONS)
    images, features, feature_meta = read_features(feature_file)
    mlflow = setup(settings)
    identity = data_identity(settings, paths.CAPTIONS, feature_file)
    tags = {**identity, "mlflow.source.name": "pipeline/stages/train.py"}  # not __main__.py
    with mlflow.start_run(run_name=run_name(settings, identity["short_id"]), tags=tags) as active:
        log_training_data(captions, identity, paths.CAPTIONS, feature_file)
        mlflow.log_params({**flatten("train", settings.train.model_dump()),
                           **flatten("features", feature_meta),
                           "data.source": settings.data.source,
                           "data.train_captions": int((captions["split"] == "train").sum()),
                           "data.dev_captions": int((captions["split"] == "dev").sum())})

        def log_epoch(epoch, logs):
            mlflow.log_metrics({"train_loss": logs["loss"], "dev_loss": logs["val_loss"]}, step=epoch + 1)

        with reported(ValueError):
            model, vocab, history = train_decoder(captions, images, features, settings.train, log_epoch)
        best = int(history["val_loss"].idxmin())
        summary = {"best_epoch": best + 1, "best_dev_loss": float(history["val_loss"].iloc[best]),
                   "epochs_run": len(history), "vocab_size": vocab.size,
                   "parameters": model.count_params()}
        mlflow.log_metrics(summary)
        # Every output is written under a temporary name and renamed into place.
        with atomic_path(paths.DECODER) as tmp:
            model.save(tmp)
        write_text(paths.VOCAB, vocab.to_text())
        with atomic_path(paths.TRAIN_HISTORY) as tmp:
            history.to_csv(tmp, index=False)
        with atomic_path(paths.TRAIN_CURVE) as tmp:
            plot_history(history, tmp)
        for artifact in (paths.TRAIN_HISTORY, paths.TRAIN_CURVE, paths.VOCAB):
            mlflow.log_artifact(str(artifact))
        write_text(paths.TRAIN_RUN, run_ref(active.info.run_id, settings))
    log.info("trained: %s", json.dumps(summary))
    return summary


def main() -> None:
    stage_main("train", __doc__, run)


if __name__ == "__main__":
    main()
