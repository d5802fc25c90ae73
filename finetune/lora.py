"""LoRA text-to-image finetuning (Hu et al., ICLR 2022; the diffusers text-to-image LoRA recipe).

A minimal, deterministic LoRA trainer: low-rank adapters on the UNet's attention and feed-forward projections
and its ResNet convolutions, trained with the usual denoising loss on (image, caption) pairs while the VAE, text
encoder and base UNet stay frozen. It is the positive control of every mimicry experiment on the embedded world: finetuning ``tiny-sd`` on
16 images of a held-out artist must make it paint that artist's style.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from finetune.generate import class_images, generate_per_image, progress_logger
from finetune.training import PriorImages, finetune_unet, pipeline_with_unet
from harness.protocols import ConfigError, Context, Mimic, check_int, check_range
from harness.seeding import derive_seed, isolated_torch_rng
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
    prior: PriorImages | None = None,
    prompts: Sequence[str] | None = None,
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
        prior: class images for DreamBooth's prior preservation (None: plain LoRA).
        prompts: one training prompt per image (None: the captions).

    Returns:
        (the finetuned pipeline, a record with the trainable parameter count, final loss and seconds).
    """
    from peft import LoraConfig

    check_int("mimic.rank", rank, 1)
    check_int("mimic.steps", steps, 1)
    check_range("mimic.lr", lr, 1e-8, 1.0)
    if len(images) == 0:
        raise ConfigError("LoRA finetuning needs at least one image")
    t0 = time.time()
    unet = copy.deepcopy(pipe.unet).float().requires_grad_(False)
    with isolated_torch_rng(seed):  # peft initialises the adapters from the global RNG
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
        )
    params = [p for p in unet.parameters() if p.requires_grad]
    loss_value = finetune_unet(
        pipe,
        unet,
        params,
        images,
        list(prompts or images.captions),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        prior=prior,
        log=log,
    )
    tuned = pipeline_with_unet(pipe, unet)
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
    ``"mimicry"``, see docs/architecture.md), e.g. by tiny-clip's zero-shot style match.

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
        self.rank = check_int("mimic.rank", rank, 1)
        self.steps = check_int("mimic.steps", steps, 1)
        self.batch_size = check_int("mimic.batch_size", batch_size, 1)
        self.sample_steps = check_int("mimic.sample_steps", sample_steps, 1)
        self.lr = check_range("mimic.lr", lr, 1e-8, 1.0)
        self.guidance_scale = check_range("mimic.guidance_scale", guidance_scale, 0.0, 100.0)
        self.prompt = prompt or None

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        pipe = ctx.pipeline("text2img")
        base_seed = generator.initial_seed()
        tuned, _record = train_lora(
            pipe,
            images,
            rank=self.rank,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=derive_seed(base_seed, "train"),
            log=progress_logger(ctx, self.steps, "lora finetune"),
        )
        return self._generate(tuned, images, base_seed, ctx, "lora generate")

    def floor(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        """The base model, not finetuned, prompted exactly as :meth:`run` prompts the finetuned one."""
        pipe = ctx.pipeline("text2img")
        return self._generate(pipe, images, generator.initial_seed(), ctx, "base model generate (floor)")

    def _generate(self, pipe: Any, images: ImageSet, base_seed: int, ctx: Context, desc: str) -> ImageSet:
        prompts = [self.prompt or c for c in images.captions]
        return generate_per_image(pipe, images, prompts, base_seed, self.sample_steps, self.guidance_scale, ctx, desc)


class DreamBoothLoraMimic(Mimic):
    """DreamBooth-LoRA (Ruiz et al., CVPR 2023, with LoRA adapters as in Mist v2 and Anti-DreamBooth's attacks).

    Every training image gets the same instance prompt with a rare identifier ("an artwork in the style of
    sks"); prior preservation adds the denoising loss on ``class_images`` images that the base model
    generates for ``class_prompt``. Then one image per training image is generated from ``generation_prompt``.
    Published: lr 1e-4, 1000-2000 steps (SD); the defaults here are the embedded world's (rank 8, 400 steps,
    lr 3e-3, like the LoRA positive control).
    """

    name = "dreambooth_lora"
    version = "1"
    threat_model = "mimicry"
    uses_model = True

    def __init__(
        self,
        instance_prompt: str = "an artwork in the style of sks",
        class_prompt: str = "an artwork",
        class_images: int = 16,
        prior_weight: float = 1.0,
        generation_prompt: str | None = None,
        rank: int = 8,
        steps: int = 400,
        lr: float = 3e-3,
        batch_size: int = 16,
        sample_steps: int = 30,
        guidance_scale: float = 5.0,
    ):
        if not instance_prompt or not class_prompt:
            raise ConfigError("mimic.instance_prompt and mimic.class_prompt must be non-empty prompts")
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.class_images = check_int("mimic.class_images", class_images, 0)
        self.prior_weight = check_range("mimic.prior_weight", prior_weight, 0.0, 100.0)
        self.generation_prompt = generation_prompt or instance_prompt
        self.rank = check_int("mimic.rank", rank, 1)
        self.steps = check_int("mimic.steps", steps, 1)
        self.lr = check_range("mimic.lr", lr, 1e-8, 1.0)
        self.batch_size = check_int("mimic.batch_size", batch_size, 1)
        self.sample_steps = check_int("mimic.sample_steps", sample_steps, 1)
        self.guidance_scale = check_range("mimic.guidance_scale", guidance_scale, 0.0, 100.0)

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        pipe = ctx.pipeline("text2img")
        base_seed = generator.initial_seed()
        prior = None
        if self.class_images:
            imgs = class_images(pipe, self.class_prompt, self.class_images, base_seed, images.size)
            prior = PriorImages(imgs, self.class_prompt, self.prior_weight)
        tuned, _ = train_lora(
            pipe,
            images,
            rank=self.rank,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=derive_seed(base_seed, "train"),
            log=progress_logger(ctx, self.steps, "dreambooth finetune"),
            prior=prior,
            prompts=[self.instance_prompt] * len(images),
        )
        return self._generate(tuned, images, base_seed, ctx, "dreambooth generate")

    def floor(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        """The base model, not finetuned, prompted with the generation prompt (its identifier means nothing to it)."""
        pipe = ctx.pipeline("text2img")
        return self._generate(pipe, images, generator.initial_seed(), ctx, "base model generate (floor)")

    def _generate(self, pipe: Any, images: ImageSet, base_seed: int, ctx: Context, desc: str) -> ImageSet:
        prompts = [self.generation_prompt] * len(images)
        return generate_per_image(pipe, images, prompts, base_seed, self.sample_steps, self.guidance_scale, ctx, desc)
