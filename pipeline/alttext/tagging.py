"""``captioner tag``: the champion's caption written into each photo's own XMP, so it travels.

For each photo (folders walked recursively; links are never written through: a photo is tagged
where it lies) the photo's metadata is read first (``pipeline.data.photo_metadata``), then:

* a value a person wrote (alt text or description with no record of a model writing exactly it)
  keeps the photo as it is: ``kept``;
* a photo whose fields this very model wrote is ``unchanged`` without captioning it again;
* the others are captioned, photos decoded on threads while the CNN works (``prefetched``); a
  caption the model is not sure enough of (``tag.min_confidence``, abstained, no confidence) is
  not written (``unsure``); a caption equal to the one a model already wrote is ``unchanged``;
  otherwise the fields (``tag.fields``) are written with the model's record (``written``), or
  would be (``would write``, ``--dry-run``).

A photo ExifTool cannot write into (BMP, say) or that is read-only gets its text in a
``photo.xmp`` sidecar with ``--sidecar`` and is reported otherwise. Every problem is reported by
the photo's name; none stops the run. A second run over the same photos writes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.alttext.proposals import as_alt_text
from pipeline.captioning.confidence import in_words
from pipeline.config import AltTextSettings, TagSettings
from pipeline.data.images import prefetched
from pipeline.data.photo_folder import PHOTO_SUFFIXES, photo_files, shown_name
from pipeline.data.photo_metadata import (
    EMBEDDABLE,
    RECORDED,
    MetadataError,
    PhotoMetadata,
    PhotoText,
    sidecar_for,
)
from pipeline.registry.pyfunc_model import described

log = logging.getLogger("pipeline.alttext")

TAG_SUFFIXES = PHOTO_SUFFIXES + (".gif", ".tif", ".tiff", ".bmp")
ACTIONS = ("written", "would write", "kept", "unchanged", "unsure", "error")


@dataclass
class Tagged:
    """What happened to one photo."""

    path: str  # as given / found, printable
    action: str  # one of ACTIONS
    detail: str = ""  # the text written (or that would be), or why not
    confidence: float | None = None
    abstained: bool = False
    written_to: str = ""  # the photo itself, or its sidecar

    @property
    def confidence_words(self) -> str:
        return in_words(self.confidence, self.abstained)


@dataclass
class TagReport:
    photos: list[Tagged] = field(default_factory=list)
    seconds: float = 0.0
    metadata_seconds: float = 0.0  # reading and writing XMP (ExifTool)
    captioned: int = 0

    def counts(self) -> dict[str, int]:
        return {a: sum(t.action == a for t in self.photos) for a in ACTIONS}

    @property
    def photos_per_s(self) -> float:
        return len(self.photos) / self.seconds if self.seconds else float("nan")


def collect(paths: list[Path], report: TagReport) -> list[Path]:
    """The photo files named by ``paths`` (folders recursively); links and unreadable names are
    reported, not followed."""
    files: list[Path] = []
    for given in paths:
        if given.is_symlink():
            report.photos.append(Tagged(shown_name(str(given)), "error", "a link: tag the file it leads to"))
        elif given.is_dir():
            refused: list[tuple[str, str]] = []
            links: list[tuple[str, bool]] = []
            found = photo_files(given, refused, TAG_SUFFIXES, links)
            for name, why in refused:
                report.photos.append(Tagged(str(given / name), "error", why))
            linked = set()
            for name, inside in links:
                linked.add(name)
                report.photos.append(Tagged(str(given / name), "error", "a link: tag the file it leads to" if inside
                                            else "a link leading outside the folder: not followed"))
            files += [path for rel, (path, _, _) in sorted(found.items()) if rel not in linked]
        elif given.is_file():
            files.append(given)
        else:
            report.photos.append(Tagged(shown_name(str(given)), "error", "no such file or folder"))
    unique, seen = [], set()
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _record(identity: str, said: dict, values: dict[str, str]) -> dict[str, str]:
    name, _, version = identity.rpartition("/")
    record = {"Model": name or identity, "ModelVersion": version,
              "WrittenAt": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "ConfidenceWords": in_words(said["confidence"], said["abstained"])}
    if said["confidence"] is not None:
        record["Confidence"] = f"{said['confidence']:.3f}"
    record.update({RECORDED[f]: v for f, v in values.items()})
    return record


def tag_photos(paths: list[Path], model, identity: str, cfg: TagSettings, alt_cfg: AltTextSettings, *,
               dry_run: bool = False, sidecar: bool = False, keep_mtime: bool = False,
               fields: list[str] | None = None, min_confidence: float | None = None,
               progress: bool = True) -> TagReport:
    """Tag the photos under ``paths`` with the captions of ``model`` (registered as ``identity``,
    name/version); see the module docstring."""
    start = time.perf_counter()
    report = TagReport()
    fields = list(fields or cfg.fields)
    bar = cfg.min_confidence if min_confidence is None else min_confidence
    files = collect(paths, report)
    try:
        tool = PhotoMetadata(cfg.max_xmp_bytes)
    except MetadataError as err:
        raise MetadataError(f"captioner tag needs ExifTool: {err}") from None
    with tool, tqdm(total=len(files), desc="tag", unit="photo", disable=not progress) as progress_bar:
        for lo in range(0, len(files), cfg.batch_size * 4):
            t0 = time.perf_counter()
            texts = tool.read(files[lo:lo + cfg.batch_size * 4], for_writing=not dry_run)
            report.metadata_seconds += time.perf_counter() - t0
            todo = []
            for text in texts:
                decided = _before_captioning(text, identity, fields, sidecar)
                if decided is None:
                    todo.append(text)
                else:
                    report.photos.append(decided)
                    progress_bar.update(1)
            for batch, pixels in prefetched(todo, lambda t: t.path, model.spec.image_size,
                                            model.limits.max_image_pixels, cfg.batch_size):
                good = [(t, p) for t, p in zip(batch, pixels) if isinstance(p, np.ndarray)]
                for t, p in zip(batch, pixels):
                    if not isinstance(p, np.ndarray):
                        report.photos.append(Tagged(shown_name(str(t.path)), "error",
                                                    f"not a usable image: {str(p).splitlines()[0]}"))
                said_all = described(model, model.embed(np.stack([p for _, p in good]))) if good else []
                report.captioned += len(good)
                for (text, _), said in zip(good, said_all):
                    t0 = time.perf_counter()
                    report.photos.append(_write(tool, text, said, identity, fields, bar, alt_cfg,
                                                dry_run, sidecar, keep_mtime))
                    report.metadata_seconds += time.perf_counter() - t0
                progress_bar.update(len(batch))
    report.seconds = time.perf_counter() - start
    log.info("tagged %d photos: %s", len(report.photos), report.counts())
    return report


MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif", "tif": "image/tiff"}


def tag_upload(tool: PhotoMetadata, data: bytes, name: str, said: dict, identity: str, cfg: TagSettings,
               alt_cfg: AltTextSettings) -> tuple[bytes, Tagged, str]:
    """An uploaded photo (``data``, called ``name``) with ``said`` (the model's caption and how
    sure it is) written in as ``captioner tag`` would: (the photo's bytes, what happened, its
    file type). The bytes are the upload's own unless something was written."""
    with tool.private_copy(data) as path:
        (text,) = tool.read([path], for_writing=True)
        if not text.problem and text.file_type not in EMBEDDABLE:
            done = Tagged(name, "error", f"a {text.file_type.upper() or 'file of this'} kind cannot carry alt text: "
                                         "send JPEG, PNG, WebP, GIF or TIFF")
        else:
            done = (_before_captioning(text, identity, cfg.fields, sidecar=False)
                    or _write(tool, text, said, identity, cfg.fields, cfg.min_confidence, alt_cfg,
                              dry_run=False, sidecar=False, keep_mtime=False))
        done.path, done.written_to = name, name if done.written_to else ""
        return (path.read_bytes() if done.action == "written" else data), done, text.file_type


def _writable_here(text: PhotoText) -> str:
    """Why the text cannot go into the photo itself ('' when it can)."""
    if text.file_type not in EMBEDDABLE:
        return f"ExifTool cannot write into {text.file_type.upper() or 'this'} files"
    # the mode bits too: root may write anything, but a file marked read-only is meant to stay so
    if not os.access(text.path, os.W_OK) or not text.path.stat().st_mode & 0o222:
        return "the file is read-only"
    if not os.access(text.path.parent, os.W_OK):
        return "its folder is read-only"
    return ""


def _before_captioning(text: PhotoText, identity: str, fields: list[str], sidecar: bool) -> Tagged | None:
    """The outcome for a photo that needs no caption, or None when it needs one."""
    name = shown_name(str(text.path))
    if text.problem:
        return Tagged(name, "error", text.problem)
    person = text.by_person()
    if person:
        return Tagged(name, "kept", f"a person wrote its {' and '.join(sorted(person))}: never changed")
    if text.model == identity and all(text.by_model(f) for f in fields):
        return Tagged(name, "unchanged", f"already tagged by {identity}", written_to=name)
    why = _writable_here(text)
    if why and not sidecar:
        return Tagged(name, "error", f"{why}: --sidecar writes {sidecar_for(text.path).name} beside it")
    return None


def _write(tool: PhotoMetadata, text: PhotoText, said: dict, identity: str, fields: list[str], bar: float,
           alt_cfg: AltTextSettings, dry_run: bool, sidecar: bool, keep_mtime: bool) -> Tagged:
    name = shown_name(str(text.path))
    alt = as_alt_text(said["caption"], alt_cfg)
    sure = dict(confidence=said["confidence"], abstained=said["abstained"])
    if said["abstained"]:
        return Tagged(name, "unsure", f"the model abstained ({said['reason']}): nothing written", **sure)
    if said["confidence"] is None:
        return Tagged(name, "unsure", f"no confidence ({said['reason'] or 'the model does not say'}): nothing written", **sure)
    if said["confidence"] < bar:
        return Tagged(name, "unsure", f"confidence {said['confidence']:.2f} below tag.min_confidence {bar:g}: "
                                      f"nothing written (it might say: {alt})", **sure)
    values = {f: alt for f in fields}
    if all(text.values.get(f) == v and text.by_model(f) for f, v in values.items()):
        return Tagged(name, "unchanged", f"{text.model or 'a model'} wrote the same: {alt}", **sure)
    into_sidecar = bool(_writable_here(text))
    target = sidecar_for(text.path) if into_sidecar else text.path
    if dry_run:
        return Tagged(name, "would write", alt, written_to=shown_name(str(target)), **sure)
    try:
        written = tool.write(text, values, _record(identity, said, values), sidecar=into_sidecar, keep_mtime=keep_mtime)
    except (MetadataError, OSError) as err:
        return Tagged(name, "error", f"not written: {str(err).splitlines()[0] if str(err) else type(err).__name__}", **sure)
    return Tagged(name, "written", alt, written_to=shown_name(str(written)), **sure)
