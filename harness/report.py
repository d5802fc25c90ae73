"""Images for reports: labelled PNG grids (the audit's report and the model cards use them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_grid"]


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
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
