"""A photo's own words: the alt text and description in its XMP, and whether a model wrote them.

Read and written by ExifTool (Debian's ``libimage-exiftool-perl``, found on PATH or at
``CAPTIONER_EXIFTOOL``), one long-lived process driven through PyExifTool. ExifTool rather than
hand-written segment surgery: it writes XMP into JPEG, PNG and WebP (and many more) copying the
image data as it is, keeps EXIF, ICC profiles and every other XMP property, and is what photo
tools themselves use. Fields (``FIELDS``): IPTC's ``Iptc4xmpCore:AltTextAccessibility``, IPTC's
``Iptc4xmpCore:ExtDescrAccessibility`` and Dublin Core's ``dc:description`` (language
alternatives; the project writes ``x-default``).

Who wrote what: when a model writes a field it also records, in the project's own XMP namespace
(``exiftool.config`` beside this module), its name, version, the date, its confidence and the
very text it wrote. A field is a person's when it holds a value and no such record, or when its
value differs from the recorded one (a person edited what the model wrote): those are never
changed.

Hostile files: XMP is first measured (above ``max_xmp_bytes`` the photo is left alone) and then
parsed by defusedxml with DTDs forbidden, so entity expansion and external entities are refused,
never resolved; a photo whose content is not what its extension says is left alone too. Names
that ExifTool's argument stream cannot carry (line breaks, bytes that are not UTF-8, trailing
blanks) reach it through a link with a plain name in a private temporary folder.

Writes are atomic: ExifTool writes a new file into a private folder beside the photo, the photo
is checked unchanged since it was read (size, time, inode, sha256), the new file gets the photo's
permissions (and times, with ``keep_mtime``) and is renamed over it: a crash leaves the old file.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

from pipeline.data.archives import sha256_of

CONFIG = Path(__file__).with_name("exiftool.config")
# field -> (ExifTool group, tag); every one a language alternative
FIELDS = {"alt_text": ("XMP-iptcCore", "AltTextAccessibility"),
          "extended_description": ("XMP-iptcCore", "ExtDescrAccessibility"),
          "description": ("XMP-dc", "Description")}
RECORD_GROUP = "XMP-captioner"
RECORDED = {"alt_text": "AltText", "description": "Description"}  # the text a model wrote, per field it writes
SIDECAR_SUFFIX = ".xmp"
EMBEDDABLE = {"jpg", "png", "webp", "gif", "tif"}  # content types ExifTool writes XMP into
# content types (ExifTool's FileTypeExtension) each photo suffix may hold
SUFFIX_TYPES = {".jpg": {"jpg"}, ".jpeg": {"jpg"}, ".png": {"png"}, ".webp": {"webp"}, ".gif": {"gif"},
                ".tif": {"tif"}, ".tiff": {"tif"}, ".bmp": {"bmp"}}
INSTALL = ("ExifTool is not installed: apt-get install libimage-exiftool-perl (or make setup), "
           "or set CAPTIONER_EXIFTOOL to its path")


class MetadataError(RuntimeError):
    """ExifTool is missing or failed as a whole (one photo's problem is a ``PhotoText.problem``)."""


class PhotoChanged(MetadataError):
    """The photo changed on disk between reading and writing it: nothing was written."""


@dataclass
class PhotoText:
    """What a photo (and its sidecar, which wins where both hold a field) says of itself."""

    path: Path
    file_type: str = ""  # ExifTool's FileTypeExtension: jpg, png, webp, ...
    values: dict[str, str] = field(default_factory=dict)  # field -> the x-default (or only) value
    record: dict[str, str] = field(default_factory=dict)  # the project's record: Model, ModelVersion, AltText, ...
    problem: str = ""  # why the photo must be left alone ('' = none)
    sidecar: Path | None = None  # photo.xmp beside it, when there is one
    signature: tuple = ()  # (size, mtime_ns, inode, sha256) when read

    def by_person(self) -> dict[str, str]:
        """The fields a person wrote: a value with no record of a model writing exactly it."""
        return {f: v for f, v in self.values.items() if v and not self.by_model(f)}

    def persons_words(self) -> tuple[str, str]:
        """(field, text) of the first field a person wrote, in FIELDS order (alt text first);
        ('', '') when a person wrote none."""
        person = self.by_person()
        return next(((f, person[f]) for f in FIELDS if f in person), ("", ""))

    def by_model(self, name: str) -> bool:
        recorded = RECORDED.get(name)
        return bool(recorded) and name in self.values and self.record.get(recorded) == self.values[name]

    @property
    def model(self) -> str:
        """name/version of the model that wrote the fields, '' if none did."""
        if not self.record.get("Model"):
            return ""
        return f"{self.record['Model']}/{self.record.get('ModelVersion', '')}"


def sidecar_for(path: Path) -> Path:
    """Where a photo's sidecar lies: ``photo.xmp``, or ``photo.jpg.xmp`` when another photo of the
    folder has the same stem (``photo.png``), so that two photos never share one."""
    plain = path.with_suffix(SIDECAR_SUFFIX)
    try:
        twins = [p for p in path.parent.glob(glob.escape(path.stem) + ".*")
                 if p != path and p.suffix.lower() in SUFFIX_TYPES]
    except OSError:
        twins = []
    return path.with_name(path.name + SIDECAR_SUFFIX) if twins else plain


def exiftool_path() -> str | None:
    return os.environ.get("CAPTIONER_EXIFTOOL") or shutil.which("exiftool")


def signature(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, sha256_of(path)


def xmp_problem(packet: bytes, max_bytes: int) -> str:
    """Why an XMP packet must not be touched ('' when it is plain, well-formed XML). DTDs and
    entities are refused by defusedxml before anything is expanded or fetched."""
    if len(packet) > max_bytes:
        return f"XMP of {len(packet):,} bytes, above tag.max_xmp_bytes ({max_bytes:,}): left alone"
    text = packet.strip(b"\x00 \t\r\n")  # the <?xpacket?> wrapper is a processing instruction: fine
    try:
        safe_xml.fromstring(text, forbid_dtd=True)
    except DefusedXmlException as err:
        return f"XMP declares a DTD or entities ({type(err).__name__}; never expanded): left alone"
    except safe_xml.ParseError as err:
        return f"malformed XMP ({err}): left alone"
    return ""


def _plain(name: str) -> bool:
    """Whether ExifTool's one-argument-per-line stream carries this absolute path unchanged."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return bool(re.fullmatch(r"/[^\n\r]*[^\s]", name)) and not name.startswith("/-")


def _one_line(text: str) -> str:
    return " ".join(text.split())


class PhotoMetadata:
    """One ExifTool process for many photos (a context manager)."""

    def __init__(self, max_xmp_bytes: int = 1 << 20):
        exe = exiftool_path()
        if exe is None or not Path(exe).exists():
            raise MetadataError(INSTALL)
        import exiftool

        self.max_xmp_bytes = max_xmp_bytes
        self._links = tempfile.mkdtemp(prefix="captioner-exiftool-")
        try:
            self._tool = exiftool.ExifTool(executable=exe, common_args=["-G1", "-charset", "filename=utf8"],
                                           config_file=str(CONFIG), encoding="utf-8")
            self._tool.run()
        except Exception as err:
            shutil.rmtree(self._links, ignore_errors=True)
            raise MetadataError(f"cannot start ExifTool ({exe}): {err}") from None

    def __enter__(self) -> PhotoMetadata:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._tool.terminate()
        except Exception:  # noqa: BLE001 - already gone
            pass
        shutil.rmtree(self._links, ignore_errors=True)

    # -- plumbing -------------------------------------------------------------------------
    def _name(self, path: Path) -> str:
        """A name ExifTool can be given for ``path``: itself, or a plain-named link to it."""
        name = os.fspath(path.absolute())
        if _plain(name):
            return name
        link = Path(tempfile.mkdtemp(dir=self._links)) / ("photo" + "".join(c for c in path.suffix if c.isalnum() or c == "."))
        link.symlink_to(path.absolute())
        return str(link)

    def _json(self, *args: str) -> list[dict]:
        import json

        out = self._tool.execute("-j", *args)
        return json.loads(out) if out.strip() else []

    def _run(self, *args: str) -> str:
        """Run ExifTool; MetadataError with its own words when it fails."""
        self._tool.execute(*args)
        status = self._tool.last_status
        if status:
            said = (self._tool.last_stderr or self._tool.last_stdout or "").strip().splitlines()
            raise MetadataError("; ".join(line for line in said if line.strip()) or f"ExifTool exited {status}")
        return self._tool.last_stdout

    # -- reading ------------------------------------------------------------------------
    def read(self, paths: list[Path], for_writing: bool = False) -> list[PhotoText]:
        """What each photo (and its ``.xmp`` sidecar) says of itself, in order; ``for_writing``
        also takes each file's signature first, which ``write`` checks."""
        found = [PhotoText(Path(p)) for p in paths]
        if not found:
            return []
        if for_writing:
            for text in found:
                try:
                    text.signature = signature(text.path)
                except OSError as err:
                    text.problem = f"cannot read it: {err.strerror or err}"
        names = [self._name(t.path) for t in found]
        wanted = ["-FileTypeExtension", "-XMP:XMP", f"-{RECORD_GROUP}:all",
                  *{f"-{group}:all" for group, _ in FIELDS.values()}]
        rows = {r.get("SourceFile"): r for r in self._json(*wanted, *names)}
        for text, name in zip(found, names):
            row = rows.get(name)
            if text.problem:
                continue
            if row is None:
                text.problem = "ExifTool cannot read it (missing or unreadable)"
                continue
            self._take(text, row, embedded=True)
            sidecar = sidecar_for(text.path)
            if not text.problem and sidecar != text.path and sidecar.is_file() and not sidecar.is_symlink():
                text.sidecar = sidecar
                for side in self._json(*wanted, self._name(sidecar)):
                    self._take(text, side, embedded=False)
        return found

    def _take(self, text: PhotoText, row: dict, embedded: bool) -> None:
        where = "" if embedded else f" (sidecar {sidecar_for(text.path).name})"
        if row.get("ExifTool:Error"):
            text.problem = f"ExifTool: {row['ExifTool:Error']}{where}"
            return
        if embedded:
            text.file_type = str(row.get("File:FileTypeExtension", "")).lower()
            allowed = SUFFIX_TYPES.get(text.path.suffix.lower())
            if allowed is not None and text.file_type not in allowed:
                text.problem = (f"its content is {text.file_type.upper() or 'not an image'}, not what "
                                f"{text.path.suffix} says: left alone")
                return
        if "XMP:XMP" in row:
            size = re.search(r"Binary data (\d+) bytes", str(row["XMP:XMP"]))
            n = int(size.group(1)) if size else 0
            if n > self.max_xmp_bytes:
                text.problem = f"XMP of {n:,} bytes, above tag.max_xmp_bytes ({self.max_xmp_bytes:,}){where}: left alone"
                return
            raw = self._json("-b", "-XMP:XMP", row["SourceFile"])
            packet = raw[0].get("XMP:XMP", "") if raw else ""
            packet = (base64.b64decode(packet[7:]) if isinstance(packet, str) and packet.startswith("base64:")
                      else str(packet).encode("utf-8"))
            problem = xmp_problem(packet, self.max_xmp_bytes)
            if problem:
                text.problem = problem.replace(": left alone", f"{where}: left alone")
                return
        for name, (group, tag) in FIELDS.items():
            keys = [k for k in row if k == f"{group}:{tag}" or k.startswith(f"{group}:{tag}-")]
            if keys:  # x-default first, else any language a person wrote in
                value = row.get(f"{group}:{tag}", row[keys[0]])
                text.values[name] = str(value)
        for key, value in row.items():
            if key.startswith(f"{RECORD_GROUP}:"):
                text.record[key.split(":", 1)[1]] = str(value)

    # -- writing ------------------------------------------------------------------------
    def write(self, text: PhotoText, values: dict[str, str], record: dict[str, str], *,
              sidecar: bool = False, keep_mtime: bool = False) -> Path:
        """Write ``values`` (field -> text) and the model's ``record`` into the photo (or into its
        ``photo.xmp`` when ``sidecar``); returns the file written. The photo must be unchanged
        since ``text`` was read (``PhotoChanged`` otherwise)."""
        args = []
        for name, value in values.items():
            group, tag = FIELDS[name]
            args.append(f"-{group}:{tag}={_one_line(value)}")
        for key, value in record.items():
            args.append(f"-{RECORD_GROUP}:{key}={_one_line(value)}")
        target = sidecar_for(text.path) if sidecar else text.path
        folder = target.parent
        work = Path(tempfile.mkdtemp(prefix=".captioner-tag-", dir=folder))
        try:
            out = work / "new.tmp"  # an extension of no type: ExifTool keeps the source's format
            if sidecar:
                source = [self._name(target)] if target.is_file() else []
                self._run("-o", str(out.with_suffix(SIDECAR_SUFFIX)), *args, *source)
                out = out.with_suffix(SIDECAR_SUFFIX)
                before = target
            else:
                self._run("-o", str(out), *args, self._name(text.path))
                before = text.path
            if not sidecar and signature(before) != text.signature:
                raise PhotoChanged("it changed while being tagged: nothing written (run again)")
            if before.exists():
                st = before.stat()
                os.chmod(out, st.st_mode & 0o7777)
                if keep_mtime:
                    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            elif keep_mtime:
                st = text.path.stat()
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(out, target)
            return target
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @contextlib.contextmanager
    def private_copy(self, data: bytes):
        """A path to a private copy of ``data`` (an uploaded photo) to read and write like any
        photo, gone when the block ends. It has no suffix: ExifTool goes by the content, and
        ``PhotoText.file_type`` says what that is."""
        work = Path(tempfile.mkdtemp(dir=self._links))
        try:
            path = work / "upload"
            path.write_bytes(data)
            yield path
        finally:
            shutil.rmtree(work, ignore_errors=True)
