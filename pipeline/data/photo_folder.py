"""A folder of photos: which files in it are photos, as the index, tagging and the app name them.

May import: the ground floor only.
"""

from __future__ import annotations

import os
from pathlib import Path

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what the app and the served model take


NOT_UTF8 = ("file name is not valid UTF-8: rename it (the index, search and the app name photos in UTF-8; "
            "e.g. convmv -f latin1 -t utf8 --notest)")


def shown_name(rel: str) -> str:
    """A path as it can be printed and stored: bytes that are not UTF-8 as ``\\xff``."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def photo_files(folder: Path, refused: list[tuple[str, str]] | None = None,
                suffixes: tuple[str, ...] = PHOTO_SUFFIXES, links: list[tuple[str, bool]] | None = None,
                ) -> dict[str, tuple[Path, int, int]]:
    """Every photo under ``folder`` (by suffix, any case): relative '/'-separated path ->
    (absolute path, size, mtime_ns). A link is followed only when it resolves inside the folder.
    A path that is not valid UTF-8 cannot be stored or shown as text: it goes to ``refused``
    (shown name, reason) instead, and the other photos are indexed. ``links``, when given,
    receives (shown name, whether it leads inside the folder) of every photo name that is a link."""
    root = folder.resolve()
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).resolve().is_relative_to(root)]
        for name in filenames:
            if not name.lower().endswith(suffixes) or name.startswith("._"):
                continue
            path = Path(dirpath) / name
            try:
                resolved = path.resolve()
                if links is not None and resolved != path.absolute():
                    links.append((shown_name(path.relative_to(root).as_posix()), resolved.is_relative_to(root)))
                if not resolved.is_relative_to(root) or not resolved.is_file():
                    continue
                stat = resolved.stat()
            except OSError:
                continue
            rel = path.relative_to(root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # os.walk's surrogate escapes for undecodable bytes
                if refused is not None:
                    refused.append((shown_name(rel), NOT_UTF8))
                continue
            found[rel] = (path, stat.st_size, stat.st_mtime_ns)
    return found
