"""SDS protections (Xue et al., "Toward Effective Protection Against Diffusion Based Mimicry through Score
Distillation", ICLR 2024).

AdvDM's semantic loss back-propagates through the UNet. Xue et al. show the UNet's Jacobian can be dropped:
the score-distillation gradient of the diffusion loss with respect to the latent is
``w(t) (eps_theta(z_t, t, c) - n)`` (Poole et al., DreamFusion), and only the VAE encoder is differentiated.
That is about 2x faster and needs half the memory. Their finding: the encoder is the vulnerable part, and
*minimising* the loss ("SDS(-)") protects better than maximising it ("SDS(+)").

Implementation: per step, the surrogate loss ``sum(stopgrad(g) * z)`` with ``g = eps_pred - n`` (w(t) = 1) has
the SDS gradient with respect to the latent ``z = E(x + d)``; sign PGD on the image, ascending for "+",
descending for "-". Published: eps 16/255, 100 steps; the harness uses sign steps of 1/255 by default.
The reported objective is the diffusion loss itself (what SDS(+) raises and SDS(-) lowers).
"""

from __future__ import annotations

import torch

from harness.diffusion import denoising_loss, encode_sample, noise_target, text_embeddings
from harness.pgd import PGDSettings, frozen, optimise_and_report
from harness.protocols import ConfigError, Context, Defense, DefenseOutput, check_range
from harness.types import ImageSet

__all__ = ["SDSProtection"]


class SDSProtection(Defense):
    """SDS(+) or SDS(-) protection.

    Args:
        direction: "+" (maximise the diffusion loss) or "-" (minimise it; the stronger one in the paper).
        eps: L-inf budget in [0, 1] pixel units (published 16/255).
        step_size: sign step (1/255).
        steps: PGD iterations (100).
        prompt: conditioning prompt (None: each image's caption).
        eot_samples: timestep/noise draws per step.
    """

    name = "sds"
    version = "1"
    uses_model = True
    threat_models = ("mimicry",)

    def __init__(
        self,
        direction: str = "-",
        eps: float = 16 / 255,
        step_size: float = 1 / 255,
        steps: int = 100,
        prompt: str | None = None,
        eot_samples: int = 1,
    ):
        if direction not in ("+", "-"):
            raise ConfigError(f"defense.direction must be '+' or '-', got {direction!r}")
        self.direction = direction
        self.eps = check_range("defense.eps", eps, 0.0, 1.0)
        self.settings = PGDSettings(
            eps=self.eps,
            steps=steps,
            step_size=step_size,
            random_start=False,
            eot_samples=eot_samples,
            maximize=(direction == "+"),
            eval_samples=8,
        )
        self.prompt = prompt or None

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        pipe = ctx.pipeline("text2img")
        vae, unet, sched = pipe.vae, pipe.unet, pipe.scheduler
        embed = dict(zip(images.ids, text_embeddings(pipe, [self.prompt or c for c in images.captions]), strict=True))

        def sds_surrogate(x: torch.Tensor, draws) -> torch.Tensor:
            cond = torch.stack([embed[i] for i in draws.ids])
            z = encode_sample(vae, x, draws)
            t = draws.randint(0, sched.config.num_train_timesteps)
            n = draws.randn(*z.shape[1:]).to(z.dtype)
            with torch.no_grad():
                zt = sched.add_noise(z.detach(), n, t)
                pred = unet(zt.to(unet.dtype), t, cond.to(unet.dtype)).sample.float()
                g = pred - noise_target(sched, z.detach(), n, t).float()
            # d/dz of this equals g: the score-distillation gradient, no UNet backward
            return (g * z.float()).flatten(1).sum(dim=1)

        def diffusion_loss(x: torch.Tensor, draws) -> torch.Tensor:
            cond = torch.stack([embed[i] for i in draws.ids])
            return denoising_loss(pipe, encode_sample(vae, x, draws), cond, draws)

        with frozen(unet, vae, pipe.text_encoder):
            protected, info = optimise_and_report(
                images,
                sds_surrogate,
                self.settings,
                generator,
                ctx,
                name="diffusion_loss",
                desc=f"sds{self.direction}",
                report_objective=diffusion_loss,
            )
        return DefenseOutput(images.with_images(protected), info)
