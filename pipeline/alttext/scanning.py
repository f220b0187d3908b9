"""Find the images of a website's pages that lack a text alternative, with their exact places.

Pages: ``.html``/``.htm`` and Markdown (``.md``) files under the site folder, found without
following any link out of it. An HTML ``<img>`` lacks a text alternative when it has no ``alt``
and none of ``aria-label``, ``aria-labelledby`` or ``role="presentation"``/``"none"`` (WCAG 1.1.1,
axe-core's ``image-alt``); a Markdown image when its brackets are empty (``![](a.png)``,
``![][ref]``). Left alone, and counted: ``alt=""`` (decorative, as WCAG's F38 asks), any
non-empty alt a person wrote, and images inside ``<template>``, ``<noscript>``, inline SVG,
comments, ``<script>`` and Markdown code. A machine-written alt (marked ``data-alt-source``) is
reported with the model that wrote it, so a better champion can propose it again.

Other elements that need a text alternative only a person can write are reported and counted
(state ``needs-person``), never captioned: an image button (``<input type=image>``, axe-core's
``input-image-alt``: its alt says what the button does), an image-map ``<area href>`` (``area-alt``:
its alt names the link) and any element with ``role="img"`` (``role-img-alt``: no picture of its own
to caption). Text inside ``<title>``, ``<textarea>`` and the other raw-text elements is text, even
when it reads ``<img ...>``.

Sources: ``src``, else the first candidate of ``srcset``, else a ``<picture>``'s first
``<source srcset>``; resolved as the browser does, against the page's ``<base href>`` when it has
one, else against the page (or the site root for ``/...``), and only ever read inside the site folder. Remote (``http(s)://``, ``//``) images are reported as skipped,
``data:`` images are decoded, missing files and paths that lead outside the site are reported.

Every place is an offset into the page's text as decoded (UTF-8, or the charset the page
declares, or a byte-order mark), so applying an alt text inserts it there and changes nothing
else.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote as url_quote
from urllib.parse import unquote, urljoin, urlsplit

PAGE_SUFFIXES = (".html", ".htm", ".md")
PROVENANCE = "data-alt-source"
_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_:.-]+)""", re.IGNORECASE)
_ATTRIBUTE = re.compile(r"""\s+([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")
_FENCE = re.compile(r"^ {0,3}(```|~~~)", re.MULTILINE)
_INLINE_IMAGE = re.compile(r"!\[(?P<alt>[^\]\n]*)\]\((?P<src><[^>\n]*>|[^)\s]+)(?:\s+(?:\"[^\"\n]*\"|'[^'\n]*'))?\s*\)")
_REF_IMAGE = re.compile(r"!\[(?P<alt>[^\]\n]*)\]\[(?P<ref>[^\]\n]*)\]")
_REF_DEF = re.compile(r"^ {0,3}\[(?P<ref>[^\]\n]+)\]:\s*(?P<src><[^>\n]*>|\S+)", re.MULTILINE)


@dataclass
class Page:
    path: Path  # absolute
    relative: str  # to the site folder, '/'-separated
    text: str
    encoding: str
    sha256: str  # of the bytes as read: applying refuses a page changed since


@dataclass
class Found:
    """One image of a page: where it is, what it shows, and what is to be done about it."""

    page: str
    line: int
    column: int
    offset: int  # where an alt text goes: after '<img' (HTML) or '![' (Markdown)
    kind: str  # html | markdown
    src: str
    state: str  # missing-alt | refresh | decorative | has-alt | skipped | needs-person
    reason: str = ""  # why skipped (remote, missing file, outside the site, no source, not an image) or why a person
    image: str = ""  # the resolved file, relative to the site, or "data:" for an inline image
    data: bytes | None = field(default=None, repr=False)  # the decoded data: URI
    alt: str = ""  # the alt there now (has-alt, refresh)
    alt_span: tuple[int, int] | None = None  # offsets of the present alt value (refresh)
    provenance_span: tuple[int, int] | None = None  # offsets of the whole data-alt-source attribute (refresh)
    machine: str = ""  # the model that wrote the present alt (data-alt-source)
    quote: str = '"'  # the quoting the tag uses, for what is inserted
    base: str = ""  # the page's <base href>, which the browser resolves src against


@dataclass
class Scan:
    site: Path
    pages: dict[str, Page] = field(default_factory=dict)
    found: list[Found] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, what is wrong)


def decode_page(data: bytes) -> tuple[str, str]:
    """(text, encoding) of a page: its byte-order mark, else its declared charset, else UTF-8.
    ValueError when it is none of them."""
    for bom, name in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return data.decode(name), name
    declared = _CHARSET.search(data[:4096])
    encoding = declared.group(1).decode("ascii").lower() if declared else "utf-8"
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"declares an unknown charset {encoding!r}") from None
    try:
        return data.decode(encoding), encoding
    except UnicodeDecodeError as err:
        where = f"byte {err.start}"
        raise ValueError(f"is not valid {encoding} ({where}) and declares no other charset" if not declared
                         else f"is not valid {encoding}, the charset it declares ({where})") from None


def site_pages(site: Path, max_bytes: int) -> tuple[list[Path], list[tuple[str, str]]]:
    """Page files under ``site`` (links followed only inside it) and the ones refused, with why."""
    root = site.resolve()
    pages, refused = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if (Path(dirpath) / d).resolve().is_relative_to(root)
                             and not d.startswith("."))
        for name in sorted(filenames):
            if not name.lower().endswith(PAGE_SUFFIXES):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            resolved = path.resolve()
            if not resolved.is_relative_to(root):
                refused.append((rel, "a link to a file outside the site: not read"))
            elif resolved.stat().st_size > max_bytes:
                refused.append((rel, f"{resolved.stat().st_size:,} bytes, above alt_text.max_page_bytes ({max_bytes:,})"))
            else:
                pages.append(path)
    return pages, refused


def scan_site(site: Path, max_page_bytes: int) -> Scan:
    """Every image of every page of ``site``, and the pages that could not be read."""
    root = site.expanduser().resolve()
    found = Scan(root)
    paths, found.problems = site_pages(root, max_page_bytes)
    for path in paths:
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        try:
            text, encoding = decode_page(data)
        except ValueError as err:
            found.problems.append((rel, f"{err}: not scanned"))
            continue
        page = Page(path, rel, text, encoding, hashlib.sha256(data).hexdigest())
        found.pages[rel] = page
        images = _markdown_images(page) if rel.lower().endswith(".md") else []
        images += _html_images(page, _code_spans(text) if rel.lower().endswith(".md") else [])
        for image in sorted(images, key=lambda f: f.offset):
            if image.state in ("missing-alt", "refresh"):
                _resolve(image, page, root)
            found.found.append(image)
    return found


def _line_starts(text: str) -> list[int]:
    starts = [0]
    starts += [m.end() for m in re.finditer("\n", text)]
    return starts


def _position(starts: list[int], offset: int) -> tuple[int, int]:
    import bisect

    line = bisect.bisect_right(starts, offset) - 1
    return line + 1, offset - starts[line] + 1


class _Attribute(NamedTuple):
    value: str
    start: int  # of the value, in the tag text
    end: int
    quote: str
    span: tuple[int, int]  # the whole attribute, its leading space included


def _attributes(tag_text: str, tag_end: int) -> dict[str, _Attribute]:
    """name -> its value, where the value and the whole attribute are, and its quote, of a raw start tag."""
    out = {}
    for m in _ATTRIBUTE.finditer(tag_text, tag_end, len(tag_text) - 1):
        name = m.group(1).lower()
        if name in out:
            continue  # the first of a repeated attribute counts, as in browsers
        for group, quote in ((2, '"'), (3, "'"), (4, "")):
            if m.group(group) is not None:
                out[name] = _Attribute(m.group(group), m.start(group), m.end(group), quote, m.span())
                break
        else:
            out[name] = _Attribute("", m.end(1), m.end(1), "", m.span())
    return out


class _ImgFinder(HTMLParser):
    """Start tags of <img> (outside <template>, <noscript>, <svg> and raw text), with <picture>
    sources; the elements that need a person's alt (``needs_person``); the first <base href>."""

    # inert (template, noscript, svg) or raw text: what looks like a tag inside is not one
    SKIP = {"template", "noscript", "svg", "title", "textarea", "xmp", "iframe", "noembed", "noframes"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.images: list[tuple[tuple[int, int], str, dict, str | None]] = []  # (pos, raw tag, attrs, picture src)
        self.needs_person: list[tuple[tuple[int, int], str, str]] = []  # (pos, what it is, why)
        self.base: str | None = None
        self.skip_depth = 0
        self.picture_src: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
            return
        if self.skip_depth:
            return
        values = {k: (v if v is not None else "") for k, v in attrs}
        if tag == "base" and self.base is None and values.get("href", "").strip():
            self.base = values["href"].strip()
        if tag != "img":
            self._needs_person(tag, values)
        if tag == "picture":
            self.picture_src.append(None)
        elif tag == "source" and self.picture_src and self.picture_src[-1] is None and values.get("srcset"):
            self.picture_src[-1] = values["srcset"].split(",")[0].strip().split()[0]
        elif tag == "img":
            self.images.append((self.getpos(), self.get_starttag_text(), values,
                                self.picture_src[-1] if self.picture_src else None))

    def _needs_person(self, tag: str, values: dict) -> None:
        labelled = any(values.get(a, "").strip() for a in ("aria-label", "aria-labelledby"))
        if tag == "input" and values.get("type", "").strip().lower() == "image":
            if not (labelled or values.get("alt", "").strip() or values.get("title", "").strip()):
                self.needs_person.append((self.getpos(), "image button (input type=image)",
                                          "an image button: its alt says what the button does; a person writes it"))
        elif tag == "area" and "href" in values:
            if not (labelled or values.get("alt", "").strip()):
                self.needs_person.append((self.getpos(), "image-map area",
                                          "an image-map area: its alt names where the link goes; a person writes it"))
        elif values.get("role", "").strip().lower() == "img":
            if not (labelled or values.get("title", "").strip()):
                self.needs_person.append((self.getpos(), f"<{tag} role=img>",
                                          "role=img without aria-label: no picture of its own to caption; a person names it"))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag in self.SKIP:
            self.skip_depth -= 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip_depth:
            self.skip_depth -= 1
        elif tag == "picture" and self.picture_src:
            self.picture_src.pop()


def _code_spans(text: str) -> list[tuple[int, int]]:
    """Markdown code (fenced blocks and inline spans), where nothing is an image."""
    spans = []
    fences = list(_FENCE.finditer(text))
    i = 0
    while i < len(fences):
        start = fences[i]
        close = next((f for f in fences[i + 1:] if f.group(1) == start.group(1)), None)
        end = close.end() if close else len(text)
        spans.append((start.start(), end))
        i = fences.index(close) + 1 if close else len(fences)
    for m in re.finditer(r"(`+)[^\n]*?\1", text):
        if not any(a <= m.start() < b for a, b in spans):
            spans.append((m.start(), m.end()))
    return spans


def _html_images(page: Page, skip: list[tuple[int, int]]) -> list[Found]:
    finder = _ImgFinder()
    finder.feed(page.text)
    finder.close()
    starts = _line_starts(page.text)
    out = []
    for (line, col), raw, values, picture in finder.images:
        offset = starts[line - 1] + col
        if any(a <= offset < b for a, b in skip):
            continue
        attrs = _attributes(raw, 4)
        quote = "'" if sum(a.quote == "'" for a in attrs.values()) > sum(a.quote == '"' for a in attrs.values()) else '"'
        src = values.get("src", "").strip() or (values.get("srcset", "").split(",")[0].strip().split() or [""])[0] \
            or (picture or "")
        found = Found(page.relative, line, col + 1, offset + 4, "html", src, "missing-alt", quote=quote)
        role = values.get("role", "").strip().lower()
        if "alt" in values:
            alt = attrs.get("alt", _Attribute("", 0, 0, "", (0, 0)))
            found.alt = values["alt"]
            found.alt_span = (offset + alt.start, offset + alt.end)
            found.machine = values.get(PROVENANCE, "")
            if PROVENANCE in attrs:
                start, end = attrs[PROVENANCE].span
                found.provenance_span = (offset + start, offset + end)
            found.state = "decorative" if not values["alt"].strip() else ("refresh" if found.machine else "has-alt")
        elif values.get("aria-label", "").strip() or values.get("aria-labelledby", "").strip():
            found.state, found.alt = "has-alt", values.get("aria-label", "")
        elif role in ("presentation", "none"):
            found.state = "decorative"
        found.base = finder.base or ""
        out.append(found)
    for (line, col), what, why in finder.needs_person:
        offset = starts[line - 1] + col
        if not any(a <= offset < b for a, b in skip):
            out.append(Found(page.relative, line, col + 1, offset, "html", what, "needs-person", reason=why))
    return out


def _markdown_images(page: Page) -> list[Found]:
    text, skip = page.text, _code_spans(page.text)
    starts = _line_starts(text)
    refs = {m.group("ref").strip().lower(): m.group("src").strip("<>") for m in _REF_DEF.finditer(text)}
    out = []
    for pattern, inline in ((_INLINE_IMAGE, True), (_REF_IMAGE, False)):
        for m in pattern.finditer(text):
            if any(a <= m.start() < b for a, b in skip):
                continue
            src = m.group("src").strip("<>") if inline else refs.get((m.group("ref") or m.group("alt")).strip().lower(), "")
            line, col = _position(starts, m.start())
            found = Found(page.relative, line, col, m.start() + 2, "markdown", src, "missing-alt")
            if m.group("alt").strip():
                found.state, found.alt = "has-alt", m.group("alt")
            elif not inline and not m.group("ref").strip():
                found.state, found.reason = "skipped", "empty reference: ![][] names no image"
            out.append(found)
    return out


def _resolve(found: Found, page: Page, root: Path) -> None:
    """Say where the image is: a file inside the site, data, or why it is skipped."""
    src = found.src.strip()
    if not src:
        found.state, found.reason = "skipped", "no src"
        return
    if src.startswith("data:"):
        header, _, payload = src.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            found.state, found.reason = "skipped", "a data: URI that is not base64 image data"
            return
        try:
            found.data = base64.b64decode(payload, validate=True)
            found.image = "data:"
        except (binascii.Error, ValueError):
            found.state, found.reason = "skipped", "a data: URI whose base64 does not decode"
        return
    if found.base and not urlsplit(src).scheme:  # the browser reads src against <base href>
        src = _against_base(src, found.base, page.relative)
    parts = urlsplit(src)
    if parts.scheme in ("http", "https") or src.startswith("//"):
        found.state, found.reason = "skipped", "remote image (not fetched)"
        return
    if parts.scheme:
        found.state, found.reason = "skipped", f"a {parts.scheme}: source, not a file of the site"
        return
    relative = unquote(parts.path)
    base = root if relative.startswith("/") else page.path.parent
    target = (base / relative.lstrip("/")).resolve()
    if not target.is_relative_to(root):
        found.state, found.reason = "skipped", "the path leads outside the site: not read"
    elif not target.is_file():
        found.state, found.reason = "skipped", "missing on disk"
    else:
        found.image = target.relative_to(root).as_posix()


_SITE = "http://site.invalid/"  # stands for the site's own origin while joining URLs


def _against_base(src: str, base: str, page: str) -> str:
    """``src`` as a browser reads it on ``page`` under ``<base href=base>``: a path from the site
    root (``/sub/dog.jpg``), or a remote URL when the base points elsewhere."""
    joined = urljoin(urljoin(_SITE + url_quote(page), base), src)
    if not joined.startswith(_SITE):
        return joined
    parts = urlsplit(joined)
    return parts.path + (f"?{parts.query}" if parts.query else "")
