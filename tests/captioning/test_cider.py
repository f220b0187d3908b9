import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from pipeline.captioning.cider import CiderD


def coco_cider(references, captions) -> np.ndarray:
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(c)] for i, c in enumerate(captions)}
    return Cider().compute_score(gts, res)[1]


REFERENCES = [
    [s.split() for s in ("a dog runs on the grass", "a brown dog running in a field", "the dog is running")],
    [s.split() for s in ("a man in a red shirt rides a bike", "a cyclist on a road")],
    [s.split() for s in ("two children play in the water", "kids splash at the beach",
                         "two young children in the sea", "children playing", "a boy and a girl swim")],
    [s.split() for s in ("a black cat sleeps on a sofa",)],
]


@pytest.mark.parametrize("captions", [
    ["a dog runs on the grass".split(), "a man rides a bike".split(),
     "two children play in the water".split(), "a cat".split()],  # copies, partial overlap, short
    ["dog".split(), "a a a a a a".split(), "zebra giraffe unseen words".split(), [] ],  # one word, repeats, OOV, empty
    ["a dog and a cat and a man on a bike in the water at the beach".split()] * 4,  # long: length penalty
])
def test_scores_equal_pycocoevalcap_cider_d(captions):
    """With document frequencies from the scored images' own references, the vectorised score is
    pycocoevalcap's CIDEr (which is CIDEr-D: clipped counts, Gaussian length penalty)."""
    mine = CiderD(REFERENCES).score(captions, range(len(REFERENCES)))
    np.testing.assert_allclose(mine, coco_cider(REFERENCES, captions), rtol=1e-12, atol=1e-12)


def random_corpus(seed: int, images: int, captions: int, longest: int) -> tuple[list, list]:
    """(references: 1-5 random captions per image, captions of 0..longest-1 random words)."""
    rng = np.random.default_rng(seed)
    words = "a dog cat runs on the grass man in red shirt jumps over water two".split()
    references = [[list(rng.choice(words, rng.integers(1, 12))) for _ in range(rng.integers(1, 6))]
                  for _ in range(images)]
    return references, [list(rng.choice(words, rng.integers(0, longest))) for _ in range(captions)]


def test_random_captions_match_pycocoevalcap():
    references, captions = random_corpus(0, 60, 60, 14)
    captions[5] = references[5][0]
    np.testing.assert_allclose(CiderD(references).score(captions, range(60)),
                               coco_cider(references, captions), rtol=1e-10, atol=1e-12)


def test_a_caption_is_scored_against_its_own_image_with_fixed_document_frequencies():
    """Rewards do not depend on the batch: a caption scores the same alone, among others, and
    several times over (document frequencies come from the corpus, not the batch)."""
    cider = CiderD(REFERENCES)
    caption = "a dog runs on the grass".split()
    alone = cider.score([caption], [0])[0]
    in_batch = cider.score([["cat"], caption, caption], [3, 0, 0])
    assert alone > 1.0
    np.testing.assert_allclose(in_batch[1:], [alone, alone], rtol=1e-12)
    assert cider.score([caption], [1])[0] < alone / 5  # the wrong image's references


def test_pairs_score_each_caption_against_several_images_as_score_does():
    references, captions = random_corpus(1, 20, 7, 10)
    rng = np.random.default_rng(1)
    cider = CiderD(references)
    caption_of = rng.integers(0, 7, size=50)
    images = rng.integers(0, 20, size=50)
    np.testing.assert_allclose(cider.score_pairs(captions, caption_of, images),
                               cider.score([captions[c] for c in caption_of], images), rtol=1e-12)
    assert cider.score_pairs(captions, [], []).shape == (0,)
    with pytest.raises(ValueError, match="caption indices"):
        cider.score_pairs(captions, [0, 1], [3])


def test_an_image_without_references_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        CiderD([[["a", "dog"]], []])
