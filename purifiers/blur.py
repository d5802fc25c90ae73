"""Gaussian blur (kornia), a classic low-pass purifier."""

from __future__ import annotations

import torch

from harness.protocols import Context, Purifier, PurifierOutput, check_range
from harness.types import ImageSet


class GaussianBlur(Purifier):
    """Blur with a Gaussian of standard deviation ``sigma`` pixels (kernel side 2 * ceil(3 sigma) + 1, reflect
    borders; ``kornia.filters.gaussian_blur2d``). Shape (N, 3, H, W) in [0, 1] in and out; deterministic."""

    name = "blur"
    version = "1"
    randomized = False

    def __init__(self, sigma: float = 1.0):
        self.sigma = check_range("purifier.sigma", sigma, 0.0, 100.0)

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        import kornia

        x = images.images
        if self.sigma == 0 or len(x) == 0:
            return PurifierOutput(images.with_images(x.clone()), {"sigma": self.sigma, "kernel": 1})
        k = 2 * int(torch.ceil(torch.tensor(3 * self.sigma))) + 1
        k = min(k, 2 * (min(images.size) // 2) - 1)
        out = kornia.filters.gaussian_blur2d(x, (k, k), (self.sigma, self.sigma), border_type="reflect")
        return PurifierOutput(images.with_images(out.clamp(0, 1)), {"sigma": self.sigma, "kernel": k})
