"""Validation rules and the Great Expectations (1.x) suites that run them.

Row rules (``CAPTION_RULES``) are checked on the table of caption lines read. Each rule is
one object holding everything about it, so nothing is tied together by matching strings:

  * ``column`` and ``derive``: the column it adds to the table (from the parsed line, the
    image inventory or the split lists);
  * ``expectation``: the GX expectation on that column;
  * ``reason``: the reject reason a failing row gets (a fixed text, or the column's own
    value where the column already holds a category, e.g. "corrupt image");
  * ``counts``: whether such a reject counts toward ``validate.max_reject_fraction``
    (an image in no split list does not: Flickr8k has 91 of them by design).

A row failing a rule goes to rejects.parquet with the reason(s); reasons come from a small
fixed set (details such as a decoder message go to the ``detail`` column), so the report's
``reject_reasons`` stays a short histogram.

Table checks (``kept_checks`` ... ``image_checks``) are structural or informative checks on
whole tables; a failing structural (``fatal``) one stops the stage, naming example images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from pipeline.config import ValidateSettings
from pipeline.data.caption_text import clean_caption

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
import great_expectations as gx  # noqa: E402

log = logging.getLogger(__name__)
E = gx.expectations


@dataclass(frozen=True)
class RuleContext:
    """What the row rules derive their columns from, besides the parsed lines."""

    cfg: ValidateSettings
    image_status: dict[str, str]  # name -> "ok" or a category from pipeline.data.images
    image_detail: dict[str, str]
    split_of: pd.Series  # image -> split


@dataclass(frozen=True)
class RowRule:
    column: str
    derive: Callable[[pd.DataFrame, RuleContext], pd.Series]
    expectation: Callable[[ValidateSettings], gx.expectations.Expectation]
    reason: Callable[[ValidateSettings], str] | None  # None: the failing cell is the reason
    counts: bool = True
    detail: Callable[[pd.DataFrame, RuleContext], pd.Series] | None = None

    def reason_for(self, cfg: ValidateSettings, value) -> str:
        return str(value) if self.reason is None else self.reason(cfg)


def _duplicate_key(table: pd.DataFrame, ctx: RuleContext) -> pd.Series:
    parsed = table["parse_error"].isna()
    dup = table[parsed].duplicated(["image", "caption_idx"])
    return (parsed & dup.reindex(table.index, fill_value=False)).astype(bool)


CAPTION_RULES: tuple[RowRule, ...] = (
    RowRule("parse_error", lambda t, c: t["parse_error"],
            lambda cfg: E.ExpectColumnValuesToBeNull(column="parse_error"), None),
    RowRule("image_status", lambda t, c: t["image"].map(c.image_status),
            lambda cfg: E.ExpectColumnValuesToBeInSet(column="image_status", value_set=["ok"]),
            None, detail=lambda t, c: t["image"].map(c.image_detail)),
    RowRule("n_tokens", lambda t, c: t["caption"].str.split().str.len().fillna(0).astype(int),
            lambda cfg: E.ExpectColumnValuesToBeBetween(
                column="n_tokens", min_value=cfg.min_tokens, max_value=cfg.max_tokens),
            lambda cfg: f"caption has fewer than {cfg.min_tokens} or more than "
                        f"{cfg.max_tokens} tokens after cleaning"),
    RowRule("caption_idx", lambda t, c: t["caption_idx"],
            lambda cfg: E.ExpectColumnValuesToBeBetween(
                column="caption_idx", min_value=0, max_value=cfg.captions_per_image - 1),
            lambda cfg: f"caption index outside 0..{cfg.captions_per_image - 1}"),
    RowRule("is_duplicate_key", _duplicate_key,
            lambda cfg: E.ExpectColumnValuesToBeInSet(column="is_duplicate_key", value_set=[False]),
            lambda cfg: "duplicate (image, caption_idx) key: an earlier line has it"),
    RowRule("split", lambda t, c: t["image"].map(c.split_of),
            lambda cfg: E.ExpectColumnValuesToNotBeNull(column="split"),
            lambda cfg: "image is in no split list", counts=False),
)


def caption_table(rows: pd.DataFrame, ctx: RuleContext) -> pd.DataFrame:
    """Parsed lines (flickr8k.COLUMNS) -> the table the row rules check: the cleaned caption
    plus every rule's derived column."""
    table = rows.rename(columns={"error": "parse_error"})
    table["caption"] = table["caption_raw"].map(clean_caption)
    for rule in CAPTION_RULES:
        table[rule.column] = rule.derive(table, ctx)
    return table


@dataclass
class Check:
    """One table-level expectation; ``fatal`` ones stop the stage when they fail."""

    expectation: gx.expectations.Expectation
    fatal: bool = False


@dataclass
class CheckResult:
    table: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    examples: list  # unexpected values
    images: list  # the images of the first unexpected rows, where the table has them
    fatal: bool
    unexpected_index: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"table": self.table, "expectation": self.expectation, "column": self.column,
                "success": self.success, "unexpected_count": self.unexpected_count,
                "examples": self.examples[:5], "images": self.images[:5], "fatal": self.fatal}


def row_checks(cfg: ValidateSettings) -> list[Check]:
    return [Check(rule.expectation(cfg)) for rule in CAPTION_RULES]


def kept_checks() -> list[Check]:
    return [
        Check(E.ExpectCompoundColumnsToBeUnique(column_list=["image", "caption_idx"]), fatal=True),
        Check(E.ExpectColumnValuesToNotBeNull(column="caption"), fatal=True),
        Check(E.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1), fatal=True),
    ]


def per_image_checks(captions_per_image: int) -> list[Check]:
    # Informative: images that lost captions to quarantine still train on the rest.
    return [Check(E.ExpectColumnValuesToBeBetween(
        column="n_captions", min_value=captions_per_image, max_value=captions_per_image))]


def split_checks() -> list[Check]:
    return [
        Check(E.ExpectColumnValuesToBeUnique(column="image"), fatal=True),
        Check(E.ExpectColumnValuesToBeInSet(column="has_captions", value_set=[True]), fatal=True),
    ]


def image_checks() -> list[Check]:
    return [Check(E.ExpectColumnValuesToBeInSet(column="status", value_set=["ok"]))]


class SuiteRunner:
    """Runs Check lists against pandas tables through one ephemeral GX context."""

    def __init__(self) -> None:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.context.data_sources.add_pandas("captioner")

    def run(self, name: str, frame: pd.DataFrame, checks: list[Check]) -> list[CheckResult]:
        asset = self.source.add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe(f"{name}_all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
        for check in checks:
            suite.add_expectation(check.expectation)
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
        outcome = definition.run(batch_parameters={"dataframe": frame},
                                 result_format={"result_format": "COMPLETE"})
        by_id = {check.expectation.id: check for check in checks}  # ids are set by add
        results = []
        for res in outcome.results:
            check = by_id[res.expectation_config.id]
            info = res.result or {}
            index = list(info.get("unexpected_index_list") or [])
            images = []
            if "image" in frame.columns:
                images = list(dict.fromkeys(frame.loc[index[:50], "image"].tolist()))[:5]
            results.append(CheckResult(
                table=name, expectation=res.expectation_config.type,
                column=res.expectation_config.kwargs.get("column"),
                success=bool(res.success), unexpected_count=int(info.get("unexpected_count") or 0),
                examples=[_jsonable(v) for v in (info.get("partial_unexpected_list") or [])[:5]],
                images=images, fatal=check.fatal, unexpected_index=index))
        return results


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):
        return value.item()
    return value
