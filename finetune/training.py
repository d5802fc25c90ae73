"""The denoising finetune loop shared by every finetuning mimic (LoRA, DreamBooth-LoRA, full finetune).

Standard latent-diffusion training (Rombach et al. 2022; the diffusers text-to-image and DreamBooth examples):
encode each training image once (with its horizontal flip as augmentation), then per step sample images,
latents from the VAE posterior, noise and timesteps from one seeded generator and minimise the MSE between
the UNet's prediction and its target (noise, or velocity for v-prediction models). DreamBooth's prior
preservation (Ruiz et al., CVPR 2023) adds the same loss on class images the base model generated, weighted
by ``prior_weight``. An optional EMA of the trained parameters (Hönig et al.'s full finetune uses one) is
swapped in at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from harness.diffusion import denoising_prediction, tokenize
from harness.errors import ConfigError
from harness.seeding import make_generator
from harness.types import ImageSet


@dataclass
class PriorImages:
    """Class images for prior preservation: (N, 3, H, W) in [0, 1], their prompt, and the loss weight."""

    images: torch.Tensor
    prompt: str
    weight: float = 1.0


def encode_posteriors(pipe: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (means, stds) of ``images`` followed by their horizontal flips, encoded as one batch: the
    layout :func:`finetune_unet` trains on. (A convolution library does not promise that an image's posterior is
    the same bit for bit in every batch, so a caller that keeps posteriors for later finetunes keeps whole
    batches, as :mod:`finetune.poison` does for its corpus.)"""
    vae, device = pipe.vae, pipe.unet.device
    with torch.no_grad():
        x = images.to(device, vae.dtype) * 2 - 1
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    return post.mean.float(), post.std.float()


def _encode(
    pipe: Any,
    images: torch.Tensor,
    prompts: Sequence[str],
    posteriors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    means, stds = posteriors if posteriors is not None else encode_posteriors(pipe, images)
    if means.shape[0] != 2 * len(images):
        raise ValueError(f"posteriors for {means.shape[0] // 2} images given for {len(images)} training images")
    with torch.no_grad():
        tokens = tokenize(pipe.tokenizer, list(prompts) * 2).to(pipe.unet.device)
        cond = pipe.text_encoder(tokens)[0].float()
    return means, stds, cond


def _loss(pipe: Any, unet: Any, means, stds, cond, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    device = unet.device
    sched = pipe.scheduler
    idx = torch.randint(0, means.shape[0], (batch_size,), generator=gen)
    z = (
        means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen).to(device)
    ) * pipe.vae.config.scaling_factor
    noise = torch.randn(z.shape, generator=gen).to(device)
    t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen).to(device)
    pred, target, _ = denoising_prediction(unet, sched, z, noise, t, cond[idx.to(device)])
    return F.mse_loss(pred, target)


OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: how SD finetunes fit small GPUs)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "mimic.optimizer=adamw8bit needs the bitsandbytes package (pip install bitsandbytes; CUDA only)"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    raise ConfigError(f"mimic.optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def finetune_unet(
    pipe: Any,
    unet: Any,
    params: list[torch.nn.Parameter],
    images: ImageSet,
    prompts: Sequence[str],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    prior: PriorImages | None = None,
    ema_decay: float | None = None,
    log: Callable[[int, float], None] | None = None,
    optimizer: str = "adamw",
    posteriors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Train ``params`` of ``unet`` (a copy of the pipeline's UNet) on ``images`` with ``prompts``.

    ``posteriors``: the images' VAE posteriors laid out as :func:`encode_posteriors` gives them, when the caller
    has them (computed here otherwise).

    Returns the last step's loss. With ``ema_decay`` the parameters end as their exponential moving average.
    """
    gen = make_generator(seed)
    opt = make_optimizer(optimizer, params, lr)
    means, stds, cond = _encode(pipe, images.images, prompts, posteriors)
    prior_enc = _encode(pipe, prior.images, [prior.prompt] * len(prior.images)) if prior is not None else None
    ema = [p.detach().clone() for p in params] if ema_decay else None
    unet.train()
    loss_value = math.nan
    for step in range(steps):
        loss = _loss(pipe, unet, means, stds, cond, batch_size, gen)
        if prior_enc is not None:
            loss = loss + prior.weight * _loss(pipe, unet, *prior_enc, batch_size, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.mul_(ema_decay).add_(p.detach(), alpha=1 - ema_decay)
        loss_value = loss.item()
        if log is not None:
            log(step + 1, loss_value)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                p.copy_(e)
    unet.eval().requires_grad_(False)
    return loss_value


def pipeline_with_unet(pipe: Any, unet: Any) -> Any:
    """A pipeline of ``pipe``'s class over its shared components and a new UNet (in ``pipe``'s dtype)."""
    import inspect

    torch.nn.Module.to(unet, dtype=pipe.unet.dtype)  # torch's own .to: diffusers' warns on every dtype cast
    components = {**pipe.components, "unet": unet}
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        components["requires_safety_checker"] = pipe.config.get("requires_safety_checker", False)
    tuned = type(pipe)(**components)
    tuned.set_progress_bar_config(disable=True)
    return tuned
