"""Parsers for the Flickr8k files: the token file, Kaggle's captions.txt, the split lists.

Parsers never drop a line: each returns one row per caption line read, with ``error`` set
(and the line number) where the line is malformed, so validation can quarantine it.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pandas as pd

from pipeline import paths

SPLITS = ("train", "dev", "test")
COLUMNS = ["line", "image", "caption_idx", "caption_raw", "error"]

# The official token file lists image 2258277193_586949ec62.jpg as "...jpg.1#0..4".
_NUMBERED_SUFFIX = re.compile(r"^(?P<name>.+\.jpe?g)\.\d+$", re.IGNORECASE)
_INVALID_UTF8 = re.compile("[\udc80-\udcff]")


def normalise_image_name(name: str) -> str:
    """Strip the ``.jpg.1`` quirk and surrounding whitespace."""
    name = name.strip()
    match = _NUMBERED_SUFFIX.match(name)
    return match.group("name") if match else name


def _read_text(path: Path) -> str:
    # surrogateescape keeps undecodable bytes visible per line instead of failing the file.
    return path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")


def _utf8_error(*fields: str) -> str | None:
    return "invalid UTF-8" if any(_INVALID_UTF8.search(f) for f in fields) else None


def _printable(text: str) -> str:
    """Replace undecodable bytes with U+FFFD so the text can be stored as UTF-8."""
    return _INVALID_UTF8.sub("\ufffd", text)


def parse_token_file(path: Path) -> pd.DataFrame:
    """``<image>#<n>\\t<caption>`` lines -> rows (COLUMNS). Blank lines are skipped."""
    rows = []
    for line_no, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        error = _utf8_error(line)
        key, tab, caption = line.partition("\t")
        image, hash_, idx = key.rpartition("#") if "#" in key else (key, "", "")
        caption_idx = int(idx) if idx.strip().isdigit() else -1
        if not tab:
            error = error or "malformed line: no tab between key and caption"
        elif not hash_ or caption_idx < 0:
            error = error or "malformed key: expected <image>#<n> before the tab"
        rows.append((line_no, normalise_image_name(_printable(image if hash_ else key)),
                     caption_idx, _printable(caption.strip()), error))
    return pd.DataFrame(rows, columns=COLUMNS)


def parse_kaggle_captions(path: Path) -> pd.DataFrame:
    """Kaggle ``captions.txt`` (CSV with header ``image,caption``; quoted fields may hold
    commas and ``""``-escaped quotes) -> rows (COLUMNS); caption_idx counts captions per
    image in order.

    One physical line is one record: each line is parsed on its own, strictly, so a stray
    quote (``img.jpg,"A dog runs``) makes that line a malformed row instead of letting the CSV
    reader swallow the following lines into one field. Captions never span lines in Flickr8k.
    """
    lines = _read_text(path).split("\n")
    header = next(csv.reader([lines[0].rstrip("\r")]), None)
    if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
        raise ValueError(f"{path}: expected a CSV header 'image,caption', got {header!r}")
    rows, seen = [], {}
    for line_no, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        error = _utf8_error(line)
        try:
            fields = next(csv.reader([line], strict=True))
        except csv.Error as err:
            error = error or f"malformed CSV row: {err} (unbalanced or stray quote)"
            fields = line.split(",", 1)
        if len(fields) != 2:
            error = error or f"malformed CSV row: expected 2 fields, got {len(fields)}"
        image, caption = fields[0], ",".join(fields[1:])
        image = normalise_image_name(_printable(image))
        idx = seen.get(image, 0)
        seen[image] = idx + 1
        rows.append((line_no, image, idx, _printable(caption.strip()), error))
    return pd.DataFrame(rows, columns=COLUMNS)


def count_caption_lines(path: Path) -> int:
    """Non-blank lines of a caption file, counted without any parser (the CSV header
    excluded): what every parser's row count must equal."""
    lines = [ln for ln in _read_text(path).split("\n") if ln.strip()]
    return len(lines) - (1 if path.name == paths.KAGGLE_CAPTIONS else 0)


def read_captions(dataset_dir: Path) -> tuple[pd.DataFrame, Path]:
    """Parse whichever caption file the dataset has (official token file preferred)."""
    token_file = dataset_dir / paths.TOKEN_FILE
    if token_file.is_file():
        return parse_token_file(token_file), token_file
    kaggle = dataset_dir / paths.KAGGLE_CAPTIONS
    if kaggle.is_file():
        return parse_kaggle_captions(kaggle), kaggle
    raise FileNotFoundError(
        f"no caption file in {dataset_dir}: expected {paths.TOKEN_FILE} or {paths.KAGGLE_CAPTIONS}")


def read_split_list(path: Path) -> list[str]:
    """Image names of one split list (one per line; blank lines ignored)."""
    return [normalise_image_name(n) for n in _read_text(path).splitlines() if n.strip()]


def read_splits(dataset_dir: Path) -> pd.DataFrame:
    """All split lists as rows (image, split); a missing list file is an error."""
    frames = []
    for split in SPLITS:
        path = dataset_dir / paths.SPLIT_FILES[split]
        if not path.is_file():
            raise FileNotFoundError(f"split list missing: {path}")
        frames.append(pd.DataFrame({"image": read_split_list(path), "split": split}))
    return pd.concat(frames, ignore_index=True)


def stable_split(image: str, ratios: dict[str, float]) -> str:
    """Deterministic split from the image name (sha1), stable across machines and runs."""
    bucket = int.from_bytes(hashlib.sha1(image.encode("utf-8")).digest()[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += ratios[split]
        if bucket < edge:
            return split
    return SPLITS[-1]


def write_split_lists(dataset_dir: Path, images: list[str], ratios: dict[str, float]) -> None:
    """Write the three Flickr_8k.*Images.txt lists for ``images`` using stable_split."""
    groups: dict[str, list[str]] = {s: [] for s in SPLITS}
    for image in sorted(set(images)):
        groups[stable_split(image, ratios)].append(image)
    for split, names in groups.items():
        (dataset_dir / paths.SPLIT_FILES[split]).write_text(
            "".join(f"{n}\n" for n in names), encoding="utf-8")
