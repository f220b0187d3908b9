"""Checking a dataset in the Flickr8k layout with the project's rules: the core of the
``validate`` stage, and of the ``feedback`` stage for people's corrections.

``validate_dataset`` decodes every image once, runs the Great Expectations suites of
``validation_rules`` and splits the caption rows into kept and rejected (with a reason and a
detail); ``failure_message`` says in a few lines why a report failed.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline import paths
from pipeline.config import ValidateSettings
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
