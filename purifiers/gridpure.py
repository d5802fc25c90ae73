"""GrIDPure (Zhao et al., "Can protective perturbation safeguard personal data from being exploited by
stable diffusion?", CVPR 2024): DiffPure on overlapping crops, averaged, blended with the input, repeated.

Each pass purifies every crop of a grid (crop side ``crop_fraction`` of the image, stride half a crop: 256
and 128 px on 512 px images) and a mosaic of the four corner quarter-crops (so corners get as much context
as the centre), averages the overlapping results, and blends: ``x <- (1 - g) * purified + g * x``. Published:
g 0.1, 10 denoising steps per pass (t* = 100/1000), 20 passes. Crops are resized to the model's resolution.
"""

from __future__ import annotations

import torch

from harness.protocols import ConfigError, Context, Purifier, PurifierOutput, check_int, check_range
from harness.seeding import derive_seed
from harness.types import ImageSet
from purifiers.diffpure import diffuse_and_denoise


def _positions(side: int, crop: int, stride: int) -> list[int]:
    pos = list(range(0, max(1, side - crop + 1), stride))
    if pos[-1] != side - crop:
        pos.append(side - crop)
    return pos


class GrIDPure(Purifier):
    """GrIDPure with the experiment's model.

    Args:
        passes: repetitions (20). strength: t* per pass (0.1). steps: schedule steps (100 -> 10 per pass).
        blend: g, the share of the pass input kept (0.1). crop_fraction: crop side / image side (0.5).
        prompt: conditioning prompt ("" = unconditional).
    """

    name = "gridpure"
    version = "1"
    randomized = True
    uses_model = True

    def __init__(
        self,
        passes: int = 20,
        strength: float = 0.1,
        steps: int = 100,
        blend: float = 0.1,
        crop_fraction: float = 0.5,
        prompt: str = "",
    ):
        self.passes = check_int("purifier.passes", passes, 1)
        self.steps = check_int("purifier.steps", steps, 1)
        self.strength = check_range("purifier.strength", strength, 0.0, 1.0)
        if int(steps * self.strength) < 1:
            raise ConfigError("purifier.steps x purifier.strength must give at least one denoising step")
        self.blend = check_range("purifier.blend", blend, 0.0, 1.0)
        self.crop_fraction = check_range("purifier.crop_fraction", crop_fraction, 0.1, 1.0)
        self.prompt = prompt or ""

    def _one_pass(self, pipe, x: torch.Tensor, ids, base: int, k: int, ctx: Context) -> torch.Tensor:
        n, _, h, w = x.shape
        c = max(8, round(min(h, w) * self.crop_fraction))
        stride = max(1, c // 2)
        res = getattr(ctx.model, "resolution", None) or c
        acc = torch.zeros_like(x)
        count = torch.zeros(1, 1, h, w)
        for top in _positions(h, c, stride):
            for left in _positions(w, c, stride):
                crops = x[:, :, top : top + c, left : left + c]
                seeds = [derive_seed(base, i, k, top, left) for i in ids]
                out = diffuse_and_denoise(
                    pipe, crops, seeds, self.strength, self.steps, self.prompt, 1.0, ctx.device, res
                )
                acc[:, :, top : top + c, left : left + c] += out
                count[:, :, top : top + c, left : left + c] += 1
        q = c // 2
        if q >= 4 and c <= min(h, w):  # the four corner quarter-crops as one mosaic
            corners = [(0, 0), (0, w - q), (h - q, 0), (h - q, w - q)]
            mosaic = torch.zeros(n, 3, 2 * q, 2 * q)
            slots = [(0, 0), (0, q), (q, 0), (q, q)]
            for (t, left), (mt, ml) in zip(corners, slots, strict=True):
                mosaic[:, :, mt : mt + q, ml : ml + q] = x[:, :, t : t + q, left : left + q]
            seeds = [derive_seed(base, i, k, "mosaic") for i in ids]
            out = diffuse_and_denoise(pipe, mosaic, seeds, self.strength, self.steps, self.prompt, 1.0, ctx.device, res)
            for (t, left), (mt, ml) in zip(corners, slots, strict=True):
                acc[:, :, t : t + q, left : left + q] += out[:, :, mt : mt + q, ml : ml + q]
                count[:, :, t : t + q, left : left + q] += 1
        purified = acc / count
        return ((1 - self.blend) * purified + self.blend * x).clamp(0, 1)

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        pipe = ctx.pipeline("img2img")
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        out = []
        for _, batch in ctx.progress(list(images.batches(ctx.batch_size)), desc=self.name, unit="batch"):
            x = batch.images.clone()
            for k in range(self.passes):
                x = self._one_pass(pipe, x, list(batch.ids), base, k, ctx)
            out.append(x)
        result = torch.cat(out) if out else images.images.clone()
        params = {
            "passes": self.passes,
            "strength": self.strength,
            "steps": self.steps,
            "blend": self.blend,
            "crop_fraction": self.crop_fraction,
            "noise_seed": base,
        }
        return PurifierOutput(images.with_images(result), params)
