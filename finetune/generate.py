"""Sampling shared by the finetuning mimics: one image per input id, each with its own seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from harness.protocols import Context
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet


def generate_per_image(
    pipe: Any,
    images: ImageSet,
    prompts: Sequence[str],
    base_seed: int,
    steps: int,
    guidance: float,
    ctx: Context,
    desc: str,
) -> ImageSet:
    """Generate one image per input (prompt ``prompts[k]`` for image ``k``), seeded by the image's id; the result
    keeps the inputs' ids and captions and size."""
    h, w = images.size
    by_id = dict(zip(images.ids, prompts, strict=True))
    outputs = []
    for _, batch in ctx.progress(list(images.batches(ctx.batch_size)), desc=desc, unit="batch"):
        gens = [make_generator(derive_seed(base_seed, "sample", i)) for i in batch.ids]
        out = pipe(
            prompt=[by_id[i] for i in batch.ids],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pt",
            height=h,
            width=w,
        ).images
        outputs.append(batch.with_images(out.float().cpu().clamp(0, 1)))
    return ImageSet.concat(outputs) if outputs else images


def progress_logger(ctx: Context, steps: int, desc: str):
    """A ``log(step, loss)`` callback that advances a progress bar of ``steps``."""
    bar = iter(ctx.progress(range(steps), desc=desc, unit="step"))

    def log(step: int, loss: float) -> None:
        next(bar, None)

    return log


def class_images(pipe: Any, prompt: str, n: int, seed: int, size: tuple[int, int], steps: int = 30) -> torch.Tensor:
    """``n`` images the base model generates for ``prompt`` (DreamBooth's class images), (n, 3, H, W)."""
    gens = [make_generator(derive_seed(seed, "class", k)) for k in range(n)]
    with torch.no_grad():
        out = pipe(
            prompt=[prompt] * n,
            generator=gens,
            num_inference_steps=steps,
            output_type="pt",
            height=size[0],
            width=size[1],
        ).images
    return out.float().cpu().clamp(0, 1)
