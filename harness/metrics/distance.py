"""Pixel-space distances in [0, 1] units, used to re-measure the budget a protection actually used."""

from __future__ import annotations

import torch

from harness.protocols import Metric
from harness.types import ImageSet


class LinfDistance(Metric):
    """max |x - y| over pixels and channels, per image, in [0, 1] pixel units."""

    name = "linf"
    version = "1"
    higher_is_better = False

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        d = (outputs.images.double() - references.images.double()).abs()
        return d.flatten(1).amax(dim=1) if d.numel() else torch.zeros(len(outputs), dtype=torch.float64)


class L2Distance(Metric):
    """Euclidean norm of x - y over all pixels and channels, per image, in [0, 1] pixel units."""

    name = "l2"
    version = "1"
    higher_is_better = False

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        d = outputs.images.double() - references.images.double()
        return d.flatten(1).norm(dim=1)


class LatentDistance(Metric):
    """L2 distance between the VAE encoder's latent means of two images (the model's own view of them).

    Purifiers are judged by how far they bring a protected image's latent back toward the clean image's
    latent (the issue's "distance in the model's latent space"); protections such as PhotoGuard's encoder
    attack and Mist's textural loss act exactly there.

    Args:
        vae: a diffusers ``AutoencoderKL`` (any Stable-Diffusion-style model's ``pipe.vae``).
        batch_size: images per encoder pass.
    """

    name = "latent_l2"
    version = "1"
    higher_is_better = False

    def __init__(self, vae, batch_size: int = 8):
        self.vae = vae
        self.batch_size = max(1, int(batch_size))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        out = []
        with torch.no_grad():
            for s in range(0, len(x), self.batch_size):
                xb = (x[s : s + self.batch_size] * 2 - 1).to(p.device, p.dtype)
                out.append(self.vae.encode(xb).latent_dist.mean.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        if len(outputs) == 0:
            return torch.zeros(0, dtype=torch.float64)
        d = self._encode(outputs.images) - self._encode(references.images)
        return d.flatten(1).norm(dim=1).double()
