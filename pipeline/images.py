"""Image decoding shared by validation, feature extraction and serving.

PIL rather than tf.image: it honours EXIF orientation (phone photos), converts CMYK,
greyscale, palette and alpha images to RGB, and its JPEG ``draft`` mode decodes large
photos at a reduced DCT scale, which is much faster than a full decode followed by resize.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | Path | bytes


class ImageError(ValueError):
    """An image that is missing, empty or cannot be decoded."""


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty image data (0 bytes)")
        return Image.open(io.BytesIO(source))
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"empty image file (0 bytes): {path}")
    return Image.open(path)


def load_rgb(source: ImageSource, size: int) -> np.ndarray:
    """Decode an image to a (size, size, 3) uint8 RGB array (no aspect preservation, like
    keras ``load_img(target_size=...)``). Raises ImageError with the reason."""
    try:
        with _open(source) as img:
            img.draft("RGB", (size, size))  # JPEG only: decode at the smallest scale >= size
            img = ImageOps.exif_transpose(img)
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"cannot decode image: {err}") from None


def check_image(path: Path) -> str:
    """'ok', or the reason the image at ``path`` is unusable (missing, empty, corrupt)."""
    try:
        with _open(path) as img:
            img.load()  # a full decode: verify() misses truncated JPEG data
        return "ok"
    except ImageError as err:
        msg = str(err)
        if msg.startswith("image file not found"):
            return "missing image file"
        if msg.startswith("empty image"):
            return "empty image file"
        return f"corrupt image: {msg}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return f"corrupt image: {err}"
