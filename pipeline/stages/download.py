"""Stage ``download``: get a dataset into ``data/raw/<source>/`` in the Flickr8k layout.

``data.source`` selects ``synthetic`` (generated offline), ``flickr8k`` (the official
archives over HTTP: checksum, resume, safe unzip) or ``local`` (a folder or zip you have).
The new dataset is assembled in a staging folder and swapped in only when complete, so a
failed or partial run never replaces a good earlier output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from pipeline import paths
from pipeline.config import Settings
from pipeline.data.archives import (
    DownloadError,
    UnsafeArchiveError,
    check_zip,
    download,
    safe_extract,
)
from pipeline.data.dataset_layout import LayoutError, normalise
from pipeline.data.synthetic import write_dataset
from pipeline.stages._cli import StageError, stage_main

log = logging.getLogger("pipeline.download")


def _fetch_flickr8k(settings: Settings, staging: Path) -> dict:
    cfg, limits = settings.data.flickr8k, settings.data.archive_limits
    extract = staging / "extract"
    for url, sha in ((cfg.images_url, cfg.images_sha256), (cfg.text_url, cfg.text_sha256)):
        archive = download(url, paths.DOWNLOADS_DIR / Path(url.split("?")[0]).name, sha256=sha,
                           check=lambda path: check_zip(path, limits), timeout=cfg.timeout_s, retries=cfg.retries)
        safe_extract(archive, extract, limits)
    return normalise(extract, staging / "dataset", settings.data.kaggle_split.model_dump(),
                     origin=f"the archives of {cfg.images_url} and {cfg.text_url}", move=True)


def _looks_like_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return path.suffix.lower() == ".zip" or f.read(4) == b"PK\x03\x04" or zipfile.is_zipfile(path)


def _copy_local(settings: Settings, staging: Path) -> dict:
    source = Path(settings.data.local_path).expanduser()
    ratios = settings.data.kaggle_split.model_dump()
    origin = f"data.local_path {source}"
    if source.is_dir():
        return normalise(source, staging / "dataset", ratios, origin=origin)
    if not source.exists():
        raise LayoutError(f"{origin} does not exist")
    if source.is_file() and _looks_like_zip(source):
        check_zip(source, settings.data.archive_limits)  # truncated, corrupt or a bomb: said before extraction
        safe_extract(source, staging / "extract", settings.data.archive_limits)
        return normalise(staging / "extract", staging / "dataset", ratios, origin=origin, move=True)
    raise LayoutError(f"{origin} is neither a folder nor a zip file")


def _publish(dataset: Path, out: Path) -> None:
    """Swap the finished dataset into place; the old one is removed only afterwards."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(dataset, out)
    if old.exists():
        shutil.rmtree(old)


def _remove_other_datasets(current: Path) -> None:
    """data/raw holds only the current source's dataset: it is one DVC output, and a dataset
    left from another source would be hashed and cached with it. (Archives stay cached in
    data/downloads and DVC's cache keeps earlier versions.)"""
    for other in paths.RAW_DIR.iterdir():
        if other.is_dir() and other != current and not other.name.startswith("."):
            log.info("removing %s (data.source is now %s)", other, current.name)
            shutil.rmtree(other)


def run(settings: Settings) -> Path:
    """Produce ``data/raw/<source>/``; returns that path."""
    source = settings.data.source
    out = paths.dataset_dir(source)
    paths.RAW_DIR.mkdir(parents=True, exist_ok=True)
    for stale in paths.RAW_DIR.glob(".staging-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=paths.RAW_DIR))
    try:
        if source == "synthetic":
            syn = settings.data.synthetic
            write_dataset(staging / "dataset", syn.n_images, syn.image_size, syn.seed,
                          syn.split.model_dump())
            summary = {"images": syn.n_images, "generated": True}
        elif source == "flickr8k":
            summary = _fetch_flickr8k(settings, staging)
        else:
            summary = _copy_local(settings, staging)
        _publish(staging / "dataset", out)
        _remove_other_datasets(out)
    except (DownloadError, UnsafeArchiveError, LayoutError, OSError, ValueError) as err:
        raise StageError(f"{err}\n(earlier output in {out}, if any, is unchanged)") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("dataset ready in %s: %s", out, summary)
    return out


def main() -> None:
    stage_main("download", __doc__, run)


if __name__ == "__main__":
    main()
