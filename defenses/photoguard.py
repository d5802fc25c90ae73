"""PhotoGuard (Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023).

Two immunizations against diffusion editing:

- **Encoder attack** (Sec. 4.1, Eq. 1): L-inf PGD on the image so the VAE encoder's latent moves to a target
  latent, ``min_d || E(x + d) - z_target ||_2``, with ``z_target`` the latent of a grey image (or zeros). The
  reference notebook uses eps 0.06 and step 0.02 in [-1, 1] units (0.03 and 0.01 in [0, 1]) for img2img,
  step 0.01 (0.005) for inpainting, 1000 iterations with the step decaying linearly to 1/100, random start.
  For inpainting the perturbation lives only where the edit keeps the image, and the attacked encoding is
  exactly the conditioning the inpainting pipeline computes (:func:`harness.diffusion.masked_image_latents`):
  the masked image ``(2 x - 1) * (mask < 0.5)`` in [-1, 1] units (the repainted region filled with grey, not
  black), encoded to a posterior sample times the VAE's scaling factor, for the mask the edit uses.
- **Diffusion attack** (Sec. 4.2, Eq. 2): PGD through the whole editing pipeline (VAE encode, a few
  denoising steps with classifier-free guidance, VAE decode) so the edit's output moves to a target image,
  with the gradient averaged over several noise draws. Published: L2 eps 16 and step 1 in [-1, 1] units at
  512 px, 200 iterations, 10 gradient repeats, 4 denoising steps. L2 budgets scale with the square root of
  the pixel count; in [0, 1] units at 64 px that is eps 16/2*64/512 = 1.0 and step 0.0625. Against an
  inpainting model the differentiated edit feeds the UNet the pipeline's own 9-channel input (noisy latents,
  binarised mask at latent size, masked-image latents as above) and starts from pure noise at strength 1.

Both report the objective (latent distance, or output distance to the target) on the clean images, on
uniform noise of the same budget and on the protected images.
"""

from __future__ import annotations

import math

import torch

from harness.diffusion import (
    edit_through_pipeline,
    encode_mean,
    gradient_checkpointing,
    inpaint_mask_condition,
    masked_image_latents,
    text_embeddings,
)
from harness.masks import edit_mask
from harness.pgd import PGDSettings, check_norm, frozen, optimise_and_report
from harness.protocols import ConfigError, Context, Defense, DefenseOutput, check_int, check_range
from harness.types import Budget, ImageSet

__all__ = ["PhotoGuardEncoder", "PhotoGuardDiffusion"]

TARGETS = ("grey", "zero")
VARIANTS = ("img2img", "inpaint")


class PhotoGuardEncoder(Defense):
    """PhotoGuard's encoder attack.

    Args:
        eps: L-inf budget in [0, 1] pixel units (published 0.03 = 0.06 in [-1, 1]).
        step_size: first PGD step (published 0.01 img2img, 0.005 inpainting).
        steps: PGD iterations (published 1000).
        schedule: "linear" (published: decays to ``final_step_fraction``), "constant" or "cosine".
        final_step_fraction: last step relative to the first (published 1/100).
        target: "grey" (latent of a flat 0.5 image) or "zero" (the zero latent).
        variant: "img2img" (perturb everywhere; attack the VAE's latent mean, unscaled, as published) or
            "inpaint" (perturb only the kept region; attack the inpainting pipeline's masked-image latents:
            ``vae.encode((2 x - 1) * (mask < 0.5))``, a posterior sample drawn afresh each step, times the
            scaling factor, exactly the UNet's conditioning channels; see
            :func:`harness.diffusion.masked_image_latents`). The inpaint variant's ``latent_distance`` is in
            those scaled units.
        mask, mask_fraction: the inpainting mask (see :func:`harness.masks.edit_mask`); keep them equal to the
            edit's ``mimic.mask`` / ``mimic.mask_fraction`` (same defaults: "border", 0.5).
        random_start: start from uniform noise in the budget.

    Shape: (N, 3, H, W) in [0, 1] in and out. Uses the experiment's model (its VAE; for the inpaint variant
    the inpainting checkpoint's).
    """

    name = "photoguard_encoder"
    version = "1"  # the inpaint variant's instances: "2" (it attacks the pipeline's masked-image latents)
    uses_model = True
    threat_models = ("editing",)

    def __init__(
        self,
        eps: float = 0.03,
        step_size: float = 0.01,
        steps: int = 1000,
        schedule: str = "linear",
        final_step_fraction: float = 0.01,
        target: str = "grey",
        variant: str = "img2img",
        mask: str = "border",
        mask_fraction: float = 0.5,
        random_start: bool = True,
    ):
        if target not in TARGETS:
            raise ConfigError(f"defense.target must be one of {list(TARGETS)}, got {target!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"defense.variant must be one of {list(VARIANTS)}, got {variant!r}")
        self.eps = check_range("defense.eps", eps, 0.0, 1.0)
        self.settings = PGDSettings(
            eps=self.eps,
            steps=steps,
            step_size=step_size,
            schedule=schedule,
            final_step_fraction=final_step_fraction,
            random_start=bool(random_start),
            eval_samples=1,
        )
        self.target, self.variant = target, variant
        if variant == "inpaint":  # the img2img variant's outputs did not change: its cached artifacts stay valid
            self.version = "2"
        edit_mask(mask, 8, 8, mask_fraction, option="defense.mask")  # validate now
        self.mask, self.mask_fraction = mask, mask_fraction

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        pipe = ctx.pipeline("img2img" if self.variant == "img2img" else "inpaint")
        vae = pipe.vae
        h, w = images.size
        mask = keep = None
        if self.variant == "inpaint":
            mask = edit_mask(self.mask, h, w, self.mask_fraction, option="defense.mask").to(ctx.device)
            keep = 1.0 - inpaint_mask_condition(mask, h, w)  # where the pipeline keeps the image
        with frozen(vae), torch.no_grad():
            grey = torch.full((1, 3, h, w), 0.5, device=ctx.device)
            # inpaint: the masked-image latent of a flat grey image (masking grey leaves it grey), in the
            # pipeline's scaled units; the posterior mean as the target
            z_grey = (encode_mean(vae, grey) if mask is None else masked_image_latents(vae, grey, mask)).float()
        z_target = z_grey if self.target == "grey" else torch.zeros_like(z_grey)

        def objective(x: torch.Tensor, draws) -> torch.Tensor:
            z = encode_mean(vae, x) if mask is None else masked_image_latents(vae, x, mask, draws)
            return (z.float() - z_target).flatten(1).norm(dim=1)

        with frozen(vae):
            protected, info = optimise_and_report(
                images,
                objective,
                self.settings,
                generator,
                ctx,
                name="latent_distance",
                desc=self.name,
                mask=None if keep is None else keep.cpu(),
            )
        return DefenseOutput(images.with_images(protected), info)


class PhotoGuardDiffusion(Defense):
    """PhotoGuard's diffusion attack: PGD through the editing pipeline toward a target image.

    Args:
        eps: budget in [0, 1] pixel units; L2 over the image by default (published L2 16 in [-1, 1] at
            512 px; scaled to the image size when ``scale_to_resolution``).
        step_size: step in the same units (published 1 in [-1, 1] at 512 px).
        norm: "l2" (published) or "linf".
        steps: PGD iterations (published 200).
        grad_repeats: noise draws averaged per gradient (published 10).
        edit_steps: denoising steps of the attacked edit (published 4).
        strength: img2img strength of the attacked edit (inpainting models start from noise, strength 1).
        guidance_scale: classifier-free guidance of the attacked edit (published 7.5).
        prompt: the prompt of the attacked edit ("" or None: each image's caption).
        target: "grey" (a flat 0.5 image) or "zero" (black).
        variant: "img2img" or "inpaint" (attacks the model's inpainting checkpoint, ``model.inpaint_source``,
            through the 9-channel input the inpainting pipeline builds: noisy latents, the binarised mask at
            latent size and the masked image's latents, see :func:`harness.diffusion.edit_through_pipeline`).
        mask, mask_fraction: the inpainting mask (keep them equal to the edit's ``mimic.mask`` /
            ``mimic.mask_fraction``); the perturbation stays in the kept region (mask < 0.5).
        scale_to_resolution: scale L2 eps and step from 512 px to the images' size (sqrt of pixel count).
        gradient_checkpointing: trade time for memory on the UNet and VAE (large models).
    """

    name = "photoguard_diffusion"
    version = "1"  # the inpaint variant's instances: "2" (it feeds the UNet the pipeline's conditioning)
    uses_model = True
    threat_models = ("editing",)

    def __init__(
        self,
        eps: float = 8.0,
        step_size: float = 0.5,
        norm: str = "l2",
        steps: int = 200,
        grad_repeats: int = 10,
        edit_steps: int = 4,
        strength: float = 0.6,
        guidance_scale: float = 7.5,
        prompt: str | None = None,
        target: str = "grey",
        variant: str = "img2img",
        mask: str = "border",
        mask_fraction: float = 0.5,
        scale_to_resolution: bool = True,
        gradient_checkpointing: bool = False,
    ):
        self.norm = check_norm("defense.norm", norm)
        self.raw_eps = check_range("defense.eps", eps, 0.0, 1.0 if norm == "linf" else 1e4)
        self.raw_step = check_range("defense.step_size", step_size, 0.0, 1e4)
        self.steps = check_int("defense.steps", steps, 0)
        self.grad_repeats = check_int("defense.grad_repeats", grad_repeats, 1)
        self.edit_steps = check_int("defense.edit_steps", edit_steps, 1)
        self.strength = check_range("defense.strength", strength, 0.01, 1.0)
        self.guidance_scale = check_range("defense.guidance_scale", guidance_scale, 0.0, 100.0)
        self.prompt = prompt or None
        if target not in TARGETS:
            raise ConfigError(f"defense.target must be one of {list(TARGETS)}, got {target!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"defense.variant must be one of {list(VARIANTS)}, got {variant!r}")
        self.target, self.variant = target, variant
        if variant == "inpaint":  # the img2img variant's outputs did not change: its cached artifacts stay valid
            self.version = "2"
        edit_mask(mask, 8, 8, mask_fraction, option="defense.mask")
        self.mask, self.mask_fraction = mask, mask_fraction
        self.scale_to_resolution = bool(scale_to_resolution)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        # the L-inf bound the harness checks; an L2 budget states none (the L2 radius is reported instead)
        self.eps = self.raw_eps if norm == "linf" else None

    @property
    def budget(self) -> Budget:
        note = "stated at 512 px, scaled by the square root of the pixel count" if self.scale_to_resolution else ""
        return Budget(self.norm, self.raw_eps, note if self.norm == "l2" else "")

    def l2_radius(self, h: int, w: int) -> float | None:
        """The L2 budget in [0, 1] units for ``h`` x ``w`` images (None for an L-inf budget)."""
        return self.settings_for(h, w).eps if self.norm == "l2" else None

    def settings_for(self, h: int, w: int) -> PGDSettings:
        scale = math.sqrt(h * w / (512 * 512)) if (self.norm == "l2" and self.scale_to_resolution) else 1.0
        return PGDSettings(
            eps=self.raw_eps * scale,
            steps=self.steps,
            step_size=self.raw_step * scale,
            norm=self.norm,
            update="sign",
            schedule="constant",
            random_start=False,
            eot_samples=self.grad_repeats,
            eval_samples=2,
        )

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        pipe = ctx.pipeline("img2img" if self.variant == "img2img" else "inpaint")
        h, w = images.size
        settings = self.settings_for(h, w)
        mask = edit_mask(self.mask, h, w, self.mask_fraction, option="defense.mask").to(ctx.device)
        strength = 1.0 if self.variant == "inpaint" else self.strength
        target = torch.full((1, 3, h, w), 0.5 if self.target == "grey" else 0.0, device=ctx.device)
        prompts = [self.prompt or c for c in images.captions]
        embed = dict(zip(images.ids, text_embeddings(pipe, prompts), strict=True))
        empty = text_embeddings(pipe, [""])[0]

        def objective(x: torch.Tensor, draws) -> torch.Tensor:
            cond = torch.stack([embed[i] for i in draws.ids])
            out = edit_through_pipeline(
                pipe,
                x,
                cond,
                empty.expand_as(cond),
                draws,
                strength,
                self.edit_steps,
                self.guidance_scale,
                mask=mask.expand(len(x), -1, -1, -1) if self.variant == "inpaint" else None,
            )
            return (out - target).flatten(1).norm(dim=1)

        keep = (1.0 - inpaint_mask_condition(mask, h, w)).cpu() if self.variant == "inpaint" else None
        with (
            frozen(pipe.unet, pipe.vae, pipe.text_encoder),
            gradient_checkpointing(pipe.unet, pipe.vae, enabled=self.gradient_checkpointing),
        ):
            protected, info = optimise_and_report(
                images, objective, settings, generator, ctx, name="output_distance", desc=self.name, mask=keep
            )
        info.update({"eps_scaled": settings.eps, "step_scaled": settings.step_size})
        return DefenseOutput(images.with_images(protected), info)
