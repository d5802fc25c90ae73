"""Differentiable pieces of a latent diffusion model that the protections attack.

All functions take images in [0, 1] (the harness convention) and convert to the model's [-1, 1] inside. They
work with any Stable-Diffusion-style diffusers pipeline (``vae``, ``unet``, ``text_encoder``, ``tokenizer``,
``scheduler``): the shipped tiny-sd and real SD 1.5 / 2.1 alike. Randomness comes from :class:`Draws`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.inpainting import is_inpainting_unet
from harness.pgd import Draws

__all__ = [
    "encode_mean",
    "encode_sample",
    "decode",
    "vae_scale_factor",
    "inpaint_mask_condition",
    "masked_image",
    "masked_image_latents",
    "inpaint_mask_latent",
    "tokenize",
    "text_embeddings",
    "noise_target",
    "denoising_prediction",
    "denoising_loss",
    "edit_through_pipeline",
    "gradient_checkpointing",
    "latent_pattern",
    "generate_seeded",
]


def _vae_dtype(vae: Any) -> torch.dtype:
    return next(vae.parameters()).dtype


def encode_mean(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's latent mean (unscaled), (B, C, h, w), differentiable in ``images``."""
    x = (images * 2 - 1).to(_vae_dtype(vae))
    return vae.encode(x).latent_dist.mean


def encode_sample(vae: Any, images: torch.Tensor, draws: Draws) -> torch.Tensor:
    """A latent sample times the scaling factor (what the UNet sees), reparameterised so it is differentiable."""
    x = (images * 2 - 1).to(_vae_dtype(vae))
    post = vae.encode(x).latent_dist
    eps = draws.randn(*post.mean.shape[1:]).to(post.mean.dtype)
    return (post.mean + post.std * eps) * vae.config.scaling_factor


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents to images in [0, 1] (not clipped, so gradients flow everywhere)."""
    x = vae.decode(latents / vae.config.scaling_factor).sample
    return (x.float() + 1) / 2


# ------------------------------------------------------------------------------ inpainting conditioning
# What diffusers' StableDiffusionInpaintPipeline (0.42) feeds a 9-channel UNet besides the noisy latents, for
# ``image`` (N, 3, H, W) in [0, 1] and ``mask_image`` (N, 1, H, W), H and W multiples of the VAE's scale factor:
#   init_image     = image_processor.preprocess(image)               -> 2 * image - 1, in [-1, 1]
#   mask_condition = mask_processor.preprocess(mask_image)           -> resized (nearest) to H x W, then
#                                                                       binarised: 1 where >= 0.5, else 0
#   masked_image   = init_image * (mask_condition < 0.5)             -> the repainted region filled with 0 in
#                                                                       [-1, 1] units (grey 0.5 in [0, 1])
#   mask           = interpolate(mask_condition, (H/f, W/f))         -> nearest, f = vae_scale_factor
#   masked_image_latents = vae.encode(masked_image).latent_dist.sample(generator) * scaling_factor
#   unet input     = cat([noisy latents, mask, masked_image_latents], dim=1)   (each doubled for CFG)
# The functions below compute the same tensors, differentiably in the image; tests/test_inpaint_conditioning.py
# checks them against the pipeline's own.


def vae_scale_factor(vae: Any) -> int:
    """The VAE's downsampling factor, computed as the diffusers pipelines compute ``vae_scale_factor``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def inpaint_mask_condition(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inpainting pipeline's binarised mask at image size (its ``mask_condition``), (B, 1, H, W) float.

    As ``mask_processor.preprocess``: resized to ``height`` x ``width`` (nearest) when it is another size,
    then 1 where the mask is >= 0.5 (repainted) and 0 elsewhere (kept).
    """
    m = mask.float()
    if m.shape[-2:] != (height, width):
        m = F.interpolate(m, size=(height, width))
    return (m >= 0.5).float()


def masked_image(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting pipeline's ``masked_image`` in [-1, 1] units: ``(2 x - 1) * (mask_condition < 0.5)``.

    The repainted region holds 0 in [-1, 1] units (grey 0.5 in [0, 1]), not black. ``mask``: (B or 1, 1, H, W),
    1 = repainted (binarised as the pipeline does).
    """
    cond = inpaint_mask_condition(mask, *images.shape[-2:]).to(images.device)
    return (images * 2 - 1) * (cond < 0.5).to(images.dtype)


def masked_image_latents(
    vae: Any, images: torch.Tensor, mask: torch.Tensor, draws: Draws | None = None
) -> torch.Tensor:
    """The inpainting pipeline's ``masked_image_latents`` (what a 9-channel UNet sees in channels 5..8).

    Args:
        vae: the pipeline's VAE.
        images: (B, 3, H, W) in [0, 1]; H and W multiples of the VAE's scale factor (the pipeline refuses
            other sizes).
        mask: (B or 1, 1, H, W), 1 = repainted.
        draws: the encoder's noise: the pipeline draws a posterior sample, ``mean + std * eps`` with ``eps``
            from each image's generator; here ``eps`` comes from ``draws`` (reparameterised, so differentiable).
            None: the posterior mean (the sample's expectation).

    Returns:
        (B, C, H / f, W / f) latents times the VAE's scaling factor, differentiable in ``images``.
    """
    f = vae_scale_factor(vae)
    h, w = images.shape[-2:]
    if h % f or w % f:
        raise ConfigError(f"inpainting needs image sides divisible by {f} (the VAE's scale factor), got {h}x{w}")
    post = vae.encode(masked_image(images, mask).to(_vae_dtype(vae))).latent_dist
    z = post.mean
    if draws is not None:
        z = z + post.std * draws.randn(*z.shape[1:]).to(z.dtype)
    return z * vae.config.scaling_factor


def inpaint_mask_latent(vae: Any, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inpainting pipeline's mask channel: the binarised mask resized (nearest) to the latent size."""
    f = vae_scale_factor(vae)
    return F.interpolate(inpaint_mask_condition(mask, height, width), size=(height // f, width // f))


def tokenize(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of ``texts``, padded and truncated to the tokenizer's context length, as SD's pipelines do:
    (B, L) int64."""
    return tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def text_embeddings(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """The text encoder's hidden states for ``prompts`` (no gradient), (B, L, D)."""
    ids = tokenize(pipe.tokenizer, prompts)
    with torch.no_grad():
        return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def noise_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction models (SD 2.x)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ConfigError(f"the model's scheduler predicts {kind!r}; the defenses support epsilon and v_prediction")


def denoising_prediction(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    channels: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step every denoising loss shares: noise ``latents`` to ``z_t`` (the scheduler's forward process), ask
    the UNet for its prediction, and return it with what it is trained to predict.

    Args:
        unet, scheduler: the model's UNet and noise scheduler.
        latents: scaled latents (B, C, h, w); ``noise`` the same shape; ``t`` (B,) timesteps.
        cond: text embeddings (B, L, D).
        channels: tensors concatenated after ``z_t`` on the channel axis (an inpainting UNet's mask and
            masked-image latents).

    Returns:
        (prediction, target, z_t), the first two as float32.
    """
    noisy = scheduler.add_noise(latents, noise, t)
    x = torch.cat([noisy, *channels], dim=1) if channels else noisy
    pred = unet(x.to(unet.dtype), t, cond.to(unet.dtype)).sample.float()
    return pred, noise_target(scheduler, latents, noise, t).float(), noisy


def denoising_loss(
    pipe: Any,
    latents: torch.Tensor,
    cond: torch.Tensor,
    draws: Draws,
    t_range: tuple[int, int] | None = None,
    unet: Any = None,
    return_parts: bool = False,
) -> Any:
    """The diffusion training loss per image: ``|| unet(z_t, t, c) - target ||^2`` at a random t and noise.

    Args:
        pipe: the pipeline (scheduler, and the UNet unless ``unet`` is given).
        latents: scaled latents (B, C, h, w).
        cond: text embeddings (B, L, D).
        draws: the batch's draws (timestep and noise, per image).
        t_range: [low, high) of timesteps (default the whole schedule).
        unet: a UNet to use instead of ``pipe.unet`` (a surrogate).
        return_parts: also return (prediction, target, t, noisy latents).

    Returns:
        (B,) float32 losses, or (losses, parts).
    """
    sched = pipe.scheduler
    n = sched.config.num_train_timesteps
    lo, hi = t_range or (0, n)
    t = draws.randint(lo, hi)
    noise = draws.randn(*latents.shape[1:]).to(latents.dtype)
    net = unet if unet is not None else pipe.unet
    pred, target, noisy = denoising_prediction(net, sched, latents, noise, t, cond)
    loss = F.mse_loss(pred, target, reduction="none").flatten(1).mean(dim=1)
    if return_parts:
        return loss, (pred, target, t, noisy)
    return loss


def edit_through_pipeline(
    pipe: Any,
    images: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    draws: Draws,
    strength: float,
    steps: int,
    guidance_scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A differentiable img2img (or inpainting, for 9-channel UNets) edit: DDIM from ``strength`` to 0.

    The path PhotoGuard's diffusion attack differentiates: VAE encode, noise to ``strength`` of the schedule,
    ``steps`` deterministic DDIM steps with classifier-free guidance, VAE decode.

    For a 9-channel (inpainting) UNet the input is built as ``StableDiffusionInpaintPipeline`` builds it:
    ``cat([z_t, mask, masked_image_latents])`` with the pipeline's binarised mask at latent size and the
    latents of its masked image (:func:`masked_image_latents`: the repainted region filled with 0 in [-1, 1]
    units, a posterior sample times the scaling factor). At strength 1 the pipeline starts from pure noise and
    never encodes the whole image, and so does this edit; the randomness is drawn in the pipeline's order
    (image latents when strength < 1, then the initial noise, then the masked image's posterior sample).

    Args:
        images: (B, 3, H, W) in [0, 1].
        cond, uncond: prompt and empty-prompt embeddings (B, L, D).
        strength: fraction of the schedule to noise to (0-1]; inpainting starts from pure noise at 1.
        steps: DDIM steps over the strength-truncated schedule.
        mask: (B, 1, H, W), 1 where the inpainting model repaints (needed for 9-channel UNets).

    Returns:
        The edited images (B, 3, H, W), about [0, 1], not clipped.
    """
    sched = pipe.scheduler
    unet = pipe.unet
    n = sched.config.num_train_timesteps
    alphas = sched.alphas_cumprod.to(images.device)
    inpaint = is_inpainting_unet(unet, pipe.vae)
    if inpaint and mask is None:
        raise ConfigError("an inpainting model needs a mask for the diffusion attack (defense.mask)")
    h, w = images.shape[-2:]
    f = vae_scale_factor(pipe.vae)
    t_start = max(1, min(n - 1, int(round(strength * n)) - 1))
    ts = torch.linspace(t_start, 0, steps + 1).round().long().tolist()
    from_noise = inpaint and strength >= 1.0  # the inpainting pipeline's ``is_strength_max``
    z0 = None if from_noise else encode_sample(pipe.vae, images, draws)
    noise = draws.randn(pipe.vae.config.latent_channels, h // f, w // f).to(_vae_dtype(pipe.vae))
    if z0 is None:
        z = noise
    else:
        a = alphas[ts[0]]
        z = a.sqrt() * z0 + (1 - a).sqrt() * noise
    if inpaint:
        small = inpaint_mask_latent(pipe.vae, mask, h, w).to(images.device)
        masked = masked_image_latents(pipe.vae, images, mask, draws)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        zin = torch.cat([z, z])
        if inpaint:
            zin = torch.cat([zin, torch.cat([small, small]).to(z.dtype), torch.cat([masked, masked])], dim=1)
        tt = torch.full((zin.shape[0],), t, device=z.device, dtype=torch.long)
        out = unet(zin.to(unet.dtype), tt, torch.cat([uncond, cond]).to(unet.dtype)).sample.float()
        e_u, e_c = out.chunk(2)
        pred = e_u + guidance_scale * (e_c - e_u)
        a_t = alphas[t]
        a_next = alphas[t_next] if t_next > 0 else torch.ones_like(a_t)
        if sched.config.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * z - (1 - a_t).sqrt() * pred
            eps = a_t.sqrt() * pred + (1 - a_t).sqrt() * z
        else:
            eps = pred
            x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return decode(pipe.vae, z)


@contextlib.contextmanager
def gradient_checkpointing(*modules: Any, enabled: bool = True) -> Iterator[None]:
    """Enable diffusers' gradient checkpointing on ``modules`` inside the block (memory for time)."""
    changed = []
    if enabled:
        for m in modules:
            if m is not None and getattr(m, "_supports_gradient_checkpointing", False):
                if not getattr(m, "is_gradient_checkpointing", False):
                    m.enable_gradient_checkpointing()
                    changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.disable_gradient_checkpointing()


def latent_pattern(size: int, kind: str = "mist") -> torch.Tensor:
    """A high-contrast target pattern (1, 3, size, size) in [0, 1] for textural (Mist-style) losses.

    Mist pulls the latent toward a fixed, busy image pattern. The harness generates one rather than shipping
    an image: ``"mist"`` is a tiled glyph-like pattern of black strokes on white; ``"grey"`` is flat 0.5.
    """
    if kind == "grey":
        return torch.full((1, 3, size, size), 0.5)
    if kind != "mist":
        raise ConfigError(f"defense.target_pattern must be 'mist' or 'grey', got {kind!r}")
    cell = max(4, size // 8)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    u, v = xx % cell, yy % cell
    tile_x, tile_y = xx // cell, yy // cell
    which = (tile_x * 3 + tile_y * 5) % 4
    stroke = max(1, cell // 4)
    ink = torch.where(
        which == 0,
        (u < stroke),
        torch.where(
            which == 1, (v < stroke), torch.where(which == 2, (u - v).abs() < stroke, (u + v - cell).abs() < stroke)
        ),
    )
    img = torch.where(ink, 0.0, 1.0).float()
    return img.expand(1, 3, size, size).clone()


def generate_seeded(
    pipe: Any,
    ids: Sequence[str],
    prompts: Sequence[str],
    seed: int,
    size: tuple[int, int],
    steps: int,
    guidance: float,
    ctx: Any,
    desc: str,
) -> torch.Tensor:
    """Text-to-image samples, one per id (prompt ``prompts[k]`` for ``ids[k]``), each from a generator seeded by
    ``(seed, id)`` so that a sample never depends on the batch it ran in. (N, 3, H, W) in [0, 1] on the CPU.
    ``ctx``: a :class:`harness.protocols.Context` (batch size, progress)."""
    from harness.seeding import derive_seed, make_generator

    if len(ids) != len(prompts):
        raise ValueError(f"generate_seeded: {len(ids)} ids but {len(prompts)} prompts")
    out = []
    starts = list(range(0, len(ids), ctx.batch_size))
    for k in ctx.progress(starts, desc=desc, unit="batch"):
        part = list(ids[k : k + ctx.batch_size])
        with torch.no_grad():
            res = pipe(
                prompt=list(prompts[k : k + ctx.batch_size]),
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[make_generator(derive_seed(seed, i)) for i in part],
                output_type="pt",
                height=size[0],
                width=size[1],
            ).images
        out.append(res.float().cpu().clamp(0, 1))
    return torch.cat(out) if out else torch.zeros(0, 3, *size)
