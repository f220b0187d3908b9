import keras
import numpy as np
import pandas as pd
import pytest

from pipeline.captioning.cider import CiderD
from pipeline.captioning.consensus import ConsensusReranker, Neighbours, ranked_candidates
from pipeline.captioning.decoder import DecoderConfig, StepModels, build_decoder
from pipeline.captioning.decoding import Caption, beam_candidates
from pipeline.captioning.vocabulary import Vocabulary

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
    reranker = ConsensusReranker(neighbours, k=2, weight=0.0)
    near = reranker.nearest(np.array([[5, 0.3, 0.1], [0, 0.1, 1]], dtype=np.float32))
    assert near.tolist() == [[2, 3], [0, 1]]  # dogs for the dog; beach, then bike (0.1) for the beach


def test_consensus_is_cider_d_against_all_the_neighbours_captions(neighbours):
    caption = "a dog running on the grass".split()
    one = ConsensusReranker(neighbours, k=1, weight=0.0)
    two = ConsensusReranker(neighbours, k=2, weight=0.0)
    new = FEATURES[4:5]
    per_image = CiderD(neighbours.references).score([caption, caption], [2, 3])
    assert one.consensus(new, [[caption]])[0][0] == pytest.approx(per_image[0])
    # all 5 captions of the two dog images count the same: dog1 has 3, dog2 has 2
    assert two.consensus(new, [[caption]])[0][0] == pytest.approx((3 * per_image[0] + 2 * per_image[1]) / 5)


def test_sharpness_lets_the_closer_neighbours_count_more(neighbours):
    caption = "a brown dog running in a field".split()
    new = FEATURES[4:5]
    per_image = CiderD(neighbours.references).score([caption, caption], [2, 3])  # dog1 (nearer), dog2
    unit = new[0] / np.linalg.norm(new[0])
    gap = unit @ neighbours.features[3] - unit @ neighbours.features[2]  # dog2's similarity - dog1's, < 0
    sharp = ConsensusReranker(neighbours, k=2, weight=0.0, sharpness=20.0)
    weights = np.array([3, 2 * np.exp(20.0 * gap)])  # each image's references x its weight
    assert sharp.consensus(new, [[caption]])[0][0] == pytest.approx(weights @ per_image / weights.sum())
    # very sharp: only the nearest image counts (a photo like dog1: dog2 is 0.01 less similar)
    nearest_only = ConsensusReranker(neighbours, k=2, weight=0.0, sharpness=1000.0)
    assert nearest_only.consensus(FEATURES[2:3], [[caption]])[0][0] == pytest.approx(per_image[0], rel=1e-3)
    # 0: every reference alike, as without sharpness
    alike = ConsensusReranker(neighbours, k=2, weight=0.0, sharpness=0.0)
    assert alike.consensus(new, [[caption]])[0][0] == pytest.approx((3 * per_image[0] + 2 * per_image[1]) / 5)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="sharpness"):
            ConsensusReranker(neighbours, k=2, weight=0.0, sharpness=bad)


def test_rerank_prefers_the_candidate_the_neighbours_agree_with(neighbours):
    vocab = Vocabulary.build(["a dog runs on the grass", "a man rides a bike"], 1, 10)
    likely = Caption(ids(vocab, "a man rides a bike"), -2.0)  # what the decoder likes best
    agreed = Caption(ids(vocab, "a dog runs on the grass"), -4.0)
    candidates = [[(likely, -0.6), (agreed, -1.0)]]
    new = FEATURES[4:5]
    ranked = ConsensusReranker(neighbours, k=2, weight=0.5).rerank(new, candidates, vocab)[0]
    assert [c for c, _, _ in ranked] == [agreed, likely]
    assert ranked[0][1] == -1.0 and ranked[0][2] > ranked[1][2]  # decoder score kept, consensus added
    # a large weight on the decoder's score keeps its order
    ranked = ConsensusReranker(neighbours, k=2, weight=100.0).rerank(new, candidates, vocab)[0]
    assert [c for c, _, _ in ranked] == [likely, agreed]


def ids(vocab: Vocabulary, text: str) -> list[int]:
    return [vocab.words.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def decoder_and_vocab():
    """A random-init decoder over the test captions' words, 3-d features like FEATURES."""
    keras.utils.set_random_seed(3)
    vocab = Vocabulary.build(DOGS + BIKES + BEACH, 1, 8)
    decoder = build_decoder(DecoderConfig(vocab.size, 3, vocab.sequence_length, 8, 16, 0.0), FEATURES)
    return StepModels.from_decoder(decoder), vocab


def test_samples_widen_the_beam_with_new_captions_only(neighbours, decoder_and_vocab):
    models, vocab = decoder_and_vocab
    beam = beam_candidates(models, FEATURES, vocab, beam_size=2, no_repeat_ngram=2)
    reranker = ConsensusReranker(neighbours, k=2, weight=0.25, samples=6, top_k=0, seed=1)
    pool = reranker.widen(models, FEATURES, vocab, beam, length_penalty=0.7, no_repeat_ngram=2)
    for found, widened in zip(beam, pool):
        assert widened[:len(found)] == found  # the beam's candidates first, untouched
        texts = [tuple(c.tokens) for c, _ in widened]
        assert len(texts) == len(set(texts))  # no caption twice
        assert len(found) < len(widened) <= len(found) + 6
        for caption, normalised in widened:
            assert normalised == pytest.approx(caption.log_prob / (len(caption.tokens) + 1) ** 0.7)
    again = reranker.widen(models, FEATURES, vocab, beam, length_penalty=0.7, no_repeat_ngram=2)
    assert again == pool  # seeded: the same images get the same candidates
    assert ConsensusReranker(neighbours, k=2, weight=0.25).widen(
        models, FEATURES, vocab, beam, length_penalty=0.7, no_repeat_ngram=2) is beam  # no samples: the beam


def test_ranked_candidates_pick_by_consensus_among_beam_and_samples(neighbours, decoder_and_vocab):
    models, vocab = decoder_and_vocab
    kwargs = dict(beam_size=2, length_penalty=0.7, no_repeat_ngram=2)
    plain = ranked_candidates(models, FEATURES, vocab, **kwargs)
    assert plain == beam_candidates(models, FEATURES, vocab, **kwargs)
    reranker = ConsensusReranker(neighbours, k=2, weight=0.0, samples=20, top_k=0, seed=0)
    ranked = ranked_candidates(models, FEATURES, vocab, **kwargs, reranker=reranker)
    for image, found in enumerate(ranked):
        consensus = [c for _, _, c in found]
        assert consensus == sorted(consensus, reverse=True)  # weight 0: by consensus alone
        assert found[0][2] >= max(c for _, _, c in reranker.rerank(FEATURES[image:image + 1], [plain[image]], vocab)[0])
    # a random decoder rarely ranks first what the neighbours wrote; 20 samples give consensus a choice
    assert any(found[0][0] not in [c for c, _ in beam] for found, beam in zip(ranked, plain))


def test_settings_of_a_model_registered_before_sampling_mean_no_samples_and_no_contrast(neighbours):
    old = ConsensusReranker.from_settings(neighbours, {"consensus_neighbours": 3, "consensus_weight": 0.5})
    assert (old.k, old.weight, old.samples, old.contrast, old.sharpness) == (3, 0.5, 0, 0.0, 0.0)
    new = ConsensusReranker.from_settings(neighbours, {"consensus_neighbours": 3, "consensus_weight": 0.5,
                                                       "consensus_samples": 4, "consensus_top_k": 5,
                                                       "consensus_contrast": 2.0, "consensus_sharpness": 8.0})
    assert (new.samples, new.top_k, new.contrast, new.sharpness) == (4, 5, 2.0, 8.0)


def test_more_neighbours_than_train_images_uses_them_all(neighbours):
    reranker = ConsensusReranker(neighbours, k=50, weight=0.0)
    assert reranker.nearest(FEATURES[4:5]).shape == (1, 4)
    with pytest.raises(ValueError, match="at least 1"):
        ConsensusReranker(neighbours, k=0, weight=0.0)


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
    with pytest.raises(ValueError, match="another backbone"):
        ConsensusReranker(neighbours, k=2, weight=0.0).nearest(np.ones((1, 5), np.float32))


def test_consensus_in_chunks_equals_one_image_at_a_time(neighbours, monkeypatch):
    import pipeline.captioning.consensus

    monkeypatch.setattr(pipeline.captioning.consensus, "CHUNK_IMAGES", 2)  # 5 images: chunks of 2, 2, 1
    reranker = ConsensusReranker(neighbours, k=2, weight=0.0)
    captions = [[c.split() for c in texts] for texts in (DOGS, BIKES, BEACH[:1], [], DOGS[1:])]
    together = reranker.consensus(FEATURES, captions)
    for image, found in enumerate(captions):
        alone = reranker.consensus(FEATURES[image:image + 1], [found])[0]
        np.testing.assert_allclose(together[image], alone, rtol=1e-12)
    assert len(together[3]) == 0 and together[0].max() > 0


def test_contrast_demotes_the_caption_that_also_fits_the_other_photos(neighbours):
    vocab = Vocabulary.build(DOGS + BIKES + BEACH, 1, 10)
    common = Caption(ids(vocab, "a dog runs on the grass"), -1.0)  # shares "a", "on", "the" with all
    particular = Caption(ids(vocab, "the dog is running fast"), -1.0)
    candidates = [[(common, -0.5), (particular, -0.5)]]
    new = FEATURES[4:5]
    plain = ConsensusReranker(neighbours, k=2, weight=0.0).rerank(new, candidates, vocab)[0]
    assert [c for c, _, _ in plain] == [common, particular]
    contrasted = ConsensusReranker(neighbours, k=2, weight=0.0, contrast=3.0)
    ranked = contrasted.rerank(new, candidates, vocab)[0]
    assert [c for c, _, _ in ranked] == [particular, common]
    texts = [["the", "dog", "is", "running", "fast"]]
    near, far = contrasted.consensus(new, [texts])[0][0], contrasted.generic([texts])[0][0]
    assert ranked[0][2] == pytest.approx(near - 3.0 * far)  # the consensus shown is net of the contrast


def test_generic_images_are_the_same_random_train_images_for_every_photo(neighbours, monkeypatch):
    import pipeline.captioning.consensus

    texts = [[c.split() for c in DOGS], [c.split() for c in BIKES]]
    every = ConsensusReranker(neighbours, k=4, weight=0.0)  # 4 train images, under GENERIC_IMAGES
    assert every.generic_rows.tolist() == [0, 1, 2, 3]
    for got, want in zip(every.generic(texts), every.consensus(FEATURES[:2], texts)):  # k = 4: all of them
        np.testing.assert_allclose(got, want, rtol=1e-12)
    monkeypatch.setattr(pipeline.captioning.consensus, "GENERIC_IMAGES", 2)
    two = ConsensusReranker(neighbours, k=2, weight=0.0, seed=5)
    assert len(set(two.generic_rows)) == 2
    assert two.generic_rows.tolist() == ConsensusReranker(neighbours, k=3, weight=1.0, seed=5).generic_rows.tolist()
