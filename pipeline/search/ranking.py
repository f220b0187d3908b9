"""Ranking indexed photos for a text query, or for a photo ("more like this").

* ``likelihood``: the caption model's own probability of the query as a caption of each photo,
  log p(query | image), from one teacher-forced pass of the decoder over the query's words for
  every photo at once (its inference halves: encode the photos' features, then one step per
  word, so the word classifier runs only at the query's real positions). The image-blind prior
  p(query) is the same for every photo, so it does not change the order.
* ``bm25``: full-text ranking over the captions and candidates stored in the index (SQLite FTS5's
  BM25, or PostgreSQL's ts_rank_cd).
* ``blend``: reciprocal rank fusion of the two (each photo scores 1/(60 + its rank) in each).

Which one is the default was measured on real Flickr8k dev (``benchmarks/bench_search.py``,
``reports/benchmarks.md``). Likelihood scores every photo; past ``LIKELIHOOD_SHORTLIST`` photos
it scores only a shortlist: the photos full-text search finds, and the ones whose CNN features
are closest to those of the best of them (what that costs in recall is in the same report).

Whatever the ranking, a photo whose own alt text or description, as a person wrote it into the
photo (``captioner index`` reads it), holds every word of the query comes first: a person who
looked at the photo is surer than the model. Such hits are marked as found in a person's words.

Query words the model does not know are left out of the likelihood, with a note; a query of
none but unknown words falls back to full-text search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.captioning.confidence import said_of
from pipeline.captioning.consensus import unit_rows
from pipeline.data.caption_text import clean_caption
from pipeline.search.photo_index import Photo, PhotoIndex

RANKINGS = ("likelihood", "bm25", "blend")
DEFAULT_RANKING = "likelihood"
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009)
LIKELIHOOD_SHORTLIST = 2000  # above this many photos, likelihood scores a shortlist only
LIKELIHOOD_BATCH = 4096  # photos scored together (rows x vocabulary floats per step)


@dataclass
class Hit:
    photo: Photo
    score: float
    by_person: bool = False  # found in what a person wrote into the photo, not in the model's caption


@dataclass
class SearchResult:
    query: str
    ranking: str
    hits: list[Hit]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"query": self.query, "ranking": self.ranking, "notes": self.notes,
                "results": [{"path": h.photo.path, "score": round(h.score, 4), "caption": h.photo.caption,
                             **said_of({"caption": h.photo.caption, "confidence": h.photo.confidence,
                                        "abstained": h.photo.abstained, "reason": h.photo.reason}),
                             "person": person_written(h.photo), "found_in_person_text": h.by_person}
                            for h in self.hits]}


def person_written(photo: Photo) -> dict | None:
    """What a person wrote into the photo's own metadata, marked as theirs (None when nothing)."""
    if not photo.person_text:
        return None
    return {"field": photo.person_field, "text": photo.person_text, "written_by": "a person"}


def query_ids(query: str, vocab) -> tuple[list[int], list[str], list[str]]:
    """(word ids the model knows, in order; the unknown words; the words dropped past the
    longest caption the model writes) of a query, cleaned as every caption is."""
    words = clean_caption(query).split()
    cut = words[vocab.max_length:]
    words = words[:vocab.max_length]
    known = [vocab.id(w) for w in words if vocab.id(w) != vocab.unk_id]
    return known, sorted({w for w in words if vocab.id(w) == vocab.unk_id}), cut


def log_likelihood(models, vocab, features: np.ndarray, ids: list[int], batch: int = LIKELIHOOD_BATCH) -> np.ndarray:
    """log p(ids, <end> | image) for every row of ``features``: teacher-forced through the
    decoder's inference halves, one step per word (no padding, no wasted positions)."""
    out = np.zeros(len(features))
    targets = [*ids, vocab.end_id]
    for lo in range(0, len(features), batch):
        feats = features[lo:lo + batch]
        state = models.encode(feats)
        token = np.full((len(feats), 1), vocab.start_id, dtype=np.int32)
        total = np.zeros(len(feats))
        for target in targets:
            log_probs, state = models.step(token, state)
            total += log_probs[:, target]
            token = np.full((len(feats), 1), target, dtype=np.int32)
        out[lo:lo + batch] = total
    return out


def rank_of(scores: dict[int, float]) -> dict[int, int]:
    return {pid: r for r, pid in enumerate(sorted(scores, key=lambda p: -scores[p]), start=1)}


def fuse(*rankings: dict[int, float]) -> dict[int, float]:
    """Reciprocal rank fusion: each photo sums 1 / (RRF_K + its rank) over the rankings it is in."""
    fused: dict[int, float] = {}
    for scores in rankings:
        for pid, rank in rank_of(scores).items():
            fused[pid] = fused.get(pid, 0.0) + 1.0 / (RRF_K + rank)
    return fused


class Searcher:
    """Search over one index with one model: the photos' CNN features are read once, and again
    only when the index changed (``refresh``), so a query costs only its own work. ``model`` (a
    loaded CaptionModel) may be swapped for a new champion between queries."""

    def __init__(self, store: PhotoIndex, model=None):
        self.store, self.model = store, model
        self._version = None
        self.refresh()

    def refresh(self) -> None:
        """Read the photos' features again if the index changed since they were read. Photos are
        compared with one another by the part every stored row begins with, the pooled vector
        (an attention model's rows add the grid after it); the caption model reads whole rows."""
        version = self.store.version()
        if version == self._version:
            return
        self.ids, self.rows, self.backbones = self.store.embeddings()
        width = min((len(v) for v in self.rows), default=0)
        self.features = (np.stack([v[:width] for v in self.rows]) if self.rows
                         else np.zeros((0, 0), np.float32))
        self._version = version

    @property
    def scorable(self) -> np.ndarray:
        """Rows embedded by the model's own CNN (the only ones its likelihood is meaningful for)."""
        digest = getattr(self.model, "backbone_digest", None)
        return np.asarray([i for i, b in enumerate(self.backbones) if b == digest], dtype=int)

    def search(self, query: str, limit: int, ranking: str = DEFAULT_RANKING,
               shortlist: int = LIKELIHOOD_SHORTLIST, min_confidence: float | None = None) -> SearchResult:
        """The ``limit`` best photos for ``query`` (likelihood and blend need the model; only
        photos embedded by its CNN are scored by it); with ``min_confidence``, only photos whose
        caption is at least that sure (abstained ones never)."""
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
        result = SearchResult(query, ranking, [])
        if not clean_caption(query):
            result.notes.append("the query has no words to search for")
            return result
        text = dict(self.store.text_search(query, max(limit, shortlist)))
        if ranking == "bm25" or self.model is None:
            if ranking != "bm25":
                result.notes.append("no caption model loaded: ranked by full-text search")
                result.ranking = "bm25"
            scores = text
        else:
            ids, unknown, cut = query_ids(query, self.model.vocab)
            if unknown:
                result.notes.append(f"words the model does not know, left out: {', '.join(unknown)}")
            if cut:
                result.notes.append(f"the query was cut to its first {self.model.vocab.max_length} words")
            if not ids:
                result.notes.append("no word of the query is known to the model: ranked by full-text search")
                result.ranking, scores = "bm25", text
            else:
                liked = self.likelihood(ids, text, shortlist, result.notes)
                scores = liked if ranking == "likelihood" else fuse(liked, text)
        # a photo whose own description, as a person wrote it, holds every word of the query
        # comes first: a person's words about the photo beat any model's
        person = self.store.person_search(query)
        for pid in person:
            scores.setdefault(pid, text.get(pid, 0.0))
        if person:
            result.notes.append(f"{len(person)} photos whose own alt text or description (written by a person) "
                                "holds every word come first")
        if min_confidence is not None:
            sure = self.store.confident_ids(min_confidence)
            result.notes.append(f"only photos captioned with confidence >= {min_confidence:g} (or described by "
                                f"a person): {sum(p in sure or p in person for p in scores)} of {len(scores)} matches")
            scores = {p: s for p, s in scores.items() if p in sure or p in person}
        order = sorted(scores, key=lambda p: (p not in person, -scores[p]))[:limit]
        photos = self.store.by_ids(order)
        result.hits = [Hit(photos[pid], float(scores[pid]), pid in person) for pid in order if pid in photos]
        return result

    def likelihood(self, ids: list[int], text: dict[int, float], shortlist: int, notes: list[str]) -> dict[int, float]:
        """log p(query | photo) for the photos the model's CNN embedded: all of them, or past
        ``shortlist`` photos those the text matches and their nearest neighbours by CNN features."""
        rows = self.scorable
        if len(rows) < len(self.ids):
            notes.append(f"{len(self.ids) - len(rows)} photos were indexed with another CNN and are not scored "
                         "by the caption model: run captioner index again")
        if len(rows) > shortlist:
            rows = shortlist_rows(self.ids, self.features, rows, text, shortlist)
        if not len(rows):
            return {}
        # the model's own CNN embedded these rows for it: one width, the width its decoder reads
        found = log_likelihood(self.model.chooser.models, self.model.vocab, np.stack([self.rows[r] for r in rows]), ids)
        return {self.ids[r]: float(s) for r, s in zip(rows, found)}

    def more_like(self, vector: np.ndarray, limit: int, exclude: int | None = None) -> list[Hit]:
        """Photos ranked by the cosine of their CNN features to ``vector``."""
        if not self.ids:
            return []
        vector = np.asarray(vector, np.float32)[:self.features.shape[1]]  # compared by the pooled part
        sims = unit_rows(self.features) @ unit_rows(vector[None])[0]
        order = [i for i in np.argsort(-sims) if self.ids[i] != exclude][:limit]
        photos = self.store.by_ids(self.ids[i] for i in order)
        return [Hit(photos[self.ids[i]], float(sims[i])) for i in order]


def shortlist_rows(all_ids: list[int], features: np.ndarray, rows: np.ndarray, text: dict[int, float],
                   size: int) -> np.ndarray:
    """At most ``size`` of ``rows``: the full-text hits first (best first), then the photos whose
    CNN features are most like those of the best few hits (what the text cannot see). With no
    hit at all there is nothing to start from: every row."""
    position = {pid: i for i, pid in enumerate(all_ids)}
    allowed = set(rows.tolist())
    hits = [position[pid] for pid in sorted(text, key=lambda p: -text[p]) if position.get(pid) in allowed]
    if not hits:
        return rows
    chosen = dict.fromkeys(hits[:size // 2])
    prototype = unit_rows(features[hits[:10]]).mean(axis=0)
    for r in rows[np.argsort(-(unit_rows(features[rows]) @ prototype))]:
        if len(chosen) >= size:
            break
        chosen.setdefault(int(r))
    return np.asarray(list(chosen), dtype=int)
