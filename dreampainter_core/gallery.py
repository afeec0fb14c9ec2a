"""Review a batch run: a contact sheet per product and an ``index.html`` gallery of the whole run.

``DIR/<id>/contact.png``: the product photo, its mask over it, then one row per format with
that format's seeds. ``DIR/<id>/review/{product,mask}.png``: small copies for the gallery, so
it opens from ``DIR`` alone (no link to the user's own photo folders). ``DIR/index.html``: one
card per product in manifest order, failed ones first with their reason, each image linking to
its full-size file. Everything is written atomically.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .fileio import atomic_write_bytes, atomic_write_text
from .images import mask_overlay

CELL = 192  # px: the contact sheet's cell height
THUMB = 256  # px: the review copies' longest side
LABEL = 16  # px under each cell
BACKDROP = (236, 236, 236)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8))


def _fit(im: Image.Image, height: int) -> Image.Image:
    width = max(1, round(im.width * height / im.height))
    return im.resize((width, height), Image.LANCZOS)


def _png_bytes(im: Image.Image) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return buffer.getvalue()


def write_contact_sheet(out: Path, item, used: tuple[torch.Tensor, torch.Tensor], outputs: list[Path]) -> Path:
    """`used` = (product photo [H, W, 3], the mask it was generated with [H, W])."""
    image, mask = used
    product, overlay = _pil(image), _pil(mask_overlay(mask, image)[0])
    review = out / item.id / "review"
    for name, im in (("product", product), ("mask", overlay)):
        small = im.copy()
        small.thumbnail((THUMB, THUMB))
        atomic_write_bytes(review / f"{name}.png", _png_bytes(small))

    rows: dict[str, list[tuple[str, Image.Image]]] = {}
    for path in outputs:
        if path.is_file():
            fmt, seed = path.stem.rsplit("_", 1)
            with Image.open(path) as im:
                rows.setdefault(fmt.replace("x", ":"), []).append((f"{fmt.replace('x', ':')} seed {seed}",
                                                                    _fit(im.convert("RGB"), CELL)))
    lines = [[("product", _fit(product, CELL)), ("mask", _fit(overlay, CELL))], *rows.values()]
    gap = 6
    width = max(sum(im.width + gap for _, im in line) + gap for line in lines)
    height = len(lines) * (CELL + LABEL + gap) + gap
    sheet = Image.new("RGB", (width, height), BACKDROP)
    draw = ImageDraw.Draw(sheet)
    y = gap
    for line in lines:
        x = gap
        for label, im in line:
            sheet.paste(im, (x, y))
            draw.text((x + 2, y + CELL + 2), label, fill=(40, 40, 40))
            x += im.width + gap
        y += CELL + LABEL + gap
    return atomic_write_bytes(out / item.id / "contact.png", _png_bytes(sheet))


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; background: #f4f4f4; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } .summary { margin: 0 0 20px; color: #555; }
.card { background: #fff; border-radius: 8px; padding: 12px 16px; margin: 0 0 16px; box-shadow: 0 1px 3px #0002; }
.card h2 { font-size: 16px; margin: 0 0 4px; } .prompt { color: #555; margin: 0 0 8px; }
.badge { font-size: 12px; padding: 1px 8px; border-radius: 10px; margin-left: 8px; color: #fff; }
.done { background: #2e7d32; } .skipped { background: #607d8b; } .failed { background: #c62828; }
.reason { color: #c62828; white-space: pre-wrap; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-end; margin: 6px 0; }
figure { margin: 0; } figcaption { font-size: 12px; color: #666; }
img { height: 160px; border-radius: 4px; background: #ddd; display: block; }
.fmt { width: 44px; font-weight: 600; color: #444; }
"""


def write_gallery(out: Path, items, report: dict) -> Path:
    """index.html over the run's report: product, mask and each format's outputs per product."""
    counts = report.get("counts", {})
    entries = report.get("items", {})
    order = sorted(items, key=lambda i: entries.get(i.id, {}).get("status") != "failed")  # failures first
    cards = []
    for item in order:
        entry = entries.get(item.id, {"status": "not run"})
        status = entry.get("status", "?")
        parts = [f'<div class="card" id="{html.escape(item.id)}"><h2>{html.escape(item.id)}'
                 f'<span class="badge {html.escape(status)}">{html.escape(status)}</span></h2>',
                 f'<p class="prompt">{html.escape(item.prompt)}</p>']
        if entry.get("reason"):
            parts.append(f'<p class="reason">line {entry.get("line", "?")}: {html.escape(entry["reason"])}</p>')
        review = out / item.id / "review"
        firsts = [(name, f"{item.id}/review/{name}.png") for name in ("product", "mask") if (review / f"{name}.png").is_file()]
        if firsts:
            parts.append('<div class="row"><span class="fmt"></span>' + "".join(
                f'<figure><a href="{html.escape(src)}"><img src="{html.escape(src)}" alt="{name}"></a>'
                f"<figcaption>{name}</figcaption></figure>" for name, src in firsts) + "</div>")
        by_format: dict[str, list[str]] = {}
        for rel in entry.get("outputs", []):
            if (out / rel).is_file():
                fmt = Path(rel).stem.rsplit("_", 1)[0].replace("x", ":")
                by_format.setdefault(fmt, []).append(rel)
        for fmt, rels in by_format.items():
            figures = "".join(
                f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" loading="lazy" alt="{html.escape(rel)}">'
                f'</a><figcaption>seed {html.escape(Path(rel).stem.rsplit("_", 1)[1])}</figcaption></figure>'
                for rel in rels)
            parts.append(f'<div class="row"><span class="fmt">{html.escape(fmt)}</span>{figures}</div>')
        if entry.get("seconds") is not None:
            parts.append(f'<figcaption>{entry.get("made", 0)} made, {entry.get("skipped", 0)} skipped, '
                         f'{entry["seconds"]} s</figcaption>')
        cards.append("".join(parts) + "</div>")
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("done", "skipped", "failed"))
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>DreamPainter batch: {html.escape(out.name)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>DreamPainter batch: {html.escape(out.name)}</h1>"
            f'<p class="summary">{len(items)} products: {summary}. Started {html.escape(str(report.get("started", "")))}; '
            f'<a href="report.json">report.json</a></p>{"".join(cards)}'
            f'<script type="application/json" id="report">{html.escape(json.dumps(counts))}</script></body></html>\n')
    return atomic_write_text(out / "index.html", page)
