"""Greedy and beam-search decoding, batched over many images at once.

Rules shared by both: never emit <pad>, <start> or <unk>, nor an empty caption; optionally
block any repeated n-gram (``no_repeat_ngram``, 0 = off), which stops the "a white hat and a white hat ..."
loops seen on real Flickr8k; stop at <end> or after ``max_length`` words (then <end> is
forced). Scores are summed log-probabilities including <end>; beam search ranks finished
hypotheses by ``logp / length ** length_penalty``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .model import StepModels
from .text import Vocabulary

NEG_INF = -1e9


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
    if step >= vocab.max_length:
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
           no_repeat_ngram: int = 0, batch_size: int = 256, progress: str | None = None) -> list[Caption]:
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


def beam_search(models: StepModels, features: np.ndarray, vocab: Vocabulary, *, beam_size: int = 3,
                length_penalty: float = 0.7, no_repeat_ngram: int = 0,
                batch_size: int = 128, progress: str | None = None) -> list[Caption]:
    """Beam search with ``beam_size`` hypotheses per image, all images of a batch together
    (rows = images x beams); the best finished caption of each image."""
    return [found[0][0] for found in beam_candidates(
        models, features, vocab, beam_size=beam_size, length_penalty=length_penalty,
        no_repeat_ngram=no_repeat_ngram, batch_size=batch_size, progress=progress)]


def beam_candidates(models: StepModels, features: np.ndarray, vocab: Vocabulary, *, beam_size: int = 3,
                    length_penalty: float = 0.7, no_repeat_ngram: int = 0, batch_size: int = 128,
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


def one_at_a_time_greedy(models: StepModels, features: np.ndarray, vocab: Vocabulary) -> list[Caption]:
    """The tutorial way, one image and one word per model call (benchmark baseline)."""
    return [greedy(models, features[i:i + 1], vocab, batch_size=1)[0] for i in range(len(features))]
