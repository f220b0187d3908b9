"""Stage ``validate``: parse, clean and check the raw dataset -> ``data/prepared/``.

Every caption line read ends up either in ``captions.parquet`` or, with a ``reason`` (and a
``detail``), in ``rejects.parquet``: kept + rejected == non-blank lines of the caption file,
counted apart from the parser. The rules and their reasons live in ``pipeline/data/validation_rules.py``
(a Great Expectations suite); per-expectation results go to ``reports/validation.json``.

The stage fails (exit 1) when a structural expectation fails or when the counted rejects
exceed ``validate.max_reject_fraction``. Then the last good ``captions.parquet`` and
``rejects.parquet`` stay as they were (the outputs are ``persist: true`` in dvc.yaml, so
``dvc repro`` and Airflow do not delete them first), the failing run's rejects go to
``reports/validation_rejects.parquet`` and its report to ``reports/validation.json``.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline import paths
from pipeline.atomic import write_json, write_parquet
from pipeline.config import Settings, ValidateSettings
from pipeline.data.flickr8k import (
    SPLITS,
    count_caption_lines,
    image_file,
    image_name_problem,
    read_captions,
    read_splits,
)
from pipeline.data.images import INVALID_NAME, check_image
from pipeline.data.validation_rules import (
    CAPTION_RULES,
    RuleContext,
    SuiteRunner,
    caption_table,
    image_checks,
    kept_checks,
    per_image_checks,
    row_checks,
    split_checks,
)
from pipeline.stages._cli import StageError, reported, stage_main

log = logging.getLogger("pipeline.validate")

CAPTION_COLUMNS = ["image", "split", "caption_idx", "caption_raw", "caption"]
REJECT_COLUMNS = ["line", "image", "caption_idx", "caption_raw", "caption", "split", "reason",
                  "detail", "source_file"]


def inventory(images_dir: Path, names: list[str], workers: int,
              max_pixels: int) -> dict[str, tuple[str, str]]:
    """Decode every image once: name -> ('ok', '') or (category, detail). A name that is not a
    plain file name is never looked up (its caption rows are malformed anyway)."""
    def status(name: str) -> tuple[str, str]:
        problem = image_name_problem(name)
        return (INVALID_NAME, problem) if problem else check_image(image_file(images_dir, name), max_pixels)

    with ThreadPoolExecutor(workers) as pool:
        statuses = list(tqdm(pool.map(status, names), total=len(names), desc="check images", unit="img"))
    return dict(zip(names, statuses))


def validate_dataset(dataset: Path, cfg: ValidateSettings) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Pure core: (kept captions, rejects, report). Raises FileNotFoundError / ValueError when
    the input files themselves are unusable (no caption file, a missing split list)."""
    rows, caption_file = read_captions(dataset)
    lines = count_caption_lines(caption_file)
    if len(rows) != lines:  # a parser that merged or lost lines is a bug, never data loss
        raise ValueError(f"{caption_file}: {lines} non-blank lines but {len(rows)} rows parsed")
    splits = read_splits(dataset)
    log.info("read %d caption lines from %s", lines, caption_file)

    names = sorted(set(rows["image"]) | set(splits["image"]))
    images = inventory(dataset / paths.IMAGES_SUBDIR, names, cfg.decode_workers, cfg.max_image_pixels)
    ctx = RuleContext(cfg, {n: s for n, (s, _) in images.items()},
                      {n: d for n, (_, d) in images.items()},
                      splits.drop_duplicates("image").set_index("image")["split"])
    table = caption_table(rows, ctx)

    runner = SuiteRunner()
    results = runner.run("captions", table, row_checks(cfg))
    reasons: dict[int, list[str]] = {}
    details: dict[int, list[str]] = {}
    counted: set[int] = set()
    for rule, result in zip(CAPTION_RULES, results, strict=True):
        detail = rule.detail(table, ctx) if rule.detail is not None else None
        for idx in result.unexpected_index:
            reasons.setdefault(idx, []).append(rule.reason_for(cfg, table.at[idx, rule.column]))
            if detail is not None:
                details.setdefault(idx, []).append(str(detail.at[idx]))
            if rule.counts:
                counted.add(idx)

    rejected = table.index.isin(list(reasons))
    kept = table[~rejected][CAPTION_COLUMNS].sort_values(["split", "image", "caption_idx"])
    rejects = table[rejected].assign(
        reason=[" | ".join(reasons[i]) for i in table.index[rejected]],
        detail=[" | ".join(details.get(i, [])) for i in table.index[rejected]],
        source_file=caption_file.name)[REJECT_COLUMNS]

    per_image = kept.groupby("image").size().rename("n_captions").reset_index()
    captioned = set(rows.loc[rows["error"].isna(), "image"])
    split_table = splits.assign(has_captions=splits["image"].isin(captioned))
    image_table = pd.DataFrame({"image": names, "status": [ctx.image_status[n] for n in names]})
    results += runner.run("kept_captions", kept.reset_index(drop=True), kept_checks())
    results += runner.run("captions_per_image", per_image, per_image_checks(cfg.captions_per_image))
    results += runner.run("split_lists", split_table, split_checks())
    results += runner.run("images", image_table, image_checks())

    unsplit_images = sorted(set(table.loc[table["split"].isna() & table["parse_error"].isna(), "image"]))
    report = {
        "caption_file": caption_file.name,
        "lines_read": lines, "rows_read": len(table), "kept": len(kept), "rejected": len(rejects),
        "reject_fraction": len(counted) / max(len(table), 1),
        "max_reject_fraction": cfg.max_reject_fraction,
        "reject_reasons": dict(Counter(r for rs in reasons.values() for r in set(rs)).most_common()),
        "images": {"referenced": len(names), **Counter(ctx.image_status.values())},
        "splits": {s: int((kept["split"] == s).sum()) for s in SPLITS},
        "unsplit_images": {"count": len(unsplit_images), "examples": unsplit_images[:10]},
        "images_with_fewer_captions": int((per_image["n_captions"] < cfg.captions_per_image).sum()),
        "expectations": [r.summary() for r in results],
    }
    fatal = [r for r in results if r.fatal and not r.success]
    report["success"] = not fatal and report["reject_fraction"] <= cfg.max_reject_fraction
    return kept.reset_index(drop=True), rejects.reset_index(drop=True), report


def failure_message(report: dict, rejects: pd.DataFrame) -> str:
    lines = []
    for exp in report["expectations"]:
        if exp["fatal"] and not exp["success"]:
            where = f"{exp['table']}{'.' + exp['column'] if exp['column'] else ''}"
            lines.append(f"structural check failed: {exp['expectation']} on {where}: "
                         f"{exp['unexpected_count']} unexpected, e.g. images {exp['images'][:3]} "
                         f"(values {exp['examples'][:3]})")
    if report["reject_fraction"] > report["max_reject_fraction"]:
        lines.append(f"{report['reject_fraction']:.1%} of caption rows rejected, above "
                     f"validate.max_reject_fraction={report['max_reject_fraction']:.1%}")
        for reason, count in list(report["reject_reasons"].items())[:5]:
            example = rejects[rejects["reason"].str.contains(reason, regex=False)].iloc[0]
            lines.append(f"  {count} x {reason!r}, e.g. line {example['line']}: "
                         f"{example['image']} {example['caption_raw'][:60]!r} {example['detail'][:80]}")
    return "\n".join(lines)


def run(settings: Settings) -> dict:
    """Validate ``data/raw/<source>`` and write the prepared tables and the report."""
    dataset = paths.dataset_dir(settings.data.source)
    if not dataset.is_dir():
        raise StageError(f"{dataset} does not exist: run the download stage first")
    with reported(FileNotFoundError, ValueError):
        kept, rejects, report = validate_dataset(dataset, settings.validation)
    report["dataset"] = str(dataset)
    if not report["success"]:
        write_parquet(rejects, paths.FAILED_REJECTS)
        report["rejects_file"] = str(paths.FAILED_REJECTS)
        write_json(paths.VALIDATION_REPORT, report)
        raise StageError(
            f"validation of {dataset} failed; the last good {paths.CAPTIONS} and "
            f"{paths.REJECTS} were left as they were.\n" + failure_message(report, rejects)
            + f"\nrejected rows: {paths.FAILED_REJECTS}; full report: {paths.VALIDATION_REPORT}")
    write_parquet(kept, paths.CAPTIONS)
    write_parquet(rejects, paths.REJECTS)
    report["rejects_file"] = str(paths.REJECTS)
    write_json(paths.VALIDATION_REPORT, report)
    log.info("kept %d captions, rejected %d (%s); splits %s", report["kept"], report["rejected"],
             report["reject_reasons"] or "none", report["splits"])
    return report


def main() -> None:
    stage_main("validate", __doc__, run)


if __name__ == "__main__":
    main()
