"""Stage ``validate``: parse, clean and check the raw dataset -> ``data/prepared/``.

Every caption line read ends up either in ``captions.parquet`` or, with a ``reason``, in
``rejects.parquet`` (kept + rejected == rows read). The checks are a Great Expectations
suite; per-expectation results go to ``reports/validation.json``. The stage fails (exit 1,
earlier outputs untouched) when a structural expectation fails or when the rejected share
exceeds ``validate.max_reject_fraction``. Images in no split list are quarantined and
reported but do not count towards that share (Flickr8k has 91 such images).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .. import paths
from ..config import Settings
from ..expectations import (
    CheckResult,
    SuiteRunner,
    caption_checks,
    image_checks,
    kept_checks,
    per_image_checks,
    split_checks,
)
from ..flickr8k import read_captions, read_splits
from ..images import check_image
from ..text import clean_caption
from ._cli import StageError, stage_main

log = logging.getLogger("pipeline.validate")

UNSPLIT = "image is in no split list"
CAPTION_COLUMNS = ["image", "split", "caption_idx", "caption_raw", "caption"]


def inventory(images_dir: Path, names: list[str], workers: int) -> dict[str, str]:
    """Decode every image once: name -> 'ok' or the reason it is unusable."""
    with ThreadPoolExecutor(workers) as pool:
        statuses = list(tqdm(pool.map(lambda n: check_image(images_dir / n), names),
                             total=len(names), desc="check images", unit="img"))
    return dict(zip(names, statuses))


def _row_reason(result: CheckResult, row: pd.Series) -> str:
    if result.column == "parse_error":
        return row["parse_error"]
    if result.column == "image_status":
        return row["image_status"]
    return result.reason


def validate_dataset(dataset: Path, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Pure core: (kept captions, rejects, report). Raises StageError on structural faults
    in the input files themselves (no caption file, a missing split list)."""
    cfg = settings.validation
    try:
        rows, caption_file = read_captions(dataset)
        splits = read_splits(dataset)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from None
    log.info("read %d caption lines from %s", len(rows), caption_file)

    names = sorted(set(rows["image"]) | set(splits["image"]))
    status = inventory(dataset / paths.IMAGES_SUBDIR, names, cfg.decode_workers)
    split_of = splits.drop_duplicates("image").set_index("image")["split"]

    table = rows.rename(columns={"error": "parse_error"})
    table["caption"] = table["caption_raw"].map(clean_caption)
    table["n_tokens"] = table["caption"].str.split().str.len().fillna(0).astype(int)
    table["image_status"] = table["image"].map(status)
    parsed = table["parse_error"].isna()
    table["is_duplicate_key"] = parsed & table[parsed].duplicated(["image", "caption_idx"]).reindex(
        table.index, fill_value=False)
    table["split"] = table["image"].map(split_of)

    runner = SuiteRunner()
    results = runner.run("captions", table, caption_checks(
        cfg.captions_per_image, cfg.min_tokens, cfg.max_tokens))
    reasons: dict[int, list[str]] = {}
    for result in results:
        for idx in result.unexpected_index:
            reasons.setdefault(idx, []).append(_row_reason(result, table.loc[idx]))

    rejected_mask = table.index.isin(list(reasons))
    kept = table[~rejected_mask][CAPTION_COLUMNS].sort_values(["split", "image", "caption_idx"])
    rejects = table[rejected_mask].assign(
        reason=[" | ".join(reasons[i]) for i in table.index[rejected_mask]],
        source_file=caption_file.name)[
        ["line", "image", "caption_idx", "caption_raw", "caption", "split", "reason", "source_file"]]

    per_image = kept.groupby("image").size().rename("n_captions").reset_index()
    captioned = set(rows.loc[rows["error"].isna(), "image"])
    split_table = splits.assign(has_captions=splits["image"].isin(captioned))
    image_table = pd.DataFrame({"image": names, "status": [status[n] for n in names]})
    results += runner.run("kept_captions", kept.reset_index(drop=True), kept_checks())
    results += runner.run("captions_per_image", per_image, per_image_checks(cfg.captions_per_image))
    results += runner.run("split_lists", split_table, split_checks())
    results += runner.run("images", image_table, image_checks())

    counted = sum(1 for r in reasons.values() if set(r) != {UNSPLIT})
    unsplit_images = sorted(set(table.loc[table["split"].isna() & parsed, "image"]))
    report = {
        "dataset": str(dataset), "caption_file": caption_file.name,
        "rows_read": len(table), "kept": len(kept), "rejected": len(rejects),
        "reject_fraction": counted / max(len(table), 1),
        "max_reject_fraction": cfg.max_reject_fraction,
        "reject_reasons": dict(Counter(r for rs in reasons.values() for r in set(rs)).most_common()),
        "images": {"referenced": len(names), **Counter(status.values())},
        "splits": {s: int((kept["split"] == s).sum()) for s in ("train", "dev", "test")},
        "unsplit_images": {"count": len(unsplit_images), "examples": unsplit_images[:10]},
        "images_with_fewer_captions": int((per_image["n_captions"] < cfg.captions_per_image).sum()),
        "expectations": [r.summary() for r in results],
    }
    fatal = [r for r in results if r.fatal and not r.success]
    too_many = report["reject_fraction"] > cfg.max_reject_fraction
    report["success"] = not fatal and not too_many
    return kept.reset_index(drop=True), rejects.reset_index(drop=True), report


def _failure_message(report: dict, rejects: pd.DataFrame) -> str:
    lines = []
    for exp in report["expectations"]:
        if exp["fatal"] and not exp["success"]:
            lines.append(f"structural check failed: {exp['expectation']} on {exp['table']}"
                         f"{'.' + exp['column'] if exp['column'] else ''}: "
                         f"{exp['unexpected_count']} unexpected, e.g. {exp['examples'][:3]}")
    if report["reject_fraction"] > report["max_reject_fraction"]:
        lines.append(f"{report['reject_fraction']:.1%} of caption rows rejected, above "
                     f"validate.max_reject_fraction={report['max_reject_fraction']:.1%}")
        for reason, count in list(report["reject_reasons"].items())[:5]:
            example = rejects[rejects["reason"].str.contains(reason, regex=False)].iloc[0]
            lines.append(f"  {count} x {reason!r}, e.g. line {example['line']}: "
                         f"{example['image']} {example['caption_raw'][:60]!r}")
    return "\n".join(lines)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def run(settings: Settings) -> dict:
    """Validate ``data/raw/<source>`` and write the prepared tables and the report."""
    dataset = paths.dataset_dir(settings.data.source)
    if not dataset.is_dir():
        raise StageError(f"{dataset} does not exist: run the download stage first")
    kept, rejects, report = validate_dataset(dataset, settings)
    if not report["success"]:
        _write_parquet(rejects, paths.FAILED_REJECTS)
        report["rejects_file"] = str(paths.FAILED_REJECTS)
        _write_json(report, paths.VALIDATION_REPORT)
        raise StageError(
            f"validation of {dataset} failed; {paths.CAPTIONS} was not replaced.\n"
            + _failure_message(report, rejects)
            + f"\nrejected rows: {paths.FAILED_REJECTS}; full report: {paths.VALIDATION_REPORT}")
    _write_parquet(kept, paths.CAPTIONS)
    _write_parquet(rejects, paths.REJECTS)
    report["rejects_file"] = str(paths.REJECTS)
    _write_json(report, paths.VALIDATION_REPORT)
    log.info("kept %d captions, rejected %d (%s); splits %s", report["kept"], report["rejected"],
             report["reject_reasons"] or "none", report["splits"])
    return report


def main() -> None:
    stage_main("validate", __doc__, run)


if __name__ == "__main__":
    main()
