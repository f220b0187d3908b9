"""Alt text for a 1,000-image website, end to end: scan, caption with the champion, write the
review file, apply every proposal (``captioner alt-text SITE --apply --yes``), in-process.

Builds a site of ``--pages`` HTML pages with ``--images`` distinct photo-sized JPEGs (500x375)
spread over them, none with an alt; uses the champion of the project's MLflow store (run
``make run`` first) and the project's ``alt_text`` params. Reports the seconds of each step and
images per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import PROJECT, append_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--pages", type=int, default=50)
    args = parser.parse_args()
    import mlflow

    from benchmarks.bench_features import photo_like_jpegs
    from pipeline.alttext import proposals as alt
    from pipeline.alttext.scanning import scan_site
    from pipeline.config import load_settings
    from pipeline.registry.champion import load_champion_model
    from pipeline.registry.tracking import tracking_uri

    settings = load_settings(PROJECT / "params.yaml")
    mlflow.set_tracking_uri(tracking_uri(settings).replace("sqlite:///mlflow.db", f"sqlite:///{PROJECT}/mlflow.db"))
    identity, model = load_champion_model(settings.registry.model_name)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        (site / "img").mkdir(parents=True)
        names = photo_like_jpegs(site / "img", args.images)
        per_page = -(-len(names) // args.pages)
        for p in range(args.pages):
            imgs = "".join(f'<p>Item {i}</p>\n<img src="img/{n}" width="500">\n'
                           for i, n in enumerate(names[p * per_page:(p + 1) * per_page]))
            (site / f"page-{p:03d}.html").write_text(f"<!doctype html>\n<html><body>\n{imgs}</body></html>\n")
        timings = {}
        start = time.perf_counter()
        scan = scan_site(site, settings.alt_text.max_page_bytes)
        timings["scan"] = time.perf_counter() - start
        t = time.perf_counter()
        proposals = alt.propose(scan, model, identity, settings.alt_text, progress=False)
        alt.save_review(site / alt.REVIEW_FILE, proposals)
        timings["caption + review file"] = time.perf_counter() - t
        t = time.perf_counter()
        for p in proposals:
            if not p.lint:
                p.status = "accepted"
        result = alt.apply(site, proposals)
        timings["apply"] = time.perf_counter() - t
        total = time.perf_counter() - start
    rows = [(f"{step}", f"{seconds:.1f} s") for step, seconds in timings.items()]
    rows += [("end to end", f"{total:.1f} s = {args.images / total:.1f} images/s"),
             ("proposals applied", f"{sum(p.status == 'applied' for p in proposals)} of {len(proposals)} "
                                   f"on {len(result.pages)} pages")]
    append_report("Alt text for a website (bench_alttext.py)", rows, [
        f"{args.images} distinct JPEGs 500x375 on {args.pages} pages; model {identity} "
        f"(Xception 299, runtime {model.spec.runtime} {model.spec.precision}), beam {model.decoding.beam_size} "
        f"+ consensus; in-process, as `captioner alt-text SITE --apply --yes` runs"])


if __name__ == "__main__":
    main()
