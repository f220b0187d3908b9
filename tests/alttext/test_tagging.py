"""`captioner tag` with the session's champion over a folder as people keep photos: captions go
into the photos' XMP (read back by ExifTool), a person's words are never changed, a second run
does nothing, a later model rewrites only what a model wrote, and careless or hostile files are
reported by name without stopping the run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.alttext.tagging import tag_photos
from tests.data.test_photo_metadata import (
    LAUGHS,
    PERSON_XMP,
    image_data,
    jpeg_with_everything,
    read_back,
)
from tests.helpers import PROJECT, exiftool

NAME = "flickr8k-captioner"


@pytest.fixture(scope="module")
def champion(registered):
    import mlflow

    from pipeline.registry.champion import load_champion_model

    exiftool()
    root, _, _ = registered
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    identity, model = load_champion_model(NAME)
    return root, identity, model


@pytest.fixture
def album(champion, tmp_path):
    """Synthetic test photos as JPEG (with EXIF and ICC), PNG and WebP, one a person described."""
    root, _, _ = champion
    images = sorted((root / "data/raw/synthetic/Images").glob("*.jpg"))[:4]
    folder = tmp_path / "album"
    (folder / "2026").mkdir(parents=True)
    pixels = [Image.open(p).convert("RGB") for p in images]
    jpeg_with_everything(folder / "beach.jpg")
    pixels[0].save(folder / "beach.jpg", "JPEG", quality=92, exif=Image.open(folder / "beach.jpg").info["exif"])
    pixels[1].save(folder / "2026" / "park.png", "PNG")
    pixels[2].save(folder / "2026" / "snow.webp", "WEBP", quality=85)
    pixels[3].save(folder / "garden.jpg", "JPEG", xmp=PERSON_XMP)
    return folder


def settings():
    from tests.helpers import tiny_settings

    return tiny_settings()


def run(paths, champion, **kw):
    _, identity, model = champion
    cfg = settings()
    kw.setdefault("min_confidence", 0.0)  # the tiny model is rarely sure: the bar is tested on its own
    return tag_photos(paths, model, identity, cfg.tag, cfg.alt_text, progress=False, **kw)


def test_captions_go_into_the_photos_and_a_second_run_does_nothing(champion, album, tmp_path):
    _, identity, _ = champion
    originals = {p: (p.read_bytes(), image_data(p, tmp_path)) for p in album.rglob("*.*")}
    dry = run([album], champion, dry_run=True)
    assert dry.counts()["would write"] == 3 and all(p.read_bytes() == b for p, (b, _) in originals.items())

    report = run([album], champion, keep_mtime=True)
    by_name = {Path(t.path).name: t for t in report.photos}
    assert report.counts()["written"] == 3, report.photos
    assert by_name["garden.jpg"].action == "kept" and "a person wrote its alt_text" in by_name["garden.jpg"].detail
    seen = {Path(r["SourceFile"]).name: r for r in read_back(*sorted(album.rglob("*.*")))}
    for name in ("beach.jpg", "park.png", "snow.webp"):
        alt = seen[name]["XMP-iptcCore:AltTextAccessibility"]
        assert alt == by_name[name].detail and alt[0].isupper() and alt.endswith(".")
        assert seen[name]["XMP-dc:Description"] == alt
        assert seen[name]["XMP-captioner:Model"] == NAME
        assert f"{NAME}/{seen[name]['XMP-captioner:ModelVersion']}" == identity
        assert float(seen[name]["XMP-captioner:Confidence"]) == pytest.approx(by_name[name].confidence, abs=1e-3)
        assert seen[name]["XMP-captioner:ConfidenceWords"].endswith("confidence")
    assert seen["beach.jpg"]["IFD0:Artist"] == "Grace Hopper"  # EXIF kept
    assert seen["garden.jpg"]["XMP-iptcCore:AltTextAccessibility"] == "My grandmother's garden in May."
    for path, (raw, data) in originals.items():
        assert image_data(path, tmp_path) == data, path  # 0 bytes of image data changed
        if path.name == "garden.jpg":
            assert path.read_bytes() == raw  # a person's photo untouched

    written = {p: p.read_bytes() for p in album.rglob("*.*")}
    again = run([album], champion)
    assert again.counts()["unchanged"] == 3 and again.counts()["kept"] == 1 and again.captioned == 0
    assert all(p.read_bytes() == b for p, b in written.items())


def test_a_later_model_rewrites_only_what_a_model_wrote_and_only_where_it_differs(champion, album):
    _, identity, model = champion
    run([album], champion)
    beach, park = album / "beach.jpg", album / "2026" / "park.png"
    # an older model had written something else into the beach photo
    subprocess.run([exiftool(), "-config", str(PROJECT / "pipeline/data/exiftool.config"), "-q", "-overwrite_original",
                    "-XMP-iptcCore:AltTextAccessibility=Old words.", "-XMP-dc:Description=Old words.",
                    "-XMP-captioner:AltText=Old words.", "-XMP-captioner:Description=Old words.",
                    "-XMP-captioner:ModelVersion=0", str(beach)], check=True)
    park_before = park.read_bytes()
    cfg = settings()
    report = tag_photos([album], model, f"{NAME}/999", cfg.tag, cfg.alt_text, min_confidence=0.0, progress=False)
    by_name = {Path(t.path).name: t for t in report.photos}
    assert by_name["beach.jpg"].action == "written" and by_name["beach.jpg"].detail != "Old words."
    assert by_name["park.png"].action == "unchanged" and "wrote the same" in by_name["park.png"].detail
    assert park.read_bytes() == park_before
    assert str(read_back(beach)[0]["XMP-captioner:ModelVersion"]) == "999"


def test_unsure_captions_are_not_written(champion, album):
    before = {p: p.read_bytes() for p in album.rglob("*.*")}
    report = run([album], champion, min_confidence=1.0)
    unsure = [t for t in report.photos if t.action == "unsure"]
    assert len(unsure) == 3 and all("nothing written" in t.detail for t in unsure)
    assert all(p.read_bytes() == b for p, b in before.items())


def test_careless_and_hostile_files_are_reported_by_name(champion, album, tmp_path):
    outside = tmp_path / "outside.jpg"
    jpeg_with_everything(outside)
    os.symlink(outside, album / "leads-out.jpg")
    jpeg_with_everything(album / "laughs.jpg", LAUGHS)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(album / "liar.webp", "PNG")
    # photos like the ones the model learnt from (noise would make it abstain), under awkward names
    odd = album / "two\nlines.jpg"
    shutil.copy(album / "beach.jpg", odd)
    locked = album / "locked.jpg"
    shutil.copy(album / "beach.jpg", locked)
    os.chmod(locked, 0o444)
    scan = album / "scan.bmp"
    Image.open(album / "2026" / "park.png").save(scan, "BMP")
    outside_before = outside.read_bytes()

    report = run([album, tmp_path / "no-such-folder"], champion)
    by_name = {Path(t.path).name: t for t in report.photos}
    assert "leading outside the folder" in by_name["leads-out.jpg"].detail
    assert "never expanded" in by_name["laughs.jpg"].detail
    assert "not what .webp says" in by_name["liar.webp"].detail
    assert by_name["two\nlines.jpg"].action == "written"
    assert "read-only" in by_name["locked.jpg"].detail and "--sidecar" in by_name["locked.jpg"].detail
    assert "cannot write into BMP" in by_name["scan.bmp"].detail
    assert by_name["no-such-folder"].action == "error"
    assert outside.read_bytes() == outside_before
    # --sidecar: the read-only photo and the BMP get photo.xmp beside them, themselves unchanged
    locked_before = locked.read_bytes()
    report = run([album], champion, sidecar=True)
    by_name = {Path(t.path).name: t for t in report.photos}
    assert by_name["locked.jpg"].written_to.endswith("locked.xmp") and by_name["scan.bmp"].written_to.endswith("scan.xmp")
    assert locked.read_bytes() == locked_before
    assert read_back(album / "scan.xmp")[0]["XMP-iptcCore:AltTextAccessibility"] == by_name["scan.bmp"].detail
    assert not list(album.rglob(".captioner-tag-*")) and not (tmp_path / "outside.xmp").exists()


def test_the_command_line_tags_and_caption_json_names_a_persons_alt_text(champion, album, registered):
    root, _, _ = registered
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    cli = [sys.executable, "-m", "pipeline.cli"]
    out = subprocess.run([*cli, "tag", str(album), "--min-confidence", "0", "--fields", "alt_text", "-q", "--json"],
                         cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(x["action"] for x in lines) == ["kept", "written", "written", "written"]
    beach = read_back(album / "beach.jpg")[0]
    assert "XMP-iptcCore:AltTextAccessibility" in beach and "XMP-dc:Description" not in beach
    bad = subprocess.run([*cli, "tag", str(album), "--fields", "colour"], cwd=PROJECT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--fields" in bad.stderr
    out = subprocess.run([*cli, "caption", "--json", str(album / "garden.jpg"), str(album / "beach.jpg")],
                         cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    rows = {Path(r["file"]).name: r for r in map(json.loads, out.stdout.splitlines())}
    assert rows["garden.jpg"]["person_alt_text"] == "My grandmother's garden in May."
    assert rows["beach.jpg"]["person_alt_text"] is None  # a model wrote its alt text, not a person
    assert np.isfinite(rows["beach.jpg"]["confidence"] or 0.0)
