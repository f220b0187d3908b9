"""The feedback loop measured: what corrections teach a model on real Flickr8k, and what tracing
costs a caption request.

``--part training`` (real data, default ``../shared/flickr8k_real/``; the test split is never
read): people correct ``--corrections`` (500) dev photos with one of their reference captions
(the first). The model before is the default decoder trained on the train split (``--load DIR``
reuses one saved by ``bench_quality.py --save``); the model after is trained with the same
``train.*`` params on the train split plus the corrections, each counted
``feedback.train_repeats`` times (``pipeline/data/sources.training_rows``, as the train stage
does), the other dev photos driving early stopping. Both are scored with the ``decoding.*``
params on the dev photos nobody corrected (5 references each) and on the corrected ones (against
their 5 references, and against the correction alone).

``--part tracing``: the app (FastAPI's TestClient, the champion of the project's MLflow store,
copied) serving one photo-sized JPEG per request, with feedback off, with the feedback store but
no traces, and with both; requests alternate between the three apps so drift hits them alike.
The p50 ratio traced / untraced is what tracing costs a request.

Both append to ``reports/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_quality import REAL  # noqa: E402
from benchmarks.common import PROJECT, append_report  # noqa: E402
from pipeline.data.real_folder import read_captions as load_captions  # noqa: E402

KEYS = ("bleu4", "meteor", "rouge_l", "cider")


def training(args) -> None:
    import numpy as np
    import pandas as pd

    from pipeline.captioning.decoder import decoding_models, load_decoder
    from pipeline.captioning.vocabulary import Vocabulary
    from pipeline.config import load_settings
    from pipeline.data.features_file import read_features
    from pipeline.data.sources import FEEDBACK, RAW, training_rows
    from pipeline.stages.evaluate import evaluate_model
    from pipeline.stages.train import train_decoder

    settings = load_settings(PROJECT / "params.yaml")
    captions, _ = load_captions(args.data, settings.validation.min_tokens, settings.validation.max_tokens)
    images, features, _ = read_features(next(args.data.glob("*.parquet")))
    dev = sorted(captions.loc[captions["split"] == "dev", "image"].unique())
    corrected = sorted(np.random.default_rng(0).choice(dev, size=args.corrections, replace=False).tolist())
    picked = set(corrected)
    first = captions[captions["image"].isin(picked)].sort_values("caption_idx").groupby("image").head(1)
    print(f"{len(picked)} of {len(dev)} dev photos corrected with their first reference caption")

    start = time.perf_counter()
    if args.load:
        before, vocab_before = load_decoder(args.load / "decoder.keras"), Vocabulary.load(args.load / "vocab.json")
        before_minutes = None
    else:
        before, vocab_before, _, _ = train_decoder(captions, images, features, settings.train)
        before_minutes = (time.perf_counter() - start) / 60
        if args.save:  # the same layout as bench_quality.py --save: bench_search.py --load reads it
            args.save.mkdir(parents=True, exist_ok=True)
            before.save(args.save / "decoder.keras")
            (args.save / "vocab.json").write_text(vocab_before.to_text())

    raw = captions[~captions["image"].isin(picked)].assign(folder=RAW)  # dev minus the corrected photos
    taught = pd.concat([raw, first.assign(split="train", folder=FEEDBACK)], ignore_index=True)
    start = time.perf_counter()
    after, vocab_after, history, _ = train_decoder(training_rows(taught, settings.feedback.train_repeats),
                                                   images, features, settings.train)
    after_minutes = (time.perf_counter() - start) / 60

    def scored(table: pd.DataFrame) -> pd.DataFrame:
        return table.assign(split="test")  # evaluate_model scores its "test" split

    sets = {
        "dev photos nobody corrected (5 references)": scored(captions[(captions["split"] == "dev")
                                                                      & ~captions["image"].isin(picked)]),
        "corrected photos, against their 5 references": scored(captions[captions["image"].isin(picked)]),
        "corrected photos, against the correction": scored(first),
    }
    train_rows = captions[captions["split"] == "train"]  # consensus neighbours: the train split
    rows = []
    for label, table in sets.items():
        for name, model, vocab in (("before", before, vocab_before), ("after", after, vocab_after)):
            metrics, _ = evaluate_model(decoding_models(model), vocab, pd.concat([train_rows, table]), images,
                                        features, settings.decoding)
            rows.append((f"{label}: {name}", " / ".join(f"{metrics['beam'][k]:.3f}" for k in KEYS)))
    epochs = len(history)
    rows.append(("training time, model after", f"{after_minutes:.1f} min ({epochs} epochs)"))
    if before_minutes is not None:
        rows.append(("training time, model before", f"{before_minutes:.1f} min"))
    append_report("Learning from corrections on real Flickr8k dev (bench_feedback.py --part training)", rows, [
        "rows: beam BLEU-4 / METEOR / ROUGE-L / CIDEr (decoding.* params)",
        f"{len(picked)} dev photos corrected with their first reference caption, each counted "
        f"{settings.feedback.train_repeats} times in training (feedback.train_repeats); the model before "
        f"{'loaded from ' + str(args.load) if args.load else 'trained here'} on the train split; the model "
        f"after trained on the train split and the corrections, early stopping on the other dev photos",
        f"train.* params of params.yaml (units {settings.train.units}, ensemble {settings.train.ensemble})"])


def count_traces(experiment_name: str) -> int:
    import mlflow

    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return 0
    return len(mlflow.search_traces(locations=[experiment.experiment_id], max_results=100_000, return_type="list"))


def tracing(args) -> None:
    import io

    import mlflow
    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from pipeline.app.feedback_desk import FeedbackDesk
    from pipeline.app.hot_swap import ChampionHolder
    from pipeline.app.routes import create_app
    from pipeline.config import load_settings

    settings = load_settings(PROJECT / "params.yaml")
    store = PROJECT / "mlflow.db"
    if not store.exists():
        raise SystemExit(f"{store} not found: run `make run` first (it registers a champion)")
    work = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    shutil.copy(store, work / "mlflow.db")
    for folder in ("mlruns", "mlartifacts"):  # artifacts of a file store beside the database
        if (PROJECT / folder).exists():
            shutil.copytree(PROJECT / folder, work / folder)
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    base = np.stack([np.sin(xx / 40), np.cos(yy / 50), np.sin((xx + yy) / 60)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(((base + 1) * 100 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=90)
    photo = buf.getvalue()

    name = settings.registry.model_name
    variants = {
        "feedback off": None,
        "feedback store, no traces": settings.feedback.model_copy(update={"trace": False, "db": str(work / "a.db")}),
        "feedback store and MLflow traces": settings.feedback.model_copy(update={"db": str(work / "b.db")}),
    }
    traces_before = count_traces(settings.feedback.experiment)
    clients = {}
    # one client sends every request: the per-address limit would time the 429s, not the app
    unlimited = settings.app.model_copy(update={"max_captions_per_minute": 10**9})
    for label, cfg in variants.items():
        desk = FeedbackDesk(cfg, name) if cfg else None
        clients[label] = TestClient(create_app(ChampionHolder(name), poll_seconds=3600, limits=unlimited, desk=desk)).__enter__()
    times: dict[str, list[float]] = {label: [] for label in variants}
    for client in clients.values():  # warm up: the step graphs, the first trace
        for _ in range(3):
            client.post("/api/caption", files=[("file", ("p.jpg", photo, "image/jpeg"))])
    for _ in range(args.requests):
        for label, client in clients.items():
            start = time.perf_counter()
            response = client.post("/api/caption", files=[("file", ("p.jpg", photo, "image/jpeg"))])
            times[label].append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.text
    for client in clients.values():
        client.__exit__(None, None, None)
    mlflow.flush_trace_async_logging()  # every trace written before its store is removed
    traces = count_traces(settings.feedback.experiment) - traces_before
    p50 = {label: statistics.median(values) for label, values in times.items()}
    base_ms = p50["feedback off"]
    rows = [(f"p50, {label}", f"{ms:.1f} ms ({ms / base_ms:.3f}x)") for label, ms in p50.items()]
    traced = p50["feedback store and MLflow traces"] / p50["feedback store, no traces"]
    rows.append(("what tracing adds (traced / store only)", f"{(traced - 1) * 100:+.1f}% (target: under 5%)"))
    append_report("What feedback and tracing cost a caption request (bench_feedback.py --part tracing)", rows, [
        f"{args.requests} requests per app, interleaved, one 500x375 JPEG each, FastAPI TestClient in one process; "
        f"the champion of the project's MLflow store ({name}), traces to a copy of it (SQLite)",
        f"the feedback store is SQLite (WAL); MLflow exports traces asynchronously (its default); traces "
        f"this run wrote: {traces} (3 warm-up + {args.requests} measured requests)"])
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("training", "tracing", "all"), default="all")
    parser.add_argument("--data", type=Path, default=REAL, help=f"real Flickr8k files (default: {REAL})")
    parser.add_argument("--corrections", type=int, default=500, help="dev photos corrected (default: 500)")
    parser.add_argument("--load", type=Path, help="the model before: decoder.keras + vocab.json from here")
    parser.add_argument("--save", type=Path, help="write the model before (trained here) to this folder")
    parser.add_argument("--requests", type=int, default=200, help="requests per app for --part tracing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part in ("tracing", "all"):
        tracing(args)
    if args.part in ("training", "all"):
        training(args)


if __name__ == "__main__":
    main()
