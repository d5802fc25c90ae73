"""Gaussian noise: add N(0, sigma^2) per pixel and clip (Hönig et al. 2024 use sigma 0.05; BlurGuard 0.1)."""

from __future__ import annotations

import torch

from harness.protocols import Context, Purifier, PurifierOutput, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet


class GaussianNoise(Purifier):
    """Add i.i.d. Gaussian noise of standard deviation ``sigma`` ([0, 1] pixel units), then clip to [0, 1].

    Each image's noise comes from a generator seeded by the purifier's generator and the image's id, so the
    output does not depend on the batch. Shape (N, 3, H, W) in [0, 1] in and out.
    """

    name = "gaussian_noise"
    version = "1"
    randomized = True

    def __init__(self, sigma: float = 0.05):
        self.sigma = check_range("purifier.sigma", sigma, 0.0, 1.0)

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        x = images.images
        noise = (
            torch.stack([torch.randn(x.shape[1:], generator=make_generator(derive_seed(base, i))) for i in images.ids])
            if len(images)
            else torch.zeros_like(x)
        )
        out = (x + self.sigma * noise).clamp(0, 1)
        return PurifierOutput(images.with_images(out), {"sigma": self.sigma, "noise_seed": base})
