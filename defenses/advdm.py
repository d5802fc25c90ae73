"""AdvDM (Liang et al., ICML 2023) and Mist (Liang & Wu, 2023): adversarial examples against diffusion mimicry.

- **semantic** (AdvDM): maximise the diffusion training loss of the image's latent at random timesteps and
  noise, ``max_d E_{t, n} || eps_theta(z_t(E(x + d)), t, c) - n ||^2``, the gradient flowing through the
  UNet and the VAE encoder (Monte-Carlo over t and n, one draw per step as in AdvDM).
- **textural** (Mist's textural loss, after Glaze/PhotoGuard's encoder attack): pull the encoder's latent to
  the latent of a fixed, busy target pattern, ``min_d || E(x + d) - E(pattern) ||^2``.
- **fused** (Mist): ``min_d  w * L_textural - L_semantic``. Mist v1's published fusion weight is 1e4 on the
  semantic term relative to the textural distance computed on unscaled latent means; the harness applies the
  weight to the semantic loss (``semantic_weight``) and reports both parts.

Published settings (METHODS.md): eps 8/255 (as Hönig et al. used Mist), 100 PGD steps, sign steps of 1/255.
The prompt is each image's caption unless ``prompt`` is set.
"""

from __future__ import annotations

import torch

from defenses.engine import PGDSettings, frozen, objective_report, optimise_and_report
from defenses.latent import (
    denoising_loss,
    encode_mean,
    encode_sample,
    gradient_checkpointing,
    latent_pattern,
    text_embeddings,
)
from harness.protocols import ConfigError, Context, Defense, DefenseOutput, check_range
from harness.seeding import derive_seed
from harness.types import ImageSet

__all__ = ["AdvDM"]

MODES = ("semantic", "textural", "fused")


class AdvDM(Defense):
    """AdvDM / Mist protection.

    Args:
        mode: "semantic" (AdvDM), "textural" or "fused" (Mist).
        eps: L-inf budget in [0, 1] pixel units (published 8/255).
        step_size: PGD sign step (1/255).
        steps: PGD iterations (100).
        semantic_weight: weight of the semantic loss in the fused objective (Mist v1: 1e4).
        target_pattern: "mist" (a generated glyph pattern) or "grey".
        prompt: the conditioning prompt (None: each image's caption).
        eot_samples: timestep/noise draws averaged per step (AdvDM: 1).
        gradient_checkpointing: trade time for memory on the UNet.
    """

    name = "advdm"
    version = "1"
    uses_model = True
    threat_models = ("mimicry",)

    def __init__(
        self,
        mode: str = "semantic",
        eps: float = 8 / 255,
        step_size: float = 1 / 255,
        steps: int = 100,
        semantic_weight: float = 1e4,
        target_pattern: str = "mist",
        prompt: str | None = None,
        eot_samples: int = 1,
        gradient_checkpointing: bool = False,
    ):
        if mode not in MODES:
            raise ConfigError(f"defense.mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.eps = check_range("defense.eps", eps, 0.0, 1.0)
        self.settings = PGDSettings(
            eps=self.eps,
            steps=steps,
            step_size=step_size,
            random_start=False,
            eot_samples=eot_samples,
            maximize=(mode == "semantic"),
            eval_samples=8,
        )
        self.semantic_weight = check_range("defense.semantic_weight", semantic_weight, 0.0, 1e9)
        latent_pattern(8, target_pattern)  # validates the name
        self.target_pattern = target_pattern
        self.prompt = prompt or None
        self.gradient_checkpointing = bool(gradient_checkpointing)

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        pipe = ctx.pipeline("text2img")
        vae = pipe.vae
        h, w = images.size
        embed = dict(zip(images.ids, text_embeddings(pipe, [self.prompt or c for c in images.captions]), strict=True))
        with torch.no_grad():
            z_pattern = encode_mean(vae, latent_pattern(h, self.target_pattern).to(ctx.device)[..., :h, :w]).float()

        def semantic(x: torch.Tensor, draws) -> torch.Tensor:
            cond = torch.stack([embed[i] for i in draws.ids])
            return denoising_loss(pipe, encode_sample(vae, x, draws), cond, draws)

        def textural(x: torch.Tensor, draws) -> torch.Tensor:
            return (encode_mean(vae, x).float() - z_pattern).pow(2).flatten(1).mean(dim=1)

        def fused(x: torch.Tensor, draws) -> torch.Tensor:
            return textural(x, draws) - self.semantic_weight * semantic(x, draws)

        objective = {"semantic": semantic, "textural": textural, "fused": fused}[self.mode]
        report_seed = derive_seed(generator.initial_seed(), "report")
        with (
            frozen(pipe.unet, vae, pipe.text_encoder),
            gradient_checkpointing(pipe.unet, enabled=self.gradient_checkpointing),
        ):
            protected, info = optimise_and_report(
                images,
                objective,
                self.settings,
                generator,
                ctx,
                name=f"{self.mode}_loss",
                desc=f"{self.name}:{self.mode}",
            )
            if self.mode == "fused":  # both parts, so a row shows which one moved
                for part, fn in (("semantic", semantic), ("textural", textural)):
                    s = PGDSettings(eps=self.eps, steps=0, step_size=0.0, eval_samples=8, maximize=part == "semantic")
                    info.update(
                        objective_report(
                            fn, images.images, protected, images.ids, s, report_seed, ctx, name=f"{part}_loss"
                        )
                    )
        return DefenseOutput(images.with_images(protected), info)
