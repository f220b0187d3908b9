"""Reading and writing a photo's alt text and description in XMP, checked with ExifTool itself
(a reader the project did not write) and Pillow: the image data of JPEG, PNG and WebP is byte for
byte what it was, every other field stays, and hostile files are left alone with a reason."""

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

from pipeline.data.photo_metadata import (
    PhotoChanged,
    PhotoMetadata,
    sidecar_for,
    signature,
    xmp_problem,
)
from tests.helpers import exiftool

RECORD = {"Model": "flickr8k-captioner", "ModelVersion": "3", "AltText": "A dog runs.", "Description": "A dog runs."}
VALUES = {"alt_text": "A dog runs.", "description": "A dog runs."}

PERSON_XMP = b"""<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:Iptc4xmpCore="http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/"
 xmlns:dc="http://purl.org/dc/elements/1.1/">
<Iptc4xmpCore:AltTextAccessibility><rdf:Alt><rdf:li xml:lang="x-default">My grandmother's garden in May.</rdf:li>
</rdf:Alt></Iptc4xmpCore:AltTextAccessibility>
<dc:creator><rdf:Seq><rdf:li>Ada</rdf:li></rdf:Seq></dc:creator>
</rdf:Description></rdf:RDF></x:xmpmeta>"""

LAUGHS = b"""<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY ext SYSTEM "file:///etc/passwd">]>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>&c;&ext;</dc:title>
</rdf:Description></rdf:RDF></x:xmpmeta>"""


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def jpeg_with_everything(path: Path, xmp: bytes | None = None) -> None:
    """A JPEG as a camera and a photo tool leave it: EXIF, an ICC profile, maybe XMP."""
    exif = Image.Exif()
    exif[0x013B] = "Grace Hopper"  # Artist
    exif[0x010F] = "Acme"  # Make
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    kwargs = {"xmp": xmp} if xmp else {}
    picture().save(path, "JPEG", quality=90, exif=exif.tobytes(), icc_profile=icc, **kwargs)


def read_back(*paths: Path, tags=("-XMP-iptcCore:all", "-XMP-dc:all", "-XMP-captioner:all", "-IFD0:Artist",
                                  "-ICC_Profile:ProfileDescription", "-PNG:all")) -> list[dict]:
    """ExifTool's own reading (with the project's config, so the record's namespace has names)."""
    config = Path(__file__).parents[2] / "pipeline/data/exiftool.config"
    out = subprocess.run([exiftool(), "-config", str(config), "-j", "-G1", *tags, *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def image_data(path: Path, tmp: Path) -> bytes:
    """The file with every piece of metadata stripped by ExifTool: what is left is the image data
    (JPEG scans, PNG IDAT, WebP bitstream)."""
    out = tmp / f"stripped-{path.name}-{os.urandom(4).hex()}.tmp"
    subprocess.run([exiftool(), "-q", "-all=", "-o", str(out), str(path)], check=True)
    return out.read_bytes()


@pytest.fixture
def tool():
    exiftool()
    with PhotoMetadata(max_xmp_bytes=16_000) as t:
        yield t


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_written_fields_read_back_by_exiftool_and_nothing_else_changes(tool, tmp_path, fmt):
    path = tmp_path / f"photo.{fmt}"
    if fmt == "jpg":
        jpeg_with_everything(path)
    elif fmt == "png":
        info = PngInfo()
        info.add_text("Author", "Grace Hopper")
        picture().save(path, "PNG", pnginfo=info)
    else:
        picture().save(path, "WEBP", quality=80)  # the simple format: ExifTool adds the VP8X header
    before_bytes = path.read_bytes()
    before_data = image_data(path, tmp_path)
    before_pixels = np.asarray(Image.open(io.BytesIO(before_bytes)))
    os.chmod(path, 0o640)
    old_mtime = path.stat().st_mtime_ns - 10_000_000_000
    os.utime(path, ns=(old_mtime, old_mtime))

    [text] = tool.read([path], for_writing=True)
    assert (text.problem, text.values, text.file_type) == ("", {}, fmt)
    assert tool.write(text, VALUES, RECORD, keep_mtime=True) == path

    [seen] = read_back(path)
    assert seen["XMP-iptcCore:AltTextAccessibility"] == "A dog runs."
    assert seen["XMP-dc:Description"] == "A dog runs."
    assert seen["XMP-captioner:Model"] == "flickr8k-captioner" and seen["XMP-captioner:AltText"] == "A dog runs."
    if fmt == "jpg":  # EXIF and the ICC profile kept
        assert seen["IFD0:Artist"] == "Grace Hopper" and "sRGB" in seen["ICC_Profile:ProfileDescription"]
    if fmt == "png":
        assert seen["PNG:Author"] == "Grace Hopper"
    assert image_data(path, tmp_path) == before_data  # 0 bytes of image data changed
    assert np.array_equal(np.asarray(Image.open(path)), before_pixels)
    assert path.stat().st_mtime_ns == old_mtime and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".captioner")] == []  # no leftovers

    [again] = tool.read([path])
    assert again.by_person() == {} and again.by_model("alt_text") and again.model == "flickr8k-captioner/3"


def test_a_persons_words_and_edits_are_told_apart_from_a_models(tool, tmp_path):
    mine = tmp_path / "garden.jpg"
    jpeg_with_everything(mine, PERSON_XMP)
    edited = tmp_path / "edited.jpg"
    jpeg_with_everything(edited)
    [text] = tool.read([edited], for_writing=True)
    tool.write(text, VALUES, RECORD)
    subprocess.run([exiftool(), "-q", "-overwrite_original", "-XMP-iptcCore:AltTextAccessibility=Rex, our dog.",
                    str(edited)], check=True)
    garden, rex = tool.read([mine, edited])
    assert garden.by_person() == {"alt_text": "My grandmother's garden in May."}
    assert rex.by_person() == {"alt_text": "Rex, our dog."}  # the record no longer matches: a person's now
    assert not rex.by_model("alt_text") and rex.by_model("description")


def test_hostile_and_careless_files_are_left_alone_with_a_reason(tool, tmp_path):
    laughs = tmp_path / "laughs.jpg"
    jpeg_with_everything(laughs, LAUGHS)
    huge = tmp_path / "huge.jpg"
    jpeg_with_everything(huge, PERSON_XMP.replace(b"Ada", b"A" * 60_000))
    broken = tmp_path / "broken.jpg"
    jpeg_with_everything(broken, b"<x:xmpmeta><rdf:RDF>not closed")
    liar = tmp_path / "liar.jpg"
    picture().save(liar, "PNG")
    junk = tmp_path / "junk.png"
    junk.write_text("not a photo")
    crlf = tmp_path / "two\nlines .jpg"
    jpeg_with_everything(crlf)
    texts = {t.path.name: t for t in tool.read([laughs, huge, broken, liar, junk, crlf, tmp_path / "gone.jpg"],
                                                for_writing=True)}
    assert "DTD or entities" in texts["laughs.jpg"].problem and "never expanded" in texts["laughs.jpg"].problem
    assert "above tag.max_xmp_bytes" in texts["huge.jpg"].problem
    assert "malformed XMP" in texts["broken.jpg"].problem
    assert "content is PNG, not what .jpg says" in texts["liar.jpg"].problem
    assert "not what .png says" in texts["junk.png"].problem
    assert texts["gone.jpg"].problem
    # a name with a line break and a trailing blank is written like any other
    assert texts["two\nlines .jpg"].problem == ""
    tool.write(texts["two\nlines .jpg"], VALUES, RECORD)
    assert read_back(crlf)[0]["XMP-iptcCore:AltTextAccessibility"] == "A dog runs."
    # the parser never expands or fetches: the same packet alone
    assert "never expanded" in xmp_problem(LAUGHS, 1 << 20)


def test_a_photo_changed_while_being_tagged_is_not_written(tool, tmp_path):
    path = tmp_path / "busy.jpg"
    jpeg_with_everything(path)
    [text] = tool.read([path], for_writing=True)
    picture(5).save(path, "JPEG")  # someone saved over it meanwhile
    after = signature(path)
    with pytest.raises(PhotoChanged):
        tool.write(text, VALUES, RECORD)
    assert signature(path) == after
    assert "XMP-iptcCore:AltTextAccessibility" not in read_back(path)[0]


def test_sidecars_for_formats_exiftool_cannot_write_and_twins(tool, tmp_path):
    bmp = tmp_path / "scan.bmp"
    picture().save(bmp, "BMP")
    before = bmp.read_bytes()
    [text] = tool.read([bmp], for_writing=True)
    assert tool.write(text, VALUES, RECORD, sidecar=True) == tmp_path / "scan.xmp"
    assert bmp.read_bytes() == before
    [seen] = read_back(tmp_path / "scan.xmp")
    assert seen["XMP-iptcCore:AltTextAccessibility"] == "A dog runs."
    [again] = tool.read([bmp])
    assert again.sidecar == tmp_path / "scan.xmp" and again.by_model("alt_text")
    # scan.png beside scan.bmp: each gets its own sidecar, named after the whole file name
    picture(1).save(tmp_path / "scan.png", "PNG")
    assert sidecar_for(bmp) == tmp_path / "scan.bmp.xmp"
    assert sidecar_for(tmp_path / "scan.png") == tmp_path / "scan.png.xmp"


def test_an_embedded_copy_for_download(tool, tmp_path):
    path = tmp_path / "upload.jpg"
    jpeg_with_everything(path)
    with tool.private_copy(path.read_bytes()) as copy:
        (text,) = tool.read([copy], for_writing=True)
        assert text.file_type == "jpg" and not text.problem
        tool.write(text, {"alt_text": "A dog runs."}, RECORD)
        data = copy.read_bytes()
    assert not copy.exists()  # nothing of the upload is left behind
    out = tmp_path / "download.jpg"
    out.write_bytes(data)
    assert read_back(out)[0]["XMP-iptcCore:AltTextAccessibility"] == "A dog runs."
    assert image_data(out, tmp_path) == image_data(path, tmp_path)
