"""Caption cleaning: the one tokenisation of every caption, reference or generated.

Rules (applied to every caption, train or not):
  1. Unicode NFKD, accents dropped ("café" -> "cafe"), lowercased.
  2. Split into runs of the letters a-z; everything else (punctuation, digits, "'s",
     hyphens) separates tokens: "t-shirt" -> "t shirt", "dog's" -> "dog s".
  3. One-letter tokens are dropped except "a" (so "t", "s" vanish; the article stays).
The result is space-joined. A caption with no token left is rejected by validation.
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"[a-z]+")


def clean_caption(text: str) -> str:
    """Apply the cleaning rules above; returns '' when nothing is left."""
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_text = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    tokens = [t for t in _WORD.findall(ascii_text) if len(t) > 1 or t == "a"]
    return " ".join(tokens)


def references_by_image(captions, split: str) -> tuple[list[str], list[list[list[str]]]]:
    """The images of ``split`` in a captions table (columns image, split, caption), in name
    order, each with its cleaned captions as lists of words."""
    grouped = captions[captions["split"] == split].groupby("image", sort=True)["caption"]
    names = list(grouped.groups)
    return names, [[c.split() for c in grouped.get_group(name)] for name in names]
