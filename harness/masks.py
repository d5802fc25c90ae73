"""Inpainting masks shared by the inpainting defenses and the inpainting editor.

A mask is (1, 1, H, W) float in {0, 1}; 1 marks the region the inpainting edit repaints, 0 the region it
keeps. PhotoGuard's inpainting threat model keeps the subject and regenerates the rest: ``"border"`` keeps a
centred square (the subject) and repaints around it; ``"centre"`` repaints the centred square instead.
"""

from __future__ import annotations

import torch

from harness.protocols import ConfigError, check_range

__all__ = ["MASK_KINDS", "edit_mask"]

MASK_KINDS = ("border", "centre")


def edit_mask(kind: str, height: int, width: int, fraction: float = 0.5, option: str = "mask") -> torch.Tensor:
    """The repaint mask of ``kind`` for an image of ``height`` x ``width``.

    Args:
        kind: "border" (keep the centred square, repaint the rest) or "centre" (repaint the centred square).
        fraction: the centred square's side as a fraction of the image side, in (0, 1).
        option: the config option named in errors.

    Returns:
        (1, 1, height, width) float32, 1 = repainted.
    """
    if kind not in MASK_KINDS:
        raise ConfigError(f"{option} must be one of {list(MASK_KINDS)}, got {kind!r}")
    f = check_range(f"{option}_fraction", fraction, 0.05, 0.95)
    sh, sw = max(1, round(height * f)), max(1, round(width * f))
    top, left = (height - sh) // 2, (width - sw) // 2
    centre = torch.zeros(1, 1, height, width)
    centre[..., top : top + sh, left : left + sw] = 1.0
    return centre if kind == "centre" else 1.0 - centre
