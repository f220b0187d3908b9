"""The vocabulary: word <-> id, the special tokens, and the teacher-forcing arrays.

Ids 0..3 are <pad> <start> <end> <unk>; "<" never survives ``clean_caption``, so no real word
collides with them. Built from the train split's cleaned captions only.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0..3; "<" never survives cleaning


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id mapping. Ids 0..3 are <pad> <start> <end> <unk>."""

    words: tuple[str, ...]
    max_length: int  # tokens per caption, <start> and <end> excluded
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.words[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError("vocabulary must start with " + " ".join(SPECIAL_TOKENS))
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    @property
    def size(self) -> int:
        return len(self.words)

    @property
    def sequence_length(self) -> int:
        """Length of the teacher-forcing input/target sequences (+1 for <start>/<end>)."""
        return self.max_length + 1

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int, max_length: int) -> "Vocabulary":
        """Vocabulary of cleaned captions: words seen at least ``min_count`` times, most
        frequent first (ties alphabetical, so the result is deterministic)."""
        counts = Counter(w for c in captions for w in c.split())
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        clash = set(kept) & set(SPECIAL_TOKENS)
        if clash:  # cannot happen with clean_caption output; guards hand-made input
            raise ValueError(f"caption words collide with special tokens: {sorted(clash)}")
        return cls(SPECIAL_TOKENS + tuple(kept), max_length)

    def id(self, word: str) -> int:
        return self._index.get(word, self.unk_id)

    def encode(self, caption: str) -> list[int]:
        """Word ids of a cleaned caption, truncated to max_length (no special tokens)."""
        return [self.id(w) for w in caption.split()[: self.max_length]]

    def teacher_forcing_arrays(self, captions: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (n, max_length + 1) int32, post-padded with <pad>=0:
        inputs = <start> w1..wn, targets = w1..wn <end>."""
        captions = list(captions)
        n, length = len(captions), self.sequence_length
        inputs = np.zeros((n, length), dtype=np.int32)
        targets = np.zeros((n, length), dtype=np.int32)
        for row, caption in enumerate(captions):
            ids = self.encode(caption)
            inputs[row, : len(ids) + 1] = [self.start_id, *ids]
            targets[row, : len(ids) + 1] = [*ids, self.end_id]
        return inputs, targets

    def decode(self, ids: Iterable[int]) -> str:
        """Words of an id sequence, stopping at <end>, skipping <pad>/<start>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.words[i])
        return " ".join(words)

    def to_json(self) -> dict:
        return {"words": list(self.words), "max_length": self.max_length,
                "special_tokens": list(SPECIAL_TOKENS)}

    def to_text(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(tuple(data["words"]), int(data["max_length"]))
