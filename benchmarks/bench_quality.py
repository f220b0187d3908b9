"""Caption quality on real Flickr8k: train on the train split, score on dev.

Runs the project's own code on an embeddings Parquet + token file + split lists (default:
``../shared/flickr8k_real/``, real captions with real ImageNet embeddings; the test split is
held out and never read here):

* the folder reader ``captioner real-model`` uses (``pipeline/data/real_folder.py``: the token file
  parser and caption cleaning of ``validate``, the same token-count bounds from ``validate.*``);
* ``train.train_decoder`` with the ``train.*`` params (dev drives early stopping, as in the stage);
* ``evaluate.evaluate_model`` with the ``decoding.*`` params, scoring the dev split: BLEU-1..4,
  METEOR, ROUGE-L, CIDEr for greedy, beam and the image-blind baseline, plus caption health;
  beam reranked by consensus with the train images when ``decoding.consensus.neighbours`` > 0
  (with ``decoding.consensus.samples`` sampled captions per image among the candidates).

When the folder also holds the grid of regions (``mobilenet_v2_224_grid.trainval.parquet`` beside
``mobilenet_v2_224.trainval.parquet``), it is read too, and ``train.decoder`` chooses which decoder
trains: ``lstm`` reads the pooled vectors, ``attention`` also the grid (``--load`` takes the kind
of the decoder saved). Consensus reranking compares photos by their pooled vectors either way.

``--set train.units=512`` (repeatable) overrides a param for this run. The table goes to
``reports/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_report  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
REAL = PROJECT.parent / "shared" / "flickr8k_real"


def override(raw: dict, assignments: list[str]) -> dict:
    """Apply SECTION.KEY=VALUE (any depth, e.g. train.self_critical.epochs=5) to params.yaml's tree."""
    import yaml

    for item in assignments:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise SystemExit(f"--set {item}: no param {key} in params.yaml")
        node[leaf] = yaml.safe_load(value)
    return raw


def load_members(folders: list[Path]):
    """The decoders saved in ``folders`` (``--save``) and their vocabulary, which must be one."""
    from pipeline.captioning.decoder import load_decoder, members_of
    from pipeline.captioning.vocabulary import Vocabulary

    texts = {(folder / "vocab.json").read_text() for folder in folders}
    if len(texts) > 1:
        raise SystemExit(f"--load: {', '.join(map(str, folders))} hold different vocabularies; "
                         "an ensemble needs decoders trained on the same captions and vocab params")
    members = [m for folder in folders for m in members_of(load_decoder(folder / "decoder.keras"))]
    return members, Vocabulary.load(folders[0] / "vocab.json")


def training_rows(history, self_critical, minutes: float, vocab, loaded) -> list[tuple[str, str]]:
    if loaded:
        rows = [("training", f"{minutes:.1f} min; cross-entropy: none, decoder(s) loaded from {', '.join(map(str, loaded))}")]
    else:
        best = history.loc[history.groupby("member")["val_loss"].idxmin()]
        rows = [("training", f"{minutes:.1f} min; cross-entropy {len(history)} epochs, best dev loss "
                             + ", ".join(f"{r.val_loss:.4f} at epoch {r.epoch}" for r in best.itertuples())
                             + f"; vocabulary {vocab.size}")]
    if not len(self_critical):
        return rows
    for member, tuned in self_critical.groupby("member"):
        rows.append((f"self-critical, member {member}",
                     ", ".join(f"epoch {r.epoch}: dev CIDEr-D {r.dev_cider:.3f}" for r in tuned.itertuples())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REAL, help=f"folder with the files (default: {REAL})")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a train.* / evaluate.* / validate.* param for this run")
    parser.add_argument("--label", default="params.yaml", help="what this run is, for the report")
    parser.add_argument("--decode", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also score beam search with these decoding.* values, e.g. "
                             "beam_size=5,consensus.weight=0.5 (repeatable; same trained decoder)")
    parser.add_argument("--save", type=Path, help="write the trained decoder.keras and vocab.json here")
    parser.add_argument("--load", type=Path, action="append",
                        help="skip training: score decoder.keras + vocab.json from here; repeated, the "
                             "decoders (trained with the same vocabulary) decode as one ensemble")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import numpy as np
    import pandas as pd
    import yaml

    from pipeline.captioning.consensus import Neighbours
    from pipeline.captioning.decoder import (
        decoding_models,
        ensemble_decoder,
        grid_of,
        members_of,
        require_grid,
    )
    from pipeline.captioning.decoding import beam_search
    from pipeline.captioning.self_critical import fine_tune
    from pipeline.config import DecodingSettings, parse_settings
    from pipeline.data.features_file import read_features, row_index, rows_of
    from pipeline.data.real_folder import embeddings_file, read_captions, read_grid_rows
    from pipeline.stages.evaluate import HEALTH, evaluate_model
    from pipeline.stages.train import decoder_features, references_of, train_decoder

    raw = override(yaml.safe_load((PROJECT / "params.yaml").read_text()), args.assignments)
    settings = parse_settings(raw)
    captions, dropped = read_captions(args.data, settings.validation.min_tokens, settings.validation.max_tokens)
    embeddings = embeddings_file(args.data)
    images, pooled, _ = read_features(embeddings)
    grid_path, grid, features = None, None, pooled
    found = read_grid_rows(args.data, images, pooled)
    if found:
        grid_path, features, (rows, columns, channels) = found
        grid = (rows * columns, channels)
    print(f"{len(captions)} captions ({dropped} dropped), {len(images)} embeddings of {pooled.shape[1]} dims"
          + (f", grids of {grid[0]} regions x {grid[1]} channels" if grid else ""))

    kind = settings.train
    start = time.perf_counter()
    if args.load:  # the saved decoders' own kind decides what they read
        members, vocab = load_members(args.load)
        for folder, member in zip(args.load, members):
            try:
                require_grid(member, grid, str(grid_path or embeddings), folder / "decoder.keras")
            except ValueError as err:
                raise SystemExit(str(err)) from None
        kind = settings.train.model_copy(update={"decoder": "attention" if any(map(grid_of, members)) else "lstm"})
    decoder_rows, _ = decoder_features(features, grid, kind, str(grid_path or embeddings))
    if args.load:  # then only self-critical fine-tuning (of each member), if train.self_critical.epochs > 0
        history = None
        tuned = []
        if settings.train.self_critical.epochs:
            index = row_index(images)
            references = (*references_of(captions, "train", index), *references_of(captions, "dev", index))
            for member, model in enumerate(members):
                tuned.append(fine_tune(model, vocab, decoder_rows, *references, settings.train.self_critical,
                                       settings.train.seed + member).assign(member=member))
        self_critical = pd.concat(tuned, ignore_index=True) if tuned else pd.DataFrame()
        decoder = members[0] if len(members) == 1 else ensemble_decoder(members)
    else:
        decoder, vocab, history, self_critical = train_decoder(captions, images, features, settings.train, grid=grid)
    train_minutes = (time.perf_counter() - start) / 60
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        decoder.save(args.save / "decoder.keras")
        (args.save / "vocab.json").write_text(vocab.to_text())
    # The evaluator scores its "test" split: here that is dev (the real test split is held out).
    scored = captions.assign(split=captions["split"].replace({"dev": "test"}))
    start = time.perf_counter()
    models = decoding_models(decoder)
    neighbours = Neighbours.from_split(scored, "train", images, pooled)  # photos compared by pooled vectors
    metrics, _ = evaluate_model(models, vocab, scored, images, decoder_rows, settings.decoding, neighbours)
    eval_minutes = (time.perf_counter() - start) / 60

    keys = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
    rows = [(mode, " / ".join(f"{metrics[mode][k]:.3f}" for k in keys)) for mode in ("greedy", "beam", "baseline")]
    for mode in ("greedy", "beam"):
        h = metrics[HEALTH][mode]
        rows.append((f"{mode} caption health",
                     f"{h['distinct_captions']} distinct captions / {h['images']} images, "
                     f"{h['distinct_words']} distinct words, {h['repeated_bigram_share']:.1%} repeat a bigram, "
                     f"{h['unk_share']:.1%} with <unk>, length {h['mean_length']:.1f} vs {h['reference_mean_length']:.1f}"))
    for spec in args.decode:
        variant = DecodingSettings.model_validate(override(settings.decoding.model_dump(), spec.split(",")))
        found, _ = evaluate_model(models, vocab, scored, images, decoder_rows, variant, neighbours)
        h = found[HEALTH]["beam"]
        rows.append((f"beam, {spec}", " / ".join(f"{found['beam'][k]:.3f}" for k in keys)
                     + f"; {h['distinct_words']} words, length {h['mean_length']:.1f}"))
    rows += training_rows(history, self_critical, train_minutes, vocab, args.load)
    rows.append(("evaluation", f"{eval_minutes:.1f} min"))
    members = members_of(decoder)
    if len(members) > 1:  # decoding speed of one member against the whole ensemble
        dev_features = decoder_rows[np.unique(rows_of(row_index(images), scored.loc[scored["split"] == "test", "image"]))]
        for name, candidate in (("1 member", decoding_models(members[0])), (f"{len(members)} members", models)):
            start = time.perf_counter()
            d = settings.decoding
            beam_search(candidate, dev_features, vocab, beam_size=d.beam_size, length_penalty=d.length_penalty,
                        no_repeat_ngram=d.no_repeat_ngram, batch_size=d.batch_size)
            rows.append((f"batched beam decoding, {name}", f"{len(dev_features) / (time.perf_counter() - start):.0f} img/s"))
    t, e = settings.train, settings.decoding
    c = e.consensus
    append_report(f"Caption quality on real Flickr8k dev (bench_quality.py, {args.label})", rows, [
        f"rows: BLEU-1 / BLEU-2 / BLEU-3 / BLEU-4 / METEOR / ROUGE-L / CIDEr on the {metrics['n_images']} dev "
        f"images; train on {int((captions['split'] == 'train').sum())} train captions",
        f"data: {embeddings.name} ({pooled.shape[1]}-d)"
        + (f" and {grid_path.name} ({grid[0]} regions x {grid[1]} channels)" if grid_path else "")
        + f"; decoder {'attention' if any(grid_of(m) for m in members_of(decoder)) else 'lstm'}, units {t.units}, embedding {t.embedding_dim}, "
        f"dropout {t.dropout}, lr {t.learning_rate} (x{t.lr_decay} after {t.lr_patience} stalled epochs), "
        f"label smoothing {t.label_smoothing}, batch {t.batch_size}, patience {t.patience}; ensemble {t.ensemble}; "
        f"self-critical {t.self_critical.epochs} epochs (lr {t.self_critical.learning_rate}, "
        f"{t.self_critical.samples} samples x {t.self_critical.batch_images} images, top-k {t.self_critical.top_k}, "
        f"{t.self_critical.baseline} baseline); "
        f"beam {e.beam_size}, length penalty {e.length_penalty}, no-repeat {e.no_repeat_ngram}-grams, "
        f"consensus reranking with {c.neighbours} train images (weight {c.weight}) of the "
        f"beam's candidates and {c.samples} samples per image (top-{c.top_k}), "
        f"contrast {c.contrast}, sharpness {c.sharpness}",
        f"overrides: {', '.join(args.assignments) or 'none'}; dev also drives early stopping, as in the train stage"])


if __name__ == "__main__":
    main()
