"""Parsers for the Flickr8k files: the token file, Kaggle's captions.txt, the split lists.

Parsers never drop a line: each returns one row per caption line read, with ``error`` set
(and the line number) where the line is malformed, so validation can quarantine it. Malformed:
no tab or key (token file), a CSV row that does not parse (Kaggle), invalid UTF-8, a NUL byte,
or an image name that is not a plain file name (``/srv/private/secret.jpg``, ``../x.jpg``):
a caption file names files inside the dataset's image folder, never anywhere else.

A file in UTF-16 or UTF-32 is refused as a whole, with the encoding found and the conversion
to make (its byte-order mark, or for UTF-16 without one, the NUL in every other byte, tells).
Every join of a name to the image folder goes through ``image_file``, which refuses the same
names again.
"""

from __future__ import annotations

import codecs
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
# byte-order marks of the encodings a Windows tool may save a caption file in (UTF-32 first:
# its little-endian mark begins with UTF-16's)
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32 LE", "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32 BE", "UTF-32BE"),
         (codecs.BOM_UTF16_LE, "UTF-16 LE", "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16 BE", "UTF-16BE"))
NUL_BYTE = "malformed line: contains a NUL byte"
BAD_NAME = "malformed image name: not a plain file name in the image folder (a path, '..' or empty)"


class CaptionFileError(ValueError):
    """A caption or split file that cannot be read as a whole (wrong encoding, a bad header)."""


def image_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain file name inside an image folder, or None when it is one."""
    if not name or name in (".", ".."):
        return "empty" if not name else f"{name!r} is not a file"
    if "/" in name or "\\" in name:
        return f"{name!r} is a path (absolute or with a folder), not a file name"
    if "\x00" in name:
        return "it contains a NUL byte"
    return None


def image_file(images_dir: Path, name: str) -> Path:
    """``images_dir / name`` for a plain file name; ValueError for any name that could lead
    elsewhere (the one way a stage joins an image name to a folder)."""
    problem = image_name_problem(name)
    if problem:
        raise ValueError(f"refusing image name {name!r}: {problem}")
    return images_dir / name


def normalise_image_name(name: str) -> str:
    """Strip the ``.jpg.1`` quirk and surrounding whitespace."""
    name = name.strip()
    match = _NUMBERED_SUFFIX.match(name)
    return match.group("name") if match else name


def _read_text(path: Path, shown: str | None = None) -> str:
    """The file as text (UTF-8; ``shown`` names it in errors). Undecodable bytes stay visible per
    line (surrogateescape) instead of failing the file; a UTF-16/32 file is a CaptionFileError."""
    data = path.read_bytes()
    name = shown or str(path)
    for bom, label, iconv in _BOMS:
        if data.startswith(bom):
            raise CaptionFileError(
                f"{name} is encoded as {label} (it starts with a {label} byte-order mark); the Flickr8k "
                f"files are UTF-8: convert it first, e.g. iconv -f {iconv} -t UTF-8 {path.name} > {path.name}.utf8")
    head = data[:65536]
    if len(head) >= 64 and head.count(0) > len(head) // 4:  # every other byte: UTF-16 without a mark
        raise CaptionFileError(f"{name} looks like UTF-16 without a byte-order mark ({head.count(0)} of its "
                               f"first {len(head)} bytes are NUL); the Flickr8k files are UTF-8: convert it "
                               f"first, e.g. iconv -f UTF-16LE -t UTF-8 {path.name} > {path.name}.utf8")
    return data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")


def _line_error(line: str, image: str) -> str | None:
    """The malformation every parser checks the same way: bad bytes, a NUL, an unsafe name."""
    if _INVALID_UTF8.search(line):
        return "invalid UTF-8"
    if "\x00" in line:
        return NUL_BYTE
    if image_name_problem(image):
        return BAD_NAME
    return None


def _printable(text: str) -> str:
    """Replace undecodable bytes with U+FFFD so the text can be stored as UTF-8."""
    return _INVALID_UTF8.sub("\ufffd", text)


def parse_token_file(path: Path, shown: str | None = None) -> pd.DataFrame:
    """``<image>#<n>\\t<caption>`` lines -> rows (COLUMNS). Blank lines are skipped."""
    rows = []
    for line_no, line in enumerate(_read_text(path, shown).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        image, hash_, idx = key.rpartition("#") if "#" in key else (key, "", "")
        caption_idx = int(idx) if idx.strip().isdigit() else -1
        name = normalise_image_name(_printable(image if hash_ else key))
        error = None
        if not tab:
            error = "malformed line: no tab between key and caption"
        elif not hash_ or caption_idx < 0:
            error = "malformed key: expected <image>#<n> before the tab"
        error = _line_error(line, name) or error
        rows.append((line_no, name, caption_idx, _printable(caption.strip()), error))
    return pd.DataFrame(rows, columns=COLUMNS)


def parse_kaggle_captions(path: Path, shown: str | None = None) -> pd.DataFrame:
    """Kaggle ``captions.txt`` (CSV with header ``image,caption``; quoted fields may hold
    commas and ``""``-escaped quotes) -> rows (COLUMNS); caption_idx counts captions per
    image in order.

    One physical line is one record: each line is parsed on its own, strictly, so a stray
    quote (``img.jpg,"A dog runs``) makes that line a malformed row instead of letting the CSV
    reader swallow the following lines into one field. Captions never span lines in Flickr8k.
    """
    lines = _read_text(path, shown).split("\n")
    header = next(csv.reader([lines[0].rstrip("\r").replace("\x00", "")]), None)
    if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
        raise CaptionFileError(f"{shown or path}: expected a CSV header 'image,caption', got {header!r}")
    rows, seen = [], {}
    for line_no, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        error = None
        try:
            fields = next(csv.reader([line.replace("\x00", "")], strict=True))
        except csv.Error as err:
            error = f"malformed CSV row: {err} (unbalanced or stray quote)"
            fields = line.split(",", 1)
        if len(fields) != 2:
            error = error or f"malformed CSV row: expected 2 fields, got {len(fields)}"
        image, caption = fields[0], ",".join(fields[1:])
        image = normalise_image_name(_printable(image))
        if "\x00" in line:  # the csv module cannot read a NUL: parsed without it, refused here
            image, caption = image.replace("\x00", ""), caption.replace("\x00", " ")
        error = _line_error(line, image) or error
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
    """Image names of one split list (one per line; blank lines ignored). A name that is not a
    plain file name (or has a NUL or invalid UTF-8) is a CaptionFileError naming its line: split
    lists are short and written by the dataset's makers, so one is a broken file, not a row."""
    names = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        name = normalise_image_name(line)
        problem = ("invalid UTF-8" if _INVALID_UTF8.search(line) else image_name_problem(name))
        if problem:
            raise CaptionFileError(f"{path}, line {line_no}: {_printable(line)!r} is not an image file name "
                                   f"({problem})")
        names.append(name)
    return names


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
    for image in sorted(n for n in set(images) if not image_name_problem(n)):  # the others are malformed rows
        groups[stable_split(image, ratios)].append(image)
    for split, names in groups.items():
        (dataset_dir / paths.SPLIT_FILES[split]).write_text(
            "".join(f"{n}\n" for n in names), encoding="utf-8")
