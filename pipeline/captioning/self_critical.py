"""Self-critical sequence training (Rennie et al. 2017): fine-tune a cross-entropy decoder to
write captions that score high on CIDEr-D, the metric itself, rather than to imitate the
references word by word.

For each batch of train images: sample ``samples`` captions per image from the decoder,
reward each with its CIDEr-D against the image's references (document frequencies from the
train split), subtract the reward of the image's greedy caption (the "self-critical"
baseline: a sample is pushed up only where it beats what the model would write at test
time), and take a policy-gradient step on -advantage x log p(sample). After every epoch the
greedy captions of the dev split are scored; the weights of the best dev CIDEr are kept, the
cross-entropy weights included (epoch 0), so fine-tuning that does not help changes nothing.

The log-probabilities of the gradient step are computed with dropout off, as the samples were
drawn, so the gradient is that of the distribution sampled from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.captioning.cider import CiderD
from pipeline.captioning.decoder import StepModels, make_trainer
from pipeline.captioning.decoding import greedy, sample
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import SelfCriticalSettings

log = logging.getLogger("pipeline.captioning.self_critical")

HISTORY_COLUMNS = ["epoch", "sample_reward", "greedy_reward", "dev_cider"]
# dev images captioned per greedy call when scoring an epoch: memory only (captions do not depend on it)
DEV_BATCH = 256


def words_of(ids: np.ndarray, vocab: Vocabulary) -> list[list[str]]:
    """Each row of ids as words, up to (without) <end>."""
    table = np.asarray(vocab.words, dtype=object)
    return [list(table[row[: np.argmax(row == vocab.end_id) if (row == vocab.end_id).any() else len(row)]])
            for row in ids]


def teacher_forcing(ids: np.ndarray, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of sampled ids, in ``Vocabulary.teacher_forcing_arrays``' layout."""
    inputs = np.zeros_like(ids)
    inputs[:, 0] = vocab.start_id
    inputs[:, 1:] = ids[:, :-1]
    inputs[ids == vocab.pad_id] = vocab.pad_id  # positions after <end>; their targets are <pad>
    return inputs, ids


def baseline(scores: np.ndarray, greedy_scores: np.ndarray, samples: int, kind: str) -> np.ndarray:
    """What each sample's reward is compared with: its image's greedy caption's reward
    ("greedy", Rennie et al. 2017), or the mean reward of the image's other samples ("samples",
    Luo 2020; the settings require samples >= 2), which is centred on the samples themselves."""
    if kind == "greedy":
        return np.repeat(greedy_scores, samples)
    per_image = scores.reshape(-1, samples)
    return ((per_image.sum(axis=1, keepdims=True) - per_image) / (samples - 1)).reshape(-1)


def policy_step(decoder, learning_rate: float) -> Callable:
    """A traced update: (features, inputs, targets, advantage per row) -> loss, one Adam step of
    -mean over real tokens of advantage x log p(token)."""
    import keras
    import tensorflow as tf

    trainer = make_trainer(decoder, learning_rate)
    optimizer = keras.optimizers.Adam(learning_rate, clipnorm=5.0)
    variables = decoder.trainable_variables

    @tf.function(reduce_retracing=True)
    def update(features, inputs, targets, advantage):
        with tf.GradientTape() as tape:
            picked, _, real = trainer.token_log_probs((features, inputs), targets, training=False)
            weight = tf.boolean_mask(tf.broadcast_to(advantage[:, None], tf.shape(targets)), real)
            loss = -tf.reduce_mean(weight * picked)
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return update


def fine_tune(decoder, vocab: Vocabulary, features: np.ndarray, train_rows: np.ndarray,
              train_references: Sequence[Sequence[list[str]]], dev_rows: np.ndarray,
              dev_references: Sequence[Sequence[list[str]]], cfg: SelfCriticalSettings, seed: int,
              on_epoch: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Fine-tune ``decoder`` in place on the train images ``features[train_rows]`` (with their
    tokenised references); keep the weights of the best dev CIDEr-D. The history has one row per
    epoch, epoch 0 being the decoder as given."""
    rng = np.random.default_rng(seed)
    models = StepModels.from_decoder(decoder)
    reward = CiderD(train_references)
    dev_reward = CiderD(dev_references)  # dev's own document frequencies: pycocoevalcap's CIDEr
    dev_features = features[dev_rows]

    def dev_cider() -> float:
        captions = greedy(models, dev_features, vocab, no_repeat_ngram=0, batch_size=DEV_BATCH)
        return float(dev_reward.score([[vocab.words[i] for i in c.tokens] for c in captions],
                                      range(len(dev_rows))).mean())

    history = [{"epoch": 0, "sample_reward": np.nan, "greedy_reward": np.nan, "dev_cider": dev_cider()}]
    best_weights, best = decoder.get_weights(), history[0]["dev_cider"]
    log.info("self-critical: dev CIDEr-D %.4f before fine-tuning", best)
    update = policy_step(decoder, cfg.learning_rate)
    k = cfg.samples
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(len(train_rows))
        sampled, greedy_sum = [], []
        for lo in tqdm(range(0, len(order), cfg.batch_images), desc=f"self-critical epoch {epoch}",
                       unit="batch", leave=False):
            images = order[lo:lo + cfg.batch_images]
            feats = features[train_rows[images]]
            greedy_ids = [c.tokens for c in greedy(models, feats, vocab, no_repeat_ngram=0,
                                                   batch_size=len(feats))]
            greedy_scores = reward.score([[vocab.words[i] for i in t] for t in greedy_ids], images)
            repeated = np.repeat(feats, k, axis=0)
            ids, _ = sample(models, repeated, vocab, rng, top_k=cfg.top_k, no_repeat_ngram=0)
            scores = reward.score(words_of(ids, vocab), np.repeat(images, k))
            advantage = (scores - baseline(scores, greedy_scores, k, cfg.baseline)).astype("float32")
            update(repeated, *teacher_forcing(ids, vocab), advantage)
            sampled.append(scores.mean()), greedy_sum.append(greedy_scores.mean())
        row = {"epoch": epoch, "sample_reward": float(np.mean(sampled)),
               "greedy_reward": float(np.mean(greedy_sum)), "dev_cider": dev_cider()}
        history.append(row)
        log.info("self-critical epoch %d: sample reward %.4f, greedy reward %.4f, dev CIDEr-D %.4f",
                 epoch, row["sample_reward"], row["greedy_reward"], row["dev_cider"])
        if on_epoch:
            on_epoch(row)
        if row["dev_cider"] > best:
            best, best_weights = row["dev_cider"], decoder.get_weights()
    decoder.set_weights(best_weights)
    return pd.DataFrame(history, columns=HISTORY_COLUMNS)
