"""Consensus reranking of beam candidates by the captions of similar train images.

Beam search ranks its candidates by the decoder's own probability, which favours safe, generic
sentences. Here each candidate is also scored by how well it agrees with what people wrote for
the ``neighbours`` train images closest to the photo (cosine similarity of the CNN feature
vectors): its CIDEr-D against all of their reference captions, with the train split's
document frequencies. The final ranking is ``consensus + weight x (log-prob / length **
length_penalty)``: the candidates still come from the decoder, the neighbours only choose among
them (Devlin et al. 2015, "Exploring nearest neighbor approaches for image captioning", used
their consensus to pick a caption; Mao et al. and others rerank a beam with it).

A beam's candidates differ in a word or two, so the choice is narrow. ``consensus.samples``
widens it: that many captions sampled per image (among each step's ``consensus.top_k`` likeliest
words, scored by the decoder as beam candidates are) join the pool, so a caption with a word
the beam never proposes can win when the neighbours' captions use it.

The neighbours count alike, or with ``consensus.sharpness`` > 0 the closer ones count more: a
neighbour's weight is exp(sharpness x (its cosine similarity - the nearest one's)), so the
caption is judged mostly by the photos most like this one.

Consensus favours what many people write, and the safest such caption fits any photo ("a dog
runs through the grass"), so rerankers narrow the vocabulary. ``consensus.contrast`` subtracts
that much of a candidate's agreement with the captions of 100 random train images (the same
for every photo) from its agreement with the neighbours: a discriminative score in the spirit
of Luo et al. 2018 ("Discriminability objective for training descriptive captions").

The train images' unit-length feature vectors and their reference captions are one file
(``models/neighbours.npz``, written by ``train``), which the registered model carries, so the
served model ranks exactly as ``evaluate`` scored it.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.captioning.cider import CiderD
from pipeline.config import ConsensusSettings
from pipeline.data.caption_text import references_by_image
from pipeline.data.features_file import row_index, rows_of

CHUNK_IMAGES = 64  # images whose candidates are scored together (x k neighbours x their n-grams)
GENERIC_IMAGES = 100  # random train images a caption is contrasted with (consensus.contrast)


@dataclass(frozen=True)
class Neighbours:
    """The train images a photo is compared with: unit-length features (M, D) and, per image,
    its tokenised reference captions."""

    features: np.ndarray
    references: list[list[list[str]]]

    @classmethod
    def from_split(cls, captions: pd.DataFrame, split: str, images: list[str],
                   features: np.ndarray) -> "Neighbours":
        """The images of ``split`` in ``captions`` (columns image, split, caption) with their
        rows of ``features`` (rows named by ``images``)."""
        names, references = references_by_image(captions, split)
        if not names:
            raise ValueError(f"no captions in the {split} split to compare photos with")
        vectors = features[rows_of(row_index(images), names)].astype(np.float32)
        return cls(unit_rows(vectors), references)

    def comparable(self, features: np.ndarray) -> np.ndarray:
        """The part of image rows that photos are compared by: the pooled vector. Rows for an
        attention decoder carry the grid of regions after it (``pipeline/stages/train.py``
        ``decoder_features``), which is cut off here; a row narrower than the train images'
        vectors comes from another CNN: ValueError."""
        features = np.asarray(features, np.float32)
        width = self.features.shape[1]
        if features.ndim != 2 or features.shape[1] < width:
            raise ValueError(f"features of shape {features.shape} cannot be compared with the train images' "
                             f"{width}-d features (another backbone?)")
        return features[:, :width]

    def save(self, path: Path | str) -> None:
        """One .npz, loadable without pickle: features, every caption as text, and the image
        (row of features) each caption belongs to."""
        owner = np.repeat(np.arange(len(self.references)), [len(r) for r in self.references])
        texts = np.array([" ".join(c) for refs in self.references for c in refs], dtype=np.str_)
        with open(path, "wb") as out:
            np.savez_compressed(out, features=self.features.astype(np.float16), captions=texts, owner=owner)

    @classmethod
    def load(cls, path: Path | str) -> "Neighbours":
        """ValueError naming the file when it is not one ``save`` wrote (truncated, foreign)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                features, texts, owner = data["features"].astype(np.float32), data["captions"], data["owner"]
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: not a neighbours file ({type(err).__name__}: {err}); "
                             "run the train stage again (dvc repro train)") from None
        if features.ndim != 2 or owner.ndim != 1 or len(owner) != len(texts) or (
                len(owner) and (owner.min() < 0 or owner.max() >= len(features))):
            raise ValueError(f"{path}: captions and features do not match (a truncated or foreign file?)")
        references: list[list[list[str]]] = [[] for _ in range(len(features))]
        for text, row in zip(texts.tolist(), owner.tolist()):
            references[row].append(text.split())
        if any(not refs for refs in references):
            raise ValueError(f"{path}: an image without captions (a truncated or foreign file?)")
        return cls(features, references)


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


class ConsensusScorer:
    """``score(features, captions)``: each image's captions scored by their CIDEr-D against the
    references of its ``settings.neighbours`` nearest train images (optionally weighted by
    closeness), net of ``settings.contrast`` x their agreement with the generic images'."""

    def __init__(self, neighbours: Neighbours, settings: ConsensusSettings):
        if settings.neighbours < 1:
            raise ValueError(f"consensus needs at least 1 neighbour, got {settings.neighbours}")
        if not 0 <= settings.sharpness < np.inf:
            raise ValueError(f"consensus sharpness must be finite and >= 0, got {settings.sharpness}")
        self.neighbours, self.settings = neighbours, settings
        self.k = min(settings.neighbours, len(neighbours.features))
        # the same random train images for every photo: what a caption that fits any photo matches
        self.generic_rows = np.sort(np.random.default_rng(settings.seed).choice(
            len(neighbours.features), min(GENERIC_IMAGES, len(neighbours.features)), replace=False))
        # built once: the train references' n-gram vectors and document frequencies
        self.cider = CiderD(neighbours.references)
        self.ref_counts = np.array([len(r) for r in neighbours.references], dtype=np.float64)

    def _neighbourhood(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, k) rows of the most similar train images, most similar first, and each one's
        weight: 1, or with ``sharpness`` exp(sharpness x (its similarity - the nearest one's))."""
        sims = unit_rows(self.neighbours.comparable(features)) @ self.neighbours.features.T
        top = np.argpartition(-sims, self.k - 1, axis=1)[:, :self.k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        rows = np.take_along_axis(top, order, axis=1)
        closeness = np.take_along_axis(sims, rows, axis=1).astype(np.float64)
        return rows, np.exp(self.settings.sharpness * (closeness - closeness[:, :1]))

    def _generic(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.broadcast_to(self.generic_rows, (n, len(self.generic_rows)))
        return rows, np.ones(rows.shape)

    def _agreement(self, captions: Sequence[Sequence[list[str]]],
                   *groups: tuple[np.ndarray, np.ndarray]) -> list[list[np.ndarray]]:
        """Per group of train images (``groups[g]``: image i's rows and their weights), each
        image's captions against those images' references. The groups are scored in one pass,
        so a caption's n-grams are counted once however many groups it is compared with."""
        widths = [g[0].shape[1] for g in groups]
        rows = np.concatenate([g[0] for g in groups], axis=1)
        # every reference of an image weighs the image's weight
        counts = self.ref_counts[rows] * np.concatenate([g[1] for g in groups], axis=1)
        out = [[np.zeros(len(found)) for found in captions] for _ in groups]
        for lo in range(0, len(captions), CHUNK_IMAGES):  # bounded memory: pairs x reference n-grams
            flat = [(i, j) for i in range(lo, min(lo + CHUNK_IMAGES, len(captions))) for j in range(len(captions[i]))]
            if not flat:
                continue
            width = rows.shape[1]
            scored = self.cider.score_pairs([captions[i][j] for i, j in flat], np.repeat(np.arange(len(flat)), width),
                                            np.concatenate([rows[i] for i, _ in flat])).reshape(len(flat), width)
            # a caption's (weighted) mean over a group's references = the images' CIDEr-D (each a
            # mean over its own references) weighted by their reference counts (x their weights)
            for g, (start, stop) in enumerate(zip(np.cumsum([0, *widths[:-1]]), np.cumsum(widths))):
                for (i, j), row in zip(flat, scored[:, start:stop]):
                    weights = counts[i, start:stop]
                    out[g][i][j] = row @ weights / weights.sum()
        return out

    def agreement_with_generic(self, features: np.ndarray, captions: Sequence[Sequence[list[str]]]
                               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per image, its captions' agreement with its neighbours' references and with the
        generic images' (each as ``score`` computes it before ``contrast``), in one pass."""
        return tuple(self._agreement(captions, self._neighbourhood(features), self._generic(len(captions))))

    def score(self, features: np.ndarray, captions: Sequence[Sequence[list[str]]]) -> list[np.ndarray]:
        """Per image, the consensus of each of its ``captions`` (lists of words): the CIDEr-D
        against all reference captions of its neighbours (the mean over those references, each
        weighing the same, or with ``sharpness`` each neighbour's weighing its closeness), minus
        ``contrast`` x the same against the generic images' references."""
        near = self._neighbourhood(features)
        if not self.settings.contrast:
            return self._agreement(captions, near)[0]
        close, generic = self._agreement(captions, near, self._generic(len(captions)))
        return [c - self.settings.contrast * g for c, g in zip(close, generic)]
