"""The embedded offline dataset: simple scenes written in the real Flickr8k file format.

Each image has a background colour and one or two shapes (circle, square, triangle) of a
colour at a position. A random-init Xception's features separate colour, position and
background well and shape only weakly (a linear probe: colour, position and background
100%, shape 57% against 37% chance), so most captions talk about colour,
position and background; shape words still appear, as in any description.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline import paths
from pipeline.data.flickr8k import write_split_lists

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "white": (250, 250, 250), "black": (15, 15, 15),
    "orange": (250, 140, 20), "purple": (140, 50, 170),
}
BACKGROUNDS = ("white", "black", "blue", "green", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # centre of the shape as a fraction of the image size
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
    "bottom": (0.5, 0.75), "middle": (0.5, 0.5),
}
_WHERE = {
    "left": ["on the left", "on the left side", "at the left of the picture"],
    "right": ["on the right", "on the right side", "at the right of the picture"],
    "top": ["at the top", "near the top", "at the top of the picture"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom of the picture"],
    "middle": ["in the middle", "in the centre", "in the middle of the picture"],
}
_ONE_SHAPE = [
    "A {c} {s} {w} on a {bg} background .",
    "There is a {c} {s} {w} .",
    "A {bg} picture with a {c} {s} {w} .",
    "A {c} shape {w} against a {bg} background",
    "The {s} is {c} and the background is {bg} .",
    "A {c} {s} {w} of a plain {bg} image .",
    "A {bg} background with a {c} {s} .",
    "Something {c} {w} .",
]
_TWO_SHAPES = [
    "A {c1} {s1} on the left and a {c2} {s2} on the right .",
    "Two shapes , a {c1} {s1} and a {c2} {s2} , on a {bg} background .",
    "A {bg} picture with a {c1} shape on the left and a {c2} shape on the right .",
    "There is a {c1} {s1} next to a {c2} {s2} .",
    "A {c1} {s1} and a {c2} {s2} against a {bg} background",
    "Two {c1} and {c2} shapes on a {bg} background .",
    "On a {bg} background , a {c1} {s1} sits left of a {c2} {s2} .",
]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, centre, radius) -> None:
    x, y = centre
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif shape == "square":
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=fill)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)


def make_scene(rng: random.Random, size: int) -> tuple[Image.Image, list[str]]:
    """One image and its five different captions."""
    bg = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (size, size), COLOURS[bg])
    draw = ImageDraw.Draw(image)
    n_shapes = 1 if rng.random() < 0.7 else 2
    colours = rng.sample([c for c in COLOURS if c != bg], n_shapes)
    shapes = [rng.choice(SHAPES) for _ in range(n_shapes)]
    radius = size * rng.uniform(0.14, 0.2)
    if n_shapes == 1:
        where = rng.choice(list(POSITIONS))
        centres = [POSITIONS[where]]
        templates = rng.sample(_ONE_SHAPE, 5)
        fill = {"c": colours[0], "s": shapes[0], "bg": bg}
        captions = [t.format(w=rng.choice(_WHERE[where]), **fill) for t in templates]
    else:
        centres = [POSITIONS["left"], POSITIONS["right"]]
        radius *= 0.8
        templates = rng.sample(_TWO_SHAPES, 5)
        fill = {"c1": colours[0], "s1": shapes[0], "c2": colours[1], "s2": shapes[1], "bg": bg}
        captions = [t.format(**fill) for t in templates]
    for shape, colour, (fx, fy) in zip(shapes, colours, centres):
        jitter = size * 0.04
        centre = (fx * size + rng.uniform(-jitter, jitter), fy * size + rng.uniform(-jitter, jitter))
        _draw_shape(draw, shape, colour, centre, radius)
    return image, [_sentence(c) for c in captions]


def _sentence(text: str) -> str:
    """'a orange' -> 'an orange'; capitalised like the Flickr8k captions."""
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)
    return text[0].upper() + text[1:]


def write_dataset(out_dir: Path, n_images: int, image_size: int, seed: int,
                  split: dict[str, float]) -> None:
    """Write ``Images/*.jpg``, ``Flickr8k.token.txt`` and the three split lists."""
    rng = random.Random(seed)
    images_dir = out_dir / paths.IMAGES_SUBDIR
    images_dir.mkdir(parents=True, exist_ok=True)
    lines, names = [], []
    for i in range(n_images):
        name = f"{1000000000 + i * 7919}_{rng.getrandbits(40):010x}.jpg"
        image, captions = make_scene(rng, image_size)
        image.save(images_dir / name, format="JPEG", quality=92)
        names.append(name)
        lines.extend(f"{name}#{k}\t{caption}\n" for k, caption in enumerate(captions))
    (out_dir / paths.TOKEN_FILE).write_text("".join(lines), encoding="utf-8")
    write_split_lists(out_dir, names, split)
