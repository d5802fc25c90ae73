"""AdvDM (Liang et al., ICML 2023) and Mist (Liang & Wu, 2023): adversarial examples against diffusion mimicry.

Three objectives over the image ``x + d`` (``d`` the perturbation), each per image:

- **semantic** (AdvDM, maximised): the latent diffusion model's training loss
  ``L_sem = mean_elements || eps_theta(z_t, t, c) - n ||^2`` with ``z = s * (mu(x + d) + sigma(x + d) * e)``
  a posterior sample of the VAE encoder scaled by the VAE's ``scaling_factor`` ``s`` (0.18215 for SD 1.x),
  ``t`` uniform over the schedule and ``n ~ N(0, I)``; the gradient flows through the UNet and the encoder
  (Monte-Carlo over t, n and e, one draw per step as in AdvDM). ``c`` is each image's caption, or a fixed
  ``prompt``. This is LDM's ``p_losses`` (``l_simple``, mean over elements) that AdvDM and Mist call.
- **textural** (Mist, minimised): the squared error *summed* over every latent element between the scaled
  posterior samples of the image and of the target pattern,
  ``L_tex = sum_elements (s * (mu(x + d) + sigma(x + d) * e1) - s * (mu(p) + sigma(p) * e2))^2``, as Mist's
  release (psyker-team/mist ``mist_v3.py``: ``nn.MSELoss(reduction="sum")`` between two
  ``get_first_stage_encoding(encode_first_stage(.))`` latents). The pattern's latent is a posterior *sample*,
  drawn afresh at every evaluation as the release re-encodes ``MIST.png`` in every forward pass; its mean and
  standard deviation are computed once. The pattern is generated (:func:`harness.diffusion.latent_pattern`, a
  tiled black-on-white glyph pattern) because the release's ``MIST.png`` is not shipped.
- **fused** (Mist, minimised): ``L_tex - rate * L_sem`` with the release's ``rate = 10^(r + 3)``, default
  ``r = 1`` so ``rate = 1e4``. The semantic part uses Mist's fixed prompt, "a painting" ("a photo" for
  objects), set in ``experiments/defense/mist.yaml``.

Every random draw (timesteps, diffusion noise, posterior samples of image and pattern) goes through the
engine's :class:`~harness.pgd.Draws`, so a result does not depend on the batch size.

Published settings (docs/methods.md#advdm-and-mist): AdvDM and Mist use sign (L-inf) PGD with steps of 1/255 for 100 steps; the
harness's budget is 8/255 as Hönig et al. used Mist (the release's default is 16/255). Mist's release runs
advertorch's ``LinfPGDAttack`` with its default random start (uniform in the budget), so ``mist.yaml`` sets
``random_start: true``; AdvDM starts from the clean image.

Deviations from the release, all from the image size: the release works on 512 px images (optionally split
into ``blocks x blocks`` tiles) and computes the semantic loss on a random crop of the tile's size, which is
the whole tile (the crop is the identity) at the default of one block; the harness's images are 64 px and
the semantic loss sees the whole image, as the release does at one block. Because ``L_tex`` is a sum, its
size relative to ``rate * L_sem`` (a mean) grows with the number of latent elements: SD at 512 px has
4 x 64 x 64 latents, tiny-sd at 64 px 4 x 16 x 16 (the scaling factor brings both to about unit variance),
so at the same ``rate`` the textural term carries about 1/16 of the weight it has in the release. The harness
keeps the released formula and weight instead of rescaling them.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.diffusion import (
    denoising_loss,
    encode_sample,
    gradient_checkpointing,
    latent_pattern,
    text_embeddings,
)
from harness.pgd import Draws, PGDSettings, frozen, objective_report, optimise_and_report
from harness.protocols import ConfigError, Context, Defense, DefenseOutput, check_range
from harness.seeding import derive_seed
from harness.types import ImageSet

__all__ = ["AdvDM", "textural_loss"]

MODES = ("semantic", "textural", "fused")


def textural_loss(z: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """Mist's textural loss per image: the squared error summed over all latent elements, (B,) float32.

    ``z`` and ``z_target`` are the *scaled* latents the UNet sees (posterior sample x ``scaling_factor``);
    ``z_target`` may have batch size 1 (broadcast).
    """
    return (z.float() - z_target.float()).pow(2).flatten(1).sum(dim=1)


def _scaled_pattern_sample(mean: torch.Tensor, std: torch.Tensor, scale: float, draws: Draws) -> torch.Tensor:
    """One posterior sample of the pattern per image of the batch, scaled: (B, C, h, w)."""
    e = draws.randn(*mean.shape[1:]).to(mean.dtype)
    return (mean + std * e) * scale


class AdvDM(Defense):
    """AdvDM / Mist protection.

    Args:
        mode: "semantic" (AdvDM: maximise the diffusion loss), "textural" (Mist's textural loss alone) or
            "fused" (Mist: minimise ``textural - rate * semantic``).
        eps: L-inf budget in [0, 1] pixel units (8/255 as Hönig et al. used Mist; Mist's release: 16/255).
        step_size: PGD sign step (AdvDM and Mist: 1/255).
        steps: PGD iterations (100).
        rate: Mist's fusion weight on the semantic loss, ``10^(r + 3)`` in the release with default r = 1:
            1e4. Used by the fused mode only.
        target_pattern: "mist" (a generated glyph pattern standing in for ``MIST.png``) or "grey".
        prompt: a fixed conditioning prompt for the semantic loss (Mist: "a painting"); None: each image's
            caption (AdvDM).
        random_start: start from uniform noise in the budget (Mist's release, through advertorch's default)
            rather than from the clean image (AdvDM).
        eot_samples: timestep/noise draws averaged per step (AdvDM and Mist: 1).
        gradient_checkpointing: trade time for memory on the UNet.
    """

    name = "advdm"
    version = "2"  # 2: Mist's released textural loss (sum over scaled posterior samples) and weighting
    uses_model = True
    threat_models = ("mimicry",)

    def __init__(
        self,
        mode: str = "semantic",
        eps: float = 8 / 255,
        step_size: float = 1 / 255,
        steps: int = 100,
        rate: float = 1e4,
        target_pattern: str = "mist",
        prompt: str | None = None,
        random_start: bool = False,
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
            random_start=bool(random_start),
            eot_samples=eot_samples,
            maximize=(mode == "semantic"),
            eval_samples=8,
        )
        self.rate = check_range("defense.rate", rate, 0.0, 1e9)
        latent_pattern(8, target_pattern)  # validates the name
        self.target_pattern = target_pattern
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"defense.prompt must be a string or null, got {prompt!r}")
        self.prompt = prompt or None
        self.gradient_checkpointing = bool(gradient_checkpointing)

    def objectives(self, pipe: Any, images: ImageSet, device: str) -> dict[str, Any]:
        """The per-image objectives ``{"semantic", "textural", "fused"}``, each ``fn(x, draws) -> (B,)``.

        Lower is better for the defense for "textural" and "fused"; "semantic" is the loss AdvDM raises.
        """
        vae = pipe.vae
        scale = float(vae.config.scaling_factor)
        h, w = images.size
        prompts = [self.prompt or c for c in images.captions]
        embed = dict(zip(images.ids, text_embeddings(pipe, prompts), strict=True))
        with torch.no_grad():
            pattern = latent_pattern(max(h, w), self.target_pattern)[..., :h, :w].to(device)
            dtype = next(vae.parameters()).dtype
            post = vae.encode((pattern * 2 - 1).to(dtype)).latent_dist
            p_mean, p_std = post.mean.float(), post.std.float()

        def semantic(x: torch.Tensor, draws: Draws) -> torch.Tensor:
            cond = torch.stack([embed[i] for i in draws.ids])
            return denoising_loss(pipe, encode_sample(vae, x, draws), cond, draws)

        def textural(x: torch.Tensor, draws: Draws) -> torch.Tensor:
            z = encode_sample(vae, x, draws)  # posterior sample x scaling_factor (draws e1)
            return textural_loss(z, _scaled_pattern_sample(p_mean, p_std, scale, draws))  # draws e2

        def fused(x: torch.Tensor, draws: Draws) -> torch.Tensor:
            return textural(x, draws) - self.rate * semantic(x, draws)

        return {"semantic": semantic, "textural": textural, "fused": fused}

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        pipe = ctx.pipeline("text2img")
        objectives = self.objectives(pipe, images, ctx.device)
        report_seed = derive_seed(generator.initial_seed(), "report")
        with (
            frozen(pipe.unet, pipe.vae, pipe.text_encoder),
            gradient_checkpointing(pipe.unet, enabled=self.gradient_checkpointing),
        ):
            protected, info = optimise_and_report(
                images,
                objectives[self.mode],
                self.settings,
                generator,
                ctx,
                name=f"{self.mode}_loss",
                desc=f"{self.name}:{self.mode}",
            )
            if self.mode == "fused":  # both parts, so a row shows which one moved (semantic raised, textural lowered)
                for part in ("semantic", "textural"):
                    s = PGDSettings(eps=self.eps, steps=0, step_size=0.0, eval_samples=8, maximize=part == "semantic")
                    info.update(
                        objective_report(
                            objectives[part], images.images, protected, images.ids, s, report_seed, ctx, f"{part}_loss"
                        )
                    )
        return DefenseOutput(images.with_images(protected), info)
