"""The caption decoder: an LSTM language model conditioned on the image feature vector.

Image injection, both ways at once:
  * the normalised, projected image sets the LSTM's initial state (h0, c0), so the very
    first word already depends on the picture ("init-inject");
  * the same projection is added to every LSTM output before the word classifier
    ("merge"), so the image is not forgotten over a long caption.
Init-inject alone tends to drift back to the language prior after a few words; merge alone
cannot steer the first word. Using both costs two small Dense layers.

With a grid of regions (``train.decoder: attention``), each word also looks at the photo: the
image input is the pooled vector followed by the CNN's last feature map (R regions x C channels,
row-major), and after the LSTM has read a word, its output h_t attends over the projected regions
(scaled dot-product attention; placed after the LSTM as in the "spatial" model of Lu et
al. 2017, "Knowing When to Look"). The context vector is added beside the image projection before
the word classifier. Because the query is the LSTM's own output, not its input, the whole caption
still trains in one pass (no attention inside the recurrent loop), and the weights alpha_t (which
region each word came from) are one tensor of the training graph: ``attention_maps`` reads them.

The image input is normalised with train-split statistics (a Normalization layer adapted
in ``build_decoder``): random-init CNN features are ~1e-5 in scale and would otherwise
not train.

Training (``CaptionTrainer``) computes the word classifier only at real (non-pad) target
positions, gathered with a boolean mask, so the loss is exactly the mean cross-entropy over
real tokens and no time is spent on padding: with Flickr8k's
~11-word captions padded to 24, that halves the cost of the largest layer. The embedding
does not use ``mask_zero``, so no implicit Keras mask is involved anywhere.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

# isort: off
from pipeline.captioning import quiet_tensorflow  # noqa: F401  (must come before keras)
import keras  # noqa: E402
from keras import layers, ops  # noqa: E402
# isort: on


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and variance of the train features, the variance floored at 1e-4 of
    the median variance: a dimension that is (nearly) constant on the train split, such as a
    ReLU unit never active there, must not blow up when it is non-zero on a new image."""
    features = np.asarray(features, dtype=np.float64)
    variance = features.var(axis=0)
    floor = max(float(np.median(variance)) * 1e-4, 1e-30)
    return features.mean(axis=0).astype("float32"), np.maximum(variance, floor).astype("float32")


class Layer:
    """The decoder's layer names: the training graph is built with them and the inference
    halves (``StepModels``) pick the trained layers out by them, so they live here only."""

    IMAGE_NORM = "image_norm"
    IMAGE_DROPOUT = "image_dropout"
    IMAGE_PROJ = "image_proj"
    INIT_H = "init_h"
    INIT_C = "init_c"
    EMBEDDING = "embedding"
    EMBEDDING_DROPOUT = "embedding_dropout"
    LSTM = "lstm"
    MERGE = "merge"
    HIDDEN = "hidden"
    HIDDEN_DROPOUT = "hidden_dropout"
    LOGITS = "logits"
    # attention over a grid of regions (absent from a pooled-only decoder)
    REGION_NORM = "region_norm"
    REGION_DROPOUT = "region_dropout"
    REGION_PROJ = "region_proj"
    ATTENTION_KEYS = "attention_keys"
    ATTENTION_QUERY = "attention_query"
    ATTENTION_WEIGHTS = "attention_weights"


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    feature_dim: int
    sequence_length: int
    embedding_dim: int
    units: int
    dropout: float
    # (regions, channels) of the grid that follows the pooled vector in each image row;
    # None: pooled vector only (the LSTM decoder)
    grid: tuple[int, int] | None = None

    @property
    def input_width(self) -> int:
        return self.feature_dim + (self.grid[0] * self.grid[1] if self.grid else 0)


def _normalization(name: str, shape: tuple, samples: np.ndarray | None) -> layers.Normalization:
    """Per-channel standardisation with train statistics (None: neutral, when a saved model is
    about to restore them)."""
    if samples is not None:
        mean, variance = feature_statistics(samples)
        return layers.Normalization(mean=mean, variance=variance, name=name)
    norm = layers.Normalization(name=name)
    norm.build((None, *shape))
    return norm


def _attend(get, seq, keys, regions):
    """Scaled dot-product attention of each LSTM output (B, T, U) over the regions (B, R, U) with
    their keys (B, R, A): (context (B, T, U), weights (B, T, R)). Additive attention (Show, Attend
    and Tell's) needs a (B, T, R, A) tanh and was not faster or better in a first measurement.
    One function for training and for the one-step inference model, so both run the same layers."""
    query = get(Layer.ATTENTION_QUERY)(seq)  # (B, T, A)
    scores = ops.matmul(query, ops.transpose(keys, (0, 2, 1))) / float(np.sqrt(keys.shape[-1]))  # (B, T, R)
    weights = get(Layer.ATTENTION_WEIGHTS)(scores)
    return ops.matmul(weights, regions), weights


def build_decoder(cfg: DecoderConfig, train_features: np.ndarray | None = None) -> keras.Model:
    """Training model: (image (N, W), input ids (N, T)) -> logits (N, T, V); W is the pooled
    width D, or D + R x C with a grid (attention)."""
    image = keras.Input((cfg.input_width,), name="image")
    tokens = keras.Input((cfg.sequence_length,), dtype="int32", name="tokens")
    d = cfg.feature_dim
    pooled = image[:, :d] if cfg.grid else image
    norm = _normalization(Layer.IMAGE_NORM, (d,), None if train_features is None else train_features[:, :d])
    img = layers.Dropout(cfg.dropout, name=Layer.IMAGE_DROPOUT)(norm(pooled))
    img = layers.Dense(cfg.units, activation="relu", name=Layer.IMAGE_PROJ)(img)
    h0 = layers.Dense(cfg.units, activation="tanh", name=Layer.INIT_H)(img)
    c0 = layers.Dense(cfg.units, name=Layer.INIT_C)(img)
    emb = layers.Embedding(cfg.vocab_size, cfg.embedding_dim, name=Layer.EMBEDDING)(tokens)
    emb = layers.Dropout(cfg.dropout, name=Layer.EMBEDDING_DROPOUT)(emb)
    seq, _, _ = layers.LSTM(cfg.units, return_sequences=True, return_state=True, name=Layer.LSTM)(
        emb, initial_state=[h0, c0])
    merge = [seq, ops.expand_dims(img, 1)]
    if cfg.grid:
        n_regions, channels = cfg.grid
        grid = ops.reshape(image[:, d:], (-1, n_regions, channels))
        region_norm = _normalization(Layer.REGION_NORM, cfg.grid, None if train_features is None
                                     else train_features[:, d:].reshape(-1, channels))
        regions = layers.Dropout(cfg.dropout, name=Layer.REGION_DROPOUT)(region_norm(grid))
        regions = layers.Dense(cfg.units, activation="relu", name=Layer.REGION_PROJ)(regions)
        keys = layers.Dense(cfg.units, use_bias=False, name=Layer.ATTENTION_KEYS)(regions)
        attention = {Layer.ATTENTION_QUERY: layers.Dense(cfg.units, name=Layer.ATTENTION_QUERY),
                     Layer.ATTENTION_WEIGHTS: layers.Softmax(axis=-1, name=Layer.ATTENTION_WEIGHTS)}
        context, _ = _attend(attention.get, seq, keys, regions)
        merge.append(context)
    merged = layers.Add(name=Layer.MERGE)(merge)
    hidden = layers.Dense(cfg.units, activation="relu", name=Layer.HIDDEN)(merged)
    hidden = layers.Dropout(cfg.dropout, name=Layer.HIDDEN_DROPOUT)(hidden)
    logits = layers.Dense(cfg.vocab_size, name=Layer.LOGITS)(hidden)
    return keras.Model([image, tokens], logits, name="caption_decoder")


def grid_of(decoder: keras.Model) -> tuple[int, int] | None:
    """(regions, channels) of the grid a decoder attends over; None for a pooled-only decoder
    (every decoder saved before attention existed)."""
    try:
        norm = decoder.get_layer(Layer.REGION_NORM)
    except ValueError:
        return None
    regions = decoder.get_layer(Layer.REGION_PROJ).input.shape
    return int(regions[1]), int(norm.input.shape[-1])


def pooled_width(decoder: keras.Model) -> int:
    """D: the width of the pooled vector a decoder reads (its input, less any grid)."""
    return int(decoder.get_layer(Layer.IMAGE_NORM).input.shape[-1])


@dataclass
class StepModels:
    """Inference halves of a trained decoder, sharing its weights, behind a cell-independent API:

    encode(features (N, W)) -> state, an opaque list of (N, ...) arrays
    step(tokens (N, 1), state) -> (log-probs (N, V), state)

    Decoding only repeats, reorders (``[x[rows] for x in state]``) and passes the state on, so
    greedy, beam search and ensembles work for any cell. The state is what the image fixes once
    (its projection; with attention also the projected regions and their keys), then the
    LSTM's h, c.
    """

    encoder: keras.Model
    stepper: keras.Model
    fixed: int = 1  # leading state arrays that the steps read but never change

    @classmethod
    def from_decoder(cls, decoder: keras.Model) -> "StepModels":
        get = decoder.get_layer
        units = get(Layer.LSTM).units
        grid = grid_of(decoder)
        d = pooled_width(decoder)
        image = keras.Input((d + (grid[0] * grid[1] if grid else 0),))
        img = get(Layer.IMAGE_PROJ)(get(Layer.IMAGE_NORM)(image[:, :d] if grid else image))
        fixed = [img]
        if grid:
            regions = get(Layer.REGION_PROJ)(get(Layer.REGION_NORM)(ops.reshape(image[:, d:], (-1, *grid))))
            fixed += [regions, get(Layer.ATTENTION_KEYS)(regions)]
        encoder = keras.Model(image, [*fixed, get(Layer.INIT_H)(img), get(Layer.INIT_C)(img)])

        token = keras.Input((1,), dtype="int32")
        fixed_in = [keras.Input(tuple(x.shape[1:])) for x in fixed]
        h_in, c_in = keras.Input((units,)), keras.Input((units,))
        seq, h, c = get(Layer.LSTM)(get(Layer.EMBEDDING)(token), initial_state=[h_in, c_in])
        merge = [seq, ops.expand_dims(fixed_in[0], 1)]
        if grid:
            merge.append(_attend(get, seq, fixed_in[2], fixed_in[1])[0])
        hidden = get(Layer.HIDDEN)(get(Layer.MERGE)(merge))
        log_probs = ops.log_softmax(get(Layer.LOGITS)(hidden)[:, 0, :], axis=-1)
        stepper = keras.Model([token, *fixed_in, h_in, c_in], [log_probs, h, c])
        return cls(encoder, stepper, len(fixed))

    def encode(self, features: np.ndarray) -> list[np.ndarray]:
        return _run(self.encoder, features)

    def step(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        fixed = state[:self.fixed]
        log_probs, h, c = _run(self.stepper, [tokens, *state])
        return log_probs, [*fixed, h, c]


def attention_maps(decoder: keras.Model, features: np.ndarray, captions: list[list[int]],
                   start_id: int, sequence_length: int) -> list[np.ndarray]:
    """Where the decoder looked for each word of each caption: per caption an array (words + 1,
    R) of weights over the grid's regions (each row sums to 1), the last row for <end>. Read
    from one teacher-forced pass over the finished captions (the query is the LSTM's output
    after the previous word, as when the caption was decoded). ValueError for a pooled-only
    decoder or ensemble member list: it has no grid to look at."""
    members = members_of(decoder)
    if any(grid_of(m) is None for m in members):
        raise ValueError("this decoder reads one pooled vector per photo: it has no attention to show "
                         "(train it with train.decoder: attention on features with a grid)")
    inputs = np.zeros((len(captions), sequence_length), dtype=np.int32)
    for row, tokens in enumerate(captions):
        seq = [start_id, *tokens][:sequence_length]
        inputs[row, :len(seq)] = seq
    weights = []
    for member in members:  # an ensemble: the mean of its members' maps
        model = _MAPS.get(member)
        if model is None:  # built (and traced by _run) once per decoder: a served model is asked per request
            model = _MAPS[member] = keras.Model(member.inputs, [member.get_layer(Layer.ATTENTION_WEIGHTS).output])
        weights.append(np.concatenate([_run(model, [features[lo:lo + 256], inputs[lo:lo + 256]])[0]
                                       for lo in range(0, len(captions), 256)]))
    mean = np.mean(weights, axis=0)
    return [mean[row, :min(len(tokens) + 1, sequence_length)] for row, tokens in enumerate(captions)]


_MAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # decoder -> its attention-weights model


@dataclass
class EnsembleSteps:
    """K decoders decoding as one: the state is the members' states laid end to end and each
    step's log-probs are the mean of the members' (their geometric-mean distribution, up to
    normalisation). Same API as ``StepModels``, so greedy and beam search take either."""

    members: list[StepModels]

    def __post_init__(self) -> None:
        self._widths: list[int] = []

    def encode(self, features: np.ndarray) -> list[np.ndarray]:
        states = [member.encode(features) for member in self.members]
        self._widths = [len(state) for state in states]
        return [x for state in states for x in state]

    def step(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        log_probs, new_state, at = [], [], 0
        for member, width in zip(self.members, self._widths):
            lp, member_state = member.step(tokens, state[at:at + width])
            log_probs.append(lp)
            new_state += member_state
            at += width
        return np.mean(log_probs, axis=0), new_state


ENSEMBLE_MEMBER = "member_"


def ensemble_decoder(members: list[keras.Model]) -> keras.Model:
    """One Keras model holding K trained decoders (saved and loaded as one file, so evaluate,
    register and serving handle an ensemble like a single decoder): (image, tokens) -> the mean
    of the members' per-token log-probs."""
    image = keras.Input(members[0].inputs[0].shape[1:], name="image")
    tokens = keras.Input(members[0].inputs[1].shape[1:], dtype="int32", name="tokens")
    log_probs = [ops.log_softmax(keras.Model(m.inputs, m.output, name=f"{ENSEMBLE_MEMBER}{k}")([image, tokens]))
                 for k, m in enumerate(members)]
    return keras.Model([image, tokens], ops.mean(ops.stack(log_probs), axis=0), name="caption_ensemble")


def members_of(decoder: keras.Model) -> list[keras.Model]:
    """The decoders inside an ensemble, or [decoder] for a single one."""
    nested = [layer for layer in decoder.layers
              if isinstance(layer, keras.Model) and layer.name.startswith(ENSEMBLE_MEMBER)]
    return nested or [decoder]


def decoding_models(decoder: keras.Model) -> "StepModels | EnsembleSteps":
    """What greedy and beam search run: the inference halves of a decoder or of every member."""
    members = members_of(decoder)
    if len(members) == 1:
        return StepModels.from_decoder(members[0])
    return EnsembleSteps([StepModels.from_decoder(m) for m in members])


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _run(model: keras.Model, inputs) -> list[np.ndarray]:
    """One call of an inference half as a traced graph: an eager Keras call costs milliseconds of
    Python per step, which made beam search for one image 8x slower (68 vs 8 ms, units 256).
    Traced once per model for any batch size (an input signature with a free batch dimension),
    so greedy, beam search and sampling at their own batch sizes never retrace."""
    fn = _COMPILED.get(model)
    if fn is None:
        import tensorflow as tf

        specs = [tf.TensorSpec((None, *x.shape[1:]), x.dtype) for x in model.inputs]
        fn = _COMPILED[model] = tf.function(
            lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False), input_signature=specs)
    out = fn(*(inputs if isinstance(inputs, list) else [inputs]))
    return [np.asarray(x) for x in out] if isinstance(out, (list, tuple)) else [np.asarray(out)]


class CaptionTrainer(keras.Model):
    """Fits a decoder built by ``build_decoder``; ``fit`` reports the masked token loss.

    Everything up to the last hidden layer runs on the padded batch (B, T, U); the classifier
    and the loss run only on the real positions (N_real, U). Requires the TensorFlow backend.
    """

    def __init__(self, decoder: keras.Model, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.decoder = decoder
        self.label_smoothing = label_smoothing
        self.body = keras.Model(decoder.inputs, decoder.get_layer(Layer.HIDDEN_DROPOUT).output)
        self.head = decoder.get_layer(Layer.LOGITS)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, inputs, training=False):
        return self.decoder(inputs, training=training)

    def token_log_probs(self, inputs, targets, training: bool):
        """(log p of every real target token (N_real,), log-softmax rows (N_real, V), the
        (B, T) mask of real positions), the classifier run on the real positions only."""
        import tensorflow as tf

        hidden = self.body(inputs, training=training)  # (B, T, U)
        real = tf.not_equal(targets, 0)  # <pad> = 0
        log_softmax = tf.nn.log_softmax(self.head(tf.boolean_mask(hidden, real)))  # (N_real, V)
        picked = tf.gather(log_softmax, tf.boolean_mask(targets, real), batch_dims=1)
        return picked, log_softmax, real

    def masked_loss(self, inputs, targets, training: bool, smoothing: float = 0.0):
        """Mean cross-entropy over real tokens; with ``smoothing`` e, the target is (1 - e) on the
        true word plus e spread evenly over the vocabulary (label smoothing)."""
        import tensorflow as tf

        picked, log_softmax, _ = self.token_log_probs(inputs, targets, training)
        per_token = -picked
        if smoothing:
            per_token = (1 - smoothing) * per_token - smoothing * tf.reduce_mean(log_softmax, axis=-1)
        return tf.reduce_mean(per_token)

    def train_step(self, data):
        import tensorflow as tf

        inputs, targets = data
        variables = self.decoder.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.masked_loss(inputs, targets, training=True, smoothing=self.label_smoothing)
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        # dev loss stays the plain cross-entropy, comparable whatever the smoothing
        inputs, targets = data
        self.loss_tracker.update_state(self.masked_loss(inputs, targets, training=False))
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


def make_trainer(decoder: keras.Model, learning_rate: float, label_smoothing: float = 0.0) -> CaptionTrainer:
    trainer = CaptionTrainer(decoder, label_smoothing)
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=5.0))
    return trainer


def load_decoder(path) -> keras.Model:
    return keras.models.load_model(path)


def require_grid(decoder: keras.Model, grid: tuple[int, int] | None, source: str, decoder_file) -> None:
    """An attention decoder reads the grid it was trained on: ValueError naming both files when
    ``source`` holds no grid, or one of another shape (regions x channels), which would otherwise
    fail deep in TensorFlow. A pooled-only decoder takes any source (it reads the pooled part)."""
    wanted = {grid_of(m) for m in members_of(decoder)} - {None}
    if not wanted:
        return
    if grid is None:
        raise ValueError(f"the decoder {decoder_file} attends over a grid of {' / '.join(f'{r} regions x {c} channels' for r, c in wanted)}, "
                         f"but {source} holds no grid, only pooled vectors")
    if wanted != {tuple(grid)}:
        raise ValueError(f"the decoder {decoder_file} attends over a grid of {' / '.join(f'{r} regions x {c} channels' for r, c in wanted)}, "
                         f"but {source} holds grids of {grid[0]} regions x {grid[1]} channels (another CNN or input size?)")


def decoder_rows(decoder: keras.Model, rows: np.ndarray, grid: tuple[int, int] | None, source,
                 decoder_file) -> np.ndarray:
    """The part of image ``rows`` (pooled vector, then any grid of ``grid`` = (regions, channels))
    that ``decoder`` reads: all of it for an attention decoder (``require_grid`` first), the
    pooled vector for a pooled-only one."""
    require_grid(decoder, grid, source, decoder_file)
    return rows[:, :int(members_of(decoder)[0].inputs[0].shape[-1])]


def require_feature_dim(decoder: keras.Model, feature_dim: int, backbone: str, decoder_file) -> None:
    """A decoder reads the vectors of the CNN its features came from: ValueError, naming the file,
    when ``decoder`` was trained on vectors of another width than ``backbone`` makes (features of
    another CNN), which would otherwise fail deep in TensorFlow, or caption noise."""
    width = pooled_width(members_of(decoder)[0])
    if width != feature_dim:
        raise ValueError(f"the decoder {decoder_file} was trained on {width}-d image features, but its CNN "
                         f"{backbone} makes {feature_dim}-d ones: features from another backbone were given to it; "
                         "retrain it on this backbone's features (or register it with the backbone it was trained on)")
