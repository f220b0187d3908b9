"""Corrections as a dataset: what the ``feedback`` stage writes to ``data/feedback/``.

The folder has the Flickr8k layout the project reads everywhere (``Images/``, the token file,
the three split lists), so ``validate`` checks corrections with the very rules Flickr8k captions
go through. Photos are named by their sha256 (the store's key); a photo goes to the feedback
test split when a stable hash of it falls below ``feedback.test_share`` (the same photo always
lands on the same side, whoever corrects it and how often), to the train split otherwise. The
output depends only on the corrections not taken back, never on when it was written: an
unchanged store exports byte for byte the same folder, so DVC runs nothing after it.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

from pipeline import paths
from pipeline.feedback.store import FeedbackStore

log = logging.getLogger("pipeline.feedback")
_SPACES = re.compile(r"\s+")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def held_out(sha256: str, test_share: float) -> bool:
    """Whether a photo belongs to the feedback test set (its sha256's first 8 bytes as a fraction)."""
    return int(sha256[:16], 16) / 2**64 < test_share


def photo_name(sha256: str, data: bytes) -> str:
    """``<sha256>.<its format's suffix>``; ``.bin`` for bytes no image reader knows (validate then
    quarantines the caption with the image's reason)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            suffix = _SUFFIXES.get(img.format or "", ".bin")
    except Exception:  # any undecodable upload: named, exported, rejected by validate with a reason
        suffix = ".bin"
    return sha256 + suffix


def one_line(text: str) -> str:
    """A correction on one line of the token file (tabs and line breaks become spaces)."""
    return _SPACES.sub(" ", text).strip()


def export(store: FeedbackStore, out: Path, test_share: float) -> dict:
    """Write every correction not taken back into ``out`` (an empty folder); returns counts, and
    ``missing_photos``: the corrections left out because the store holds no photo for them."""
    images = out / paths.IMAGES_SUBDIR
    images.mkdir(parents=True)
    names: dict[str, str] = {}
    per_photo: dict[str, list[str]] = {}
    missing: list[dict] = []  # corrections whose photo the store does not hold
    for row in store.corrections():
        sha = row["image_sha256"] or ""
        if sha not in names:
            data = store.image(sha) if _SHA256.match(sha) else None
            if data is None:  # never through the app: a database edited by hand is reported, not followed
                log.warning("feedback %s: no stored photo %r; left out of the export", row["id"], sha[:80])
                missing.append({"feedback_id": row["id"], "image": sha[:80], "caption_raw": row["correction"]})
                continue
            names[sha] = photo_name(sha, data)
            (images / names[sha]).write_bytes(data)
        per_photo.setdefault(names[sha], []).append(one_line(row["correction"]))
    lines = [f"{name}#{i}\t{text}\n" for name in sorted(per_photo) for i, text in enumerate(per_photo[name])]
    (out / paths.TOKEN_FILE).write_text("".join(lines), encoding="utf-8")
    split = {name: "test" if held_out(name.split(".")[0], test_share) else "train" for name in per_photo}
    for side in ("train", "dev", "test"):
        (out / paths.SPLIT_FILES[side]).write_text(
            "".join(f"{n}\n" for n in sorted(per_photo) if split[n] == side), encoding="utf-8")
    return {"corrections": len(lines), "photos": len(per_photo),
            "test_photos": sum(1 for s in split.values() if s == "test"), "missing_photos": missing}
