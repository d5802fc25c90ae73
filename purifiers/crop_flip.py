"""Random crop (resized back) and horizontal flip: the augmentations finetuning scripts apply anyway."""

from __future__ import annotations

import torch

from harness.protocols import Context, Purifier, PurifierOutput, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet


class CropFlip(Purifier):
    """Crop a random square covering ``scale`` of each side, resize it back (bicubic, kornia), and flip it
    horizontally with probability ``flip_p``. Per-image draws (seeded by id). (N, 3, H, W) in [0, 1] in and out.

    A flip changes which pixel is where: editing metrics against the clean edit will penalise it, so use it
    for the mimicry threat model (finetuning scripts flip anyway).
    """

    name = "crop_flip"
    version = "1"
    randomized = True

    def __init__(self, scale: float = 0.9, flip_p: float = 0.5):
        self.scale = check_range("purifier.scale", scale, 0.1, 1.0)
        self.flip_p = check_range("purifier.flip_p", flip_p, 0.0, 1.0)

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        import kornia

        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        h, w = images.size
        ch, cw = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        out, sampled = [], []
        for img, i in zip(images.images, images.ids, strict=True):
            g = make_generator(derive_seed(base, i))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            flip = bool(torch.rand((), generator=g) < self.flip_p)
            crop = img[None, :, top : top + ch, left : left + cw]
            crop = kornia.geometry.transform.resize(crop, (h, w), interpolation="bicubic", antialias=True)
            out.append((crop.flip(-1) if flip else crop)[0].clamp(0, 1))
            sampled.append({"id": i, "top": top, "left": left, "flip": flip})
        result = torch.stack(out) if out else images.images.clone()
        return PurifierOutput(
            images.with_images(result), {"scale": self.scale, "flip_p": self.flip_p, "sampled": sampled}
        )
