import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline import paths
from pipeline.data.flickr8k import read_splits
from pipeline.stages import download
from pipeline.stages._cli import StageError
from tests.helpers import jpeg_bytes, tiny_settings, write_params, zip_bomb, zip_bytes

NAMES = [f"10{i}_abc.jpg" for i in range(6)]
TOKEN = "".join(f"{n}#{k}\tA red thing number {k} .\n" for n in NAMES for k in range(5)).encode()
SPLITS = {"Flickr_8k.trainImages.txt": NAMES[:4], "Flickr_8k.devImages.txt": NAMES[4:5],
          "Flickr_8k.testImages.txt": NAMES[5:]}


def official_archives() -> tuple[bytes, bytes]:
    """Archives shaped like the real ones: images under Flicker8k_Dataset/ (sic), text at
    the root, plus the __MACOSX folder the real zips carry."""
    images = {f"Flicker8k_Dataset/{n}": jpeg_bytes() for n in NAMES}
    images["__MACOSX/Flicker8k_Dataset/._x.jpg"] = b"junk"
    text = {"Flickr8k.token.txt": TOKEN, "readme.txt": b"Flickr8k",
            **{k: "".join(f"{n}\n" for n in v).encode() for k, v in SPLITS.items()}}
    return zip_bytes(images), zip_bytes(text)


def flickr_settings(server, **extra):
    return tiny_settings(**{"data.source": "flickr8k",
                            "data.flickr8k.images_url": f"{server.url}/Flickr8k_Dataset.zip",
                            "data.flickr8k.text_url": f"{server.url}/Flickr8k_text.zip",
                            "data.flickr8k.retries": 1, **extra})


def test_flickr8k_download_normalises_the_official_layout(workdir, http_server):
    images, text = official_archives()
    http_server.files.update({"/Flickr8k_Dataset.zip": images, "/Flickr8k_text.zip": text})
    out = download.run(flickr_settings(http_server))
    assert out == paths.dataset_dir("flickr8k")
    assert sorted(p.name for p in (out / "Images").iterdir()) == NAMES
    assert (out / paths.TOKEN_FILE).read_bytes() == TOKEN
    assert read_splits(out)["image"].tolist() == NAMES
    assert not list(paths.RAW_DIR.glob(".staging-*"))


def test_failed_download_keeps_the_earlier_dataset(workdir, http_server):
    images, text = official_archives()
    http_server.files.update({"/Flickr8k_Dataset.zip": images, "/Flickr8k_text.zip": text})
    out = download.run(flickr_settings(http_server))
    before = sorted(p.name for p in out.rglob("*"))
    paths.DOWNLOADS_DIR.joinpath("Flickr8k_text.zip").unlink()  # force a fresh fetch...
    with pytest.raises(StageError, match="sha256 mismatch") as err:   # ...that fails
        download.run(flickr_settings(http_server, **{"data.flickr8k.text_sha256": "ab" * 32}))
    assert "unchanged" in str(err.value)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_zip_with_parent_path_member_is_refused(workdir, http_server):
    images, _ = official_archives()
    evil = zip_bytes({"Flickr8k.token.txt": TOKEN, "../evil.sh": b"rm -rf /"})
    http_server.files.update({"/Flickr8k_Dataset.zip": images, "/Flickr8k_text.zip": evil})
    with pytest.raises(StageError, match=r"refusing to extract member '\.\./evil\.sh'"):
        download.run(flickr_settings(http_server))
    assert not (workdir / "data" / "evil.sh").exists() and not (workdir / "evil.sh").exists()
    assert not paths.dataset_dir("flickr8k").exists()


def test_local_kaggle_zip_gets_deterministic_split_lists(workdir):
    captions = "image,caption\n" + "".join(
        f'{n},"A dog , running {k} ."\n' for n in NAMES for k in range(5))
    archive = workdir / "flickr8k-kaggle.zip"
    archive.write_bytes(zip_bytes({"captions.txt": captions.encode(),
                                   **{f"Images/{n}": jpeg_bytes() for n in NAMES}}))
    settings = tiny_settings(**{"data.source": "local", "data.local_path": str(archive)})
    out = download.run(settings)
    assert (out / "captions.txt").read_text() == captions
    first = read_splits(out)
    assert sorted(first["image"]) == NAMES
    download.run(settings)
    assert read_splits(out).equals(first)


def test_synthetic_dataset_is_deterministic_and_in_flickr_format(workdir):
    out = download.run(tiny_settings())
    token = (out / paths.TOKEN_FILE).read_text()
    assert len(token.splitlines()) == 40 * 5
    first_line = token.splitlines()[0]
    assert "#0\t" in first_line and first_line.endswith(".") or first_line[-1].isalpha()
    images = sorted(p.name for p in (out / "Images").iterdir())
    assert len(images) == 40 and all(n.endswith(".jpg") for n in images)
    download.run(tiny_settings())
    assert (out / paths.TOKEN_FILE).read_text() == token


def test_switching_source_leaves_only_the_current_dataset(workdir, http_server):
    download.run(tiny_settings())
    images, text = official_archives()
    http_server.files.update({"/Flickr8k_Dataset.zip": images, "/Flickr8k_text.zip": text})
    download.run(flickr_settings(http_server))
    assert sorted(p.name for p in paths.RAW_DIR.iterdir()) == ["flickr8k"]


def test_truncated_local_zip_says_so(workdir):
    archive = workdir / "flickr.zip"
    archive.write_bytes(zip_bytes({"captions.txt": b"image,caption\n", "Images/a.jpg": jpeg_bytes()})[:150])
    with pytest.raises(StageError, match=r"not a valid zip \(truncated"):
        download.run(tiny_settings(**{"data.source": "local", "data.local_path": str(archive)}))
    with pytest.raises(StageError, match="does not exist"):
        download.run(tiny_settings(**{"data.source": "local", "data.local_path": str(workdir / "nope")}))


def test_error_page_served_as_archive_does_not_stick(workdir, http_server):
    images, text = official_archives()
    http_server.files.update({"/Flickr8k_Dataset.zip": images, "/Flickr8k_text.zip": b"<html>503</html>"})
    with pytest.raises(StageError, match="not a valid zip"):
        download.run(flickr_settings(http_server))
    http_server.files["/Flickr8k_text.zip"] = text
    out = download.run(flickr_settings(http_server))
    assert (out / paths.TOKEN_FILE).read_bytes() == TOKEN


@pytest.fixture(scope="session")
def bomb_zip(tmp_path_factory):
    """1 GiB of zeros in a 1 MB zip, every CRC right."""
    path = tmp_path_factory.mktemp("bomb") / "Flickr8k_Dataset.zip"
    path.write_bytes(zip_bomb(1 << 30))
    return path


@pytest.fixture
def small_folder(tmp_path):
    """A 64 MB file system for the project (tmpfs, where this user may mount one; a plain folder
    otherwise): a bomb that got unpacked would fill it and fail the stage with ENOSPC."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    yield folder
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def bytes_written() -> int:
    """Bytes this process has passed to write() so far (Linux /proc/self/io)."""
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("wchar:"))


def test_a_zip_bomb_given_as_local_path_is_refused_and_nothing_close_to_it_is_written(
        small_folder, bomb_zip, monkeypatch):
    monkeypatch.chdir(small_folder)
    settings = tiny_settings(**{"data.source": "local", "data.local_path": str(bomb_zip)})
    free, before = shutil.disk_usage(small_folder).free, bytes_written()
    with pytest.raises(StageError, match=r"bomb\.zip|Flickr8k_Dataset\.zip") as err:
        download.run(settings)
    assert "max_compression_ratio" in str(err.value) and "unchanged" in str(err.value)
    assert bytes_written() - before < 1 << 20  # 1 GiB declared; not even 1 MB written
    assert shutil.disk_usage(small_folder).free >= free - (1 << 20)
    assert not list(paths.RAW_DIR.glob(".staging-*")) and not paths.dataset_dir("local").exists()


def test_a_zip_bomb_served_as_the_download_is_moved_aside_and_never_unpacked(
        small_folder, bomb_zip, http_server, monkeypatch):
    monkeypatch.chdir(small_folder)
    _, text = official_archives()
    http_server.files.update({"/Flickr8k_Dataset.zip": bomb_zip.read_bytes(), "/Flickr8k_text.zip": text})
    before = bytes_written()
    with pytest.raises(StageError, match="max_compression_ratio.*moved to .*Flickr8k_Dataset.zip.part.bad"):
        download.run(flickr_settings(http_server))
    assert bytes_written() - before < 3 << 20  # the 1 MB download itself, then nothing
    assert not list(paths.RAW_DIR.glob(".staging-*")) and not paths.dataset_dir("flickr8k").exists()


def test_a_stopped_extraction_leaves_no_staging_folder(tmp_path):
    """SIGTERM (Airflow stopping the task) mid-extraction: the stage cleans up as it exits."""
    big = {f"Flicker8k_Dataset/{i:05d}.jpg": os.urandom(20_000) for i in range(4000)}  # 80 MB, slow to unpack
    archive = tmp_path / "big.zip"
    archive.write_bytes(zip_bytes({**big, "Flickr8k.token.txt": TOKEN}))
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, **{"data.source": "local", "data.local_path": str(archive)})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.stages.download"], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((project / "data" / "raw").glob(".staging-*/extract/Flicker8k_Dataset/*.jpg")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "extraction never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read().decode()
    assert not list((project / "data" / "raw").glob(".staging-*"))


def test_a_utf16_kaggle_captions_file_is_named_as_the_user_knows_it(workdir, tmp_path):
    folder = tmp_path / "kaggle"
    (folder / "Images").mkdir(parents=True)
    (folder / "Images" / "a.jpg").write_bytes(jpeg_bytes())
    (folder / "captions.txt").write_text("image,caption\na.jpg,A dog .\n", encoding="utf-16")
    with pytest.raises(StageError) as err:
        download.run(tiny_settings(**{"data.source": "local", "data.local_path": str(folder)}))
    message = str(err.value)
    assert f"data.local_path {folder}: captions.txt is encoded as UTF-16 LE" in message and "iconv" in message
    assert ".staging" not in message and "\x00" not in message


def test_a_local_path_that_is_not_a_dataset_names_the_key(workdir):
    for path in ("/etc", "/nonexistent/flickr"):
        with pytest.raises(StageError, match=rf"data\.local_path {path}"):
            download.run(tiny_settings(**{"data.source": "local", "data.local_path": path}))


def test_links_to_files_outside_a_local_folder_are_not_followed(workdir, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes(colour=(1, 2, 3)))
    folder = tmp_path / "kaggle"
    (folder / "Images").mkdir(parents=True)
    (folder / "Images" / "a.jpg").write_bytes(jpeg_bytes())
    (folder / "Images" / "b.jpg").symlink_to(secret)
    (folder / "captions.txt").write_text("image,caption\na.jpg,A dog .\nb.jpg,A cat .\n")
    out = download.run(tiny_settings(**{"data.source": "local", "data.local_path": str(folder)}))
    assert sorted(p.name for p in (out / "Images").iterdir()) == ["a.jpg"]
