"""Training speed: our teacher-forcing decoder vs the tutorials' prefix formulation.

Same synthetic Flickr-sized data for both: captions of 8-16 words (Zipf-distributed words over
a 3,000-word vocabulary), 2048-d image features, 256 units, batch 64.
(a) tutorial: "merge" model (image Dense + LSTM over the prefix, added, Dense softmax),
    one training sample per caption prefix;
(b) ours: pipeline.captioning.decoder.build_decoder + CaptionTrainer, one sample per caption; the
    classifier runs on real (non-pad) positions only.
Reported: seconds per epoch and the ratio a/b. Target >= 4x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, append_report  # noqa: E402


def synthetic_corpus(n_images: int, vocab: int, max_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 1, (n_images, 2048)).astype("float32")
    captions = []
    for i in range(n_images * 5):
        length = int(rng.integers(8, 17))
        words = np.minimum(rng.zipf(1.3, length), vocab - 5) + 3  # ids 4.. (0-3 special)
        captions.append((i // 5, words.tolist()[:max_len]))
    return features, captions


def tutorial_model(vocab: int, max_len: int, units: int):
    import keras
    from keras import layers

    img = keras.Input((2048,))
    fe = layers.Dense(units, activation="relu")(layers.Dropout(0.5)(img))
    seq = keras.Input((max_len,))
    se = layers.LSTM(units)(layers.Dropout(0.5)(layers.Embedding(vocab, units, mask_zero=True)(seq)))
    out = layers.Dense(vocab, activation="softmax")(layers.Dense(units, activation="relu")(layers.add([fe, se])))
    model = keras.Model([img, seq], out)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    return model


def prefix_samples(features, captions, max_len):
    """One sample per prefix: (image, left-padded prefix) -> next word (tutorial style)."""
    imgs, seqs, targets = [], [], []
    for image, words in captions:
        full = [1, *words, 2]
        for t in range(1, len(full)):
            prefix = full[:t][-max_len:]
            seqs.append([0] * (max_len - len(prefix)) + prefix)
            imgs.append(image)
            targets.append(full[t])
    return features[np.array(imgs)], np.array(seqs, "int32"), np.array(targets, "int32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--units", type=int, default=256)
    args = parser.parse_args()
    import keras

    from pipeline.captioning.decoder import DecoderConfig, build_decoder, make_trainer

    max_len = 18
    features, captions = synthetic_corpus(args.images, args.vocab, max_len - 2)
    keras.utils.set_random_seed(0)

    # (a) tutorial: prefixes
    x_img, x_seq, y = prefix_samples(features, captions, max_len)
    tut = tutorial_model(args.vocab, max_len, args.units)
    tut.fit([x_img[:128], x_seq[:128]], y[:128], batch_size=64, epochs=1, verbose=0)  # build/warm
    with Timer() as a:
        tut.fit([x_img, x_seq], y, batch_size=64, epochs=1, verbose=0)

    # (b) ours: whole captions, teacher forcing
    n = len(captions)
    inputs = np.zeros((n, max_len), "int32")
    targets = np.zeros((n, max_len), "int32")
    for row, (_, words) in enumerate(captions):
        inputs[row, : len(words) + 1] = [1, *words]
        targets[row, : len(words) + 1] = [*words, 2]
    img = features[np.array([c[0] for c in captions])]
    decoder = build_decoder(DecoderConfig(args.vocab, 2048, max_len, args.units, args.units, 0.3), features)
    ours = make_trainer(decoder, 1e-3)
    ours.fit([img[:128], inputs[:128]], targets[:128], batch_size=64, epochs=1, verbose=0)
    with Timer() as b:
        ours.fit([img, inputs], targets, batch_size=64, epochs=1, verbose=0)

    append_report("Decoder training (bench_train.py)", [
        ("(a) tutorial: one sample per prefix", f"{a.seconds:.1f} s/epoch ({len(y)} samples)"),
        ("(b) ours: teacher forcing, one sample per caption", f"{b.seconds:.1f} s/epoch ({n} samples)"),
        ("a / b (target >= 4)", f"{a.seconds / b.seconds:.2f}"),
        ("parameters (a / b)", f"{tut.count_params():,} / {decoder.count_params():,}"),
    ], [f"{args.images} images x 5 captions of 8-16 words, vocabulary {args.vocab}, "
        f"{args.units} units, batch 64, one full epoch each after a warm-up batch"])


if __name__ == "__main__":
    main()
