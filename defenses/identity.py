"""The "no protection" defense: the clean images unchanged (the clean-image baseline of every audit)."""

from __future__ import annotations

import torch

from harness.protocols import Context, Defense, DefenseOutput
from harness.types import ImageSet


class NoDefense(Defense):
    """Returns the images unchanged. Budget 0."""

    name = "none"
    version = "1"
    eps = 0.0

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        return DefenseOutput(images.with_images(images.images.clone()), {})
