"""The caption decoder: an LSTM language model conditioned on the image feature vector.

Image injection, both ways at once:
  * the normalised, projected image sets the LSTM's initial state (h0, c0), so the very
    first word already depends on the picture ("init-inject");
  * the same projection is added to every LSTM output before the word classifier
    ("merge"), so the image is not forgotten over a long caption.
Init-inject alone tends to drift back to the language prior after a few words; merge alone
cannot steer the first word. Using both costs two small Dense layers.

The image input is normalised with train-split statistics (a Normalization layer adapted
in ``build_decoder``): random-init CNN features are ~1e-5 in scale and would otherwise
not train (DESIGN §9).

The training loss is an explicit masked mean over real tokens (``MaskedTokenLoss``); the
embedding does not use ``mask_zero``, so no implicit Keras mask reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops


@keras.saving.register_keras_serializable(package="captioner")
class MaskedTokenLoss(keras.losses.Loss):
    """Sparse categorical cross-entropy averaged over non-pad target tokens only."""

    def __init__(self, pad_id: int = 0, name: str = "masked_token_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = pad_id

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        per_token = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        mask = ops.cast(ops.not_equal(y_true, self.pad_id), per_token.dtype)
        # A scalar per batch: the loss reduction then leaves it unchanged.
        return ops.sum(per_token * mask) / ops.maximum(ops.sum(mask), 1.0)

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    feature_dim: int
    sequence_length: int
    embedding_dim: int = 128
    units: int = 256
    dropout: float = 0.3


def build_decoder(cfg: DecoderConfig, train_features: np.ndarray | None = None) -> keras.Model:
    """Training model: (image (N, D), input ids (N, T)) -> logits (N, T, V)."""
    image = keras.Input((cfg.feature_dim,), name="image")
    tokens = keras.Input((cfg.sequence_length,), dtype="int32", name="tokens")
    norm = layers.Normalization(name="image_norm")
    if train_features is not None:
        norm.adapt(train_features)
    else:  # loading a saved model restores the statistics; build with neutral ones
        norm.build((None, cfg.feature_dim))
    img = layers.Dropout(cfg.dropout, name="image_dropout")(norm(image))
    img = layers.Dense(cfg.units, activation="relu", name="image_proj")(img)
    h0 = layers.Dense(cfg.units, activation="tanh", name="init_h")(img)
    c0 = layers.Dense(cfg.units, name="init_c")(img)
    emb = layers.Embedding(cfg.vocab_size, cfg.embedding_dim, name="embedding")(tokens)
    emb = layers.Dropout(cfg.dropout, name="embedding_dropout")(emb)
    seq, _, _ = layers.LSTM(cfg.units, return_sequences=True, return_state=True, name="lstm")(
        emb, initial_state=[h0, c0])
    merged = layers.Add(name="merge")([seq, ops.expand_dims(img, 1)])
    hidden = layers.Dense(cfg.units, activation="relu", name="hidden")(merged)
    hidden = layers.Dropout(cfg.dropout, name="hidden_dropout")(hidden)
    logits = layers.Dense(cfg.vocab_size, name="logits")(hidden)
    return keras.Model([image, tokens], logits, name="caption_decoder")


@dataclass
class StepModels:
    """Inference halves of a trained decoder, sharing its weights.

    encode: image (N, D) -> (image projection, h0, c0), each (N, U)
    step:   (token (N, 1), img (N, U), h, c) -> (log-probs (N, V), h', c')
    """

    encode: keras.Model
    step: keras.Model

    @classmethod
    def from_decoder(cls, decoder: keras.Model) -> "StepModels":
        get = decoder.get_layer
        units = get("lstm").units
        image = keras.Input((get("image_norm").input.shape[-1],))
        img = get("image_proj")(get("image_norm")(image))
        encode = keras.Model(image, [img, get("init_h")(img), get("init_c")(img)])

        token = keras.Input((1,), dtype="int32")
        img_in, h_in, c_in = (keras.Input((units,)) for _ in range(3))
        seq, h, c = get("lstm")(get("embedding")(token), initial_state=[h_in, c_in])
        hidden = get("hidden")(get("merge")([seq, ops.expand_dims(img_in, 1)]))
        log_probs = ops.log_softmax(get("logits")(hidden)[:, 0, :], axis=-1)
        step = keras.Model([token, img_in, h_in, c_in], [log_probs, h, c])
        return cls(encode, step)


def compile_decoder(model: keras.Model, learning_rate: float) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=5.0), loss=MaskedTokenLoss())
    return model


def load_decoder(path) -> keras.Model:
    return keras.models.load_model(path, custom_objects={"MaskedTokenLoss": MaskedTokenLoss})
