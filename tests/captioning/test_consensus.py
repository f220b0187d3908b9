import numpy as np
import pandas as pd
import pytest

from pipeline.captioning.cider import CiderD
from pipeline.captioning.consensus import ConsensusScorer, Neighbours
from pipeline.config import ConsensusSettings

DOGS = ["a dog runs on the grass", "a brown dog running in a field", "the dog is running fast"]
BIKES = ["a man rides a bike on a road", "a cyclist on a road", "a man on a bicycle"]
BEACH = ["two children play in the water", "kids splash at the beach", "children playing in the sea"]


def captions_table() -> pd.DataFrame:
    rows = [(image, split, text) for image, split, texts in (
        ("dog1.jpg", "train", DOGS), ("bike.jpg", "train", BIKES), ("beach.jpg", "train", BEACH),
        ("dog2.jpg", "train", DOGS[:2]), ("new.jpg", "test", ["a dog"])) for text in texts]
    return pd.DataFrame(rows, columns=["image", "split", "caption"])


IMAGES = ["bike.jpg", "beach.jpg", "dog1.jpg", "dog2.jpg", "new.jpg"]  # feature rows
FEATURES = np.array([[0, 1, 0], [0, 0, 1], [1, 0.1, 0], [1, 0, 0.1], [5, 0.3, 0.1]], dtype=np.float32)


def consensus(neighbours: int, weight: float = 0.0, samples: int = 0, top_k: int = 0, contrast: float = 0.0,
              sharpness: float = 0.0, seed: int = 0) -> ConsensusSettings:
    return ConsensusSettings(neighbours=neighbours, weight=weight, samples=samples, top_k=top_k, contrast=contrast,
                             sharpness=sharpness, seed=seed)


def scorer(neighbours: Neighbours, k: int, **kwargs) -> ConsensusScorer:
    return ConsensusScorer(neighbours, consensus(k, **kwargs))


@pytest.fixture
def neighbours() -> Neighbours:
    return Neighbours.from_split(captions_table(), "train", IMAGES, FEATURES)


def test_neighbours_are_the_split_images_with_their_captions(neighbours):
    assert len(neighbours.features) == 4  # train images only, in name order
    assert [len(refs) for refs in neighbours.references] == [3, 3, 3, 2]  # beach, bike, dog1, dog2
    np.testing.assert_allclose(np.linalg.norm(neighbours.features, axis=1), 1.0, rtol=1e-6)


def test_saved_neighbours_load_the_same_without_pickle(neighbours, tmp_path):
    path = tmp_path / "neighbours.npz"
    neighbours.save(path)
    loaded = Neighbours.load(path)
    assert loaded.references == neighbours.references
    np.testing.assert_allclose(loaded.features, neighbours.features, atol=1e-3)  # stored as float16


def test_a_file_whose_captions_and_features_disagree_is_refused(tmp_path):
    path = tmp_path / "neighbours.npz"
    np.savez(path, features=np.ones((2, 3), np.float16), captions=np.array(["a dog"]), owner=np.array([5]))
    with pytest.raises(ValueError, match="do not match"):
        Neighbours.load(path)
    np.savez(path, features=np.ones((2, 3), np.float16), captions=np.array(["a dog"]), owner=np.array([0]))
    with pytest.raises(ValueError, match="without captions"):
        Neighbours.load(path)


def test_nearest_train_images_come_most_similar_first(neighbours):
    near, _ = scorer(neighbours, 2)._neighbourhood(np.array([[5, 0.3, 0.1], [0, 0.1, 1]], dtype=np.float32))
    assert near.tolist() == [[2, 3], [0, 1]]  # dogs for the dog; beach, then bike (0.1) for the beach


def test_consensus_is_cider_d_against_all_the_neighbours_captions(neighbours):
    caption = "a dog running on the grass".split()
    one = scorer(neighbours, 1)
    two = scorer(neighbours, 2)
    new = FEATURES[4:5]
    per_image = CiderD(neighbours.references).score([caption, caption], [2, 3])
    assert one.score(new, [[caption]])[0][0] == pytest.approx(per_image[0])
    # all 5 captions of the two dog images count the same: dog1 has 3, dog2 has 2
    assert two.score(new, [[caption]])[0][0] == pytest.approx((3 * per_image[0] + 2 * per_image[1]) / 5)


def test_sharpness_lets_the_closer_neighbours_count_more(neighbours):
    caption = "a brown dog running in a field".split()
    new = FEATURES[4:5]
    per_image = CiderD(neighbours.references).score([caption, caption], [2, 3])  # dog1 (nearer), dog2
    unit = new[0] / np.linalg.norm(new[0])
    gap = unit @ neighbours.features[3] - unit @ neighbours.features[2]  # dog2's similarity - dog1's, < 0
    sharp = scorer(neighbours, 2, sharpness=20.0)
    weights = np.array([3, 2 * np.exp(20.0 * gap)])  # each image's references x its weight
    assert sharp.score(new, [[caption]])[0][0] == pytest.approx(weights @ per_image / weights.sum())
    # very sharp: only the nearest image counts (a photo like dog1: dog2 is 0.01 less similar)
    nearest_only = scorer(neighbours, 2, sharpness=1000.0)
    assert nearest_only.score(FEATURES[2:3], [[caption]])[0][0] == pytest.approx(per_image[0], rel=1e-3)
    # 0: every reference alike, as without sharpness
    alike = scorer(neighbours, 2, sharpness=0.0)
    assert alike.score(new, [[caption]])[0][0] == pytest.approx((3 * per_image[0] + 2 * per_image[1]) / 5)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="sharpness"):
            scorer(neighbours, 2, sharpness=bad)


def test_more_neighbours_than_train_images_uses_them_all(neighbours):
    assert scorer(neighbours, 50)._neighbourhood(FEATURES[4:5])[0].shape == (1, 4)
    with pytest.raises(ValueError, match="at least 1"):
        scorer(neighbours, 0)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a zip at all"])
def test_a_truncated_or_foreign_file_is_a_clear_error(tmp_path, content, neighbours):
    path = tmp_path / "neighbours.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a neighbours file"):
        Neighbours.load(path)
    neighbours.save(path)
    path.write_bytes(path.read_bytes()[:200])  # cut short
    with pytest.raises(ValueError, match="neighbours.npz"):
        Neighbours.load(path)


def test_features_of_another_size_are_refused(neighbours):
    with pytest.raises(ValueError, match="another backbone"):  # narrower than the train images' 3-d vectors
        scorer(neighbours, 2).score(np.ones((1, 2), np.float32), [[["a", "dog"]]])


def test_a_row_with_a_grid_after_its_pooled_vector_is_compared_by_the_pooled_vector(neighbours):
    """An attention decoder's rows carry the regions after the pooled vector: the neighbours
    are still chosen by the pooled vector, whatever the regions hold."""
    pooled = FEATURES[4:5]
    with_grid = np.concatenate([pooled, np.full((1, 8), -7.0, np.float32)], axis=1)
    caption = [[["a", "dog", "runs"]]]
    assert scorer(neighbours, 2).score(with_grid, caption)[0] == scorer(neighbours, 2).score(pooled, caption)[0]


def test_consensus_in_chunks_equals_one_image_at_a_time(neighbours, monkeypatch):
    import pipeline.captioning.consensus

    monkeypatch.setattr(pipeline.captioning.consensus, "CHUNK_IMAGES", 2)  # 5 images: chunks of 2, 2, 1
    reranker = scorer(neighbours, 2)
    captions = [[c.split() for c in texts] for texts in (DOGS, BIKES, BEACH[:1], [], DOGS[1:])]
    together = reranker.score(FEATURES, captions)
    for image, found in enumerate(captions):
        alone = reranker.score(FEATURES[image:image + 1], [found])[0]
        np.testing.assert_allclose(together[image], alone, rtol=1e-12)
    assert len(together[3]) == 0 and together[0].max() > 0


def test_contrast_demotes_the_caption_that_also_fits_the_other_photos(neighbours):
    common = "a dog runs on the grass".split()  # shares "a", "on", "the" with all
    particular = "the dog is running fast".split()
    new = FEATURES[4:5]
    plain = scorer(neighbours, 2).score(new, [[common, particular]])[0]
    assert plain[0] > plain[1]
    contrasted = scorer(neighbours, 2, contrast=3.0)
    net = contrasted.score(new, [[common, particular]])[0]
    assert net[1] > net[0]
    rows, weights = contrasted._generic(1)
    far = contrasted._agreement([[particular]], (rows, weights))[0][0][0]
    assert net[1] == pytest.approx(plain[1] - 3.0 * far)  # net of the contrast


def test_generic_images_are_the_same_random_train_images_for_every_photo(neighbours, monkeypatch):
    import pipeline.captioning.consensus

    texts = [[c.split() for c in DOGS], [c.split() for c in BIKES]]
    every = scorer(neighbours, 4)  # 4 train images, under GENERIC_IMAGES
    assert every.generic_rows.tolist() == [0, 1, 2, 3]
    generic = every._agreement(texts, every._generic(len(texts)))[0]
    for got, want in zip(generic, every.score(FEATURES[:2], texts)):  # k = 4: all of them
        np.testing.assert_allclose(got, want, rtol=1e-12)
    monkeypatch.setattr(pipeline.captioning.consensus, "GENERIC_IMAGES", 2)
    two = scorer(neighbours, 2, seed=5)
    assert len(set(two.generic_rows)) == 2
    assert two.generic_rows.tolist() == scorer(neighbours, 3, seed=5).generic_rows.tolist()
