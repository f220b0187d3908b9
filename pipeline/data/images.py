"""Image decoding shared by validation, feature extraction and serving: the one decoder.

PIL rather than tf.image: it honours EXIF orientation (phone photos), converts CMYK,
greyscale, palette and alpha images to RGB, and its JPEG ``draft`` mode decodes large
photos at a reduced DCT scale, which is much faster than a full decode followed by resize.

Size limit: every caller passes ``max_pixels`` (``validate.max_image_pixels`` for datasets);
an image above it is an ``ImageError`` ("image too large") read from the header alone, before
any pixel is decoded. PIL's own DecompressionBombWarning/Error is switched off here because
this check replaces it: a large but legitimate photo below the limit decodes silently.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | Path | bytes

Image.MAX_IMAGE_PIXELS = None  # replaced by the explicit max_pixels check below

# check_image's statuses: "ok" or one of these categories (the detail is returned apart, so
# reject reasons stay a small fixed set and never embed a path).
MISSING, EMPTY, CORRUPT, TOO_LARGE = ("missing image file", "empty image file", "corrupt image",
                                      "image too large")


class ImageError(ValueError):
    """An image that is missing, empty, too large or cannot be decoded; ``category`` is one
    of MISSING, EMPTY, CORRUPT, TOO_LARGE."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category
        self.detail = detail


def _open(source: ImageSource, max_pixels: int | None) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError(EMPTY, "0 bytes of image data")
        img = _identify(io.BytesIO(source), "the image data")
    else:
        path = Path(source)
        if path.is_dir():
            raise ImageError(MISSING, f"{path} is a directory, not an image file")
        if not path.is_file():
            raise ImageError(MISSING, f"{path} not found")
        if path.stat().st_size == 0:
            raise ImageError(EMPTY, f"{path} is 0 bytes")
        img = _identify(path, str(path))
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageError(TOO_LARGE, f"{width}x{height} = {width * height:,} pixels, above the "
                                    f"limit of {max_pixels:,}")
    return img


def _identify(fp, shown: str) -> Image.Image:
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        # PIL's own message embeds a BytesIO repr; say what it means instead.
        raise ImageError(CORRUPT, f"cannot decode {shown}: not an image in a format PIL reads "
                                  "(JPEG, PNG, ...)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(CORRUPT, str(err)) from None


def load_rgb(source: ImageSource, size: int, max_pixels: int | None) -> np.ndarray:
    """Decode an image to a (size, size, 3) uint8 RGB array (no aspect preservation, like
    keras ``load_img(target_size=...)``). Raises ImageError with the reason."""
    with _open(source, max_pixels) as img:
        try:
            img.draft("RGB", (size, size))  # JPEG only: decode at the smallest scale >= size
            img = ImageOps.exif_transpose(img)
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageError(CORRUPT, f"cannot decode image: {err}") from None


def check_image(path: Path, max_pixels: int | None) -> tuple[str, str]:
    """('ok', '') or (category, detail) for the image at ``path`` (a full decode: PIL's
    ``verify()`` misses truncated JPEG data)."""
    try:
        with _open(path, max_pixels) as img:
            img.load()
        return "ok", ""
    except ImageError as err:
        return err.category, err.detail
    except (OSError, ValueError, SyntaxError) as err:
        return CORRUPT, str(err)
