import hashlib

import pytest

from pipeline.config import ArchiveLimits
from pipeline.data.archives import (
    DownloadError,
    UnsafeArchiveError,
    check_zip,
    download,
    safe_extract,
)
from tests.helpers import lying_zip, zip_bomb, zip_bytes

BODY = bytes(range(256)) * 4096  # 1 MiB
LIMITS = ArchiveLimits(max_unpacked_bytes=100_000_000, max_compression_ratio=100)


def within_limits(path):
    check_zip(path, LIMITS)


def test_full_download_with_checksum(http_server, tmp_path):
    http_server.files["/data.zip"] = BODY
    out = download(f"{http_server.url}/data.zip", tmp_path / "data.zip", timeout=10, retries=0,
                   sha256=hashlib.sha256(BODY).hexdigest(), progress=False)
    assert out.read_bytes() == BODY
    assert not (tmp_path / "data.zip.part").exists()


def test_resumes_with_range_after_the_server_cuts_the_transfer(http_server, tmp_path):
    http_server.files["/data.zip"] = BODY
    http_server.cut_once["/data.zip"] = 300_000
    out = download(f"{http_server.url}/data.zip", tmp_path / "data.zip", timeout=10, retries=2,
                   backoff_s=0.01, progress=False)
    assert out.read_bytes() == BODY
    assert http_server.requests == [("/data.zip", None), ("/data.zip", "bytes=300000-")]


def test_interrupted_download_keeps_part_file_and_next_run_resumes(http_server, tmp_path):
    http_server.files["/data.zip"] = BODY
    http_server.cut_once["/data.zip"] = 1000
    with pytest.raises(DownloadError, match="partial file"):
        download(f"{http_server.url}/data.zip", tmp_path / "data.zip", timeout=10, retries=0, progress=False)
    assert (tmp_path / "data.zip.part").stat().st_size == 1000
    assert not (tmp_path / "data.zip").exists()
    download(f"{http_server.url}/data.zip", tmp_path / "data.zip", timeout=10, retries=0, progress=False)
    assert (tmp_path / "data.zip").read_bytes() == BODY
    assert http_server.requests[-1] == ("/data.zip", "bytes=1000-")


def test_checksum_mismatch_is_a_clear_error_and_publishes_nothing(http_server, tmp_path):
    http_server.files["/data.zip"] = BODY
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(f"{http_server.url}/data.zip", tmp_path / "data.zip", timeout=10, retries=0, sha256="0" * 64, progress=False)
    assert not (tmp_path / "data.zip").exists()


def test_http_error_is_not_retried_forever(http_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{http_server.url}/missing.zip", tmp_path / "m.zip", timeout=10, retries=3, backoff_s=0.01,
                 progress=False)
    assert len(http_server.requests) == 1


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "a/../../evil.txt"])
def test_unsafe_zip_members_are_rejected_before_anything_is_written(tmp_path, member):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(zip_bytes({"ok.txt": b"fine", member: b"evil"}))
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="refusing to extract"):
        safe_extract(archive, target, LIMITS, progress=False)
    assert not target.exists() or not any(target.rglob("*"))
    assert not (tmp_path / "evil.txt").exists()


def test_truncated_zip_is_a_clear_error(tmp_path):
    archive = tmp_path / "cut.zip"
    archive.write_bytes(zip_bytes({"a.txt": b"x" * 10_000})[:100])
    with pytest.raises(DownloadError, match="not a valid zip"):
        safe_extract(archive, tmp_path / "out", LIMITS, progress=False)


def test_macos_metadata_is_skipped(tmp_path):
    archive = tmp_path / "mac.zip"
    archive.write_bytes(zip_bytes({"d/a.txt": b"a", "__MACOSX/d/._a.txt": b"junk"}))
    written = safe_extract(archive, tmp_path / "out", LIMITS, progress=False)
    assert [p.name for p in written] == ["a.txt"]


ZIP = zip_bytes({"a.txt": b"x" * 5000})


def test_error_page_instead_of_zip_is_moved_aside_and_never_reused(http_server, tmp_path):
    """A server that sent an HTML page used to leave it cached: every rerun failed the same way."""
    http_server.files["/data.zip"] = b"<html><body>rate limited</body></html>"
    dest = tmp_path / "data.zip"
    with pytest.raises(DownloadError, match="not a valid zip.*moved to .*data.zip.part.bad"):
        download(f"{http_server.url}/data.zip", dest, timeout=10, retries=0, check=within_limits, progress=False)
    assert not dest.exists()
    http_server.files["/data.zip"] = ZIP  # the server is fixed
    out = download(f"{http_server.url}/data.zip", dest, timeout=10, retries=0, check=within_limits, progress=False)
    assert out.read_bytes() == ZIP


def test_cached_archive_is_verified_before_reuse(http_server, tmp_path):
    http_server.files["/data.zip"] = ZIP
    dest = tmp_path / "data.zip"
    download(f"{http_server.url}/data.zip", dest, timeout=10, retries=0, check=within_limits, progress=False)
    download(f"{http_server.url}/data.zip", dest, timeout=10, retries=0, check=within_limits, progress=False)
    assert len(http_server.requests) == 1  # a good cached file is reused
    dest.write_bytes(ZIP[:-10])  # damaged on disk afterwards
    out = download(f"{http_server.url}/data.zip", dest, timeout=10, retries=0, check=within_limits, progress=False)
    assert out.read_bytes() == ZIP and len(http_server.requests) == 2
    assert (tmp_path / "data.zip.bad").read_bytes() == ZIP[:-10]


def test_cached_archive_with_a_new_pinned_sha256_that_does_not_match_is_refetched(http_server, tmp_path):
    http_server.files["/data.zip"] = ZIP
    dest = tmp_path / "data.zip"
    download(f"{http_server.url}/data.zip", dest, timeout=10, retries=0, progress=False)
    dest.write_bytes(zip_bytes({"other.txt": b"y"}))  # same name, other content
    out = download(f"{http_server.url}/data.zip", dest, timeout=10, retries=0, sha256=hashlib.sha256(ZIP).hexdigest(),
                   progress=False)
    assert out.read_bytes() == ZIP


def test_failed_download_does_not_claim_a_partial_file_that_does_not_exist(tmp_path):
    with pytest.raises(DownloadError) as err:
        download("http://127.0.0.1:9/none.zip", tmp_path / "none.zip", timeout=10, retries=0, progress=False)
    assert "nothing was kept" in str(err.value) and "partial file" not in str(err.value)


def bytes_written() -> int:
    """Bytes this process has passed to write() so far (Linux /proc/self/io): what a file
    written and deleted again would hide from a look at the folder afterwards."""
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(zip_bomb(256 << 20))  # 256 MiB of zeros in about 250 KB, every CRC right
    before = bytes_written()
    for check in (lambda: check_zip(archive, LIMITS), lambda: safe_extract(archive, tmp_path / "out", LIMITS)):
        with pytest.raises(UnsafeArchiveError, match=r"max_unpacked_bytes|max_compression_ratio"):
            check()
    assert bytes_written() - before < 1 << 20 and not (tmp_path / "out").exists()
    ratio_only = ArchiveLimits(max_unpacked_bytes=10**12, max_compression_ratio=100)
    with pytest.raises(UnsafeArchiveError, match=r"times as many.*max_compression_ratio \(100\)"):
        check_zip(archive, ratio_only)
    size_only = ArchiveLimits(max_unpacked_bytes=1_000_000, max_compression_ratio=10**6)
    with pytest.raises(UnsafeArchiveError, match=r"268,435,456 bytes, above data.archive_limits.max_unpacked_bytes"):
        check_zip(archive, size_only)


def test_a_member_that_unpacks_past_its_declared_size_is_stopped(tmp_path):
    """Headers can lie: the bytes written are counted, and the member stops at its declared size."""
    archive = tmp_path / "liar.zip"
    archive.write_bytes(lying_zip("Images/zeros.jpg", actual=64 << 20, declared=1000))
    before = bytes_written()
    with pytest.raises(DownloadError, match=r"zeros.jpg"):
        safe_extract(archive, tmp_path / "out", ArchiveLimits(max_unpacked_bytes=10**12,
                                                               max_compression_ratio=10**6), progress=False)
    assert bytes_written() - before < 2 << 20  # the 64 MiB were never written
