"""Image decoding shared by validation, feature extraction and serving: the one decoder.

PIL rather than tf.image: it honours EXIF orientation (phone photos), converts CMYK,
greyscale, palette and alpha images to RGB, and its JPEG ``draft`` mode decodes large
photos at a reduced DCT scale, which is much faster than a full decode followed by resize.

Pixel formats: every mode Pillow opens becomes faithful 8-bit RGB, or an ``ImageError``
(``UNSUPPORTED``) that says why. Pillow's own ``convert("RGB")`` clips 16-bit greyscale (mode
``I;16``, what a 16-bit PNG opens as) to white and drops alpha, so ``to_rgb8`` does it itself:
16-bit values are scaled by 255/65535; 32-bit integers (``I``) are read as 16-bit when they fit
0..65535 (what 16-bit PNGs and TIFFs hold) and refused otherwise; floats (``F``) are scaled from
0..1 and refused outside it; transparency (``LA``, ``RGBA``, ``PA``, ``P`` with a transparent colour)
is laid over white, as a web page shows it; CMYK, palette, 1-bit and YCbCr go through Pillow.

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
UNSUPPORTED = "unsupported image"  # a pixel format with no faithful 8-bit RGB rendering
INVALID_NAME = "invalid image name"  # never looked up: a path or '..' where a file name belongs


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


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("LA", "La", "RGBA", "RGBa", "PA")


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` (loaded, any mode) as 8-bit RGB; ImageError(UNSUPPORTED) when it has no faithful
    8-bit rendering (see the module docstring)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(UNSUPPORTED, f"32-bit integer pixels from {values.min()} to {values.max()}: no "
                                          "8-bit rendering is implied; save it as 8 or 16 bits per channel")
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ImageError(UNSUPPORTED, "floating-point pixels outside 0..1: no 8-bit rendering is implied; "
                                          "save it as an 8-bit image")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:  # e.g. a mode Pillow cannot convert
        raise ImageError(UNSUPPORTED, f"pixel mode {mode}: {err}") from None


def load_rgb(source: ImageSource, size: int, max_pixels: int | None) -> np.ndarray:
    """Decode an image to a (size, size, 3) uint8 RGB array (no aspect preservation, like
    keras ``load_img(target_size=...)``). Raises ImageError with the reason."""
    with _open(source, max_pixels) as img:
        try:
            img.draft("RGB", (size, size))  # JPEG only: decode at the smallest scale >= size
            img = ImageOps.exif_transpose(img)
            img = to_rgb8(img).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageError(CORRUPT, f"cannot decode image: {err}") from None


def thumbnail_jpeg(source: ImageSource, size: int, max_pixels: int | None) -> bytes:
    """A JPEG at most ``size`` pixels on a side, upright, of an image at most ``max_pixels`` big
    (ImageError otherwise, read from the header: a thumbnail endpoint is a decoder too)."""
    with _open(source, max_pixels) as img:
        try:
            img.draft("RGB", (size, size))
            img = to_rgb8(ImageOps.exif_transpose(img))
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            return buf.getvalue()
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageError(CORRUPT, f"cannot decode image: {err}") from None


def check_image(path: Path, max_pixels: int | None) -> tuple[str, str]:
    """('ok', '') or (category, detail) for the image at ``path`` (a full decode: PIL's
    ``verify()`` misses truncated JPEG data)."""
    try:
        with _open(path, max_pixels) as img:
            img.load()
            to_rgb8(img)  # what features will do with it: an unsupported mode is refused here
        return "ok", ""
    except ImageError as err:
        return err.category, err.detail
    except (OSError, ValueError, SyntaxError) as err:
        return CORRUPT, str(err)


def prefetched(items: list, source_of, size: int, max_pixels: int | None, batch_size: int, workers: int = 2):
    """Yield ``(batch, pixels)`` for ``items`` ``batch_size`` at a time, where ``pixels[i]`` is the
    (size, size, 3) array of ``source_of(batch[i])`` or the ``ImageError``/``OSError`` that kept it
    from one. The next batch is read and decoded on ``workers`` threads while the caller works on
    this one (PIL releases the GIL while it decodes), so photos reach the CNN at its own pace."""
    from concurrent.futures import ThreadPoolExecutor

    def load(item):
        try:
            return load_rgb(source_of(item), size, max_pixels)
        except (ImageError, OSError, ValueError) as err:
            return err

    batches = [items[lo:lo + batch_size] for lo in range(0, len(items), batch_size)]
    if not batches:
        return
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode") as pool:
        pending = [pool.submit(load, item) for item in batches[0]]
        for i, batch in enumerate(batches):
            current = pending
            if i + 1 < len(batches):
                pending = [pool.submit(load, item) for item in batches[i + 1]]
            yield batch, [f.result() for f in current]
