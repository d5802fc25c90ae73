"""LoRA text-to-image finetuning (Hu et al., ICLR 2022; the diffusers text-to-image LoRA recipe).

A minimal, deterministic LoRA trainer: low-rank adapters on the UNet's attention and feed-forward projections
and its ResNet convolutions, trained with the usual denoising loss on (image, caption) pairs while the VAE, text
encoder and base UNet stay frozen. It is the positive control of every mimicry experiment on the embedded world: finetuning ``tiny-sd`` on
16 images of a held-out artist must make it paint that artist's style.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from harness.protocols import ConfigError, Context, Mimic, check_range
from harness.seeding import derive_seed, isolated_torch_rng, make_generator
from harness.types import ImageSet

#: UNet module names (suffixes) that get adapters: attention q/k/v/out, the transformer feed-forward, and the
#: ResNet convolutions (textures live in the high-resolution levels, which have no attention in small UNets).
LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


def train_lora(
    pipe: Any,
    images: ImageSet,
    *,
    rank: int = 8,
    steps: int = 400,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    targets: tuple[str, ...] = LORA_TARGETS,
    log: Callable[[int, float], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Finetune a LoRA on ``images`` (captioned) and return a new pipeline that uses it.

    The given pipeline is not modified (it may be shared through the model memo): the UNet is copied, the
    adapters are added to the copy, and a pipeline of the same class is built over the copy and the other,
    shared, components.

    Args:
        pipe: a Stable-Diffusion-style text-to-image pipeline (``vae``, ``text_encoder``, ``tokenizer``,
            ``unet``, ``scheduler``).
        images: training images (N, 3, H, W) in [0, 1] at the model's resolution; their captions are the prompts.
        rank: LoRA rank (>= 1); ``lora_alpha`` equals the rank (scale 1).
        steps: optimisation steps (>= 1).
        lr: AdamW learning rate, in (0, 1].
        batch_size: images per step (sampled with replacement when larger than the set).
        seed: seed of the noise, timesteps, batches and flips.
        targets: UNet module-name suffixes that get adapters.
        log: optional callback ``log(step, loss)``.

    Returns:
        (the finetuned pipeline, a record with the trainable parameter count, final loss and seconds).
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"mimic.rank must be an integer >= 1, got {rank!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"mimic.steps must be an integer >= 1, got {steps!r}")
    check_range("mimic.lr", lr, 1e-8, 1.0)
    if len(images) == 0:
        raise ConfigError("LoRA finetuning needs at least one image")
    t0 = time.time()
    device = pipe.unet.device
    unet = copy.deepcopy(pipe.unet).float().requires_grad_(False)
    with isolated_torch_rng(seed):  # peft initialises the adapters from the global RNG
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
        )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = make_generator(seed)
    scheduler = pipe.scheduler
    n_train = scheduler.config.num_train_timesteps
    alphas = scheduler.alphas_cumprod.to(device)
    vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
    with torch.no_grad():
        x = images.images.to(device, vae.dtype) * 2 - 1
        x = torch.cat([x, x.flip(-1)])
        post = vae.encode(x).latent_dist
        means, stds = post.mean.float(), post.std.float()
        tokens = tokenizer(
            list(images.captions) * 2,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        cond = text_encoder(tokens)[0].float()
    scale = vae.config.scaling_factor
    unet.train()
    loss_value = math.nan
    for step in range(steps):
        idx = torch.randint(0, means.shape[0], (batch_size,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen).to(device)) * scale
        noise = torch.randn(z.shape, generator=gen).to(device)
        t = torch.randint(0, n_train, (batch_size,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = unet(noisy, t, cond[idx.to(device)]).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if log is not None:
            log(step + 1, loss_value)
    unet.eval().requires_grad_(False)
    torch.nn.Module.to(unet, dtype=pipe.unet.dtype)  # torch's own .to: diffusers' warns on every dtype cast
    components = {**pipe.components, "unet": unet}
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        components["requires_safety_checker"] = pipe.config.get("requires_safety_checker", False)
    tuned = type(pipe)(**components)
    tuned.set_progress_bar_config(disable=True)
    record = {
        "rank": rank,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "trainable_params": sum(p.numel() for p in params),
        "final_loss": loss_value,
        "seconds": round(time.time() - t0, 1),
        "images": len(images),
    }
    return tuned, record


class LoraMimic(Mimic):
    """Style mimicry by LoRA finetuning: train on the (purified, protected) images, then generate.

    The mimic finetunes the experiment's text-to-image model on the images with their captions, then
    generates one image per training image from that image's caption, with a generator seeded by the stage
    seed and the image's id. Success is measured against the artist's clean images (threat model
    ``"mimicry"``, see DESIGN.md), e.g. by tiny-clip's zero-shot style match.

    Args:
        rank, steps, lr, batch_size: the LoRA recipe (see :func:`train_lora`; defaults: the embedded world's
            positive control, rank 8, 400 steps, lr 3e-3, batch 16).
        sample_steps: DDIM steps of the generations; guidance_scale: their guidance.
        prompt: generate from this prompt instead of each image's caption (None: the captions).

    Returns (from :meth:`run`): one generated image per input, same ids and captions, (N, 3, H, W) in [0, 1].
    """

    name = "lora"
    version = "1"
    threat_model = "mimicry"
    uses_model = True

    def __init__(
        self,
        rank: int = 8,
        steps: int = 400,
        lr: float = 3e-3,
        batch_size: int = 16,
        sample_steps: int = 30,
        guidance_scale: float = 5.0,
        prompt: str | None = None,
    ):
        for option, v, low in (
            ("rank", rank, 1),
            ("steps", steps, 1),
            ("batch_size", batch_size, 1),
            ("sample_steps", sample_steps, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"mimic.{option} must be an integer >= {low}, got {v!r}")
        self.rank, self.steps, self.batch_size, self.sample_steps = rank, steps, batch_size, sample_steps
        self.lr = check_range("mimic.lr", lr, 1e-8, 1.0)
        self.guidance_scale = check_range("mimic.guidance_scale", guidance_scale, 0.0, 100.0)
        self.prompt = prompt or None

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        pipe = ctx.pipeline("text2img")
        base_seed = generator.initial_seed()
        steps = ctx.progress(range(self.steps), desc="lora finetune", unit="step")
        bar = iter(steps)

        def log(step: int, loss: float) -> None:
            next(bar, None)

        tuned, _record = train_lora(
            pipe,
            images,
            rank=self.rank,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=derive_seed(base_seed, "train"),
            log=log,
        )
        h, w = images.size
        outputs = []
        for _, batch in ctx.progress(list(images.batches(ctx.batch_size)), desc="lora generate", unit="batch"):
            gens = [make_generator(derive_seed(base_seed, "sample", i)) for i in batch.ids]
            out = tuned(
                prompt=[self.prompt or c for c in batch.captions],
                num_inference_steps=self.sample_steps,
                guidance_scale=self.guidance_scale,
                generator=gens,
                output_type="pt",
                height=h,
                width=w,
            ).images
            outputs.append(batch.with_images(out.float().cpu().clamp(0, 1)))
        return ImageSet.concat(outputs)
