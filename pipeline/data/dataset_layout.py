"""Bring an extracted or local dataset into the one layout every later stage reads:

    <dataset>/Images/*.jpg
    <dataset>/Flickr8k.token.txt   (or Kaggle's captions.txt)
    <dataset>/Flickr_8k.{train,dev,test}Images.txt

Accepted inputs: the official archives (images in ``Flicker8k_Dataset/`` (sic) or
``Flickr8k_Dataset/``, text files at the root) and the Kaggle layout (``Images/`` +
``captions.txt``, no split lists: splits are assigned from a stable hash of the name).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from pipeline import paths
from pipeline.data.flickr8k import SPLITS, parse_kaggle_captions, write_split_lists

log = logging.getLogger(__name__)

IMAGE_DIR_NAMES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class LayoutError(RuntimeError):
    """The input does not look like Flickr8k in a known layout."""


def _find(root: Path, names: tuple[str, ...], want_dir: bool, max_depth: int = 3) -> Path | None:
    """Shallowest path under root whose name is one of ``names`` (in that preference)."""
    for depth in range(max_depth + 1):
        pattern = "/".join(["*"] * depth + ["{}"]) if depth else "{}"
        for name in names:
            for hit in sorted(root.glob(pattern.format(name))):
                if "__MACOSX" not in hit.parts and (hit.is_dir() if want_dir else hit.is_file()):
                    return hit
    return None


def _place(src: Path, dst: Path, move: bool) -> None:
    if move:
        os.replace(src, dst)
    else:
        shutil.copy2(src, dst)


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links resolved, lies inside ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def normalise(src_root: Path, out_dir: Path, split_ratios: dict[str, float], *, origin: str,
              move: bool = False, progress: bool = True) -> dict:
    """Write ``src_root`` (an extracted archive or a user's folder) into ``out_dir`` in the
    common layout. ``move`` renames instead of copying (for a private staging folder);
    ``origin`` names the source in errors (``data.local_path ...``, an archive), never a staging
    path. A link that leads outside ``src_root`` is not followed (its image is left out and
    reported missing by validate). Returns a summary (which files were used, whether splits
    were generated, which links were refused)."""
    image_dir = _find(src_root, IMAGE_DIR_NAMES, want_dir=True)
    token = _find(src_root, (paths.TOKEN_FILE,), want_dir=False)
    kaggle = _find(src_root, (paths.KAGGLE_CAPTIONS,), want_dir=False)
    if image_dir is None:
        raise LayoutError(f"{origin}: no image folder ({' or '.join(IMAGE_DIR_NAMES)})")
    if token is None and kaggle is None:
        raise LayoutError(f"{origin}: no caption file ({paths.TOKEN_FILE} or {paths.KAGGLE_CAPTIONS})")
    caption_file = token or kaggle
    if not _inside(image_dir, src_root) or not _inside(caption_file, src_root):
        raise LayoutError(f"{origin}: {image_dir.name if not _inside(image_dir, src_root) else caption_file.name} "
                          "is a link to somewhere outside the folder; copy the files in instead")
    shown = f"{origin}: {caption_file.relative_to(src_root)}"
    # parsed where it lies, before anything moves: a bad file is named as the user knows it
    captioned = (parse_kaggle_captions(caption_file, shown)["image"].tolist()
                 if caption_file.name == paths.KAGGLE_CAPTIONS else None)
    images_out = out_dir / paths.IMAGES_SUBDIR
    images_out.mkdir(parents=True, exist_ok=True)
    candidates = [p for p in sorted(image_dir.iterdir())
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("._")]
    outside = [p.name for p in candidates if not _inside(p, src_root)]
    if outside:
        log.warning("%s: %d image(s) are links to files outside the folder and were left out, e.g. %s",
                    origin, len(outside), outside[:3])
    images = [p for p in candidates if p.is_file() and p.name not in outside]
    for image in tqdm(images, desc="images", unit="img", disable=not progress):
        _place(image, images_out / image.name, move)
    _place(caption_file, out_dir / caption_file.name, move)
    split_dir = caption_file.parent
    have_splits = all(_find(split_dir, (paths.SPLIT_FILES[s],), want_dir=False, max_depth=1)
                      for s in SPLITS)
    if have_splits:
        for split in SPLITS:
            name = paths.SPLIT_FILES[split]
            _place(_find(split_dir, (name,), want_dir=False, max_depth=1), out_dir / name, move)
    else:
        write_split_lists(out_dir, captioned if captioned is not None else [p.name for p in images], split_ratios)
        log.info("no split lists found: assigned splits by a stable hash of the image name")
    if image_dir.name != paths.IMAGES_SUBDIR:
        log.info("image folder %r normalised to %r", image_dir.name, paths.IMAGES_SUBDIR)
    return {"image_dir": image_dir.name, "caption_file": caption_file.name,
            "images": len(images), "splits_generated": not have_splits, "links_outside": outside}
