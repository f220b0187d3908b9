"""Decoding speed: batched greedy and beam-3 vs a one-image-at-a-time greedy loop, and batched
beam-3 with an ensemble of 3 decoders (``train.ensemble: 3``) against one.

500 images' features through the same decoder (vocabulary 3,000, 256 units, max 20 words,
random weights so every caption runs its full length: the worst case for all three).
Reported: captions/s and ratios. Target: batched greedy >= 5x the loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, append_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--vocab", type=int, default=3000)
    args = parser.parse_args()
    import keras

    from pipeline.captioning.decoder import (
        DecoderConfig,
        StepModels,
        build_decoder,
        decoding_models,
        ensemble_decoder,
    )
    from pipeline.captioning.decoding import beam_search, greedy
    from pipeline.captioning.vocabulary import SPECIAL_TOKENS, Vocabulary

    keras.utils.set_random_seed(0)
    vocab = Vocabulary(SPECIAL_TOKENS + tuple(f"w{i}" for i in range(args.vocab - 4)), max_length=20)
    feats = np.random.default_rng(0).normal(size=(args.images, 2048)).astype("float32")
    decoder = build_decoder(DecoderConfig(vocab.size, 2048, vocab.sequence_length, 256, 256, 0.0), feats)
    models = StepModels.from_decoder(decoder)
    plain = dict(no_repeat_ngram=0)
    beam3 = dict(beam_size=3, length_penalty=0.7, no_repeat_ngram=0, batch_size=128)
    greedy(models, feats[:4], vocab, **plain, batch_size=4)  # warm-up

    def one_at_a_time():  # the tutorial way: one image and one word per model call
        return [greedy(models, feats[i:i + 1], vocab, **plain, batch_size=1)[0] for i in range(len(feats))]

    with Timer() as loop:
        looped = one_at_a_time()
    with Timer() as batched:
        fast = greedy(models, feats, vocab, **plain, batch_size=256)
    with Timer() as beam:
        beam_search(models, feats, vocab, **beam3)
    members = [decoder] + [build_decoder(DecoderConfig(vocab.size, 2048, vocab.sequence_length, 256, 256, 0.0), feats)
                           for _ in range(2)]
    ensemble = decoding_models(ensemble_decoder(members))
    beam_search(ensemble, feats[:4], vocab, **beam3)  # warm-up
    with Timer() as ensemble_beam:
        beam_search(ensemble, feats, vocab, **beam3)
    same = sum(a.tokens == b.tokens for a, b in zip(looped, fast))
    n = args.images
    append_report("Decoding (bench_decode.py)", [
        ("one image at a time, greedy", f"{n / loop.seconds:.1f} captions/s"),
        ("batched greedy (256 per batch)", f"{n / batched.seconds:.1f} captions/s"),
        ("batched beam-3 (128 images per batch)", f"{n / beam.seconds:.1f} captions/s"),
        ("batched greedy / loop (target >= 5)", f"{loop.seconds / batched.seconds:.1f}"),
        ("batched beam-3 / loop", f"{loop.seconds / beam.seconds:.1f}"),
        ("batched beam-3, ensemble of 3 decoders", f"{n / ensemble_beam.seconds:.1f} captions/s"),
        ("ensemble of 3 / one decoder, beam-3 time", f"{ensemble_beam.seconds / beam.seconds:.2f}"),
    ], [f"{n} images, vocabulary {vocab.size}, 256 units, up to {vocab.max_length} words; "
        f"batched and looped greedy captions identical for {same}/{n} images"])


if __name__ == "__main__":
    main()
