"""Full finetuning of the UNet (Hönig et al. 2024's "different finetuning script" that already weakened Glaze).

Every UNet parameter is trained on the artist's images with their captions (the text encoder and VAE stay
frozen), optionally with an EMA of the weights. Published (SD 2.1, 512 px): batch 4, 2000 steps, lr 5e-6,
EMA, constant schedule. The defaults here are scaled to the embedded world (tiny-sd, 64 px: 400 steps,
lr 2e-4, EMA 0.99). On SD, enable gradient checkpointing to fit the UNet's activations.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from finetune.generate import generate_per_image, progress_logger
from finetune.training import OPTIMIZERS, finetune_unet, pipeline_with_unet
from harness.protocols import ConfigError, Context, Mimic, check_int, check_range
from harness.seeding import derive_seed
from harness.types import ImageSet


class FullFinetuneMimic(Mimic):
    """Full UNet finetune, then one generation per training image from its caption (or ``prompt``).

    Args:
        steps, lr, batch_size: the recipe. ema_decay: EMA of the weights (0 or None: off).
        gradient_checkpointing: trade time for memory (large models).
        optimizer: "adamw" or "adamw8bit" (bitsandbytes, where installed: 8-bit optimizer state for SD).
        sample_steps, guidance_scale, prompt: the generations.
    """

    name = "full_finetune"
    version = "1"
    threat_model = "mimicry"
    uses_model = True

    def __init__(
        self,
        steps: int = 400,
        lr: float = 2e-4,
        batch_size: int = 16,
        ema_decay: float | None = 0.99,
        gradient_checkpointing: bool = False,
        optimizer: str = "adamw",
        sample_steps: int = 30,
        guidance_scale: float = 5.0,
        prompt: str | None = None,
    ):
        self.steps = check_int("mimic.steps", steps, 1)
        self.lr = check_range("mimic.lr", lr, 1e-10, 1.0)
        self.batch_size = check_int("mimic.batch_size", batch_size, 1)
        self.ema_decay = check_range("mimic.ema_decay", ema_decay, 0.0, 0.99999) if ema_decay else None
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"mimic.optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        self.optimizer = optimizer
        self.sample_steps = check_int("mimic.sample_steps", sample_steps, 1)
        self.guidance_scale = check_range("mimic.guidance_scale", guidance_scale, 0.0, 100.0)
        self.prompt = prompt or None

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        pipe = ctx.pipeline("text2img")
        base_seed = generator.initial_seed()
        unet = copy.deepcopy(pipe.unet).float().requires_grad_(True)
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        params = list(unet.parameters())
        finetune_unet(
            pipe,
            unet,
            params,
            images,
            list(images.captions),
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=derive_seed(base_seed, "train"),
            ema_decay=self.ema_decay,
            log=progress_logger(ctx, self.steps, "full finetune"),
            optimizer=self.optimizer,
        )
        if self.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        tuned = pipeline_with_unet(pipe, unet)
        return self._generate(tuned, images, base_seed, ctx, "full generate")

    def floor(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        """The base model, not finetuned, prompted exactly as :meth:`run` prompts the finetuned one."""
        pipe = ctx.pipeline("text2img")
        return self._generate(pipe, images, generator.initial_seed(), ctx, "base model generate (floor)")

    def _generate(self, pipe: Any, images: ImageSet, base_seed: int, ctx: Context, desc: str) -> ImageSet:
        prompts = [self.prompt or c for c in images.captions]
        return generate_per_image(pipe, images, prompts, base_seed, self.sample_steps, self.guidance_scale, ctx, desc)
