"""A picture of where the decoder looked: the photo with its caption, then one small copy of
the photo per word with that word's attention laid over it as a heat map (a strip, PNG).

Pillow only: the map (rows x columns of the CNN's grid) is upsampled bilinearly to the photo's
size, scaled so each word's strongest region is fully coloured (the weights of 49 or 100
regions are small numbers: on an absolute scale every map would look alike), and blended in
red-to-yellow over a dimmed copy of the photo, so the looked-at part stays readable.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 160  # pixels: the longer side of each word's copy of the photo
GAP = 6
TEXT = 22  # pixels of text under each tile
PER_ROW = 6  # words per row of the strip


def heat_overlay(photo: Image.Image, weights: np.ndarray, grid_hw: tuple[int, int]) -> Image.Image:
    """``photo`` (RGB) with the attention ``weights`` (rows x columns values, row-major, summing
    to 1) laid over it."""
    rows, cols = grid_hw
    if weights.size != rows * cols:
        raise ValueError(f"an attention map of {weights.size} values does not fit a {rows}x{cols} grid")
    peak = float(weights.max())
    level = (weights.reshape(rows, cols) / peak if peak > 0 else np.zeros((rows, cols))).astype(np.float32)
    heat = np.asarray(Image.fromarray(level, mode="F").resize(photo.size, Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)[..., None]
    base = np.asarray(photo.convert("RGB"), dtype=np.float32)
    colour = np.concatenate([np.full_like(heat, 255.0), 255.0 * heat, np.zeros_like(heat)], axis=-1)  # red -> yellow
    alpha = 0.65 * heat
    blended = (1 - alpha) * base * (0.45 + 0.55 * heat) + alpha * colour
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def render_strip(photo: Image.Image, words: list[str], maps: np.ndarray, grid_hw: tuple[int, int],
                 caption: str) -> Image.Image:
    """The strip for one photo: a header with the photo and ``caption`` (the caption as people
    read it, confidence words included), then a tile per word of ``words`` with ``maps[k]``
    (one row per word; a further row for <end> is not drawn)."""
    if len(maps) < len(words):
        raise ValueError(f"{len(words)} words but {len(maps)} attention maps")
    font = ImageFont.load_default(size=14)
    thumb = photo.convert("RGB")
    thumb.thumbnail((TILE, TILE))
    w, h = thumb.size
    per_row = max(1, min(PER_ROW, len(words)))
    lines = -(-len(words) // per_row)
    width = max(per_row * (w + GAP) + GAP, 2 * TILE + 3 * GAP)
    header = TILE + GAP
    strip = Image.new("RGB", (width, header + lines * (h + TEXT + GAP) + GAP), "white")
    draw = ImageDraw.Draw(strip)
    big = photo.convert("RGB")
    big.thumbnail((TILE, TILE - 2 * GAP))
    strip.paste(big, (GAP, GAP))
    draw.multiline_text((big.size[0] + 2 * GAP, GAP), _wrapped(caption, draw, font, width - big.size[0] - 3 * GAP),
                        fill="black", font=font, spacing=4)
    for k, word in enumerate(words):
        x = GAP + (k % per_row) * (w + GAP)
        y = header + (k // per_row) * (h + TEXT + GAP)
        strip.paste(heat_overlay(thumb, np.asarray(maps[k]), grid_hw), (x, y))
        draw.text((x + w // 2, y + h + 3), word, fill="black", font=font, anchor="ma")
    return strip


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def square_grid(regions: int) -> tuple[int, int]:
    """(rows, columns) of a decoder's ``regions``: the CNNs here make square maps of square
    inputs (MobileNetV2 7x7, Xception 10x10). ValueError for a count that is no square."""
    side = math.isqrt(regions)
    if side * side != regions:
        raise ValueError(f"{regions} regions do not make a square grid")
    return side, side


def draw_strips(decoder, vocab, rows: np.ndarray, captions: list[str], photos: list, headers: list[str],
                max_pixels: int | None) -> list[Image.Image]:
    """One strip per photo (a path or bytes): the decoder's attention while it reads each of
    ``captions`` (text of its vocabulary's words) on that photo's image ``rows``, under a header
    line from ``headers``. ValueError for a decoder without attention."""
    from pipeline.captioning.decoder import attention_maps, grid_of, members_of
    from pipeline.data.images import thumbnail_jpeg

    grid = grid_of(members_of(decoder)[0])
    if grid is None:
        raise ValueError("this decoder reads one pooled vector per photo: it has no attention to draw")
    tokens = [vocab.encode(caption) for caption in captions]
    maps = attention_maps(decoder, rows, tokens, vocab.start_id, vocab.sequence_length)
    out = []
    for caption, weights, photo, header in zip(captions, maps, photos, headers):
        with Image.open(io.BytesIO(thumbnail_jpeg(photo, 480, max_pixels))) as image:
            out.append(render_strip(image.convert("RGB"), caption.split(), weights, square_grid(grid[0]), header))
    return out


def _wrapped(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    """``text`` broken into lines no wider than ``width`` pixels (its own line breaks kept)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return "\n".join(lines)
