"""The one way a caption is chosen for a photo's features: ``CaptionChooser.choose``.

evaluate, the registered model (and through it the app, photo search and alt text) all call it
with the same ``DecodingSettings``, so what is served is what was scored:

1. ``beam_size`` 1: the greedy caption, alone;
2. otherwise beam search's ``beam_size`` candidates, ranked by the decoder's length-normalised
   log-prob;
3. with consensus on (``consensus.neighbours`` > 0), ``consensus.samples`` sampled captions per
   image join the beam's (seeded by each image's features, so a photo gets the same caption
   alone or in any batch), and every candidate is ordered by consensus (``ConsensusScorer``)
   + ``consensus.weight`` x its decoder score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.captioning.consensus import ConsensusScorer, Neighbours
from pipeline.captioning.decoder import StepModels
from pipeline.captioning.decoding import Caption, beam_candidates, greedy, sample_candidates
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import DecodingSettings


@dataclass(frozen=True)
class Candidate:
    caption: Caption
    score: float  # the decoder's: length-normalised log-prob (greedy: the summed log-prob)
    consensus: float | None = None  # agreement with similar train images' captions; None: not reranked


class CaptionChooser:
    """A decoder (``models``, ``vocab``), the decoding settings, and the train images its beam is
    reranked with (``neighbours``; needed only when ``decoding.consensus.neighbours`` > 0)."""

    def __init__(self, models: StepModels, vocab: Vocabulary, decoding: DecodingSettings,
                 neighbours: Neighbours | None = None):
        self.models, self.vocab, self.decoding = models, vocab, decoding
        self.scorer = None
        if decoding.consensus.neighbours:
            if neighbours is None:
                raise ValueError("decoding.consensus.neighbours > 0 needs the train images' neighbours file "
                                 "(models/neighbours.npz)")
            self.scorer = ConsensusScorer(neighbours, decoding.consensus)

    def choose(self, features: np.ndarray, beam_size: int | None = None,
               progress: bool = False) -> list[list[Candidate]]:
        """Each image's candidate captions, best first (``beam_size`` overrides the settings' own,
        e.g. a request's; 1 = greedy)."""
        d = self.decoding if beam_size is None else self.decoding.with_beam(beam_size)
        if d.beam_size == 1:
            found = greedy(self.models, features, self.vocab, no_repeat_ngram=d.no_repeat_ngram,
                           batch_size=d.batch_size, progress="greedy" if progress else None)
            return [[Candidate(c, c.log_prob)] for c in found]
        beams = beam_candidates(self.models, features, self.vocab, beam_size=d.beam_size,
                                length_penalty=d.length_penalty, no_repeat_ngram=d.no_repeat_ngram,
                                batch_size=d.batch_size, progress=f"beam-{d.beam_size}" if progress else None)
        pools = [[Candidate(c, s) for c, s in found] for found in beams]
        if self.scorer is None:
            return pools
        if d.consensus.samples:
            pools = self._with_samples(features, pools, d, progress)
        return self._rank(features, pools, d.consensus.weight)

    def _rank(self, features: np.ndarray, pools: list[list[Candidate]], weight: float) -> list[list[Candidate]]:
        """Each image's candidates with their consensus, best first by consensus + weight x score."""
        texts = [[self.vocab.decode(c.caption.tokens).split() for c in pool] for pool in pools]
        out = []
        for pool, consensus in zip(pools, self.scorer.score(features, texts)):
            total = [c + weight * cand.score for cand, c in zip(pool, consensus)]
            order = sorted(range(len(pool)), key=lambda j: -total[j])  # stable on ties
            out.append([Candidate(pool[j].caption, pool[j].score, float(consensus[j])) for j in order])
        return out

    def _with_samples(self, features: np.ndarray, pools: list[list[Candidate]], d: DecodingSettings,
                      progress: bool) -> list[list[Candidate]]:
        """Each image's beam candidates followed by its sampled captions that are not among them
        yet, scored as beam candidates are."""
        drawn = sample_candidates(self.models, features, self.vocab, samples=d.consensus.samples,
                                  seed=d.consensus.seed, top_k=d.consensus.top_k, length_penalty=d.length_penalty,
                                  no_repeat_ngram=d.no_repeat_ngram, batch_size=d.batch_size,
                                  progress=f"{d.consensus.samples} samples" if progress else None)
        out = []
        for pool, extra in zip(pools, drawn):
            seen = {tuple(c.caption.tokens) for c in pool}
            widened = list(pool)
            for caption, normalised in extra:
                if tuple(caption.tokens) not in seen:
                    seen.add(tuple(caption.tokens))
                    widened.append(Candidate(caption, normalised))
            out.append(widened)
        return out
