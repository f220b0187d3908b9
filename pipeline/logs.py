"""The one logging setup of every entry point (stages, ``captioner``, the task runner)."""

from __future__ import annotations

import logging
import sys

# Libraries that log every request or file at INFO: noise in a stage log.
NOISY = ("great_expectations", "urllib3", "alembic", "mlflow", "git", "h5py", "absl", "httpx")


def setup_logging(verbose: bool = False, level: int = logging.INFO) -> None:
    """Time, level, logger and message on stderr (stdout stays free for a command's output, e.g.
    the task runner's XCom line); ``verbose`` shows DEBUG."""
    logging.basicConfig(level=logging.DEBUG if verbose else level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
