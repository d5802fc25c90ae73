"""DiffPure (Nie et al., ICML 2022) with the attacker's own latent diffusion model.

Diffuse the image to timestep ``t* = strength * T`` and run the reverse chain back to 0. For a latent
diffusion model this is img2img at low strength with an empty prompt and no guidance (docs/methods.md#diffpure: t* about
0.1 of the schedule; GrIDPure used 100 of 1000). Each image's noise comes from a generator seeded by the
purifier's generator and the image's id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.protocols import ConfigError, Context, Purifier, PurifierOutput, check_int, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet


def diffuse_and_denoise(
    pipe,
    images: torch.Tensor,
    seeds: list[int],
    strength: float,
    steps: int,
    prompt: str,
    guidance: float,
    device: str,
    resolution: int | None = None,
) -> torch.Tensor:
    """img2img at ``strength`` over ``steps`` schedule steps; images resized to ``resolution`` for the model
    and back. Returns (N, 3, H, W) in [0, 1] on CPU."""
    h, w = images.shape[-2:]
    x = images
    if resolution and (h, w) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
    out = (
        pipe(
            prompt=[prompt] * len(x),
            image=x.clamp(0, 1).to(device),
            strength=strength,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=[make_generator(s) for s in seeds],
            output_type="pt",
        )
        .images.float()
        .cpu()
    )
    if out.shape[-2:] != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1)


class DiffPure(Purifier):
    """DiffPure by latent img2img with the experiment's model.

    Args:
        strength: t* as a fraction of the schedule (0.1).
        steps: schedule steps (the chain runs ``strength * steps`` of them; 100 -> 10).
        prompt: conditioning prompt ("" = unconditional, as DiffPure).
        guidance_scale: classifier-free guidance (1 = none).
    """

    name = "diffpure"
    version = "1"
    randomized = True
    uses_model = True

    def __init__(self, strength: float = 0.1, steps: int = 100, prompt: str = "", guidance_scale: float = 1.0):
        self.strength = check_range("purifier.strength", strength, 0.0, 1.0)
        check_int("purifier.steps", steps, 1)
        if int(steps * self.strength) < 1:
            raise ConfigError(
                f"purifier.steps x purifier.strength must give at least one denoising step, got {steps} x {strength}"
            )
        self.steps = steps
        self.prompt = prompt or ""
        self.guidance_scale = check_range("purifier.guidance_scale", guidance_scale, 0.0, 100.0)

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        pipe = ctx.pipeline("img2img")
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        res = getattr(ctx.model, "resolution", None)
        out = []
        for _, batch in ctx.progress(list(images.batches(ctx.batch_size)), desc=self.name, unit="batch"):
            seeds = [derive_seed(base, i) for i in batch.ids]
            out.append(
                diffuse_and_denoise(
                    pipe,
                    batch.images,
                    seeds,
                    self.strength,
                    self.steps,
                    self.prompt,
                    self.guidance_scale,
                    ctx.device,
                    res,
                )
            )
        result = torch.cat(out) if out else images.images.clone()
        params = {
            "strength": self.strength,
            "steps": self.steps,
            "denoising_steps": int(self.steps * self.strength),
            "noise_seed": base,
        }
        return PurifierOutput(images.with_images(result), params)
