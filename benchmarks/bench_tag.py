"""Do photos flow at the speed of the CNN? ``captioner tag``, ``captioner index`` and
``captioner alt-text`` against the CNN's own throughput, on the same real-size photos.

The photos: ``--data DIR``'s photos (default: the real Flickr8k dev photos in
``../shared/flickr8k_real/dev_photos``), copied under new names until there are ``--photos`` of
them (default 1,000). With the champion of the project's MLflow store (``make run`` first):

* ``CNN alone``: ``model.embed`` on photos decoded beforehand, ``--batch`` at a time: the figure
  the three commands are measured against (ratio = command's photos/s / CNN's photos/s);
* ``caption alone``: the CNN and the decoder (the model's default decoding) on the same decoded
  photos: what any command that writes captions needs at least;
* ``index``: ``index_folder`` into a new SQLite index, reading each photo's own XMP too;
* ``alt-text``: scan a website holding the photos (50 pages) and propose an alt for each;
* ``tag``: ``tag_photos`` over the folder (the project's ``tag.*`` params; with
  ``--min-confidence``, another bar), and the share of its time spent reading and writing XMP;
* ``XMP read + write``: ExifTool writing alt text and the record into every photo (read, check,
  write beside it, rename), whatever the model's confidence: what one write costs.

Each command reads, decodes and resizes the next photos on threads while the CNN works on these.
Results are appended to reports/benchmarks.md with the date and CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import PROJECT, append_report  # noqa: E402

DEFAULT_DATA = PROJECT.parent / "shared" / "flickr8k_real" / "dev_photos"
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def replicate(source: Path, folder: Path, n: int) -> list[Path]:
    """``n`` photos in ``folder``: the source's photos, copied under new names as often as needed."""
    originals = sorted(p for p in source.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not originals:
        raise SystemExit(f"no photos under {source}")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        original = originals[i % len(originals)]
        target = folder / f"{i:04d}_{original.name}"
        shutil.copyfile(original, target)
        out.append(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder of photos (default: %(default)s)")
    parser.add_argument("--photos", type=int, default=1000, help="how many photos (copies as needed)")
    parser.add_argument("--batch", type=int, default=32, help="photos per CNN batch")
    parser.add_argument("--min-confidence", type=float, default=None, help="tag's bar (default: tag.min_confidence)")
    args = parser.parse_args()
    import mlflow
    import numpy as np

    from pipeline.alttext import proposals as alt
    from pipeline.alttext.scanning import scan_site
    from pipeline.alttext.tagging import tag_photos
    from pipeline.config import load_settings
    from pipeline.data.images import load_rgb
    from pipeline.data.photo_metadata import PhotoMetadata
    from pipeline.registry.champion import load_champion_model
    from pipeline.registry.pyfunc_model import described
    from pipeline.registry.tracking import tracking_uri
    from pipeline.search.indexing import index_folder
    from pipeline.search.photo_index import PhotoIndex

    settings = load_settings(PROJECT / "params.yaml")
    mlflow.set_tracking_uri(tracking_uri(settings).replace("sqlite:///mlflow.db", f"sqlite:///{PROJECT}/mlflow.db"))
    identity, model = load_champion_model(settings.registry.model_name)
    n, batch = args.photos, args.batch
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = replicate(args.data, tmp / "cnn", n)
        megapixels = np.mean([_pixels(p) for p in photos[:200]]) / 1e6
        pixels = np.stack([load_rgb(p, model.spec.image_size, model.limits.max_image_pixels) for p in photos])
        model.embed(pixels[:batch])  # warm up: graph compilation is not throughput
        t = time.perf_counter()
        features = np.concatenate([model.embed(pixels[lo:lo + batch]) for lo in range(0, n, batch)])
        figures["CNN alone"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for lo in range(0, n, batch):
            described(model, features[lo:lo + batch])
        decoder_s = time.perf_counter() - t
        figures["caption alone"] = n / (n / figures["CNN alone"] + decoder_s)
        del pixels

        folder = tmp / "index"
        replicate(args.data, folder, n)
        with PhotoMetadata(settings.tag.max_xmp_bytes) as tool:
            report = index_folder(folder, PhotoIndex(tmp / "index.db"), model, identity, batch, progress=False,
                                  metadata=tool)
        figures["index"] = report.embedded / report.seconds

        site = tmp / "site"
        names = [p.name for p in replicate(args.data, site / "img", n)]
        per_page = -(-n // 50)
        for p in range(50):
            imgs = "".join(f'<p>Item {i}</p>\n<img src="img/{name}" width="500">\n'
                           for i, name in enumerate(names[p * per_page:(p + 1) * per_page]))
            (site / f"page-{p:03d}.html").write_text(f"<!doctype html>\n<html><body>\n{imgs}</body></html>\n")
        t = time.perf_counter()
        scan = scan_site(site, settings.alt_text.max_page_bytes)
        proposals = alt.propose(scan, model, identity, settings.alt_text, batch_size=batch, progress=False)
        figures["alt-text"] = n / (time.perf_counter() - t)

        folder = tmp / "tag"
        replicate(args.data, folder, n)
        cfg = settings.tag.model_copy(update={"batch_size": batch})
        tagged = tag_photos([folder], model, identity, cfg, settings.alt_text, min_confidence=args.min_confidence,
                            progress=False)
        figures["tag"] = len(tagged.photos) / tagged.seconds
        again = tag_photos([folder], model, identity, cfg, settings.alt_text, min_confidence=args.min_confidence,
                           progress=False)

        # the write itself, into every photo (whatever the model's confidence): read, write, rename
        folder = tmp / "write"
        files = replicate(args.data, folder, n)
        record = {"Model": identity.rpartition("/")[0], "ModelVersion": identity.rpartition("/")[2],
                  "Confidence": "0.900", "ConfidenceWords": "high confidence", "AltText": "A dog runs through the grass."}
        with PhotoMetadata(settings.tag.max_xmp_bytes) as tool:
            t = time.perf_counter()
            for lo in range(0, n, batch * 4):
                for text in tool.read(files[lo:lo + batch * 4], for_writing=True):
                    tool.write(text, {"alt_text": record["AltText"]}, record)
            write_s = (time.perf_counter() - t) / n

    cnn = figures["CNN alone"]
    for name in ("CNN alone", "caption alone", "index", "alt-text", "tag"):
        rows.append((name, f"{figures[name]:.1f} photos/s = {figures[name] / cnn:.2f}x the CNN"
                           + (f", {figures[name] / figures['caption alone']:.2f}x caption alone"
                              if name in ("index", "alt-text", "tag") else "")))
    counts = tagged.counts()
    rows += [("XMP read + write, per photo", f"{write_s * 1000:.1f} ms = {write_s * figures['tag']:.1%} of tag's time "
                                             f"per photo, {write_s * cnn:.1%} at the CNN's pace"),
             ("tag: XMP read + write share", f"{tagged.metadata_seconds / tagged.seconds:.1%} of {tagged.seconds:.1f} s"),
             ("tag: outcome", ", ".join(f"{k} {v}" for k, v in counts.items() if v)),
             ("tag again (nothing to do)", f"{again.seconds:.1f} s, captioned {again.captioned}, "
                                           + ", ".join(f"{k} {v}" for k, v in again.counts().items() if v)),
             ("index: photos a person described", f"{report.described_by_person}"),
             ("alt-text: proposals", f"{len(proposals)}")]
    bar = settings.tag.min_confidence if args.min_confidence is None else args.min_confidence
    append_report("Photos at the speed of the CNN: tag, index, alt-text (bench_tag.py)", rows, [
        f"{n} photos ({len(set(p.name.split('_', 1)[1] for p in photos))} distinct real photos from {args.data}, "
        f"{megapixels:.2f} MP on average), batches of {batch}; model {identity} ({model.spec.name} "
        f"{model.spec.image_size}, runtime {model.spec.runtime} {model.spec.precision}), its default decoding; "
        f"tag.min_confidence {bar:g}; ExifTool {_exiftool_version()}",
        "CNN alone and caption alone run on photos decoded beforehand; the commands read, decode and resize "
        "the next batch on threads while the CNN works (pipeline.data.images.prefetched)"])


def _pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.width * im.height


def _exiftool_version() -> str:
    import subprocess

    from pipeline.data.photo_metadata import exiftool_path

    exe = exiftool_path()
    return subprocess.run([exe, "-ver"], capture_output=True, text=True).stdout.strip() if exe else "missing"


if __name__ == "__main__":
    main()
