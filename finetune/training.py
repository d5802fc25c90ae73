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

import hashlib
import itertools
import math
import weakref
from collections import OrderedDict
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


class PosteriorMemo:
    """The VAE posterior (mean, std) of each training image and of its horizontal flip, kept across finetunes.

    The cells of a sweep train on many of the same images (the clean corpus of every poisoned training, the clean
    images of every positive control), and encoding them is a fixed cost of each finetune (about a tenth of a
    poisoned training on CPU). Entries are keyed by the VAE object, the version counters of its parameters (an
    in-place change of a weight invalidates them) and a digest of the image's bytes; only the images not yet
    seen are encoded, in one batch as before. On CPU an image's posterior does not depend on the batch it is
    encoded in (``tests/test_finetune_training.py`` checks it), so finetunes and their results are the same
    with or without the memo. Entries live on the CPU, least recently used dropped past ``max_bytes``.
    """

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self.nbytes = 0
        self.encoded = 0  # images encoded (a flip not counted), for tests and benchmarks
        self.tokens: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.counter = itertools.count()

    def _vae_key(self, vae: Any) -> tuple:
        # a token per VAE object, held weakly: a new (or copied) VAE never inherits another's entries
        token = self.tokens.get(vae)
        if token is None:
            token = self.tokens[vae] = next(self.counter)
        return (token, tuple(p._version for p in vae.parameters()), str(vae.dtype))

    def posteriors(self, vae: Any, images: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, stds) of ``images`` followed by their flips, as one batched encode would give them."""
        vae_key = self._vae_key(vae)
        cpu = images.detach().float().cpu().contiguous()
        keys = [(vae_key, tuple(img.shape), hashlib.sha1(img.numpy().tobytes()).digest()) for img in cpu]
        missing, pending = [], set()  # the first position of each image not in the memo
        for i, k in enumerate(keys):
            if k not in self.entries and k not in pending:
                pending.add(k)
                missing.append(i)
        if missing:
            with torch.no_grad():
                x = images[missing].to(device, vae.dtype) * 2 - 1
                post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
                mean, std = post.mean.float().cpu(), post.std.float().cpu()
            n = len(missing)
            for j, i in enumerate(missing):
                entry = (mean[j].clone(), std[j].clone(), mean[n + j].clone(), std[n + j].clone())
                self.entries[keys[i]] = entry
                self.nbytes += sum(t.numel() * t.element_size() for t in entry)
            self.encoded += n
        for k in keys:
            self.entries.move_to_end(k)
        got = [self.entries[k] for k in keys]
        while self.nbytes > self.max_bytes and len(self.entries) > len(set(keys)):
            _, old = self.entries.popitem(last=False)
            self.nbytes -= sum(t.numel() * t.element_size() for t in old)
        means = torch.stack([e[0] for e in got] + [e[2] for e in got]).to(device)
        stds = torch.stack([e[1] for e in got] + [e[3] for e in got]).to(device)
        return means, stds


#: the process's memo of training images' posteriors (one sweep's cells run in one process)
POSTERIORS = PosteriorMemo()


def _encode(pipe: Any, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
    vae, device = pipe.vae, pipe.unet.device
    means, stds = POSTERIORS.posteriors(vae, images, device)
    with torch.no_grad():
        tokens = tokenize(pipe.tokenizer, list(prompts) * 2).to(device)
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
) -> float:
    """Train ``params`` of ``unet`` (a copy of the pipeline's UNet) on ``images`` with ``prompts``.

    Returns the last step's loss. With ``ema_decay`` the parameters end as their exponential moving average.
    """
    gen = make_generator(seed)
    opt = make_optimizer(optimizer, params, lr)
    means, stds, cond = _encode(pipe, images.images, prompts)
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
