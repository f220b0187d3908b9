"""A self-contained HTML page of test images with generated and reference captions."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from pipeline.data.images import thumbnail_jpeg


def thumbnail_data_uri(path: Path, max_pixels: int | None, size: int = 200) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail_jpeg(path, size, max_pixels)).decode()


def render(items: list[dict], title: str, summary: str, max_pixels: int | None) -> str:
    """items: {path, image, beam, greedy, references} and, where the model says how sure it is,
    ``sure`` (the confidence in words), and for an attention decoder ``strip`` (PNG bytes: where it
    looked for each word of the beam caption); images (at most ``max_pixels``) are embedded as
    data URIs."""
    cards = []
    for item in items:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in item["references"])
        sure = f' <i>({html.escape(item["sure"])})</i>' if item.get("sure") else ""
        strip = ""
        if item.get("strip"):
            uri = "data:image/png;base64," + base64.b64encode(item["strip"]).decode()
            strip = (f'<details><summary>where it looked</summary><img class="strip" src="{uri}" alt="where the '
                     f'model looked for each word of: {html.escape(item["beam"])}"></details>')
        cards.append(
            f'<figure><img src="{thumbnail_data_uri(item["path"], max_pixels)}" alt="{html.escape(item["image"])}">'
            f'<figcaption><b>beam:</b> {html.escape(item["beam"])}{sure}<br>'
            f'<b>greedy:</b> {html.escape(item["greedy"])}<details><summary>references</summary>'
            f'<ul>{refs}</ul></details>{strip}<small>{html.escape(item["image"])}</small></figcaption></figure>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} main{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{width:260px;margin:0;border:1px solid #ddd;padding:.5em}} img{{max-width:100%}}
small{{color:#777}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p><main>{''.join(cards)}</main></body></html>
"""
