"""Stage ``train``: fit the caption decoder on the train split -> ``models/``.

The train split is the dataset's and the corrections people made in the app
(``data/feedback/captions.parquet``, not the held-out ones), each correction counted
``feedback.train_repeats`` times (``pipeline/data/sources.py``).

Teacher forcing over whole captions (one example per caption), masked cross-entropy with
label smoothing, the learning rate cut when dev loss stalls, early stopping on dev loss with
the best weights restored, fixed seeds. Then, when ``train.self_critical.epochs`` > 0,
self-critical fine-tuning on CIDEr-D (``pipeline/captioning/self_critical.py``), keeping the weights of
the best dev CIDEr-D. ``train.ensemble: K`` repeats both with seeds seed..seed+K-1 and saves
the K decoders as one ensemble model.

Self-critical fine-tuning is part of this stage, not a stage of its own, because its output is
the same thing, the decoder that evaluate and register take: a separate stage would need a
second decoder file and every later stage would have to choose between the two. Caption rows only
hold an index into the feature table, so memory is bounded by that table, not by the number
of captions. ``models/neighbours.npz`` holds the train images' features and captions, which
evaluate and the served model compare photos with (consensus reranking, ``pipeline/captioning/consensus.py``).
Everything is logged to an MLflow run whose id goes to models/train_run.json.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.atomic import atomic_path, write_text
from pipeline.captioning.consensus import Neighbours
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import Settings, TrainSettings
from pipeline.data.caption_text import references_by_image
from pipeline.data.features_file import pooled_part, read_feature_rows, row_index, rows_of
from pipeline.data.sources import FEEDBACK, prepared_captions, training_rows
from pipeline.registry.tracking import (
    data_identity,
    flatten,
    log_training_data,
    owner_tags,
    run_name,
    run_ref,
    setup,
)
from pipeline.stages._cli import reported, require, stage_main

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


def plot_history(history: pd.DataFrame, self_critical: pd.DataFrame, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if len(self_critical) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    for member, rows in history.groupby("member"):
        suffix = f" (member {member})" if history["member"].nunique() > 1 else ""
        ax.plot(rows["epoch"], rows["loss"], label="train loss" + suffix)
        ax.plot(rows["epoch"], rows["val_loss"], label="dev loss" + suffix)
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked cross-entropy")
    ax.legend()
    if panels == 2:
        ax = axes[0, 1]
        for member, rows in self_critical.groupby("member"):
            ax.plot(rows["epoch"], rows["dev_cider"], marker="o", label=f"dev CIDEr-D (member {member})")
            ax.plot(rows["epoch"], rows["sample_reward"], linestyle=":", label=f"sample reward (member {member})")
        ax.set_xlabel("self-critical epoch")
        ax.set_ylabel("CIDEr-D")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def references_of(captions: pd.DataFrame, split: str, index: dict[str, int]) -> tuple[np.ndarray, list]:
    """(feature rows, tokenised reference captions) of a split's images, image by image."""
    names, references = references_by_image(captions, split)
    return np.asarray(rows_of(index, names), dtype=np.int64), references


def decoder_features(features: np.ndarray, grid: tuple[int, int] | None, cfg: TrainSettings,
                     source: str = "the features") -> tuple[np.ndarray, tuple[int, int] | None]:
    """(the image rows the chosen decoder reads, the grid it attends over): rows are the pooled
    vector, then with a ``grid`` (regions, channels) the regions; an LSTM decoder gets the pooled
    vector only. ValueError, naming ``source``, when an attention decoder is asked for and the
    features hold no grid."""
    if cfg.decoder == "attention":
        if grid is None:
            raise ValueError(f"train.decoder is attention, but {source} hold no grid of regions, only one pooled "
                             f"{features.shape[1]}-d vector per photo (the features stage writes pooled vectors "
                             "only; a real-features folder with a *_grid Parquet has both): use train.decoder: lstm "
                             "here")
        return features, grid
    return pooled_part(features, grid), None


def train_decoder(captions: pd.DataFrame, images: list[str], features: np.ndarray,
                  cfg: TrainSettings, on_epoch=None, on_self_critical_epoch=None,
                  grid: tuple[int, int] | None = None, source: str = "the features"):
    """Pure core: (decoder, vocabulary, cross-entropy history, self-critical history), the
    histories with a ``member`` column (0..ensemble-1). ``features`` rows are the pooled vector,
    followed by the regions when ``grid`` (regions, channels) is given; ``train.decoder``
    chooses which the decoder reads (``decoder_features``). Each member is trained with its own
    seed by cross-entropy, then fine-tuned on CIDEr-D when ``self_critical.epochs`` > 0; K > 1
    members are returned as one ensemble model. ``on_epoch(member, epoch, logs)`` and
    ``on_self_critical_epoch(member, row)`` report progress. Raises ValueError when a split is
    empty or a captioned image has no features."""
    import keras

    from pipeline.captioning.decoder import (
        DecoderConfig,
        build_decoder,
        ensemble_decoder,
        make_trainer,
    )
    from pipeline.captioning.self_critical import HISTORY_COLUMNS, fine_tune

    features, grid = decoder_features(features, grid, cfg, source)
    train_captions = captions.loc[captions["split"] == "train", "caption"]
    if train_captions.empty or not (captions["split"] == "dev").any():
        raise ValueError("need captions in both the train and the dev split")
    vocab = Vocabulary.build(train_captions, cfg.vocab_min_count, cfg.max_length)
    index = row_index(images)
    train = split_arrays(captions, "train", index, vocab)
    dev = split_arrays(captions, "dev", index, vocab)
    train_feats = features[np.unique(train[0])]
    if cfg.self_critical.epochs:  # the same for every member: once
        references = (*references_of(captions, "train", index), *references_of(captions, "dev", index))
    members, histories, self_critical = [], [], []
    for member in range(cfg.ensemble):
        seed = cfg.seed + member
        keras.utils.set_random_seed(seed)
        model = build_decoder(DecoderConfig(
            vocab.size, pooled_part(features, grid).shape[1], vocab.sequence_length,
            cfg.embedding_dim, cfg.units, cfg.dropout, grid), train_features=train_feats)
        trainer = make_trainer(model, cfg.learning_rate, cfg.label_smoothing)
        log.info("member %d/%d: vocabulary %d words; %d train / %d dev captions; %d parameters",
                 member + 1, cfg.ensemble, vocab.size, len(train[0]), len(dev[0]), model.count_params())
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                                   restore_best_weights=True)]
        if cfg.lr_decay < 1:  # a smaller step when dev loss stalls, before early stopping gives up
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=cfg.lr_decay, patience=cfg.lr_patience,
                min_lr=cfg.learning_rate / 100))
        if on_epoch:
            callbacks.append(keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs, member=member: on_epoch(member, epoch, logs)))
        fit = trainer.fit(make_dataset(features, *train, cfg.batch_size, True, seed),
                          validation_data=make_dataset(features, *dev, cfg.batch_size, False, seed),
                          epochs=cfg.epochs, callbacks=callbacks, shuffle=False, verbose=2)  # tf.data shuffles
        history = pd.DataFrame({k: v for k, v in fit.history.items() if k in ("loss", "val_loss")})
        history.insert(0, "epoch", np.arange(1, len(history) + 1))
        history.insert(0, "member", member)
        histories.append(history)
        if cfg.self_critical.epochs:
            report = None
            if on_self_critical_epoch:
                def report(row, member=member):
                    on_self_critical_epoch(member, row)
            tuned = fine_tune(model, vocab, features, *references, cfg.self_critical, seed, report)
            self_critical.append(tuned.assign(member=member))
        members.append(model)
    decoder = members[0] if len(members) == 1 else ensemble_decoder(members)
    self_critical_history = (pd.concat(self_critical, ignore_index=True) if self_critical
                             else pd.DataFrame(columns=[*HISTORY_COLUMNS, "member"]))
    return decoder, vocab, pd.concat(histories, ignore_index=True), self_critical_history


def run(settings: Settings) -> dict:
    """Train on data/prepared + data/features; write models/ and the history."""
    feature_file = paths.features_file(settings.features.backbone)
    require(paths.CAPTIONS, feature_file)
    captions = prepared_captions()  # the dataset's and the corrections people made
    corrected = captions[(captions["folder"] == FEEDBACK) & (captions["split"] == "train")]
    images, features, feature_meta, grid = read_feature_rows(feature_file)
    mlflow = setup(settings)
    identity = data_identity(settings, paths.CAPTIONS, feature_file, paths.FEEDBACK_CAPTIONS)
    tags = {**identity, **owner_tags(), "mlflow.source.name": "pipeline/stages/train.py"}  # not __main__.py
    with mlflow.start_run(run_name=run_name(settings, identity["short_id"]), tags=tags) as active:
        log_training_data(captions, identity, paths.CAPTIONS, feature_file)
        mlflow.log_params({**flatten("train", settings.train.model_dump()),
                           **flatten("features", feature_meta),
                           "data.source": settings.data.source,
                           "data.train_captions": int((captions["split"] == "train").sum()),
                           "data.dev_captions": int((captions["split"] == "dev").sum()),
                           "data.feedback_corrections": len(corrected),
                           "feedback.train_repeats": settings.feedback.train_repeats})

        def metric(member: int, name: str) -> str:  # member_1/dev_loss when an ensemble is trained
            return name if settings.train.ensemble == 1 else f"member_{member}/{name}"

        def log_epoch(member, epoch, logs):
            mlflow.log_metrics({metric(member, "train_loss"): logs["loss"],
                                metric(member, "dev_loss"): logs["val_loss"]}, step=epoch + 1)

        def log_self_critical(member, row):
            mlflow.log_metrics({metric(member, f"self_critical_{k}"): row[k]
                                for k in ("sample_reward", "greedy_reward", "dev_cider")}, step=row["epoch"])

        with reported(ValueError):
            model, vocab, history, self_critical = train_decoder(
                training_rows(captions, settings.feedback.train_repeats), images, features, settings.train,
                log_epoch, log_self_critical, grid=grid, source=str(feature_file))
        per_member = history.loc[history.groupby("member")["val_loss"].idxmin()]
        summary = {"best_epoch": int(per_member["epoch"].iloc[0]),  # member 0's
                   "best_dev_loss": float(per_member["val_loss"].mean()), "epochs_run": len(history),
                   "ensemble": settings.train.ensemble, "vocab_size": vocab.size,
                   "parameters": model.count_params()}
        if len(self_critical):
            best = self_critical.loc[self_critical.groupby("member")["dev_cider"].idxmax()]
            summary["self_critical_best_epoch"] = int(best["epoch"].iloc[0])
            summary["self_critical_best_dev_cider"] = float(best["dev_cider"].mean())
        mlflow.log_metrics(summary)
        # Every output is written under a temporary name and renamed into place.
        with atomic_path(paths.DECODER) as tmp:
            model.save(tmp)
        with atomic_path(paths.NEIGHBOURS) as tmp:  # for consensus reranking (evaluate, serving)
            Neighbours.from_split(captions, "train", images, pooled_part(features, grid)).save(tmp)
        write_text(paths.VOCAB, vocab.to_text())
        with atomic_path(paths.TRAIN_HISTORY) as tmp:
            history.to_csv(tmp, index=False)
        with atomic_path(paths.SELF_CRITICAL_HISTORY) as tmp:
            self_critical.to_csv(tmp, index=False)
        with atomic_path(paths.TRAIN_CURVE) as tmp:
            plot_history(history, self_critical, tmp)
        for artifact in (paths.TRAIN_HISTORY, paths.SELF_CRITICAL_HISTORY, paths.TRAIN_CURVE, paths.VOCAB):
            mlflow.log_artifact(str(artifact))
        write_text(paths.TRAIN_RUN, run_ref(active.info.run_id, settings))
    log.info("trained: %s", json.dumps(summary))
    return summary


def main() -> None:
    stage_main("train", __doc__, run)


if __name__ == "__main__":
    main()
