import json
import logging

import pandas as pd

from pipeline import paths


def test_eval_json_has_every_metric_for_every_mode(in_trained):
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    for mode in ("greedy", "beam", "baseline"):
        assert set(metrics[mode]) >= {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}
        assert all(0 <= v <= 10 for v in metrics[mode].values())


def test_baseline_gives_every_image_the_same_caption_and_real_model_does_better(in_trained):
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    assert metrics["beam"]["cider"] > metrics["baseline"]["cider"]


def test_caption_health_is_in_the_metrics_and_the_gallery(in_trained):
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    table = pd.read_parquet(paths.TEST_CAPTIONS)
    for mode in ("greedy", "beam"):
        health = metrics["caption_health"][mode]
        assert health["images"] == len(table) == metrics["n_images"]
        assert health["distinct_captions"] == table[mode].nunique()
        assert health["distinct_words"] == len({w for c in table[mode] for w in c.split()})
    beam = metrics["caption_health"]["beam"]
    assert f"{beam['distinct_captions']} distinct captions for {beam['images']} images" in paths.GALLERY.read_text()


def test_test_captions_and_gallery(in_trained):
    table = pd.read_parquet(paths.TEST_CAPTIONS)
    captions = pd.read_parquet(paths.CAPTIONS)
    assert set(table["image"]) == set(captions.loc[captions["split"] == "test", "image"])
    assert all(len(r) == 5 for r in table["references"])
    page = paths.GALLERY.read_text()
    assert page.count("data:image/jpeg;base64,") == min(4, len(table))
    assert table["beam"].iloc[0] in page
    # each test caption with the confidence the served model gives it (calibrated on dev), also in the gallery
    assert table["confidence"].between(0, 1).all() and table["abstained"].dtype == bool
    assert "confidence" in page or "not sure what this shows" in page
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    assert {"ece", "precision_at_default", "coverage_at_default", "abstained"} <= set(metrics["confidence"])


def test_evaluation_shows_its_progress(in_trained, capsys, caplog):
    """Decoding and scoring a real test split takes minutes: the stage says what it is doing."""
    from pipeline.captioning.decoder import StepModels, load_decoder
    from pipeline.captioning.vocabulary import Vocabulary
    from pipeline.data.features_file import read_features
    from pipeline.stages import evaluate

    _, settings = in_trained
    caplog.set_level(logging.INFO, logger="pipeline.evaluate")
    images, features, _ = read_features(paths.features_file("xception"))
    evaluate.evaluate_model(StepModels.from_decoder(load_decoder(paths.DECODER)),
                            Vocabulary.load(paths.VOCAB), pd.read_parquet(paths.CAPTIONS), images,
                            features, settings.decoding)
    bars = capsys.readouterr().err
    assert "greedy" in bars and f"beam-{settings.decoding.beam_size}" in bars and "img/s" in bars
    assert "decoding" in caplog.text and "scoring beam captions" in caplog.text


def test_beam_captions_are_chosen_by_consensus_among_beam_and_sampled_candidates(in_trained):
    """With consensus on (the default), each beam caption is one of the decoder's beam
    candidates or of its seeded samples, the one that agrees best with the captions of similar
    train images (+ weight x the decoder's score)."""
    from pipeline.captioning.consensus import ConsensusScorer, Neighbours
    from pipeline.captioning.decoder import decoding_models, load_decoder
    from pipeline.captioning.decoding import beam_candidates, sample_candidates
    from pipeline.captioning.vocabulary import Vocabulary
    from pipeline.data.features_file import read_features, row_index, rows_of

    _, settings = in_trained
    d = settings.decoding
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    assert d.consensus.neighbours > 0 and metrics["consensus_neighbours"] == d.consensus.neighbours
    assert d.consensus.samples > 0 and metrics["consensus_samples"] == d.consensus.samples
    assert metrics["consensus_contrast"] == d.consensus.contrast
    table = pd.read_parquet(paths.TEST_CAPTIONS)
    vocab = Vocabulary.load(paths.VOCAB)
    images, features, _ = read_features(paths.features_file("xception"))
    feats = features[rows_of(row_index(images), table["image"])]
    models = decoding_models(load_decoder(paths.DECODER))
    common = dict(length_penalty=d.length_penalty, no_repeat_ngram=d.no_repeat_ngram, batch_size=d.batch_size)
    beam = beam_candidates(models, feats, vocab, beam_size=d.beam_size, **common)
    drawn = sample_candidates(models, feats, vocab, samples=d.consensus.samples, seed=d.consensus.seed,
                              top_k=d.consensus.top_k, **common)
    scorer = ConsensusScorer(Neighbours.load(paths.NEIGHBOURS), d.consensus)
    for i, (caption, found, extra) in enumerate(zip(table["beam"], beam, drawn)):
        pool = {vocab.decode(c.tokens): s for c, s in found + extra}  # a sample may repeat a beam caption
        assert caption in pool
        texts = list(pool)
        consensus = scorer.score(feats[i:i + 1], [[t.split() for t in texts]])[0]
        total = {t: c + d.consensus.weight * pool[t] for t, c in zip(texts, consensus)}
        assert total[caption] == max(total.values())
