"""The thin command line every stage shares: ``python -m pipeline.stages.<name> [--params]``.

Stage cores raise ordinary exceptions; ``run()`` turns the expected ones into ``StageError``
(``reported``), and ``stage_main`` prints those as one paragraph and exits 1, with no
traceback. SIGTERM (Airflow stopping a task, ``kill``) is turned into ``StageInterrupted``
so ``finally`` blocks run: a stage that saves partial work (features) keeps it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import ConfigError, load_settings
from pipeline.errors import ReportedError
from pipeline.logs import setup_logging

# MLflow prints a progress bar per logged artifact: noise in a stage log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class StageError(ReportedError):
    """A stage cannot finish; the message says what is wrong and where."""


class StageInterrupted(BaseException):
    """SIGTERM arrived; raised where the stage is, so its cleanup runs."""


@contextmanager
def reported(*errors: type[BaseException]) -> Iterator[None]:
    """Re-raise ``errors`` from a stage's core as StageError with the same message."""
    try:
        yield
    except errors as err:
        raise StageError(str(err)) from err


def require(*files: Path) -> None:
    """A stage's inputs must exist; otherwise say which and how to make it."""
    for file in files:
        if not Path(file).exists():
            raise StageError(f"{file} not found: run the earlier stages first (dvc repro)")


def _interrupt(signum, frame):
    raise StageInterrupted(f"stopped by signal {signal.Signals(signum).name}")


def stage_main(name: str, doc: str, run: Callable[..., object],
               extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse the common flags, load params.yaml, run the stage, turn known errors into a
    one-paragraph message and exit status 1 (no traceback for user errors). With
    ``extra_args`` (adds a stage's own flags), ``run`` gets the parsed arguments too."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if extra_args:
        extra_args(parser)
    args = parser.parse_args()
    setup_logging(args.verbose)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings = load_settings(args.params)
        run(settings, args) if extra_args else run(settings)
    except (ConfigError, ReportedError) as err:
        print(f"\n{name}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except (StageInterrupted, KeyboardInterrupt) as err:
        print(f"\n{name}: interrupted ({err or 'Ctrl-C'}); finished work was kept", file=sys.stderr)
        sys.exit(143 if isinstance(err, StageInterrupted) else 130)
