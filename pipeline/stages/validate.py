"""Stage ``validate``: parse, clean and check the raw dataset -> ``data/prepared/``.

Every caption line read ends up either in ``captions.parquet`` or, with a ``reason`` (and a
``detail``), in ``rejects.parquet``: kept + rejected == non-blank lines of the caption file,
counted apart from the parser. The rules and their reasons live in ``pipeline/data/validation_rules.py``
(a Great Expectations suite), the checking in ``pipeline/data/dataset_check.py``; per-expectation
results go to ``reports/validation.json``.

The stage fails (exit 1) when a structural expectation fails or when the counted rejects
exceed ``validate.max_reject_fraction``. Then the last good ``captions.parquet`` and
``rejects.parquet`` stay as they were (the outputs are ``persist: true`` in dvc.yaml, so
``dvc repro`` and Airflow do not delete them first), the failing run's rejects go to
``reports/validation_rejects.parquet`` and its report to ``reports/validation.json``.
"""

from __future__ import annotations

import logging

from pipeline import paths
from pipeline.atomic import write_json, write_parquet
from pipeline.config import Settings
from pipeline.data.dataset_check import failure_message, validate_dataset
from pipeline.stages._cli import StageError, reported, stage_main

log = logging.getLogger("pipeline.validate")


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
