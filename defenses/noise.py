"""Random-noise baseline of a given L-inf budget.

PhotoGuard (Salman et al., ICML 2023, Table 1) reports "random noise" of the same budget as its
immunizations as the baseline row: a protection only counts if it beats noise of equal size.
"""

from __future__ import annotations

import torch

from harness.protocols import Context, Defense, DefenseOutput, check_range
from harness.types import ImageSet


class UniformNoise(Defense):
    """Add i.i.d. uniform noise in [-eps, eps] to every pixel and channel, then clip to [0, 1].

    Args:
        eps: L-inf budget in [0, 1] pixel units (8/255 ~= 0.0314). After the 8-bit quantization between
            stages the realised L-inf distance is at most eps + 0.5/255.

    Shape: (N, 3, H, W) in [0, 1] in and out. Noise is drawn on the CPU from ``generator`` image by image,
    so the output does not depend on the batch size.
    """

    name = "noise"
    version = "1"

    def __init__(self, eps: float = 8 / 255):
        self.eps = check_range("defense.eps", eps, 0.0, 1.0)

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        x = images.images
        noise = torch.empty_like(x)
        for i in range(len(images)):
            noise[i].uniform_(-self.eps, self.eps, generator=generator)
        out = (x + noise).clamp(0.0, 1.0)
        return DefenseOutput(images.with_images(out), {"noise_linf": float((out - x).abs().max()) if len(x) else 0.0})
