"""The thin command line every stage shares: ``python -m pipeline.stages.<name> [--params]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from ..config import ConfigError, Settings, load_settings


class StageError(RuntimeError):
    """A stage cannot finish; the message says what is wrong and where."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("great_expectations", "urllib3", "alembic", "mlflow", "git", "h5py", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(name: str, doc: str, run: Callable[[Settings], object]) -> None:
    """Parse the common flags, load params.yaml, run the stage, turn known errors into a
    one-paragraph message and exit status 1 (no traceback for user errors)."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{name}", description=doc)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args()
    setup_logging(args.verbose)
    try:
        run(load_settings(args.params))
    except (ConfigError, StageError) as err:
        print(f"\n{name}: error: {err}", file=sys.stderr)
        sys.exit(1)
