"""Dirty-label poison: images of the target concept captioned as the source concept.

The plain poisoning attack that Nightshade (Shan et al., IEEE S&P 2024) is compared with: no perturbation, the
image simply shows the wrong concept for its caption. The poisoning threat model's floor
(:mod:`harness.threat_models.poisoning`): what the same number of poison samples does when nothing hides them.
It has no perturbation budget (the images are replaced, not perturbed); rows still measure how far the
replacements are from the clean images.

Where the target's images come from (``images``):
- ``world``: the embedded world renders the same artist painting the target subject (an image of the artist,
  subject and index parsed from a ``ProceduralArt`` id ``<artist>/<subject>/<split>-<index>``, drawn from a
  seed of its own), the analogue of the paper's real images of the target;
- ``model``: the model generates each image from its caption with the source replaced by the target (the
  same prompts as Nightshade's anchors, under another seed): works on any captioned data set.
"""

from __future__ import annotations

import torch

from harness.diffusion import generate_seeded
from harness.errors import ConfigError
from harness.protocols import Context, Defense, DefenseOutput, check_int, check_range
from harness.seeding import derive_seed
from harness.threat_models.poisoning import check_concepts, swap_concept
from harness.types import ImageSet

__all__ = ["DirtyLabel"]

SOURCES = ("world", "model")


class DirtyLabel(Defense):
    """Each image replaced by one of the target concept, its caption (naming the source) kept.

    Args:
        source, target: the captions' concept and the concept the images show instead.
        images: ``world`` (the embedded world's artworks of the target) or ``model`` (generated).
        steps, guidance: sampling, for ``images: model``.
    """

    name = "dirty_label"
    version = "1"
    threat_models = ("poisoning",)
    # the images are replaced, not perturbed: no budget of its own (eps None); the rows still measure how far the
    # replacements are from the clean images

    def __init__(
        self,
        source: str = "house",
        target: str = "boat",
        images: str = "world",
        steps: int = 30,
        guidance: float = 7.5,
    ):
        self.source, self.target = check_concepts(source, target)
        if images not in SOURCES:
            raise ConfigError(f"defense.images must be one of {list(SOURCES)}, got {images!r}")
        self.images = images
        self.uses_model = images == "model"
        self.steps = check_int("defense.steps", steps, 1)
        self.guidance = check_range("defense.guidance", guidance, 0.0, 100.0)

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        seed = derive_seed(generator.initial_seed(), "dirty_label")
        if self.images == "model":
            prompts = [swap_concept(c, self.source, self.target) for c in images.captions]
            pipe = ctx.pipeline("text2img")
            out = generate_seeded(
                pipe, images.ids, prompts, seed, images.size, self.steps, self.guidance, ctx, self.name
            )
        else:
            out = self._render(images, seed)
        return DefenseOutput(ImageSet(out, images.ids, images.captions), {"replaced_images": float(len(images))})

    def _render(self, images: ImageSet, seed: int) -> torch.Tensor:
        import numpy as np

        from harness.world import ARTISTS, render_artwork

        h, w = images.size
        if h != w:
            raise ConfigError(f"defense.images=world renders square artworks; the images are {h}x{w}")
        arrays = []
        for image_id in images.ids:
            artist = image_id.split("/", 1)[0]
            if artist not in ARTISTS or image_id.count("/") != 2:
                raise ConfigError(
                    f"defense.images=world needs the embedded world's artworks (ids <artist>/<subject>/<split>-<n>), "
                    f"got id {image_id!r}; use defense.images=model for other data"
                )
            arrays.append(render_artwork(artist, self.target, derive_seed(seed, image_id), h))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
