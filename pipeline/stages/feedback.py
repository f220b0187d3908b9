"""Stage ``feedback``: export and check the corrections people made in the app -> ``data/feedback/``.

Reads the feedback store (``CAPTIONER_FEEDBACK_DB``, else ``feedback.db`` in params.yaml) and
writes every correction not taken back, with its photo, in the Flickr8k layout
(``pipeline/feedback/export.py``): a stable hash of each photo holds ``feedback.test_share`` of
them out as the feedback test set (split ``feedback``), the rest join the train split. The
rules every Flickr8k caption goes through (``pipeline/data/dataset_check.py``) then check them:
kept rows go to ``data/feedback/captions.parquet``, quarantined ones with their reason to
``data/feedback/rejects.parquet``, the expectations to ``data/feedback/validation.json``.
Rejected corrections never fail the stage: they are what people typed.

The database is outside DVC, so the stage runs every time (``always_changed`` in dvc.yaml); its
output depends only on the corrections, so when none arrived or were taken back it writes the
same bytes and DVC runs nothing after it; ``dvc.lock`` pins what a model was trained on. The
folder is replaced atomically: a failed export leaves the last one in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.atomic import atomic_dir, write_json, write_parquet
from pipeline.config import Settings, ValidateSettings
from pipeline.data.dataset_check import (
    CAPTION_COLUMNS,
    REJECT_COLUMNS,
    failure_message,
    validate_dataset,
)
from pipeline.data.flickr8k import count_caption_lines
from pipeline.data.images import MISSING
from pipeline.data.sources import FEEDBACK_TEST
from pipeline.feedback.export import export
from pipeline.feedback.store import LAST_EXPORT, FeedbackError, FeedbackStore, now
from pipeline.stages._cli import reported, stage_main

log = logging.getLogger("pipeline.feedback")


def check(folder: Path, cfg: ValidateSettings) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(kept, rejects, report) of an export in ``folder``, by the dataset's own rules; the
    held-out photos get the split ``feedback``. Raises ValueError when the export itself is
    broken (a structural expectation fails: a bug, never a user's input)."""
    if count_caption_lines(folder / paths.TOKEN_FILE) == 0:
        return (pd.DataFrame(columns=CAPTION_COLUMNS), pd.DataFrame(columns=REJECT_COLUMNS),
                {"kept": 0, "rejected": 0, "reject_reasons": {}, "expectations": []})
    kept, rejects, report = validate_dataset(folder, cfg)
    if any(e["fatal"] and not e["success"] for e in report["expectations"]):
        raise ValueError("the feedback export failed a structural check:\n"
                         + failure_message({**report, "reject_fraction": 0.0}, rejects))
    kept["split"] = kept["split"].replace({"test": FEEDBACK_TEST})
    return kept, rejects, report


def with_missing_photos(rejects: pd.DataFrame, report: dict, missing: list[dict]) -> pd.DataFrame:
    """Corrections the export left out for want of their photo, as rejects with the reason (the
    quarantine lists everything not kept, not only what validate saw)."""
    if not missing:
        return rejects
    rows = pd.DataFrame([{"line": -1, "image": m["image"], "caption_idx": -1, "caption_raw": m["caption_raw"],
                          "caption": "", "split": "", "reason": MISSING,
                          "detail": f"feedback {m['feedback_id']}: the store holds no photo {m['image']!r}",
                          "source_file": "feedback store"} for m in missing], columns=REJECT_COLUMNS)
    report["rejected"] = report.get("rejected", 0) + len(rows)
    report.setdefault("reject_reasons", {})[MISSING] = report["reject_reasons"].get(MISSING, 0) + len(rows)
    return pd.concat([rejects, rows], ignore_index=True) if len(rejects) else rows


def run(settings: Settings) -> dict:
    """Export the store's corrections into ``data/feedback/`` and check them; returns counts."""
    cfg = settings.feedback
    with reported(FeedbackError, ValueError):
        store = FeedbackStore(cfg.store_url)
        started = now()  # corrections that arrive while this runs count toward the next export
        with atomic_dir(paths.FEEDBACK_DIR) as tmp:
            summary = export(store, tmp, cfg.test_share)
            kept, rejects, report = check(tmp, settings.validation)
            rejects = with_missing_photos(rejects, report, summary.pop("missing_photos"))
            write_parquet(kept.reset_index(drop=True), tmp / paths.FEEDBACK_CAPTIONS.name)
            write_parquet(rejects.reset_index(drop=True), tmp / paths.FEEDBACK_REJECTS.name)
            write_json(tmp / paths.FEEDBACK_REPORT.name, report)
        store.set_meta(LAST_EXPORT, started)
    summary.update(kept=len(kept), rejected=len(rejects), reject_reasons=report["reject_reasons"])
    if len(rejects):
        log.warning("%d of %d corrections quarantined in %s: %s", len(rejects), summary["corrections"],
                    paths.FEEDBACK_REJECTS, report["reject_reasons"])
    log.info("exported %d corrections of %d photos from %s: %d kept (%d photos held out for testing)",
             summary["corrections"], summary["photos"], store.safe_url, len(kept), summary["test_photos"])
    return summary


def main() -> None:
    stage_main("feedback", __doc__, run)


if __name__ == "__main__":
    main()
