"""Alt-text proposals: written by the champion, reviewed by a person, applied to the pages.

``propose`` captions every image a scan found without a text alternative (and, for alts a model
wrote, re-proposes when the model differs) and turns each caption into alt text by the site's
conventions (``alt_text.*`` params): a capital first letter, a full stop, no leading "image of"
/ "picture of" / "photo of", at most ``max_length`` characters; a proposal that still breaks one
of them carries the reason (``lint``) and is never applied without a person's word.

The review file (JSON, default ``<site>/.captioner-alt-text.json``) holds one entry per image:
page, line, src, the proposed alt, the alt to apply, the model, how sure the model was
(``confidence``, ``abstained``, ``reason``), and its ``status`` (``proposed`` -> ``accepted`` |
``edited`` | ``rejected`` -> ``applied``). ``for_person`` says why a proposal waits for a person:
below ``alt_text.min_confidence``, abstained (the image is unlike the photos the model learnt
from), a model without a confidence; ``--apply --yes`` never applies those, ``--review`` shows
them first.

``apply`` inserts the accepted alts into the pages and changes nothing else: each page's text is
edited only at the recorded offsets (``alt="..."`` and ``data-alt-source="<model>"`` after
``<img``, in the quoting the tag already uses; the text between ``![`` and ``]`` in Markdown,
whose provenance goes to a sidecar file), then encoded in the page's own encoding, line endings
untouched, and written atomically (a temporary file renamed over the page: a crash leaves every
page either old or new). A page changed since the scan, or read-only, is left alone, with a message.
"""

from __future__ import annotations

import difflib
import html
import json
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.alttext.scanning import PROVENANCE, Found, Scan, decode_page
from pipeline.config import AltTextSettings

REVIEW_FILE = ".captioner-alt-text.json"
SIDECAR = ".captioner-alt-sources.json"  # which Markdown alts a model wrote
STATUSES = ("proposed", "accepted", "edited", "rejected", "applied")


@dataclass
class Proposal:
    id: str
    page: str
    line: int
    column: int
    offset: int
    kind: str  # html | markdown
    src: str
    image: str
    proposed_alt: str
    alt: str  # what apply writes (the proposal, or a person's edit)
    model: str
    status: str
    lint: list[str]
    page_sha256: str
    quote: str = '"'
    replaces: list[int] | None = None  # (start, end) of a machine alt to replace (refresh)
    previous_alt: str = ""
    provenance: list[int] | None = None  # (start, end) of the data-alt-source attribute there (refresh)
    confidence: float | None = None  # the calibrated probability the caption is acceptable; None: unknown
    abstained: bool = False  # the image is unlike the photos the model learnt from
    reason: str = ""  # the model's word on its confidence (why it abstained, why it has none)
    for_person: str = ""  # why only a person may apply it ("" = it may be applied with --yes)


def waits_for_person(p: Proposal, min_confidence: float) -> str:
    """Why ``p`` may not be applied without a person's word (empty when it may)."""
    if p.abstained:
        return f"the model abstained: {p.reason}"
    if p.confidence is None:
        return f"no confidence ({p.reason or 'the model did not say how sure it is'})"
    if p.confidence < min_confidence:
        return f"confidence {p.confidence:.2f} below {min_confidence:g}"
    return ""


def as_alt_text(caption: str, cfg: AltTextSettings) -> str:
    """A caption by the site's conventions: no leading "image of", a capital, a full stop."""
    text = " ".join(caption.split())
    lowered = text.lower()
    for prefix in cfg.banned_prefixes:
        if lowered.startswith(prefix.lower()):
            text = text[len(prefix):].lstrip(" ,:-")
            lowered = text.lower()
    if cfg.capital_first and text:
        text = text[0].upper() + text[1:]
    if cfg.full_stop and text and text[-1] not in ".!?":
        text += "."
    return text


def lint(alt: str, cfg: AltTextSettings) -> list[str]:
    """What breaks the conventions; empty when the alt text keeps them all."""
    problems = []
    if not alt.strip():
        problems.append("empty")
    if len(alt) > cfg.max_length:
        problems.append(f"{len(alt)} characters, over alt_text.max_length ({cfg.max_length})")
    if any(alt.lower().startswith(p.lower()) for p in cfg.banned_prefixes):
        problems.append("starts with a phrase screen readers already say (image of / picture of / photo of)")
    if cfg.capital_first and alt[:1] and not alt[:1].isupper():
        problems.append("does not start with a capital letter")
    if cfg.full_stop and alt and alt[-1] not in ".!?":
        problems.append("does not end with a full stop")
    if re.search(r"[<>]", alt):
        problems.append("holds < or > (markup)")
    return problems


def proposal_for(found: Found, page_sha256: str, described: dict, model: str, cfg: AltTextSettings) -> Proposal:
    """The proposal for one image from what the model said of it (``described``: caption,
    confidence, abstained, reason)."""
    alt = as_alt_text(described["caption"], cfg)
    refresh = found.state == "refresh"
    made = Proposal(f"{found.page}:{found.line}:{found.column}", found.page, found.line, found.column,
                    found.alt_span[0] if refresh else found.offset, found.kind, found.src, found.image, alt, alt, model,
                    "proposed", lint(alt, cfg), page_sha256, found.quote,
                    list(found.alt_span) if refresh else None, found.alt if refresh else "",
                    list(found.provenance_span) if refresh and found.provenance_span else None,
                    described.get("confidence"), bool(described.get("abstained")), described.get("reason") or "")
    made.for_person = waits_for_person(made, cfg.min_confidence)
    return made


def save_review(path: Path, proposals: list[Proposal]) -> None:
    _atomic_write(path, (json.dumps([asdict(p) for p in proposals], indent=1) + "\n").encode())


def load_review(path: Path) -> list[Proposal]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        proposals = [Proposal(**entry) for entry in entries]
    except FileNotFoundError:
        raise ValueError(f"no review file at {path}: run captioner alt-text SITE_DIR first") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a review file this tool wrote ({err})") from None
    for p in proposals:
        if p.status not in STATUSES:
            raise ValueError(f"{path}: {p.id} has status {p.status!r}, not one of {', '.join(STATUSES)}")
    return proposals


def _escape(alt: str, quote: str) -> str:
    text = html.escape(alt, quote=False)
    return text.replace('"', "&quot;") if quote == '"' else text.replace("'", "&#39;")


def _markdown_escape(alt: str) -> str:
    return alt.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def edited_text(text: str, proposals: list[Proposal]) -> str:
    """``text`` with each proposal's alt inserted at its offset (or replacing a machine alt), from
    the end so earlier offsets stay valid; nothing else changes. The provenance mark says which
    model wrote an alt; an alt a person edited gets none (a later model then leaves it alone), and
    one that replaces a machine alt moves the mark to the model that wrote the new one."""
    edits: list[tuple[int, int, str]] = []  # (start, end, new text)
    for p in proposals:
        q = p.quote or '"'
        mark = "" if p.status == "edited" else f" {PROVENANCE}={q}{_escape(p.model, q)}{q}"
        if p.kind == "markdown":
            edits.append((p.offset, p.offset, _markdown_escape(p.alt)))
        elif p.replaces:
            start, end = p.replaces
            edits.append((start, end, _escape(p.alt, q)))
            if p.provenance:
                edits.append((p.provenance[0], p.provenance[1], mark))
        else:
            edits.append((p.offset, p.offset, f" alt={q}{_escape(p.alt, q)}{q}{mark}"))
    for start, end, new in sorted(edits, key=lambda e: e[0], reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _atomic_write(path: Path, data: bytes) -> None:
    """Write beside ``path`` and rename over it: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class Applied:
    pages: list[str]
    diffs: dict[str, str]
    skipped: list[tuple[str, str]]


def apply(site: Path, proposals: list[Proposal], dry_run: bool = False) -> Applied:
    """Write the accepted and edited proposals into their pages (see the module docstring);
    with ``dry_run`` only the diffs. Marks what was written ``applied``."""
    root = site.resolve()
    chosen = [p for p in proposals if p.status in ("accepted", "edited")]
    result = Applied([], {}, [])
    sidecar_path = root / SIDECAR
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    for page in sorted({p.page for p in chosen}):
        items = [p for p in chosen if p.page == page]
        path = (root / page).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            result.skipped.append((page, "not a page of the site any more"))
            continue
        if not os.access(path, os.W_OK) or not path.stat().st_mode & stat.S_IWUSR:  # root ignores the mode
            result.skipped.append((page, "read-only: not changed (make it writable, then apply again)"))
            continue
        data = path.read_bytes()
        import hashlib

        if hashlib.sha256(data).hexdigest() != items[0].page_sha256:
            result.skipped.append((page, "changed since it was scanned: scan again, review, then apply"))
            continue
        text, encoding = decode_page(data)
        new_text = edited_text(text, items)
        try:
            new_data = new_text.encode("utf-8-sig" if encoding == "utf-8-sig" else encoding)
        except UnicodeEncodeError as err:
            result.skipped.append((page, f"an alt text cannot be written in the page's {encoding}: {err.reason}"))
            continue
        result.diffs[page] = "".join(difflib.unified_diff(text.splitlines(keepends=True),
                                                          new_text.splitlines(keepends=True), f"a/{page}", f"b/{page}"))
        if dry_run:
            continue
        _atomic_write(path, new_data)
        result.pages.append(page)
        for p in items:
            if p.kind == "markdown" and p.status == "edited":  # a person's words: no model's mark
                sidecar.get(page, {}).pop(p.src, None)
            elif p.kind == "markdown":
                sidecar.setdefault(page, {})[f"{p.src}"] = {"alt": p.alt, "model": p.model}
            p.status = "applied"
    if not dry_run and any(p.kind == "markdown" and p.status == "applied" for p in chosen):
        _atomic_write(sidecar_path, (json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode())
    return result


def machine_markdown_alts(site: Path) -> dict[str, dict]:
    """page -> src -> {alt, model} of the Markdown alts a model wrote (the sidecar file)."""
    path = site.resolve() / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else {}


def summary(scan: Scan, proposals: list[Proposal]) -> list[tuple[str, int]]:
    """The counts a person wants first."""
    states: dict[str, int] = {}
    for f in scan.found:
        key = f"skipped: {f.reason}" if f.state == "skipped" else f.state
        states[key] = states.get(key, 0) + 1
    return [("pages scanned", len(scan.pages)), ("pages not read", len(scan.problems)),
            *sorted(states.items()), ("proposals", len(proposals)),
            ("proposals breaking a convention", sum(1 for p in proposals if p.lint))]


def propose(scan: Scan, model, identity: str, cfg: AltTextSettings, batch_size: int = 16,
            progress: bool = True) -> list[Proposal]:
    """Caption every image of ``scan`` that lacks an alt (and every machine alt another model
    wrote) with ``model``; an image that cannot be decoded is marked skipped with the reason."""
    import numpy as np
    from tqdm import tqdm

    from pipeline.data.images import prefetched
    from pipeline.registry.pyfunc_model import described

    wanted = [f for f in scan.found if f.state == "missing-alt" or (f.state == "refresh" and f.machine != identity)]
    sources: dict[str, object] = {}  # one decode and one caption per distinct image
    for found in wanted:
        key = found.image if found.image != "data:" else f"data:{id(found)}"
        sources.setdefault(key, found.data if found.image == "data:" else scan.site / found.image)
    reasons: dict[str, str] = {}
    captions: dict[str, dict] = {}
    bar = tqdm(total=len(sources), desc="caption", unit="image", disable=not progress)
    # the next batch is decoded on threads while the CNN and decoder work on this one
    for batch, pixels in prefetched(list(sources), sources.get, model.spec.image_size,
                                    model.limits.max_image_pixels, batch_size):
        good = [(key, p) for key, p in zip(batch, pixels) if isinstance(p, np.ndarray)]
        for key, p in zip(batch, pixels):
            if not isinstance(p, np.ndarray):  # ImageError, OSError: not an image, too large, unreadable
                reasons[key] = f"not a usable image: {str(p).splitlines()[0]}"
        if good:
            for (key, _), said in zip(good, described(model, model.embed(np.stack([p for _, p in good])))):
                captions[key] = said
        bar.update(len(batch))
    bar.close()
    for found in wanted:
        key = found.image if found.image != "data:" else f"data:{id(found)}"
        if key in reasons:
            found.state, found.reason = "skipped", reasons[key]
    out = []
    for found in wanted:
        key = found.image if found.image != "data:" else f"data:{id(found)}"
        if found.state == "skipped" or key not in captions:
            continue
        out.append(proposal_for(found, scan.pages[found.page].sha256, captions[key], identity, cfg))
    return out
