"""Resize down and back up: the simplest low-pass purifier (anti-aliased bicubic both ways)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.protocols import ConfigError, Context, Purifier, PurifierOutput, check_range
from harness.types import ImageSet

MODES = ("bicubic", "bilinear", "area")


class Resize(Purifier):
    """Downscale by ``factor`` (output side = round(side * factor)) and upscale back to the input size.

    Args:
        factor: scale of the intermediate image, in (0, 1] (0.5 halves each side).
        mode: interpolation, "bicubic", "bilinear" or "area" (anti-aliased when downscaling).

    Shape: (N, 3, H, W) in [0, 1] in and out; deterministic.
    """

    name = "resize"
    version = "1"
    randomized = False

    def __init__(self, factor: float = 0.5, mode: str = "bicubic"):
        self.factor = check_range("purifier.factor", factor, 1e-3, 1.0)
        if mode not in MODES:
            raise ConfigError(f"purifier.mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        h, w = images.size
        small = (max(1, round(h * self.factor)), max(1, round(w * self.factor)))
        x = images.images

        def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            if self.mode == "area":
                return F.interpolate(t, size=size, mode="area")
            return F.interpolate(t, size=size, mode=self.mode, antialias=True, align_corners=False)

        out = resize(resize(x, small), (h, w)).clamp(0, 1) if len(x) else x.clone()
        return PurifierOutput(images.with_images(out), {"factor": self.factor, "mode": self.mode, "size": list(small)})
