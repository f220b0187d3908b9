import numpy as np
import pytest
from PIL import Image

from pipeline.captioning.attention_strip import heat_overlay, render_strip


def grey(size=(120, 90)):
    return Image.new("RGB", size, (100, 100, 100))


def test_the_heat_sits_on_the_region_looked_at():
    """All weight on the top-left region of a 2x3 grid: the top-left of the photo turns
    red-yellow, the bottom-right stays the photo's own (dimmed) grey."""
    weights = np.zeros(6)
    weights[0] = 1.0
    out = np.asarray(heat_overlay(grey(), weights, (2, 3))).astype(int)
    top_left, bottom_right = out[5, 5], out[-5, -5]
    assert top_left[0] > 180 and top_left[0] - top_left[2] > 120  # warm
    assert abs(bottom_right[0] - bottom_right[2]) < 5 and bottom_right[0] < 100  # grey, dimmed


def test_a_strip_has_a_tile_per_word_and_refuses_maps_that_do_not_fit():
    words = "a dog runs on the grass".split()
    maps = np.random.default_rng(0).dirichlet(np.ones(4), size=len(words) + 1)
    strip = render_strip(grey(), words, maps, (2, 2), "a dog runs on the grass (fairly sure)")
    assert strip.mode == "RGB" and strip.width >= 6 * 120 and strip.height > 2 * 90
    with pytest.raises(ValueError, match="6 words but 3 attention maps"):
        render_strip(grey(), words, maps[:3], (2, 2), "x")
    with pytest.raises(ValueError, match=r"4 values does not fit a 3x3 grid"):
        render_strip(grey(), words, maps, (3, 3), "x")
