import random

from pipeline.data.caption_text import clean_caption
from pipeline.data.synthetic import COLOURS, make_scene


def test_scenes_have_five_distinct_grammatical_captions():
    rng = random.Random(3)
    for _ in range(200):
        image, captions = make_scene(rng, 64)
        assert image.size == (64, 64)
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            assert caption[0].isupper()
            assert " a orange" not in caption.lower() and "a orange" != caption.lower()[:8]
            assert clean_caption(caption)  # never empty after cleaning


def test_captions_name_what_is_drawn():
    rng = random.Random(5)
    image, captions = make_scene(rng, 64)
    background = image.getpixel((0, 0))
    bg_name = next(name for name, rgb in COLOURS.items() if rgb == background)
    assert sum(bg_name in c for c in captions) >= 2
