"""Editing mimics (PhotoGuard's threat model): img2img of a photo with a prompt.

As in PhotoGuard's evaluation (Salman et al., ICML 2023, Sec. 5), the clean and the protected version of
an image are edited with the same prompt and the same noise: each image's noise comes from a generator
seeded by the stage seed and the image's id, so the pair shares its randomness whatever the batch size.
"""

from __future__ import annotations

import torch

from harness.protocols import ConfigError, Context, Mimic, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet


class Img2ImgEdit(Mimic):
    """Stable Diffusion img2img edit of each image.

    Args:
        prompt: the edit prompt; ``None`` or "" uses each image's caption.
        strength: fraction of the noise schedule applied to the input (0-1; PhotoGuard 0.5-0.7).
        guidance_scale: classifier-free guidance scale (PhotoGuard 7.5).
        steps: number of denoising steps of the full schedule (img2img runs ``strength * steps`` of them).
        negative_prompt: optional negative prompt.

    Returns (from :meth:`run`): the edited images, (N, 3, H, W) in [0, 1], same ids and captions as the
    input, at the input's size.
    """

    name = "img2img"
    version = "1"
    threat_model = "editing"
    uses_model = True

    def __init__(
        self,
        prompt: str | None = None,
        strength: float = 0.6,
        guidance_scale: float = 7.5,
        steps: int = 50,
        negative_prompt: str | None = None,
    ):
        self.prompt = prompt or None
        self.strength = check_range("mimic.strength", strength, 0.0, 1.0)
        self.guidance_scale = check_range("mimic.guidance_scale", guidance_scale, 0.0, 100.0)
        if int(steps) != steps or steps < 1:
            raise ConfigError(f"mimic.steps must be a positive integer, got {steps!r}")
        self.steps = int(steps)
        self.negative_prompt = negative_prompt or None

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        pipe = ctx.pipeline("img2img")
        base_seed = generator.initial_seed()
        outputs = []
        batches = list(images.batches(ctx.batch_size))
        for _, batch in ctx.progress(batches, desc=f"{self.name} edit", unit="batch"):
            prompts = [self.prompt or c for c in batch.captions]
            gens = [make_generator(derive_seed(base_seed, i)) for i in batch.ids]
            out = pipe(
                prompt=prompts,
                image=batch.images.to(ctx.device),
                strength=self.strength,
                guidance_scale=self.guidance_scale,
                num_inference_steps=self.steps,
                negative_prompt=[self.negative_prompt] * len(batch) if self.negative_prompt else None,
                generator=gens,
                output_type="pt",
            ).images
            out = out.float().cpu()
            if out.shape[-2:] != batch.images.shape[-2:]:
                out = torch.nn.functional.interpolate(
                    out, size=batch.images.shape[-2:], mode="bicubic", antialias=True, align_corners=False
                )
            outputs.append(batch.with_images(out))
        return ImageSet.concat(outputs) if outputs else images
