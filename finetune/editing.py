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


class InpaintEdit(Mimic):
    """Stable Diffusion inpainting edit of each image: the masked region is repainted from the prompt.

    PhotoGuard's main threat model (Salman et al. 2023, Fig. 1 and Table 1): keep the subject, regenerate the
    rest. Runs on the model's inpainting checkpoint (``model.inpaint_source``: ``tiny-sd-inpaint`` for
    ``model=tiny-sd``, SD 1.5 inpainting for ``model=sd15``), or on an inpainting model given directly
    (``model=tiny-sd-inpaint``). Clean and protected images share the mask, the prompt and each image's noise.

    Args:
        prompt: the edit prompt (None or "": each image's caption).
        mask: "border" (keep the centred subject, repaint around it) or "centre" (see :mod:`harness.masks`).
        mask_fraction: side of the centred square as a fraction of the image side.
        strength, guidance_scale, steps, negative_prompt: as for img2img (inpainting usually uses strength 1).
    """

    name = "inpaint"
    version = "1"
    threat_model = "editing"
    uses_model = True

    def __init__(
        self,
        prompt: str | None = None,
        mask: str = "border",
        mask_fraction: float = 0.5,
        strength: float = 1.0,
        guidance_scale: float = 7.5,
        steps: int = 50,
        negative_prompt: str | None = None,
    ):
        from harness.masks import edit_mask

        edit_mask(mask, 8, 8, mask_fraction, option="mimic.mask")  # validate now
        self.mask, self.mask_fraction = mask, mask_fraction
        self.prompt = prompt or None
        self.strength = check_range("mimic.strength", strength, 0.01, 1.0)
        self.guidance_scale = check_range("mimic.guidance_scale", guidance_scale, 0.0, 100.0)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ConfigError(f"mimic.steps must be a positive integer, got {steps!r}")
        self.steps = int(steps)
        self.negative_prompt = negative_prompt or None

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        from harness.masks import edit_mask

        pipe = ctx.pipeline("inpaint")
        base_seed = generator.initial_seed()
        h, w = images.size
        mask = edit_mask(self.mask, h, w, self.mask_fraction, option="mimic.mask")
        outputs = []
        for _, batch in ctx.progress(list(images.batches(ctx.batch_size)), desc="inpaint edit", unit="batch"):
            gens = [make_generator(derive_seed(base_seed, i)) for i in batch.ids]
            out = (
                pipe(
                    prompt=[self.prompt or c for c in batch.captions],
                    image=batch.images.to(ctx.device),
                    mask_image=mask.expand(len(batch), -1, -1, -1).to(ctx.device),
                    height=h,
                    width=w,
                    strength=self.strength,
                    guidance_scale=self.guidance_scale,
                    num_inference_steps=self.steps,
                    negative_prompt=[self.negative_prompt] * len(batch) if self.negative_prompt else None,
                    generator=gens,
                    output_type="pt",
                )
                .images.float()
                .cpu()
            )
            if out.shape[-2:] != (h, w):
                out = torch.nn.functional.interpolate(out, size=(h, w), mode="bicubic", antialias=True)
            outputs.append(batch.with_images(out.clamp(0, 1)))
        return ImageSet.concat(outputs) if outputs else images
