"""Greedy decoding, beam search and sampling, batched over many images at once.

Rules shared by all three: never emit <pad>, <start> or <unk>, nor an empty caption; optionally
block any repeated n-gram (``no_repeat_ngram``, 0 = off), which stops the "a white hat and a white hat ..."
loops seen on real Flickr8k; stop at <end> or after ``max_length`` words (then <end> is
forced). Scores are summed log-probabilities including <end>; beam search ranks finished
hypotheses by ``logp / length ** length_penalty``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.captioning.decoder import StepModels
from pipeline.captioning.vocabulary import Vocabulary

NEG_INF = -1e9
# rows (images x samples) decoded together when sampling: each step holds a few float64 arrays
# of rows x vocabulary (4096 x 2,500 words: about 80 MB each)
MAX_SAMPLE_ROWS = 4096


@dataclass(frozen=True)
class Caption:
    tokens: list[int]  # word ids, without <start>/<end>
    log_prob: float  # sum over the emitted tokens and <end>


def _banned(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``history``."""
    if n <= 0 or len(history) < n - 1:
        return set()
    if n == 1:
        return set(history)
    prefix = tuple(history[len(history) - (n - 1):])
    return {history[i + n - 1] for i in range(len(history) - n + 1)
            if tuple(history[i:i + n - 1]) == prefix}


def allowed(log_probs: np.ndarray, vocab: Vocabulary, step: int) -> np.ndarray:
    """A copy of one step's log-probs with the words no caption may emit set to NEG_INF:
    <pad>, <start> and <unk> always, <end> as the first word (a caption has a word, as validate
    requires of the references), everything but <end> once ``max_length`` words are out."""
    lp = log_probs.copy()
    lp[:, [vocab.pad_id, vocab.start_id, vocab.unk_id]] = NEG_INF
    if step == 0:
        lp[:, vocab.end_id] = NEG_INF
    if step >= vocab.max_length:  # out of room: only <end> remains
        end = lp[:, vocab.end_id].copy()
        lp[:] = NEG_INF
        lp[:, vocab.end_id] = end
    return lp


def _mask_step(log_probs: np.ndarray, histories: list[list[int]], vocab: Vocabulary,
               step: int, no_repeat_ngram: int) -> np.ndarray:
    lp = allowed(log_probs, vocab, step)
    if step >= vocab.max_length or no_repeat_ngram <= 0:
        return lp
    for row, history in enumerate(histories):
        banned = _banned(history, no_repeat_ngram)
        if banned:
            lp[row, list(banned)] = NEG_INF
    return lp


def _batches(n: int, batch_size: int, progress: str | None):
    """Batch starts over n images, with a progress bar named ``progress`` (None: silent)."""
    with tqdm(total=n, desc=progress, unit="img", disable=progress is None) as bar:
        for lo in range(0, n, batch_size):
            yield lo
            bar.update(min(batch_size, n - lo))


def greedy(models: StepModels, features: np.ndarray, vocab: Vocabulary, *,
           no_repeat_ngram: int, batch_size: int, progress: str | None = None) -> list[Caption]:
    """Most likely next word at every step, for all images of a batch at once."""
    out: list[Caption] = []
    for lo in _batches(len(features), batch_size, progress):
        feats = features[lo:lo + batch_size]
        n = len(feats)
        state = models.encode(feats)
        token = np.full((n, 1), vocab.start_id, dtype=np.int32)
        histories: list[list[int]] = [[] for _ in range(n)]
        log_prob = np.zeros(n)
        done = np.zeros(n, dtype=bool)
        for step in range(vocab.max_length + 1):
            lp, state = models.step(token, state)
            lp = _mask_step(lp, histories, vocab, step, no_repeat_ngram)
            nxt = lp.argmax(axis=1)
            for row in np.flatnonzero(~done):
                log_prob[row] += lp[row, nxt[row]]
                if nxt[row] == vocab.end_id:
                    done[row] = True
                else:
                    histories[row].append(int(nxt[row]))
            if done.all():
                break
            token = nxt.astype(np.int32)[:, None]
        out += [Caption(hist, float(lp_)) for hist, lp_ in zip(histories, log_prob)]
    return out


def beam_search(models: StepModels, features: np.ndarray, vocab: Vocabulary, *, beam_size: int,
                length_penalty: float, no_repeat_ngram: int, batch_size: int,
                progress: str | None = None) -> list[Caption]:
    """Beam search with ``beam_size`` hypotheses per image, all images of a batch together
    (rows = images x beams); the best finished caption of each image."""
    return [found[0][0] for found in beam_candidates(
        models, features, vocab, beam_size=beam_size, length_penalty=length_penalty,
        no_repeat_ngram=no_repeat_ngram, batch_size=batch_size, progress=progress)]


def beam_candidates(models: StepModels, features: np.ndarray, vocab: Vocabulary, *, beam_size: int,
                    length_penalty: float, no_repeat_ngram: int, batch_size: int,
                    progress: str | None = None) -> list[list[tuple[Caption, float]]]:
    """Like ``beam_search``, but every finished hypothesis of each image as (caption,
    length-normalised score), best first (what an app shows as the other candidates)."""
    k = beam_size
    out: list[list[tuple[Caption, float]]] = []
    for lo in _batches(len(features), batch_size, progress):
        feats = features[lo:lo + batch_size]
        n = len(feats)
        state = [np.repeat(x, k, axis=0) for x in models.encode(feats)]
        token = np.full((n * k, 1), vocab.start_id, dtype=np.int32)
        histories: list[list[int]] = [[] for _ in range(n * k)]
        scores = np.full((n, k), NEG_INF)
        scores[:, 0] = 0.0  # all beams start identical: keep one
        finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(n)]
        for step in range(vocab.max_length + 1):
            lp, state = models.step(token, state)
            lp = _mask_step(lp, histories, vocab, step, no_repeat_ngram)
            vsize = lp.shape[1]
            total = (scores.reshape(-1, 1) + lp).reshape(n, k * vsize)
            top = np.argsort(-total, axis=1)[:, : 2 * k]
            new_scores = np.full((n, k), NEG_INF)
            origin = np.tile(np.arange(k), n).reshape(n, k) + np.arange(n)[:, None] * k
            new_tokens = np.full((n, k), vocab.end_id, dtype=np.int32)
            new_hist: list[list[int]] = [[] for _ in range(n * k)]
            for i in range(n):
                if len(finished[i]) >= k:
                    continue  # this image is done; its rows idle
                filled = 0
                for flat in top[i]:
                    score = total[i, flat]
                    if score <= NEG_INF / 2:
                        break
                    beam, word = divmod(int(flat), vsize)
                    history = histories[i * k + beam]
                    if word == vocab.end_id:
                        norm = score / (len(history) + 1) ** length_penalty
                        finished[i].append((norm, float(score), history))
                        if len(finished[i]) >= k:
                            break
                        continue
                    new_scores[i, filled] = score
                    origin[i, filled] = i * k + beam
                    new_tokens[i, filled] = word
                    new_hist[i * k + filled] = history + [word]
                    filled += 1
                    if filled == k:
                        break
            if all(len(f) >= k for f in finished):
                break
            rows = origin.reshape(-1)
            state = [x[rows] for x in state]
            scores, histories = new_scores, new_hist
            token = new_tokens.reshape(-1, 1)
        for i in range(n):
            found = finished[i] or [(0.0, float(scores[i, 0]), histories[i * k])]
            ranked = sorted(found, key=lambda f: -f[0])  # stable: ties keep the order found
            out.append([(Caption(tokens, score), norm) for norm, score, tokens in ranked])
    return out


def top_k_only(log_probs: np.ndarray, k: int) -> np.ndarray:
    """``log_probs`` with all but each row's ``k`` most likely words set to NEG_INF (k = 0: all kept)."""
    if k <= 0 or k >= log_probs.shape[1]:
        return log_probs
    cut = np.partition(log_probs, -k, axis=1)[:, -k][:, None]
    return np.where(log_probs >= cut, log_probs, NEG_INF)


def sample(models: StepModels, features: np.ndarray, vocab: Vocabulary,
           rng: np.random.Generator | Sequence[np.random.Generator], *, top_k: int,
           no_repeat_ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """One caption sampled per row of ``features``: (ids (N, max_length + 1), <end> included and
    <pad> after it; log-probs (N,), summed like beam search's scores). Words are drawn from the
    softmax (restricted to the ``top_k`` most likely words of each step when top_k > 0) with the
    Gumbel-max trick; the log-probs are the whole softmax's, so a sample and a beam caption of the
    same words score the same. ``no_repeat_ngram`` blocks repeats as in greedy and beam search
    (self-critical training samples without it, from the decoder's own distribution). ``rng``:
    one generator for all rows, or G generators, each drawing the noise of its own N / G
    consecutive rows."""
    n = len(features)
    state = models.encode(features)
    token = np.full((n, 1), vocab.start_id, dtype=np.int32)
    out = np.zeros((n, vocab.sequence_length), dtype=np.int32)
    log_prob = np.zeros(n)
    done = np.zeros(n, dtype=bool)
    histories: list[list[int]] = [[] for _ in range(n)]
    for step in range(vocab.sequence_length):
        log_probs, state = models.step(token, state)
        lp = _mask_step(log_probs, histories, vocab, step, no_repeat_ngram)
        noisy = top_k_only(lp, top_k) + _gumbel(rng, lp.shape)
        word = np.where(done, vocab.pad_id, noisy.argmax(axis=1)).astype(np.int32)
        log_prob += np.where(done, 0.0, lp[np.arange(n), word])
        out[:, step] = word
        if no_repeat_ngram:
            for row in np.flatnonzero(~done & (word != vocab.end_id)):
                histories[row].append(int(word[row]))
        done |= word == vocab.end_id
        if done.all():
            break
        token = word[:, None]
    return out, log_prob


def _gumbel(rng: np.random.Generator | Sequence[np.random.Generator], shape: tuple[int, int]) -> np.ndarray:
    if isinstance(rng, np.random.Generator):
        return rng.gumbel(size=shape)
    if not rng or shape[0] % len(rng):
        raise ValueError(f"{len(rng)} generators cannot share {shape[0]} rows evenly")
    rows = shape[0] // len(rng)
    return np.concatenate([g.gumbel(size=(rows, shape[1])) for g in rng])


def image_rng(seed: int, feature: np.ndarray) -> np.random.Generator:
    """A generator of its own for one image: seeded by ``seed`` and the bytes of its feature
    vector, so an image gets the same samples alone, in any batch, at any position."""
    digest = hashlib.blake2b(np.ascontiguousarray(feature, dtype=np.float32).tobytes(), digest_size=16).digest()
    return np.random.default_rng([seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])


def sample_candidates(models: StepModels, features: np.ndarray, vocab: Vocabulary, *, samples: int,
                      seed: int, top_k: int, length_penalty: float, no_repeat_ngram: int, batch_size: int,
                      progress: str | None = None) -> list[list[tuple[Caption, float]]]:
    """``samples`` sampled captions per image as (caption, length-normalised score), scored the way
    ``beam_candidates`` scores its own (so the two can be pooled), in the order drawn; the same
    caption may come up twice. Each image draws from ``image_rng(seed, its features)``."""
    out: list[list[tuple[Caption, float]]] = []
    per_batch = max(1, min(batch_size, MAX_SAMPLE_ROWS // samples))
    for lo in _batches(len(features), per_batch, progress):
        feats = features[lo:lo + per_batch]
        ids, log_probs = sample(models, np.repeat(feats, samples, axis=0), vocab,
                                [image_rng(seed, f) for f in feats], top_k=top_k,
                                no_repeat_ngram=no_repeat_ngram)
        drawn = []
        for row, log_prob in zip(ids, log_probs):
            tokens = [int(t) for t in row[: int(np.argmax(row == vocab.end_id))]]  # <end> is always drawn
            drawn.append((Caption(tokens, float(log_prob)), float(log_prob) / (len(tokens) + 1) ** length_penalty))
        out += [drawn[i:i + samples] for i in range(0, len(drawn), samples)]
    return out
