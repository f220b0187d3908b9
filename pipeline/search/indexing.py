"""``captioner index DIR``: caption every photo of a folder with the champion, into a photo index.

Incremental, and each step costs only what changed:

* a file whose path, size and mtime are in the index, captioned by the current model, is skipped;
* a new file whose content (sha256) matches a photo that vanished from its old path was moved:
  its row follows it, nothing is recomputed;
* a file no longer on disk leaves the index;
* a file that cannot be read or decoded is recorded with its error and skipped: it never stops
  the run (and is tried again when it changes or the model does);
* when the champion changes, every photo is captioned again, but if its CNN is the same
  (``BackboneFolder.digest``) the stored embeddings are reused and only the decoder runs.

Photos are embedded and captioned ``batch_size`` at a time, each batch committed on its own, so
a killed run keeps what it finished and the next run goes on from there; the next batch is read
and decoded on threads while the CNN works on this one (``prefetched``). With ExifTool at hand,
each photo's own metadata is read too: alt text or a description that a person (not a model, see
``pipeline.data.photo_metadata``) wrote into it is stored beside the caption, for search. Files are found by
walking the folder; links are followed only when they lead inside it (never outside the folder).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.data.archives import sha256_of
from pipeline.data.images import prefetched
from pipeline.data.photo_folder import photo_files
from pipeline.data.photo_metadata import PhotoMetadata
from pipeline.registry.pyfunc_model import described
from pipeline.search.photo_index import Photo, PhotoIndex, PhotoIndexError

log = logging.getLogger("pipeline.search")



@dataclass
class IndexReport:
    on_disk: int = 0
    unchanged: int = 0
    new: int = 0
    changed: int = 0
    moved: int = 0
    removed: int = 0
    recaptioned: int = 0  # only the decoder ran: the stored embedding was reused
    embedded: int = 0  # the CNN ran
    errors: list[tuple[str, str]] = field(default_factory=list)
    described_by_person: int = 0  # photos with alt text or a description a person wrote into them
    metadata_unread: list[tuple[str, str]] = field(default_factory=list)  # photos whose XMP was left alone, and why
    seconds: float = 0.0

    @property
    def photos_per_s(self) -> float:
        done = self.embedded + self.recaptioned
        return done / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k not in ("errors", "metadata_unread")},
                "errors": len(self.errors), "metadata_unread": len(self.metadata_unread),
                "photos_per_s": round(self.photos_per_s, 2)}


def _with_caption(photo: Photo, found: dict, identity: str) -> Photo:
    photo.caption, photo.candidates, photo.model, photo.indexed_at = found["caption"], found["candidates"], identity, _now()
    photo.confidence, photo.abstained, photo.reason = found["confidence"], found["abstained"], found["reason"]
    return photo


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def index_folder(folder: Path, store: PhotoIndex, model, identity: str, batch_size: int,
                 progress: bool = True, metadata: PhotoMetadata | None = None) -> IndexReport:
    """Bring ``store`` up to date with the photos under ``folder`` and the captions ``model``
    (a loaded ``CaptionModel``, registered as ``identity`` = name/version) writes for them;
    ``metadata`` (an open ExifTool) also reads what a person wrote into each photo."""
    start = time.perf_counter()
    root = folder.expanduser().resolve()
    if not root.is_dir():
        raise PhotoIndexError(f"{folder} is not a folder")
    indexed_root = store.root()
    if indexed_root is not None and indexed_root != root:
        raise PhotoIndexError(f"{store.url} indexes {indexed_root}, not {root}: give another --db for this folder")
    store.set_meta("root", str(root))
    digest = model.backbone_digest
    report = IndexReport()
    on_disk = photo_files(root, report.errors)
    report.on_disk = len(on_disk)
    rows = {r.path: r for r in store.iter_paths()}
    fresh, stale = [], []  # (rel, abs, size, mtime): files to hash; rows of this model to recaption
    for rel, (path, size, mtime) in on_disk.items():
        row = rows.get(rel)
        if row is not None and (row.size, row.mtime_ns) == (size, mtime):
            if row.model == identity:
                report.unchanged += 1
            else:
                stale.append(row)
        else:
            fresh.append((rel, path, size, mtime))
            if row is None:
                report.new += 1
            else:
                report.changed += 1
    vanished = {r.sha256: r for rel, r in rows.items() if rel not in on_disk}
    work: list[tuple[str, Path, int, int, str]] = []  # files that need the CNN (or decoding)
    for rel, path, size, mtime in fresh:
        try:
            sha = sha256_of(path)
        except OSError as err:
            work.append((rel, path, size, mtime, ""))  # recorded as an error below
            log.debug("cannot read %s: %s", path, err)
            continue
        mover = vanished.get(sha)
        if mover is not None and rel not in rows:
            store.move(mover.id, rel, size, mtime)
            del vanished[sha]
            report.moved += 1
            report.new -= 1
            if mover.model != identity:  # moved and the champion changed: caption it again
                stale.append(mover._replace(path=rel, size=size, mtime_ns=mtime))
            continue
        work.append((rel, path, size, mtime, sha))
    store.delete(r.id for r in vanished.values())
    report.removed = len(vanished)

    bar = tqdm(total=len(work) + len(stale), desc="index", unit="photo", disable=not progress)
    try:
        # the champion changed, the file did not: decode again, from the stored embedding if the CNN is the same
        reusable = [r for r in stale if r.backbone == digest]
        for lo in range(0, len(reusable), batch_size):
            chunk = store.by_ids(r.id for r in reusable[lo:lo + batch_size])
            photos = [p for p in chunk.values() if p.embedding is not None and p.status == "ok"]
            for photo, found in zip(photos, described(
                    model, np.stack([p.embedding for p in photos])) if photos else []):
                _with_caption(photo, found, identity)
            store.save(photos)
            report.recaptioned += len(photos)
            bar.update(len(reusable[lo:lo + batch_size]))
            work += [(p.path, root / p.path, p.size, p.mtime_ns, p.sha256) for p in chunk.values()
                     if p.embedding is None or p.status != "ok"]
        work += [(r.path, root / r.path, r.size, r.mtime_ns, r.sha256) for r in stale if r.backbone != digest]
        for batch, pixels in prefetched(work, _readable, model.spec.image_size, model.limits.max_image_pixels,
                                        batch_size):
            report.embedded += _embed_and_save(batch, pixels, store, model, identity, digest, report, metadata)
            bar.update(len(batch))
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start
    log.info("indexed %s: %s", root, report.summary())
    return report


def _readable(item) -> Path:
    rel, path, size, mtime, sha = item
    if not sha:
        raise OSError("the file cannot be read")
    return path


def _embed_and_save(batch, pixels, store: PhotoIndex, model, identity: str, digest: str, report: IndexReport,
                    metadata: PhotoMetadata | None) -> int:
    """Embed and caption one decoded batch; files that could not be read or decoded become error
    rows. Returns how many photos the CNN embedded."""
    good, saved = [], []
    for (rel, path, size, mtime, sha), image in zip(batch, pixels):
        if isinstance(image, np.ndarray):
            good.append((rel, path, size, mtime, sha, image))
        else:
            error = str(image).splitlines()[0]
            report.errors.append((rel, error))
            saved.append(Photo(rel, size, mtime, sha or "", "error", error, model=identity, indexed_at=_now()))
    if good:
        written = _persons_words(metadata, [g[1] for g in good], [g[0] for g in good], report)
        features = model.embed(np.stack([g[5] for g in good]))
        for (rel, _, size, mtime, sha, _), vector, found, (field_name, text) in zip(
                good, features, described(model, features), written):
            photo = Photo(rel, size, mtime, sha, "ok", backbone=digest, embedding=np.asarray(vector, np.float32),
                          person_text=text, person_field=field_name)
            saved.append(_with_caption(photo, found, identity))
    store.save(saved)
    return len(good)


def _persons_words(metadata: PhotoMetadata | None, paths: list[Path], names: list[str],
                   report: IndexReport) -> list[tuple[str, str]]:
    """(field, text) a person wrote into each photo, ('', '') where none did (or no ExifTool)."""
    if metadata is None:
        return [("", "")] * len(paths)
    out = []
    for name, text in zip(names, metadata.read(paths)):
        if text.problem:
            report.metadata_unread.append((name, text.problem))
            out.append(("", ""))
            continue
        chosen = text.persons_words()
        out.append(chosen)
        report.described_by_person += bool(chosen[0])
    return out
