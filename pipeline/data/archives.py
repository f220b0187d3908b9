"""Resumable HTTP download with checksum, and zip extraction that refuses unsafe archives.

A zip is refused before anything is unpacked when a member would land outside the target folder
(an absolute or ``..`` path, a link), or when its members' declared sizes add up to more than
``data.archive_limits.max_unpacked_bytes`` or to more than ``max_compression_ratio`` times the
zip's own size (a zip bomb: 2.5 GiB of zeros fit in 2.6 MB with every CRC right). Headers can
lie, so extraction also counts the bytes it writes and stops a member the moment it passes its
declared size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import requests
from tqdm import tqdm

from pipeline.config import ArchiveLimits

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A transfer failed, was truncated, or its checksum did not match."""


class HTTPStatusError(DownloadError):
    """The server answered with an error status; a 4xx is not worth retrying."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class UnsafeArchiveError(DownloadError):
    """A zip holds an absolute path, a '..' member or a link, or unpacks to too much."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def quarantine(path: Path) -> Path:
    """Move a file that failed its check aside as ``<name>.bad`` (never reused, kept for a
    look); returns the new path."""
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    return bad


def check_sizes(zf: zipfile.ZipFile, archive: Path, limits: ArchiveLimits) -> None:
    """UnsafeArchiveError when the members' declared sizes exceed ``limits`` (read from the
    central directory: nothing is decompressed)."""
    unpacked = sum(m.file_size for m in zf.infolist())
    packed = max(archive.stat().st_size, 1)
    if unpacked > limits.max_unpacked_bytes:
        raise UnsafeArchiveError(
            f"{archive}: refusing to extract: its members unpack to {unpacked:,} bytes, above "
            f"data.archive_limits.max_unpacked_bytes ({limits.max_unpacked_bytes:,}); raise the limit if "
            "this archive is really that large")
    if unpacked / packed > limits.max_compression_ratio:
        raise UnsafeArchiveError(
            f"{archive}: refusing to extract: {packed:,} bytes unpack to {unpacked:,} "
            f"({unpacked / packed:,.0f} times as many), above data.archive_limits.max_compression_ratio "
            f"({limits.max_compression_ratio:g}): a zip bomb? Photos and captions compress far less")


def check_zip(path: Path, limits: ArchiveLimits) -> None:
    """A whole, readable zip within ``limits``: the central directory parses, the declared sizes
    pass ``check_sizes`` and every member's CRC matches. An HTML error page, a cut transfer or a
    zip bomb fails here (the bomb before anything is decompressed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            check_sizes(zf, path, limits)
            broken = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise DownloadError(f"{path} is not a valid zip (truncated, corrupt, or an error page "
                            f"instead of the archive?): {err}") from None
    if broken is not None:
        raise DownloadError(f"{path} is corrupt: member {broken!r} fails its CRC check")


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".json")


def _verify(path: Path, url: str, sha256: str | None, size: int | None, check) -> None:
    """Raise DownloadError unless ``path`` has the expected size, sha256 and passes ``check``."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DownloadError(f"{path}: {actual_size} bytes, expected {size} from {url}")
    if sha256:
        actual = sha256_of(path)
        if actual != sha256.lower():
            raise DownloadError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}")
    if check is not None:
        check(path)


def _cached(dest: Path, url: str, sha256: str | None, check) -> bool:
    """True when ``dest`` is a verified earlier download of ``url``; a cached file that fails
    its checks (or came from another URL) is moved aside so it is never used again."""
    if not dest.is_file():
        return False
    try:
        record = json.loads(_sidecar(dest).read_text())
    except (OSError, ValueError):
        record = {}
    try:
        if record.get("url") not in (None, url):
            raise DownloadError(f"it was downloaded from {record['url']}, not {url}")
        _verify(dest, url, sha256, record.get("size"), check)
    except DownloadError as err:
        bad = quarantine(dest)
        log.warning("cached %s failed its check (%s); moved to %s and downloading again",
                    dest, err, bad)
        return False
    return True


def download(url: str, dest: Path, *, timeout: float, retries: int, sha256: str | None = None, check=None,
             backoff_s: float = 1.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` with HTTP Range after a cut.

    ``dest`` only appears once the whole body arrived and passed its checks: the size the
    server announced, ``sha256`` when given, and ``check(path)`` (e.g. ``check_zip``). A file
    that fails them is moved aside as ``<name>.bad`` and the error says so. A cached ``dest``
    is re-verified the same way (size from its ``.json`` record) before it is reused.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _cached(dest, url, sha256, check):
        log.info("using cached %s (verified)", dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    total: int | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 30))
            log.warning("retrying %s (attempt %d/%d): %s", url, attempt + 1, retries + 1, last_error)
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
                if resp.status_code == 416 and have:  # range past the end: the part is whole
                    break
                if resp.status_code not in (200, 206):
                    raise HTTPStatusError(f"GET {url}: HTTP {resp.status_code} {resp.reason}",
                                          resp.status_code)
                if have and resp.status_code == 200:  # server ignored Range: start over
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                mode = "ab" if have else "wb"
                # Keep the bytes that did arrive when the connection drops; the length
                # check below notices the cut and the next attempt resumes from there.
                resp.raw.enforce_content_length = False
                with part.open(mode) as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True,
                        desc=dest.name, disable=not progress) as bar:
                    for chunk in resp.iter_content(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                size = part.stat().st_size
                if total is not None and size < total:
                    raise DownloadError(f"transfer cut at {size} of {total} bytes")
                break
        except (requests.RequestException, DownloadError) as err:
            if isinstance(err, HTTPStatusError) and 400 <= err.status < 500:
                raise
            last_error = err
    else:
        kept = (f"the partial file {part} ({part.stat().st_size} bytes) is kept and the next run "
                "resumes it") if part.exists() and part.stat().st_size else "nothing was kept"
        raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {last_error}; {kept}")
    try:
        _verify(part, url, sha256, total, check)
    except DownloadError as err:
        bad = quarantine(part)
        raise DownloadError(f"{err}; the file was moved to {bad} (it will not be reused) and "
                            "nothing was extracted") from None
    os.replace(part, dest)
    _sidecar(dest).write_text(json.dumps({"url": url, "size": dest.stat().st_size}))
    return dest


def _is_skipped(name: str) -> bool:
    """macOS resource forks and Finder files that ride along in many zips."""
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(
            f"{archive}: refusing to extract member {info.filename!r} "
            "(absolute path or '..' would write outside the target folder)")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchiveError(f"{archive}: refusing to extract symbolic link {info.filename!r}")


def _copy_member(src, dst, member: zipfile.ZipInfo, archive: Path) -> None:
    """Copy one member, stopping as soon as it writes more than its declared size."""
    written = 0
    while block := src.read(CHUNK):
        written += len(block)
        if written > member.file_size:
            raise UnsafeArchiveError(f"{archive}: member {member.filename!r} unpacks to more than the "
                                     f"{member.file_size:,} bytes its header declares; extraction stopped")
        dst.write(block)


def safe_extract(archive: Path, target: Path, limits: ArchiveLimits, progress: bool = True) -> list[Path]:
    """Extract a zip into ``target`` after checking every member and the sizes (``check_sizes``);
    returns extracted files. Nothing is written when any member is unsafe or the sizes exceed
    ``limits``; a member that unpacks past its declared size stops the extraction (the caller
    removes the partial folder)."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive} is not a valid zip (truncated or corrupt?): {err}") from None
    with zf:
        check_sizes(zf, archive, limits)
        members = [m for m in zf.infolist() if not _is_skipped(m.filename)]
        for member in members:
            _check_member(member, archive)
        written = []
        for member in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress):
            if member.is_dir():
                continue
            out = target.joinpath(*PurePosixPath(member.filename.replace("\\", "/")).parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(member) as src, out.open("wb") as dst:
                    _copy_member(src, dst, member, archive)
            except (zipfile.BadZipFile, EOFError, zlib.error) as err:
                raise DownloadError(f"{archive}: member {member.filename!r} is corrupt: {err}") from None
            written.append(out)
    return written

