"""Pieces of the reports: labelled PNG grids (audits, experiments, model cards) and Markdown -> one HTML page."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["safe_filename", "save_grid", "markdown_to_html", "html_page"]


def safe_filename(name: str) -> str:
    """``name`` with every run of characters other than letters, digits, ``_``, ``.`` and ``-`` replaced by
    one ``-`` (labels such as ``aspl[lr=0.003]`` become file names), without a leading or trailing ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def save_grid(
    images: torch.Tensor,
    rows: int,
    path: Path,
    labels: Sequence[str] | None = None,
    scale: int = 2,
    label_width: int = 90,
) -> None:
    """Save images (N, 3, H, W) in [0, 1] as a PNG grid of ``rows`` rows (row labels drawn at the left, in a
    margin ``label_width`` pixels wide)."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    cols = -(-n // rows)
    margin = label_width if labels else 0
    grid = Image.new("RGB", (margin + cols * w * scale, rows * h * scale), "white")
    arr = (images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    for i in range(n):
        tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (margin + (i % cols) * w * scale, (i // cols) * h * scale))
    if labels:
        d = ImageDraw.Draw(grid)
        for r, text in enumerate(labels):
            d.text((4, r * h * scale + h * scale // 2 - 5), text, fill="black")
    import io

    from harness.cache import atomic_write_bytes

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())  # a report never points at half a PNG


def grid_from_store(store: Any, lines: Sequence[tuple], out: Path, n_images: int, label_width: int) -> Path | None:
    """A labelled grid from an artifact store (``harness.cache.ArtifactStore``), one image row per
    ``(label, stage, key)`` or ``(label, stage, key, transform)`` (a transform maps the stored set and the first
    line's set to what the row shows, e.g. reconstructions matched to the private images). Returns ``out``, or
    None when the store lacks any of them (nothing is written)."""
    from harness.cache import load_imageset

    images, labels, first = [], [], None
    for label, stage, key, *transform in lines:
        art = store.get(stage, key) if store is not None and key else None
        if art is None:
            return None
        loaded = load_imageset(art.path)[0]
        first = loaded if first is None else first
        if transform and transform[0] is not None:
            loaded = transform[0](loaded, first)
        # stages may run at other sizes (a user's images at their own size, a model's stages at its
        # resolution): every row is shown at the first row's size
        images.append(loaded.resized(first.size[0]).images[:n_images])
        labels.append(label)
    if not images:
        return None
    k = min(len(x) for x in images)
    save_grid(torch.cat([x[:k] for x in images]), len(images), out, labels=labels, scale=2, label_width=label_width)
    return out


def _png_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}td,th{{border:1px solid #ccc;padding:3px 8px}}
th{{background:#f3f3f3}}img{{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}}code{{background:#f5f5f5}}
</style></head><body>{body}</body></html>
"""


def markdown_to_html(md: str, folder: Path, embed_images: bool = True) -> str:
    """The reports' small Markdown subset (headings, bullets, tables, images, bold, code) as HTML. Images that
    exist in ``folder`` are embedded (the file opens offline on its own) or, with ``embed_images=False``, linked
    by their relative path (for reports whose folder ships the PNGs beside them)."""

    def inline(t: str) -> str:
        t = html.escape(t)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

    out, table = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *body = table
            out.append(
                "<table><tr>"
                + "".join(f"<th>{inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
            table = []
        m = re.match(r"!\[(.*?)\]\((.*?)\)", line)
        if m and (folder / m.group(2)).is_file():
            src = _png_data(folder / m.group(2)) if embed_images else html.escape(m.group(2))
            out.append(f'<p><img alt="{html.escape(m.group(1))}" src="{src}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<ul><li>{inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{inline(line.rstrip())}</p>")
    return "\n".join(out)


def html_page(title: str, md: str, folder: Path, embed_images: bool = True) -> str:
    """A whole HTML page for the Markdown report ``md`` whose images lie in ``folder``."""
    return _PAGE.format(title=html.escape(title), body=markdown_to_html(md, folder, embed_images))
