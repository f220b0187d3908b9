"""A self-contained HTML page of test images with generated and reference captions."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image, ImageOps

from pipeline.data.images import to_rgb8


def thumbnail_data_uri(path: Path, size: int = 200) -> str:
    with Image.open(path) as img:
        img = to_rgb8(ImageOps.exif_transpose(img))  # 16-bit, alpha, CMYK: as the model saw them
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def render(items: list[dict], title: str, summary: str) -> str:
    """items: {path, image, beam, greedy, references}; images are embedded as data URIs."""
    cards = []
    for item in items:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in item["references"])
        cards.append(
            f'<figure><img src="{thumbnail_data_uri(item["path"])}" alt="{html.escape(item["image"])}">'
            f'<figcaption><b>beam:</b> {html.escape(item["beam"])}<br>'
            f'<b>greedy:</b> {html.escape(item["greedy"])}<details><summary>references</summary>'
            f'<ul>{refs}</ul></details><small>{html.escape(item["image"])}</small></figcaption></figure>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} main{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{width:260px;margin:0;border:1px solid #ddd;padding:.5em}} img{{max-width:100%}}
small{{color:#777}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p><main>{''.join(cards)}</main></body></html>
"""
