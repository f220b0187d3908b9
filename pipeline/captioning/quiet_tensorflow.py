"""Import TensorFlow and Keras with their C++ start-up lines silenced.

TensorFlow 2.21 prints absl/oneDNN lines ("All log messages before absl::InitializeLog() ...",
"oneDNN custom operations are on ...") straight to file descriptor 2 while loading, before
``TF_CPP_MIN_LOG_LEVEL`` takes effect, so no environment variable hides them. They are noise in
every stage log; this module imports both with fd 2 pointed at a temporary file, and replays
that file only if the import fails. Import it before ``keras`` / ``tensorflow``.
"""

from __future__ import annotations

import os

# Before TensorFlow: TF carries its own SQLite, built without FTS5, and once it is loaded the
# sqlite3 module binds to it (photo search's full-text index then cannot be opened).
import sqlite3  # noqa: F401
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_quietly() -> None:
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_import_quietly()
