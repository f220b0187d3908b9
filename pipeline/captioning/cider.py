"""CIDEr-D of many captions at once, the reward of self-critical training.

The same score as pycocoevalcap's ``Cider`` (which is CIDEr-D: n-grams 1..4, tf-idf vectors,
counts clipped to the reference's, a Gaussian penalty on the length difference with sigma 6,
x10), computed for a batch of captions with NumPy instead of one Python dict walk per
caption/reference pair. Two differences in use, both deliberate:

* the document frequencies come from a fixed corpus given once (the train split's references,
  as in Rennie et al. 2017), not from the captions being scored; built on the scored
  images' own references, the scores equal pycocoevalcap's (tests/test_cider.py);
* a caption is scored against the references of the corpus image it names, so the reference
  vectors are computed once, not at every training step.

Captions are sequences of tokens (words); n-grams are tuples of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

Caption = Sequence[str]


def ngram_counts(tokens: Caption, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class CiderD:
    """``CiderD(references)``: ``references[i]`` are the reference captions of corpus image i.
    ``score(captions, images)`` gives each caption's CIDEr-D against its image's references."""

    def __init__(self, references: Sequence[Sequence[Caption]], n: int = 4, sigma: float = 6.0):
        if not references or any(len(refs) == 0 for refs in references):
            raise ValueError("CIDEr-D needs at least one reference caption for every image")
        self.n, self.sigma = n, sigma
        self._ids: dict[tuple, int] = {}
        cooked = [[ngram_counts(ref, n) for ref in refs] for refs in references]
        df: Counter = Counter()
        for refs in cooked:
            df.update({gram for counts in refs for gram in counts})
        self.log_images = float(np.log(len(references)))
        for gram in df:
            self._ids[gram] = len(self._ids)
        self._idf = np.array([self.log_images - np.log(max(1.0, df[g])) for g in self._ids])
        self._orders = np.array([len(g) - 1 for g in self._ids], dtype=np.int64)
        self.max_refs = max(len(refs) for refs in references)
        # Per image: its references' n-gram entries (reference slot, n-gram id, tf-idf weight),
        # and per slot the norms per order and the length (bigram count, as pycocoevalcap has it).
        self._entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._norms = np.zeros((len(references), self.max_refs, n))
        self._lengths = np.zeros((len(references), self.max_refs))
        self._ref_count = np.array([len(refs) for refs in references], dtype=np.float64)
        for image, refs in enumerate(cooked):
            slots, ids, weights = [], [], []
            for slot, counts in enumerate(refs):
                gram_ids = np.fromiter((self._ids[g] for g in counts), dtype=np.int64, count=len(counts))
                w = np.fromiter(counts.values(), dtype=np.float64, count=len(counts)) * self._idf[gram_ids]
                slots.append(np.full(len(counts), slot)), ids.append(gram_ids), weights.append(w)
                self._norms[image, slot] = np.sqrt(np.bincount(self._orders[gram_ids], w * w, minlength=n))
                self._lengths[image, slot] = sum(c for g, c in counts.items() if len(g) == 2)
            self._entries.append((np.concatenate(slots), np.concatenate(ids), np.concatenate(weights)))
        # the same entries as flat arrays, image i's at [start[i], start[i] + count[i]): gathered
        # for many images at once without a Python loop
        self._entry_count = np.array([len(e[1]) for e in self._entries], dtype=np.int64)
        self._entry_start = np.cumsum(self._entry_count) - self._entry_count
        self._flat_slots, self._flat_ids, self._flat_weights = (
            np.concatenate([e[k] for e in self._entries]) for k in range(3))

    def score(self, captions: Sequence[Caption], images: Sequence[int]) -> np.ndarray:
        """CIDEr-D of ``captions[j]`` against the references of corpus image ``images[j]``."""
        return self.score_pairs(captions, np.arange(len(captions)), images)

    def score_pairs(self, captions: Sequence[Caption], caption_of: Sequence[int],
                    images: Sequence[int]) -> np.ndarray:
        """CIDEr-D of ``captions[caption_of[p]]`` against the references of corpus image
        ``images[p]``, for every pair p: a caption compared with many images has its n-grams
        counted once."""
        caption_of, images = np.asarray(caption_of, dtype=np.int64), np.asarray(images, dtype=np.int64)
        m, pairs, n, slots = len(captions), len(images), self.n, self.max_refs
        if len(caption_of) != pairs:
            raise ValueError(f"{len(caption_of)} caption indices for {pairs} images")
        if pairs == 0:
            return np.zeros(0)
        unseen = len(self._ids)  # n-grams absent from the corpus: df 0, and they match no reference
        rows, ids, weights, orders, lengths = [], [], [], [], np.zeros(m)
        for j, caption in enumerate(captions):
            counts = ngram_counts(list(caption), n)
            known = [(self._ids.get(g, unseen), len(g) - 1, c) for g, c in counts.items()]
            gram_ids = np.array([k[0] for k in known], dtype=np.int64)
            order = np.array([k[1] for k in known], dtype=np.int64)
            tf = np.array([k[2] for k in known], dtype=np.float64)
            idf = np.where(gram_ids == unseen, self.log_images, self._idf[np.minimum(gram_ids, unseen - 1)])
            rows.append(np.full(len(known), j)), ids.append(gram_ids), orders.append(order)
            weights.append(tf * idf)
            lengths[j] = sum(c for g, c in counts.items() if len(g) == 2)
        rows, ids, weights, orders = (np.concatenate(x) if x else np.zeros(0, np.int64)
                                      for x in (rows, ids, weights, orders))
        caption_norms = np.sqrt(np.bincount(rows * n + orders, weights * weights, minlength=m * n)).reshape(m, n)

        # Match every reference entry of a pair's image with the pair's caption's own weight of
        # that n-gram: keys (caption row, n-gram id) are unique on the caption side, so one sorted
        # search finds them all.
        span = unseen + 1
        caption_keys = rows * span + ids
        order_of_key = np.argsort(caption_keys)
        sorted_keys = caption_keys[order_of_key]
        counts = self._entry_count[images]
        ref_pairs = np.repeat(np.arange(pairs), counts)
        at_image = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        entries = np.repeat(self._entry_start[images], counts) + at_image
        ref_slots, ref_ids, ref_weights = self._flat_slots[entries], self._flat_ids[entries], self._flat_weights[entries]
        ref_keys = caption_of[ref_pairs] * span + ref_ids
        at = np.minimum(np.searchsorted(sorted_keys, ref_keys), len(sorted_keys) - 1)
        found = sorted_keys[at] == ref_keys if len(sorted_keys) else np.zeros(len(ref_keys), bool)
        mine = np.where(found, weights[order_of_key[at]] if len(sorted_keys) else 0.0, 0.0)
        overlap = np.minimum(mine, ref_weights) * ref_weights
        cell = (ref_pairs * slots + ref_slots) * n + self._orders[ref_ids]
        dot = np.bincount(cell, overlap, minlength=pairs * slots * n).reshape(pairs, slots, n)

        ref_norms = self._norms[images]  # (pairs, slots, n)
        denominator = caption_norms[caption_of][:, None, :] * ref_norms
        cosine = np.divide(dot, denominator, out=dot.copy(), where=denominator != 0)
        delta = lengths[caption_of][:, None] - self._lengths[images]  # (pairs, slots)
        penalised = cosine * np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, :, None]
        # absent reference slots have no entries and zero norms: they add 0, and the mean divides
        # by the image's real reference count
        return penalised.mean(axis=2).sum(axis=1) / self._ref_count[images] * 10.0
