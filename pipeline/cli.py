"""``captioner``: caption images with a registered model, index and search a photo folder, or
serve the champion as a web app.

    captioner caption photo1.jpg photo2.jpg [--model models:/flickr8k-captioner@champion] [--beam 3]
    captioner index ~/Photos [--db PATH]          # caption every photo with the champion
    captioner search "two dogs in the snow" [--limit 10] [--json] [--like PHOTO]
    captioner alt-text ./site [--review] [--apply [--yes] [--dry-run]]
    captioner tag ~/Photos [--dry-run] [--sidecar] [--keep-mtime]   # alt text into each photo's XMP
    captioner app [--port 8000] [--poll-seconds 10] [--index PATH] [--no-feedback]
    captioner real-model --data ../shared/flickr8k_real [--promote]   # a champion of real photos, offline

Files are checked before the model is loaded (a load takes a while), so a typo, a folder or
an unreadable file is reported at once; the CLI reads each file itself and hands the model its
bytes (the caller owns this machine, so local paths are fine here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_settings
from pipeline.errors import ReportedError
from pipeline.logs import setup_logging
from pipeline.registry.champion import ALIAS
from pipeline.registry.pyfunc_model import (
    MAX_BEAM,  # the served model's own bound: one rule in one place
)


def _model_name(params: str = "params.yaml") -> str | None:
    """register.model_name from params.yaml (./ by default); None outside the project."""
    try:
        return load_settings(params).registry.model_name
    except ConfigError:
        return None


def _use_tracking_uri(uri: str | None) -> None:
    """--tracking-uri, else the project's (MLFLOW_TRACKING_URI or params.yaml), else MLflow's own
    default; exits with status 2 and the reason when the store cannot be reached."""
    from pipeline.registry.tracking import tracking_uri, use_store

    try:
        settings = load_settings()
    except ConfigError:
        settings = None  # outside the project
    uri = uri or (tracking_uri(settings) if settings else os.environ.get("MLFLOW_TRACKING_URI"))
    if uri is None:
        return
    try:
        use_store(uri, settings.mlflow if settings else None)
    except ReportedError as err:
        print(f"captioner: {err}", file=sys.stderr)
        sys.exit(2)


def beam_size(text: str) -> int:
    """argparse type: an integer 1..MAX_BEAM."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_BEAM:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_BEAM} (1 = greedy), got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def read_inputs(names: list[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """(file name -> bytes) for the readable files, (file name -> error) for the others."""
    data, errors = {}, {}
    for name in names:
        path = Path(name).expanduser()
        if path.is_dir():
            errors[name] = "is a directory, not an image file"
        elif not path.exists():
            errors[name] = "no such file"
        else:
            try:
                data[name] = path.read_bytes()
            except OSError as err:
                errors[name] = f"cannot read: {err.strerror or err}"
    return data, errors


def caption(args: argparse.Namespace) -> int:
    data, errors = read_inputs(args.images)
    for name, error in errors.items():  # said at once, before the model loads
        if args.json:
            print(json.dumps({"file": name, "error": error}), flush=True)
        else:
            print(f"{name}\tERROR: {error}", file=sys.stderr)
    if not data:
        return 1
    import mlflow  # noqa: I001
    import pandas as pd

    from pipeline.captioning import quiet_tensorflow  # noqa: F401

    _use_tracking_uri(args.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as err:
        print(f"captioner: cannot load {args.model}: {err}", file=sys.stderr)
        return 2
    from pipeline.captioning.confidence import said_of

    names = list(data)
    person = _persons_alt_texts(names) if args.json else {}
    params = {"beam_size": args.beam} if args.beam else None
    python_model = model.unwrap_python_model()
    if args.attention is not None:
        if getattr(python_model, "grid_hw", None) is None:
            print(f"captioner: {args.model} reads one pooled vector per photo: it has no attention to draw "
                  "(a model trained with train.decoder: attention has)", file=sys.stderr)
            return 2
        try:
            args.attention.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"captioner: --attention {args.attention}: cannot make that folder ({err.strerror or err})",
                  file=sys.stderr)
            return 2
    # a request holds at most the model's serving.max_rows images: more files go in several
    step = getattr(getattr(python_model, "limits", None), "max_rows", 64)
    status = 1 if errors else 0
    drawn: set[str] = set()
    for lo in range(0, len(names), step):
        chunk = names[lo:lo + step]
        if args.attention is None:
            rows = model.predict(pd.DataFrame({"image": [data[n] for n in chunk]}), params=params).to_dict("records")
        else:  # the Python model itself: predict's table has no column for the maps
            rows = python_model.caption_images([data[n] for n in chunk], args.beam, attention=True)
        for name, row in zip(chunk, rows):
            said = said_of(row)
            if args.attention is not None and not row["error"]:
                said["attention_png"] = _draw_attention(name, data[name], row, said, args.attention, drawn,
                                                        python_model.limits.max_image_pixels)
            if row["error"]:
                status = 1
                if args.json:
                    print(json.dumps({"file": name, "error": row["error"]}), flush=True)
                else:
                    print(f"{name}\tERROR: {row['error']}", file=sys.stderr)
            elif args.json:
                extra = {"person_alt_text": person.get(name)} if person is not None else {}
                print(json.dumps({"file": name, "caption": row["caption"], **said, **extra}), flush=True)
            else:
                number = "" if said["confidence"] is None else f" {said['confidence']:.2f}"
                print(f"{name}\t{said['spoken']}\t({said['confidence_words']}{number})", flush=True)
                if args.attention is not None:
                    print(f"{name}\twhere it looked: {said['attention_png'] or 'not drawn (the model abstained)'}",
                          file=sys.stderr)
    return status


def _draw_attention(name: str, image: bytes, row: dict, said: dict, folder: Path, drawn: set[str],
                    max_pixels: int) -> str | None:
    """Write ``folder/<stem>.png``: the photo, its caption as a reader should take it, and where
    the model looked for each word. None (nothing drawn) when the model abstained: it says it
    does not know what the picture shows, so its words are not drawn as if it did."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.atomic import atomic_path
    from pipeline.captioning.attention_strip import render_strip
    from pipeline.data.images import thumbnail_jpeg

    if said["abstained"] or not row.get("attention"):
        return None
    stem = Path(name).stem or "photo"
    out, k = folder / f"{stem}.png", 1
    while out.name in drawn:  # two photos of one name in different folders: both kept
        k += 1
        out = folder / f"{stem}-{k}.png"
    drawn.add(out.name)
    found = row["attention"]
    number = "" if said["confidence"] is None else f" {said['confidence']:.2f}"
    photo = Image.open(io.BytesIO(thumbnail_jpeg(image, 480, max_pixels)))
    strip = render_strip(photo, found["words"], np.asarray(found["maps"], np.float32), tuple(found["grid"]),
                         f"{said['spoken']}\n({said['confidence_words']}{number})")
    with atomic_path(out) as tmp:
        strip.save(tmp, format="PNG")
    return str(out)


def _persons_alt_texts(names: list[str]) -> dict[str, str] | None:
    """file -> the alt text (or description) a person wrote into it, for the files that carry one;
    None when ExifTool is not there to read them (the JSON then says nothing of it)."""
    with _metadata_reader() as tool:
        if tool is None:
            return None
        texts = tool.read([Path(n).expanduser() for n in names])
    found = {}
    for name, text in zip(names, texts):
        _, words = text.persons_words()
        if words:
            found[name] = words
    return found


def default_index() -> str:
    """Where the photo index lives unless --db says otherwise: CAPTIONER_SEARCH_DB (a path or a
    SQLAlchemy URL, e.g. the team's PostgreSQL), else one SQLite file per user."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return os.environ.get("CAPTIONER_SEARCH_DB") or str(base / "captioner" / "photos.db")


def _champion(args) -> tuple[str, object]:
    """Load the champion (exits with status 2 and the reason when it cannot)."""
    from pipeline.captioning import quiet_tensorflow  # noqa: F401
    from pipeline.registry.champion import load_champion_model

    name = args.model_name or _model_name(getattr(args, "params", "params.yaml"))
    if name is None:
        print("captioner: no params.yaml here to read register.model_name from: run from the project root "
              "or pass --model-name", file=sys.stderr)
        sys.exit(2)
    _use_tracking_uri(args.tracking_uri)
    try:
        return load_champion_model(name)
    except ReportedError as err:
        print(f"captioner: {err}", file=sys.stderr)
        sys.exit(2)


def index(args: argparse.Namespace) -> int:
    from pipeline.search.indexing import index_folder
    from pipeline.search.photo_index import PhotoIndex

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        print(f"captioner: {folder} is not a folder", file=sys.stderr)
        return 1
    store = PhotoIndex(args.db)
    identity, model = _champion(args)
    with _metadata_reader() as metadata:
        report = index_folder(folder, store, model, identity, args.batch, progress=not args.quiet, metadata=metadata)
    for path, error in report.errors:
        print(f"{path}\tERROR: {error}", file=sys.stderr)
    for path, why in report.metadata_unread:  # paths as photo_files shows them (escaped already)
        print(f"{path}\tWARNING: its own metadata was not read: {why}", file=sys.stderr)
    summary = report.summary()
    print(f"indexed {folder} with {identity} into {store.url}: " + ", ".join(
        f"{k} {v}" for k, v in summary.items() if k not in ("seconds",)) + f" ({summary['seconds']:.1f} s)")
    return 0


@contextlib.contextmanager
def _metadata_reader():
    """An open ExifTool for reading what people wrote into photos, or None (with a warning) when
    there is none: indexing goes on without it."""
    from pipeline.data.photo_metadata import MetadataError, PhotoMetadata

    try:  # tag.max_xmp_bytes where there is a params.yaml; the reader's own default elsewhere
        limit = {"max_xmp_bytes": load_settings().tag.max_xmp_bytes}
    except ConfigError:
        limit = {}
    try:
        tool = PhotoMetadata(**limit)
    except MetadataError as err:
        logging.getLogger("pipeline").warning("photos' own alt text and descriptions are not read: %s", err)
        yield None
        return
    with tool:
        yield tool


def search(args: argparse.Namespace) -> int:
    from pipeline.search.photo_index import PhotoIndex
    from pipeline.search.ranking import Searcher, SearchResult

    store = PhotoIndex(args.db, create=False)
    root = store.root()
    if root is None:
        print(f"captioner: {store.url} holds no index yet: run captioner index DIR first", file=sys.stderr)
        return 1
    needs_model = args.like is not None or args.ranking != "bm25"
    model = _champion(args)[1] if needs_model else None
    searcher = Searcher(store, model)
    if args.like is not None:
        vector, itself = _like_vector(args.like, root, store, model)
        result = SearchResult(f"like {args.like}", "cosine", searcher.more_like(vector, args.limit, exclude=itself))
    else:
        result = searcher.search(args.query, args.limit, args.ranking, min_confidence=args.min_confidence)
    if args.json:
        print(json.dumps({**result.to_json(), "root": str(root)}, indent=1))
        return 0
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    from pipeline.captioning.confidence import in_words

    for hit in result.hits:  # one line per photo, whatever its name holds (tabs, line breaks)
        photo = hit.photo
        sure = in_words(photo.confidence, photo.abstained) + ("" if photo.confidence is None else f" {photo.confidence:.2f}")
        line = f"{hit.score:.3f}\t{_one_field(str(root / photo.path))}\t{_one_field(photo.caption)}\t{sure}"
        if photo.person_text:  # a person's own words about the photo, marked as theirs
            line += f"\t{'found in ' if hit.by_person else ''}{photo.person_field} by a person: {_one_field(photo.person_text)}"
        print(line)
    if not result.hits:
        print("no photos found", file=sys.stderr)
    return 0


def _one_field(text: str) -> str:
    """A tab-separated field: tabs, line breaks and backslashes escaped as in Python, so that
    a file name cannot split a line; bytes that are not UTF-8 as \\xNN."""
    text = text.replace("\\", "\\\\")
    if any("\udc80" <= c <= "\udcff" for c in text):  # os.fsdecode's escapes for undecodable bytes
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _like_vector(photo: str, root: Path, store, model):
    """(CNN features, the photo's id in the index or None) of a photo: stored when it is indexed,
    else computed by the champion."""

    from pipeline.data.images import load_rgb

    path = Path(photo).expanduser().resolve()
    if path.is_relative_to(root):
        found = store.by_path(path.relative_to(root).as_posix())
        if found is not None and found.embedding is not None:
            return found.embedding, found.id
    try:
        pixels = load_rgb(path, model.spec.image_size, model.limits.max_image_pixels)
    except ValueError as err:
        print(f"captioner: {photo}: {err}", file=sys.stderr)
        sys.exit(1)
    return model.embed(pixels[None])[0], None


def alt_text(args: argparse.Namespace) -> int:
    """Scan a site, propose alt texts, review them, apply them (see ``pipeline/alttext``)."""
    from pipeline.alttext import proposals as alt
    from pipeline.alttext.scanning import scan_site

    site = Path(args.site).expanduser()
    if not site.is_dir():
        print(f"captioner: {site} is not a folder", file=sys.stderr)
        return 1
    try:
        cfg = load_settings(args.params).alt_text
    except ConfigError as err:
        print(f"captioner: {err}", file=sys.stderr)
        return 2
    review = Path(args.review_file) if args.review_file else site / alt.REVIEW_FILE
    if args.apply and not args.yes:  # apply what a person accepted: no model needed
        return _apply(site, review, alt.load_review(review), args.dry_run)
    scan = scan_site(site, cfg.max_page_bytes)
    for page, problem in scan.problems:
        print(f"{page}\tNOT READ: {problem}", file=sys.stderr)
    if args.review:
        proposals = alt.load_review(review)
    else:
        identity, model = _champion(args)
        proposals = _keep_decisions(alt.propose(scan, model, identity, cfg, progress=not args.quiet),
                                    review if review.is_file() else None)
        alt.save_review(review, proposals)
    for found in scan.found:
        if found.state == "skipped":
            print(f"{found.page}:{found.line}\t{found.src[:80]}\tSKIPPED: {found.reason}", file=sys.stderr)
        elif found.state == "needs-person":
            print(f"{found.page}:{found.line}\t{found.src}\tNEEDS A PERSON: {found.reason}", file=sys.stderr)
    if args.review:
        _review(proposals, review, cfg)
    elif args.apply:  # --yes: every proposal that keeps the conventions and is sure enough, no person in between
        bar = cfg.min_confidence if args.min_confidence is None else args.min_confidence
        waiting = 0
        for p in proposals:
            if p.status != "proposed":
                continue
            p.for_person = alt.waits_for_person(p, bar)
            if p.for_person:
                waiting += 1
                print(f"{p.page}:{p.line}\t{p.src[:60]}\tWAITS FOR A PERSON: {p.for_person}", file=sys.stderr)
            elif not p.lint:
                p.status = "accepted"
        alt.save_review(review, proposals)
        if waiting:
            print(f"{waiting} proposals wait for a person (captioner alt-text {site} --review)", file=sys.stderr)
        return _apply(site, review, proposals, args.dry_run)
    else:
        from pipeline.captioning.confidence import in_words

        for p in proposals:
            flags = f"  [{'; '.join(p.lint)}]" if p.lint else ""
            sure = f"  ({in_words(p.confidence, p.abstained)}{'; for a person: ' + p.for_person if p.for_person else ''})"
            print(f"{p.page}:{p.line}\t{p.src[:60]}\t{p.status}: {p.alt}{flags}{sure}")
        for label, count in alt.summary(scan, proposals):
            print(f"{label:>40}: {count}")
        print(f"review file: {review} (review: captioner alt-text {site} --review; then --apply)")
    return 0


def _keep_decisions(proposals, review_path):
    """A person's decisions on an earlier scan of the same, unchanged page stay."""
    from pipeline.alttext import proposals as alt

    if review_path is None:
        return proposals
    try:
        earlier = {p.id: p for p in alt.load_review(review_path)}
    except ValueError:
        return proposals
    for p in proposals:
        old = earlier.get(p.id)
        if old and old.page_sha256 == p.page_sha256 and old.status in ("accepted", "edited", "rejected"):
            p.status, p.alt = old.status, old.alt
    # what was applied stays on record (who wrote which alt, when it was accepted), after the new ones
    new_ids = {p.id for p in proposals}
    return proposals + [old for old in earlier.values() if old.status == "applied" and old.id not in new_ids]


def _review(proposals, review_path, cfg) -> None:
    """Ask about each proposal: accept, edit, reject, skip, quit; saved after every answer."""
    from pipeline.alttext import proposals as alt
    from pipeline.captioning.confidence import in_words

    # the ones the model was not sure of first: they are what only a person can decide
    todo = sorted((p for p in proposals if p.status == "proposed"), key=lambda p: not p.for_person)
    print(f"{len(todo)} proposals to review ({review_path}), {sum(bool(p.for_person) for p in todo)} the model "
          "was not sure of first")
    for p in todo:
        sure = in_words(p.confidence, p.abstained) + ("" if p.confidence is None else f" ({p.confidence:.2f})")
        print(f"\n{p.page}:{p.line}  {p.src}\n  proposed: {p.alt}\n  model: {sure}"
              + (f"\n  waits for a person: {p.for_person}" if p.for_person else "")
              + (f"\n  note: {'; '.join(p.lint)}" if p.lint else ""))
        answer = input("  [a]ccept, [e]dit, [r]eject, [s]kip, [q]uit? ").strip().lower()[:1]
        if answer == "q":
            break
        if answer == "a":
            p.status = "accepted"
        elif answer == "r":
            p.status = "rejected"
        elif answer == "e":
            text = input("  alt text: ").strip()
            problems = alt.lint(text, cfg)
            if problems:
                print(f"  kept as proposed: {'; '.join(problems)}")
                continue
            p.alt, p.status = text, "edited"
        alt.save_review(review_path, proposals)
    alt.save_review(review_path, proposals)


def _apply(site: Path, review_path: Path, proposals, dry_run: bool) -> int:
    from pipeline.alttext import proposals as alt

    earlier = {id(p) for p in proposals if p.status == "applied"}  # on record from an earlier apply
    result = alt.apply(site, proposals, dry_run=dry_run)
    for page, why in result.skipped:
        print(f"{page}\tNOT CHANGED: {why}", file=sys.stderr)
    if dry_run:
        print("".join(result.diffs.values()), end="")
        return 0
    alt.save_review(review_path, proposals)
    written = sum(1 for p in proposals if p.status == "applied" and id(p) not in earlier)
    print(f"applied {written} alt texts to {len(result.pages)} pages")
    return 0 if not result.skipped else 1


def tag(args: argparse.Namespace) -> int:
    """Write the champion's captions into the photos' own XMP (see ``pipeline/alttext/tagging``)."""
    from pipeline.alttext.tagging import tag_photos
    from pipeline.data.photo_metadata import MetadataError

    try:
        settings = load_settings(args.params)
    except ConfigError as err:
        print(f"captioner: {err}", file=sys.stderr)
        return 2
    fields = None
    if args.fields:
        fields = [f.strip() for f in args.fields.split(",") if f.strip()]
        unknown = [f for f in fields if f not in ("alt_text", "description")]
        if unknown or not fields:
            print(f"captioner: --fields takes alt_text and/or description, got {args.fields!r}", file=sys.stderr)
            return 2
    identity, model = _champion(args)
    try:
        report = tag_photos([Path(p).expanduser() for p in args.paths], model, identity, settings.tag,
                            settings.alt_text, dry_run=args.dry_run, sidecar=args.sidecar,
                            keep_mtime=args.keep_mtime, fields=fields, min_confidence=args.min_confidence,
                            progress=not args.quiet)
    except MetadataError as err:
        print(f"captioner: {err}", file=sys.stderr)
        return 2
    for t in report.photos:
        if args.json:
            print(json.dumps({"file": t.path, "action": t.action, "detail": t.detail, "written_to": t.written_to,
                              "confidence": t.confidence, "abstained": t.abstained,
                              "confidence_words": t.confidence_words}), flush=True)
            continue
        number = "" if t.confidence is None else f" {t.confidence:.2f}"
        sure = f"\t({t.confidence_words}{number})" if t.action in ("written", "would write", "unsure") else ""
        line = f"{_one_field(t.path)}\t{t.action.upper()}\t{_one_field(t.detail)}{sure}"
        print(line, file=sys.stderr if t.action == "error" else sys.stdout, flush=True)
    counts = report.counts()
    print(f"tagged with {identity}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
          + f" ({len(report.photos)} photos, {report.seconds:.1f} s)"
          + (" - dry run, nothing written" if args.dry_run else ""), file=sys.stderr if args.json else sys.stdout)
    return 1 if counts["error"] else 0


def registry_args(parser: argparse.ArgumentParser) -> None:
    """Which registered model and tracking store a command uses."""
    parser.add_argument("--model-name", default=None, help="registered model (default: register.model_name)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="captioner", description="Image captioning with Flickr8k models.")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("caption", help="print one caption per image",
                         description="Print '<file>\\t<caption>\\t(<how sure>)' per image: the caption as a reader "
                                     "should take it ('May show: ...' when the model is unsure, 'Not sure what this "
                                     "shows' when the picture is unlike the photos it learnt from) and the confidence "
                                     "in words and as a number. Errors go to stderr and make the exit status 1 (2: the "
                                     "model cannot be loaded).")
    cap.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    cap.add_argument("--model", default=None,
                     help="MLflow model URI (default: models:/<register.model_name>@champion)")
    cap.add_argument("--beam", type=beam_size, default=None,
                     help=f"beam size 1..{MAX_BEAM} (1 = greedy; default: the model's)")
    cap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")
    cap.add_argument("--json", action="store_true",
                     help="one JSON object per photo: file, caption, confidence, confidence_words, abstained, "
                          "reason, person_alt_text (the alt text a person already wrote into the photo, or null), "
                          "attention_png with --attention (or file, error)")
    cap.add_argument("--attention", type=Path, default=None, metavar="DIR",
                     help="also write DIR/<photo>.png per photo: the photo with its caption and, per word, where the "
                          "model looked (a heat map over the photo); needs a model trained with train.decoder: "
                          "attention; none is drawn for a photo the model abstains on")
    ind = sub.add_parser("index", help="caption every photo of a folder into a searchable index",
                         description="Caption every photo under DIR (JPEG, PNG, WebP; recursively) with the "
                                     "champion into a photo index. Again later, it does only what changed: "
                                     "new, changed, moved and deleted files, and a new champion (reusing the "
                                     "stored CNN features when the CNN is the same). With ExifTool installed, the "
                                     "alt text or description a person wrote into a photo is stored too, for search.")
    ind.add_argument("folder", help="the photo folder")
    ind.add_argument("--db", default=default_index(), help=f"the index: a file, or a SQLAlchemy URL "
                                                            f"(default: {default_index()})")
    ind.add_argument("--batch", type=positive, default=32, help="photos embedded and captioned together (default: 32)")
    registry_args(ind)
    ind.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sea = sub.add_parser("search", help="find indexed photos by what is in them",
                         description="Print '<score>\\t<path>\\t<caption>\\t<how sure>' for the photos that best fit QUERY, best "
                                     "first, ranked by the caption model's own likelihood of the query (default), "
                                     "full-text BM25 over the stored captions, or a blend of the two. Photos "
                                     "whose own alt text or description, as a person wrote it into the photo, "
                                     "holds every word come first, with a fifth field: '<field> by a person: <text>'.")
    sea.add_argument("query", nargs="?", default="", help="what is in the photos you want, in English")
    sea.add_argument("--like", metavar="PHOTO", help="instead: photos that look like PHOTO (CNN features)")
    sea.add_argument("--limit", type=positive, default=10, help="how many photos (default: 10)")
    sea.add_argument("--ranking", choices=["likelihood", "bm25", "blend"], default="likelihood",
                     help="how to rank (default: likelihood; bm25 needs no model)")
    sea.add_argument("--json", action="store_true", help="JSON instead of lines")
    sea.add_argument("--min-confidence", type=probability, default=None, metavar="P",
                     help="only photos whose caption the model was at least this sure of (0..1; never abstained ones)")
    sea.add_argument("--db", default=default_index(), help=f"the index (default: {default_index()})")
    registry_args(sea)
    alt = sub.add_parser("alt-text", help="find images without alt text in a website and propose some",
                         description="Scan SITE_DIR's .html/.htm/.md pages for images without a text "
                                     "alternative, caption them with the champion and write proposals to a "
                                     "review file (nothing else is changed). --review asks about each one; "
                                     "--apply writes the accepted ones into the pages (--dry-run: the diff "
                                     "only); --apply --yes applies every proposal that keeps the conventions.")
    alt.add_argument("site", help="the website's folder")
    alt.add_argument("--review", action="store_true", help="accept, edit or reject each proposal")
    alt.add_argument("--apply", action="store_true", help="write the accepted alt texts into the pages")
    alt.add_argument("--yes", action="store_true",
                     help="with --apply: accept every proposal that keeps the conventions and that the model is "
                          "sure enough of (alt_text.min_confidence); abstained ones always wait for a person")
    alt.add_argument("--min-confidence", type=probability, default=None, metavar="P",
                     help="with --apply --yes: the confidence a proposal needs this run (default: alt_text.min_confidence)")
    alt.add_argument("--dry-run", action="store_true", help="with --apply: print the diff, write nothing")
    alt.add_argument("--review-file", default=None, help="default: SITE_DIR/.captioner-alt-text.json")
    alt.add_argument("--params", default="params.yaml", help="the conventions (alt_text.*) and model name")
    registry_args(alt)
    alt.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tg = sub.add_parser("tag", help="write the champion's caption into each photo's own metadata (XMP)",
                        description="Write the champion's caption into each photo's XMP, where photo tools, content "
                                    "systems and social media read it: IPTC's Alt Text (Accessibility) and, by tag.fields, "
                                    "dc:description, with a record that a model wrote them (name, version, date, "
                                    "confidence). A value a person wrote is never changed; a later champion rewrites "
                                    "only what a model wrote, where its caption differs; a caption below "
                                    "tag.min_confidence is not written. The image data and every other field are "
                                    "kept; each write is atomic. Prints '<file>\\t<WRITTEN|WOULD WRITE|KEPT|UNCHANGED|"
                                    "UNSURE|ERROR>\\t<text or why>'. Needs ExifTool (apt-get install "
                                    "libimage-exiftool-perl).")
    tg.add_argument("paths", nargs="+", help="photos and folders (walked recursively; links are not followed)")
    tg.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")
    tg.add_argument("--sidecar", action="store_true",
                    help="for photos ExifTool cannot write into (BMP) and read-only ones: write photo.xmp beside them")
    tg.add_argument("--keep-mtime", action="store_true", help="keep each photo's modification time")
    tg.add_argument("--fields", default=None, metavar="LIST",
                    help="comma-separated: alt_text, description (default: tag.fields)")
    tg.add_argument("--min-confidence", type=probability, default=None, metavar="P",
                    help="the confidence a caption needs to be written this run (default: tag.min_confidence)")
    tg.add_argument("--json", action="store_true", help="one JSON object per photo")
    tg.add_argument("--params", default="params.yaml", help="tag.* and alt_text.* settings (default: params.yaml)")
    registry_args(tg)
    tg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    app = sub.add_parser("app", help="serve a caption web page and JSON API over the champion",
                         description="A web page (drop photos, get captions) and POST /api/caption, "
                                     "GET /api/model, GET /healthz over models:/<name>@<alias>; the "
                                     "alias is checked every --poll-seconds and a new version is "
                                     "swapped in without a restart.")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    app.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    app.add_argument("--model-name", default=None, help="registered model (default: register.model_name)")
    app.add_argument("--alias", default=ALIAS, help=f"alias to follow (default: {ALIAS})")
    app.add_argument("--poll-seconds", type=float, default=10.0,
                     help="how often to check the alias (default: 10)")
    app.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")
    app.add_argument("--index", default=None, metavar="PATH",
                     help="also serve search over this photo index (GET /api/search, thumbnails)")
    app.add_argument("--params", default="params.yaml",
                     help="feedback.* settings: where ratings and corrections go (default: params.yaml)")
    app.add_argument("--no-feedback", action="store_true",
                     help="no caption ids, ratings, corrections or traces")
    app.add_argument("--trusted-proxies", default=None, metavar="ADDRS",
                     help="comma-separated addresses of reverse proxies whose X-Forwarded-For names the client "
                          "(default: none; the connection's address counts, for rate limits too)")
    app.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                     help="comma-separated Host names the app answers besides the defaults (on 127.0.0.1: the "
                          "loopback names only; on another address: any, unless listed here)")
    real = sub.add_parser("real-model", help="train, evaluate and register a model on real Flickr8k features",
                          description="Train the decoder on a folder of real Flickr8k captions and MobileNetV2 int8 "
                                      "features (the layout of the shared flickr8k_real/: token file, split lists, "
                                      "embeddings Parquet, dev_photos/), score it on that folder's dev split and "
                                      "register it in the project's MLflow store with the vendored MobileNetV2 as "
                                      "its CNN, judged against the champion on the dev photos like any model.")
    real.add_argument("--data", required=True, type=Path, help="the folder of captions and features")
    real.add_argument("--work", type=Path, default=Path("real"),
                      help="where the stages' files are laid out and written (default: real/)")
    real.add_argument("--promote", action="store_true",
                      help="make it champion even if the comparison with the champion does not favour it")
    real.add_argument("--params", default="params.yaml", help="train.*, decoding.*, register.*, mlflow.* "
                                                              "(default: params.yaml)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.command == "real-model":
        setup_logging()
        from pipeline.stages import real_model

        try:
            report = real_model.run(load_settings(args.params), args.data, args.work, args.promote)
        except (ConfigError, ReportedError) as err:
            print(f"captioner: {err}", file=sys.stderr)
            sys.exit(1)
        print(f"{report['model_name']} v{report['version']}: {report['decision']} ({report['reason']}); "
              f"beam {report['metric']} {report['new_score']:.4f} on the dev split")
        sys.exit(0)
    if args.command == "app":
        setup_logging()
        if args.poll_seconds <= 0:
            parser.error("--poll-seconds must be positive")
        from pipeline.app.routes import serve
        from pipeline.captioning import quiet_tensorflow  # noqa: F401

        name = args.model_name or _model_name()
        if name is None:
            parser.error("no params.yaml here to read register.model_name from: run from the project root "
                         "or pass --model-name")
        _use_tracking_uri(args.tracking_uri)
        try:
            settings = load_settings(args.params)
        except ConfigError as err:
            parser.error(f"the app reads its limits (app.*) and feedback.* from params.yaml: {err}; run from the "
                         "project root or pass --params FILE")
        feedback = None if args.no_feedback else settings.feedback
        listed = [[a.strip() for a in (text or "").split(",") if a.strip()]
                  for text in (args.trusted_proxies, args.allowed_hosts)]
        try:
            sys.exit(serve(name, args.alias, args.host, args.port, args.poll_seconds, settings.app, args.index,
                           feedback, trusted_proxies=listed[0], extra_hosts=listed[1], tag=settings.tag,
                           alt_text=settings.alt_text))
        except ReportedError as err:
            print(f"captioner: {err}", file=sys.stderr)
            sys.exit(2)
    if args.command == "alt-text":
        setup_logging(level=logging.WARNING)
        if (args.yes or args.dry_run) and not args.apply:
            parser.error("--yes and --dry-run go with --apply")
        try:
            sys.exit(alt_text(args))
        except (ReportedError, ValueError) as err:
            print(f"captioner: {err}", file=sys.stderr)
            sys.exit(1)
    if args.command == "tag":
        setup_logging(level=logging.WARNING)
        try:
            sys.exit(tag(args))
        except ReportedError as err:
            print(f"captioner: {err}", file=sys.stderr)
            sys.exit(1)
    if args.command in ("index", "search"):
        setup_logging(level=logging.WARNING)
        if args.command == "search" and not args.query.strip() and args.like is None:
            parser.error("give a QUERY (what is in the photos) or --like PHOTO")
        import sqlalchemy as sa

        from pipeline.config import database_url
        from pipeline.search.photo_index import damaged

        try:
            sys.exit(index(args) if args.command == "index" else search(args))
        except ReportedError as err:
            print(f"captioner: {err}", file=sys.stderr)
            sys.exit(1)
        except sa.exc.SQLAlchemyError as err:  # the index file was readable at first, damaged further in
            print(f"captioner: {damaged(database_url(args.db), err)}", file=sys.stderr)
            sys.exit(1)
    setup_logging(level=logging.WARNING)
    if args.model is None:
        name = _model_name()
        if name is None:
            parser.error("no params.yaml here to read register.model_name from: run from the project root "
                         "or pass --model models:/<name>@champion")
        args.model = f"models:/{name}@{ALIAS}"
    sys.exit(caption(args))


if __name__ == "__main__":
    main()
