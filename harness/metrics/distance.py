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
