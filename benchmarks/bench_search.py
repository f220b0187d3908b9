"""Photo search on real Flickr8k dev: retrieval quality of each ranking, query latency, and
indexing throughput.

Quality, the standard way: the 1,000 dev images of ``--data`` (the layout of
``../shared/flickr8k_real``: real captions and ImageNet embeddings) are indexed with the captions
the decoder writes for them (the chosen one and the beam's other candidates, chosen with the
``decoding`` params as the served model does); each of their 5,000 reference captions is a
query whose one relevant answer is its own image. For each ranking (``likelihood``: the
decoder's log p(query | image); ``bm25``: SQLite FTS5 over the stored captions; ``blend``:
reciprocal rank fusion of the two): Recall@1/5/10 (percent) and the median rank; and for
likelihood over a shortlist of 10% of the photos (what the default does past 2,000 photos, here
200 of 1,000): what the shortlist costs in recall.

The decoder: ``--load DIR`` (saved by ``bench_quality.py --save``), else one trained on the train
split with params.yaml, as bench_quality.py does. Speed: query latency over the same index and
one of 20,000 photos (the dev photos repeated), p50 of ``--latency-queries`` queries; indexing
throughput (photos/s) of a first index and of a re-index after a decoder-only change, on
photo-sized JPEGs with a small registered model built here (Xception 299x299, the default
runtime). ``--json FILE`` writes ``{"rankings": {name: {"r1", "r5", "r10", "median_rank"}},
"default": name}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_quality import REAL, load_members, override  # noqa: E402
from benchmarks.common import PROJECT, Timer, append_report  # noqa: E402
from pipeline.data.real_folder import read_captions as load_captions  # noqa: E402


def ranks_of(scores: np.ndarray, true_col: np.ndarray) -> np.ndarray:
    """1-based rank of each query's true image among its row of ``scores`` (higher is better;
    ties count against it)."""
    true = scores[np.arange(len(scores)), true_col][:, None]
    return (scores > true).sum(axis=1) + 1


def recall(ranks: np.ndarray) -> dict[str, float]:
    return {"r1": float((ranks <= 1).mean() * 100), "r5": float((ranks <= 5).mean() * 100),
            "r10": float((ranks <= 10).mean() * 100), "median_rank": float(np.median(ranks))}


def likelihood_matrix(models, vocab, features: np.ndarray, queries: list[list[int]], rows_per_call: int = 16384):
    """(Q, N) log p(query | image) for every query and image, queries of one length stacked so
    each decoder step runs on many rows at once."""
    from pipeline.search.ranking import log_likelihood

    out = np.zeros((len(queries), len(features)))
    by_length: dict[int, list[int]] = {}
    for q, ids in enumerate(queries):
        by_length.setdefault(len(ids), []).append(q)
    per_call = max(1, rows_per_call // len(features))
    done = 0
    # each photo is encoded once (with a grid, its regions projected once); its state is repeated per query
    encoded = models.encode(features)
    for length, qs in sorted(by_length.items()):
        for lo in range(0, len(qs), per_call):
            group = qs[lo:lo + per_call]
            # rows: image i for query g at g * N + i; the tokens differ per query, so step by hand
            rows = len(group) * len(features)
            state = [np.tile(x, (len(group),) + (1,) * (x.ndim - 1)) for x in encoded]
            targets = np.array([queries[q] for q in group], dtype=np.int32)  # (G, length)
            token = np.full((rows, 1), vocab.start_id, dtype=np.int32)
            total = np.zeros(rows)
            for t in range(length + 1):
                target = np.repeat(targets[:, t] if t < length else np.full(len(group), vocab.end_id), len(features))
                log_probs, state = models.step(token, state)
                total += log_probs[np.arange(rows), target]
                token = target[:, None].astype(np.int32)
            out[group] = total.reshape(len(group), len(features))
            done += len(group)
            print(f"\rlikelihood: {done}/{len(queries)} queries", end="", flush=True)
    print()
    assert np.allclose(out[0], log_likelihood(models, vocab, features, queries[0]), atol=1e-3)  # the same as search's
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REAL, help="a folder in the layout of ../shared/flickr8k_real")
    parser.add_argument("--load", type=Path, action="append", help="decoder.keras + vocab.json from bench_quality --save")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--queries", type=int, default=0, help="use only this many queries (default: all)")
    parser.add_argument("--latency-photos", type=int, default=20_000)
    parser.add_argument("--latency-queries", type=int, default=20)
    parser.add_argument("--index-photos", type=int, default=200, help="JPEGs indexed for the throughput figures")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", type=Path, help="write the recall figures here")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import yaml

    from pipeline.captioning.caption_choice import CaptionChooser
    from pipeline.captioning.consensus import Neighbours
    from pipeline.captioning.decoder import (
        decoding_models,
        ensemble_decoder,
        grid_of,
        members_of,
        require_grid,
    )
    from pipeline.config import parse_settings
    from pipeline.data.features_file import read_features, row_index, rows_of
    from pipeline.data.real_folder import embeddings_file, read_grid_rows
    from pipeline.search.photo_index import Photo, PhotoIndex
    from pipeline.search.ranking import RRF_K, Searcher, query_ids, shortlist_rows
    from pipeline.stages.train import train_decoder

    settings = parse_settings(override(yaml.safe_load((PROJECT / "params.yaml").read_text()), args.assignments))
    captions, _ = load_captions(args.data, settings.validation.min_tokens, settings.validation.max_tokens)
    embeddings = embeddings_file(args.data)
    images, features, _ = read_features(embeddings)
    grid_path, grid, rows_with_grid = None, None, None
    found = read_grid_rows(args.data, images, features)  # an attention decoder reads pooled vector + regions
    if found:
        grid_path, rows_with_grid, (height, width, channels) = found
        grid = (height * width, channels)
    if args.load:
        members, vocab = load_members(args.load)
        decoder = members[0] if len(members) == 1 else ensemble_decoder(members)
    else:
        decoder, vocab, _, _ = train_decoder(captions, images, rows_with_grid if grid else features,
                                             settings.train, grid=grid)
    attends = any(grid_of(m) for m in members_of(decoder))
    try:
        require_grid(decoder, grid, str(grid_path or embeddings), args.load[0] / "decoder.keras" if args.load else "trained")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    models = decoding_models(decoder)
    index = row_index(images)
    dev = captions[captions["split"] == "dev"]
    dev_images = sorted(dev["image"].unique())
    dev_features = features[rows_of(index, dev_images)]  # pooled: stored, compared, shortlisted by
    dev_rows = rows_with_grid[rows_of(index, dev_images)] if attends else dev_features  # what the decoder reads
    neighbours = Neighbours.from_split(captions, "train", images, features) if settings.decoding.consensus.neighbours else None
    chooser = CaptionChooser(models, vocab, settings.decoding, neighbours)

    class Model:  # what search needs of a loaded CaptionModel
        backbone_digest = "real-embeddings"

    Model.chooser, Model.vocab = chooser, vocab
    with Timer() as captioning:
        chosen = chooser.choose(dev_rows)
    rows = []
    for name, vector, ranked in zip(dev_images, dev_rows, chosen):  # stored as the served model embeds them
        candidates = [{"caption": vocab.decode(c.caption.tokens), "score": round(c.score, 4)}
                      for c in ranked[:settings.decoding.beam_size]]
        rows.append(Photo(name, 0, 0, "", "ok", "", candidates[0]["caption"], candidates, "bench", Model.backbone_digest,
                          vector.astype(np.float32)))
    queries = dev[["image", "caption"]].itertuples(index=False)
    queries = [(q.image, q.caption) for q in queries][: args.queries or None]
    true_col = np.array([dev_images.index(img) for img, _ in queries])
    with tempfile.TemporaryDirectory() as tmp:
        store = PhotoIndex(Path(tmp) / "dev.db")
        store.save(rows)
        id_of = {p.path: p.id for p in store.all(with_embeddings=False)}
        col_of_id = {id_of[name]: c for c, name in enumerate(dev_images)}
        # bm25 over the stored captions: every photo it does not return ranks last
        bm25 = np.full((len(queries), len(dev_images)), -np.inf)
        with Timer() as bm25_time:
            for q, (_, text) in enumerate(queries):
                for pid, score in store.text_search(text, len(dev_images)):
                    bm25[q, col_of_id[pid]] = score
        ids = [query_ids(text, vocab)[0] for _, text in queries]
        with Timer() as like_time:
            likelihood = likelihood_matrix(models, vocab, dev_rows, ids)
        ranks = {"likelihood": ranks_of(likelihood, true_col), "bm25": ranks_of(bm25, true_col)}

        def rrf(scores: np.ndarray) -> np.ndarray:
            order = np.argsort(-scores, axis=1, kind="stable")
            rank = np.empty_like(order)
            rank[np.arange(len(scores))[:, None], order] = np.arange(1, scores.shape[1] + 1)
            return 1.0 / (RRF_K + rank)

        ranks["blend"] = ranks_of(rrf(likelihood) + np.where(np.isfinite(bm25), rrf(bm25), 0.0), true_col)
        # likelihood over a 10% shortlist: the text's hits, then the nearest photos by CNN features
        size = max(1, len(dev_images) // 10)
        store_ids = [id_of[name] for name in dev_images]
        short = np.full_like(likelihood, -np.inf)
        for q in range(len(queries)):
            text = {store_ids[c]: bm25[q, c] for c in np.flatnonzero(np.isfinite(bm25[q]))}
            keep = shortlist_rows(store_ids, dev_features, np.arange(len(dev_images)), text, size)
            short[q, keep] = likelihood[q, keep]
        ranks[f"likelihood, {size}-photo shortlist"] = ranks_of(short, true_col)
        figures = {name: recall(r) for name, r in ranks.items()}
        default = max(("likelihood", "bm25", "blend"), key=lambda n: (figures[n]["r1"] + figures[n]["r5"]
                                                                      + figures[n]["r10"]))

        # latency: the same index and one of --latency-photos photos (the dev photos repeated)
        from pipeline.search import ranking

        big = PhotoIndex(Path(tmp) / "big.db")
        copies = max(1, args.latency_photos // len(rows))
        for k in range(copies):
            big.save([Photo(f"{k}/{p.path}", 0, 0, "", "ok", "", p.caption, p.candidates, "bench", p.backbone,
                            p.embedding) for p in rows])
        latency = {}
        sample = [text for _, text in queries[:: max(1, len(queries) // args.latency_queries)]][: args.latency_queries]
        for label, db, shortlist in ((f"{len(rows):,} photos, likelihood (all photos)", store, ranking.LIKELIHOOD_SHORTLIST),
                                     (f"{len(rows) * copies:,} photos, likelihood, shortlist "
                                      f"{ranking.LIKELIHOOD_SHORTLIST} (default)", big, ranking.LIKELIHOOD_SHORTLIST),
                                     (f"{len(rows) * copies:,} photos, likelihood over all photos", big, 10**9),
                                     (f"{len(rows) * copies:,} photos, bm25", big, None)):
            searcher = Searcher(db, Model)
            searcher.search(sample[0], 10, "bm25" if shortlist is None else "likelihood", shortlist or 0)  # warm-up
            seconds = []
            for text in sample:
                with Timer() as t:
                    searcher.search(text, 10, "bm25" if shortlist is None else "likelihood", shortlist or 0)
                seconds.append(t.seconds)
            latency[label] = float(np.median(seconds))
    throughput = {} if args.skip_throughput else index_throughput(args.index_photos)

    rows_out = [(f"{name}: R@1 / R@5 / R@10, median rank",
                 f"{f['r1']:.1f} / {f['r5']:.1f} / {f['r10']:.1f}, {f['median_rank']:.0f}") for name, f in figures.items()]
    rows_out.append(("default ranking (best R@1+R@5+R@10)", default))
    rows_out += [(f"query latency p50, {label}", f"{s * 1000:.0f} ms") for label, s in latency.items()]
    rows_out += [(f"indexing, {label}", f"{v:.1f} photos/s") for label, v in throughput.items()]
    rows_out.append(("scoring every dev query", f"likelihood {like_time.seconds:.0f} s, bm25 {bm25_time.seconds:.0f} s; "
                                                f"captioning the 1,000 photos {captioning.seconds:.0f} s"))
    append_report(f"Photo search on real Flickr8k dev (bench_search.py{', ' + args.label if args.label else ''})", rows_out, [
        f"{len(rows)} dev images ({embeddings.name}), {len(queries)} queries (their reference captions, one relevant "
        "image each); captions stored per photo: the chosen one and the beam's other candidates "
        f"(decoding: beam {settings.decoding.beam_size}, consensus {settings.decoding.consensus.neighbours} neighbours, "
        f"{settings.decoding.consensus.samples} samples)",
        f"decoder: {', '.join(map(str, args.load)) if args.load else 'trained here with params.yaml'}; blend = reciprocal "
        f"rank fusion (k={RRF_K}); a photo bm25 does not return ranks last",
        f"latency: {args.latency_queries} queries, one at a time, after one warm-up; index throughput: "
        f"{args.index_photos} JPEGs 500x375, Xception 299 (default runtime), a 60-image synthetic decoder"])
    if args.json:
        args.json.write_text(json.dumps({"rankings": figures, "default": default}, indent=1))


def index_throughput(count: int) -> dict[str, float]:
    """Photos/s of a first index (CNN + decoder) and of a re-index after a decoder-only change
    (a new version of the same model files: the stored embeddings are reused)."""
    from mlflow import MlflowClient

    from benchmarks.bench_features import photo_like_jpegs
    from benchmarks.bench_serving import NAME, build_model
    from pipeline.registry.champion import load_champion_model
    from pipeline.search.indexing import index_folder
    from pipeline.search.photo_index import PhotoIndex

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
        old = os.getcwd()
        os.chdir(root)
        try:
            build_model(root)
            client = MlflowClient()
            client.set_registered_model_alias(NAME, "champion", "1")
            photos = root / "photos"
            photos.mkdir()
            photo_like_jpegs(photos, count)
            store = PhotoIndex(root / "index.db")
            identity, model = load_champion_model(NAME)
            first = index_folder(photos, store, model, identity, 32, progress=False)
            source = client.get_model_version(NAME, "1")
            again = client.create_model_version(NAME, source.source, run_id=source.run_id).version
            client.set_registered_model_alias(NAME, "champion", str(again))
            identity, model = load_champion_model(NAME)
            second = index_folder(photos, store, model, identity, 32, progress=False)
            assert second.embedded == 0 and second.recaptioned == count
        finally:
            os.chdir(old)
    return {"first index (CNN + decoder)": first.photos_per_s,
            "re-index after a decoder-only change (stored embeddings reused)": second.photos_per_s}


if __name__ == "__main__":
    main()
