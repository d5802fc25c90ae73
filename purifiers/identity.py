"""No purification: naive mimicry, the first column of every audit."""

from __future__ import annotations

import torch

from harness.protocols import Context, Purifier, PurifierOutput
from harness.types import ImageSet


class NoPurifier(Purifier):
    """Returns the images unchanged."""

    name = "none"
    version = "1"
    randomized = False

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        return PurifierOutput(images.with_images(images.images.clone()), {})
