"""The Great Expectations (1.x) suites that validation runs, and their results as rows.

Two kinds of expectation:
  * row-level, on the table of caption lines read: a row that fails one of them is
    quarantined into rejects.parquet with the expectation's reason;
  * structural, on the split lists and the image inventory: a failure stops the stage.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
import great_expectations as gx  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class Check:
    """One expectation, with the reject reason its failures get (row-level)."""

    expectation: gx.expectations.Expectation
    reason: str | None = None  # None: structural or informative, not a per-row reject
    fatal: bool = False


@dataclass
class CheckResult:
    table: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    examples: list
    reason: str | None
    fatal: bool
    unexpected_index: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"table": self.table, "expectation": self.expectation, "column": self.column,
                "success": self.success, "unexpected_count": self.unexpected_count,
                "examples": self.examples[:5], "reject_reason": self.reason, "fatal": self.fatal}


def caption_checks(captions_per_image: int, min_tokens: int, max_tokens: int) -> list[Check]:
    E = gx.expectations
    return [
        Check(E.ExpectColumnValuesToBeNull(column="parse_error"), "malformed line"),
        Check(E.ExpectColumnValuesToBeInSet(column="image_status", value_set=["ok"]),
              "image missing or undecodable"),
        Check(E.ExpectColumnValuesToBeBetween(
            column="n_tokens", min_value=min_tokens, max_value=max_tokens),
            f"caption has fewer than {min_tokens} or more than {max_tokens} tokens after cleaning"),
        Check(E.ExpectColumnValuesToBeBetween(
            column="caption_idx", min_value=0, max_value=captions_per_image - 1),
            f"caption index outside 0..{captions_per_image - 1}"),
        Check(E.ExpectColumnValuesToBeInSet(column="is_duplicate_key", value_set=[False]),
              "duplicate (image, caption_idx) key: an earlier line has it"),
        Check(E.ExpectColumnValuesToNotBeNull(column="split"), "image is in no split list"),
    ]


def kept_checks() -> list[Check]:
    E = gx.expectations
    return [
        Check(E.ExpectCompoundColumnsToBeUnique(column_list=["image", "caption_idx"]),
              fatal=True),
        Check(E.ExpectColumnValuesToNotBeNull(column="caption"), fatal=True),
        Check(E.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1),
              fatal=True),
    ]


def per_image_checks(captions_per_image: int) -> list[Check]:
    # Informative: images that lost captions to quarantine still train on the rest.
    return [Check(gx.expectations.ExpectColumnValuesToBeBetween(
        column="n_captions", min_value=captions_per_image, max_value=captions_per_image))]


def split_checks() -> list[Check]:
    E = gx.expectations
    return [
        Check(E.ExpectColumnValuesToBeUnique(column="image"), fatal=True),
        Check(E.ExpectColumnValuesToBeInSet(column="has_captions", value_set=[True]),
              fatal=True),
    ]


def image_checks() -> list[Check]:
    return [Check(gx.expectations.ExpectColumnValuesToBeInSet(column="status", value_set=["ok"]))]


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
            results.append(CheckResult(
                table=name, expectation=res.expectation_config.type,
                column=res.expectation_config.kwargs.get("column"),
                success=bool(res.success), unexpected_count=int(info.get("unexpected_count") or 0),
                examples=[_jsonable(v) for v in (info.get("partial_unexpected_list") or [])[:5]],
                reason=check.reason, fatal=check.fatal,
                unexpected_index=list(info.get("unexpected_index_list") or [])))
        return results


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):
        return value.item()
    return value
