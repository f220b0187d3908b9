"""The one way a caption is chosen: greedy, the beam, or the beam and seeded samples ordered by
consensus + weight x the decoder's score."""

import keras
import pytest

from pipeline.captioning.caption_choice import Candidate, CaptionChooser
from pipeline.captioning.consensus import ConsensusScorer
from pipeline.captioning.decoder import DecoderConfig, StepModels, build_decoder
from pipeline.captioning.decoding import Caption, beam_candidates, greedy
from pipeline.captioning.vocabulary import Vocabulary
from pipeline.config import DecodingSettings
from tests.captioning.test_consensus import BEACH, BIKES, DOGS, FEATURES, consensus, neighbours  # noqa: F401


def decoding(beam_size: int = 2, **consensus_settings) -> DecodingSettings:
    return DecodingSettings(beam_size=beam_size, length_penalty=0.7, no_repeat_ngram=2, batch_size=64,
                            consensus=consensus(**{"neighbours": 0, **consensus_settings}))


@pytest.fixture(scope="module")
def decoder_and_vocab():
    """A random-init decoder over the test captions' words, 3-d features like FEATURES."""
    keras.utils.set_random_seed(3)
    vocab = Vocabulary.build(DOGS + BIKES + BEACH, 1, 8)
    decoder = build_decoder(DecoderConfig(vocab.size, 3, vocab.sequence_length, 8, 16, 0.0), FEATURES)
    return StepModels.from_decoder(decoder), vocab


def test_beam_size_one_is_the_greedy_caption_alone(decoder_and_vocab):
    models, vocab = decoder_and_vocab
    chosen = CaptionChooser(models, vocab, decoding()).choose(FEATURES, beam_size=1)
    expected = greedy(models, FEATURES, vocab, no_repeat_ngram=2, batch_size=64)
    assert [[c.caption for c in found] for found in chosen] == [[c] for c in expected]


def test_without_consensus_the_beam_keeps_the_decoders_order(decoder_and_vocab):
    models, vocab = decoder_and_vocab
    chosen = CaptionChooser(models, vocab, decoding()).choose(FEATURES)
    beam = beam_candidates(models, FEATURES, vocab, beam_size=2, length_penalty=0.7, no_repeat_ngram=2,
                           batch_size=64)
    assert chosen == [[Candidate(c, s) for c, s in found] for found in beam]


def test_samples_widen_the_beam_with_new_captions_only(neighbours, decoder_and_vocab):  # noqa: F811
    models, vocab = decoder_and_vocab
    chooser = CaptionChooser(models, vocab, decoding(neighbours=2, weight=0.25, samples=6, seed=1), neighbours)
    beam = CaptionChooser(models, vocab, decoding()).choose(FEATURES)
    pools = chooser._with_samples(FEATURES, beam, chooser.decoding, progress=False)
    for found, widened in zip(beam, pools):
        assert widened[:len(found)] == found  # the beam's candidates first, untouched
        texts = [tuple(c.caption.tokens) for c in widened]
        assert len(texts) == len(set(texts))  # no caption twice
        assert len(found) < len(widened) <= len(found) + 6
        for candidate in widened:
            caption = candidate.caption
            assert candidate.score == pytest.approx(caption.log_prob / (len(caption.tokens) + 1) ** 0.7)
    assert chooser._with_samples(FEATURES, beam, chooser.decoding, progress=False) == pools  # seeded


def test_consensus_picks_among_the_beam_and_the_samples(neighbours, decoder_and_vocab):  # noqa: F811
    models, vocab = decoder_and_vocab
    plain = CaptionChooser(models, vocab, decoding()).choose(FEATURES)
    chooser = CaptionChooser(models, vocab, decoding(neighbours=2, weight=0.0, samples=20), neighbours)
    ranked = chooser.choose(FEATURES)
    scorer = ConsensusScorer(neighbours, chooser.decoding.consensus)
    for image, found in enumerate(ranked):
        agreed = [c.consensus for c in found]
        assert agreed == sorted(agreed, reverse=True)  # weight 0: by consensus alone
        beam_texts = [[vocab.decode(c.caption.tokens).split() for c in plain[image]]]
        assert found[0].consensus >= max(scorer.score(FEATURES[image:image + 1], beam_texts)[0])
    # a random decoder rarely ranks first what the neighbours wrote; 20 samples give consensus a choice
    assert any(found[0].caption not in [c.caption for c in beam] for found, beam in zip(ranked, plain))


def test_the_weight_trades_consensus_for_the_decoders_score(neighbours):  # noqa: F811
    vocab = Vocabulary.build(["a dog runs on the grass", "a man rides a bike"], 1, 10)
    likely = Caption([vocab.id(w) for w in "a man rides a bike".split()], -2.0)  # the decoder's favourite
    agreed = Caption([vocab.id(w) for w in "a dog runs on the grass".split()], -4.0)  # the neighbours'
    pools = [[Candidate(likely, -0.6), Candidate(agreed, -1.0)]]
    chooser = CaptionChooser(None, vocab, decoding(neighbours=2), neighbours)
    ranked = chooser._rank(FEATURES[4:5], pools, weight=0.5)[0]
    assert [c.caption for c in ranked] == [agreed, likely]
    assert ranked[0].score == -1.0 and ranked[0].consensus > ranked[1].consensus  # score kept, consensus added
    ranked = chooser._rank(FEATURES[4:5], pools, weight=100.0)[0]  # a large weight keeps the decoder's order
    assert [c.caption for c in ranked] == [likely, agreed]


def test_consensus_without_the_neighbours_file_is_a_clear_error(decoder_and_vocab):
    models, vocab = decoder_and_vocab
    with pytest.raises(ValueError, match="neighbours"):
        CaptionChooser(models, vocab, decoding(neighbours=3))
