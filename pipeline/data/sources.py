"""Where each prepared caption comes from: the dataset (``folder`` "raw",
``data/prepared/captions.parquet``) or people's corrections in the app (``folder`` "feedback",
``data/feedback/captions.parquet``, written by the ``feedback`` stage).

This module is the one place that joins the two, turns rows into image files and gives
corrections their training weight. Corrected photos of the held-out share have the split
``feedback`` (scored by ``evaluate`` beside the test split, never trained on); the others are
train rows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.data.flickr8k import image_file

RAW, FEEDBACK = "raw", "feedback"
FEEDBACK_TEST = "feedback"  # the split of held-out corrected photos


def prepared_captions() -> pd.DataFrame:
    """The dataset's kept captions and the kept corrections (when exported), with ``folder``."""
    frames = [pd.read_parquet(paths.CAPTIONS).assign(folder=RAW)]
    if paths.FEEDBACK_CAPTIONS.exists():
        frames.append(pd.read_parquet(paths.FEEDBACK_CAPTIONS).assign(folder=FEEDBACK))
    return pd.concat(frames, ignore_index=True)


def folders(source: str) -> dict[str, Path]:
    """Image folder of each kind of row, for a ``data.source``."""
    return {RAW: paths.dataset_dir(source) / paths.IMAGES_SUBDIR, FEEDBACK: paths.FEEDBACK_DIR / paths.IMAGES_SUBDIR}


def image_files(captions: pd.DataFrame, source: str) -> dict[str, Path]:
    """image name -> file, for every image of ``captions`` (tables without a ``folder`` column,
    written before feedback existed, are all dataset rows)."""
    dirs = folders(source)
    kinds = captions["folder"] if "folder" in captions else pd.Series(RAW, index=captions.index)
    pairs = pd.DataFrame({"image": captions["image"], "folder": kinds}).drop_duplicates("image")
    return {name: image_file(dirs[kind], name) for name, kind in zip(pairs["image"], pairs["folder"])}


def training_rows(captions: pd.DataFrame, repeats: int) -> pd.DataFrame:
    """``captions`` with each feedback row ``repeats`` times: a corrected photo has one caption
    where a Flickr8k photo has five, so a correction counts as ``feedback.train_repeats``
    captions, in the vocabulary and in the loss."""
    if "folder" not in captions or repeats <= 1:
        return captions
    corrected = captions[captions["folder"] == FEEDBACK]
    return pd.concat([captions, *([corrected] * (repeats - 1))], ignore_index=True)
