"""IMPRESS (Cao et al., NeurIPS 2023) and IMPRESS++ (Hönig et al. 2024): consistency purification.

A protected image is inconsistent under the latent diffusion model's autoencoder: ``D(E(x))`` differs from
``x``. IMPRESS optimises the image to be consistent while staying perceptually close to the input:

    min_x'  || D(E(x')) - x' ||^2 + a * max(P(x', x) - e, 0)

Published: e 0.1, Adam lr 0.01, 3000 steps, a 0.1 (docs/methods.md#impress); IMPRESS++ first adds Gaussian noise (0.1 for
art). P is LPIPS in the paper; here it is ST-LPIPS (LPIPS on an anti-aliased VGG-16 with ImageNet features,
the only real LPIPS weights that install offline; the ``perceptual`` extra), as in the harness's Glaze-style
cloak, and every row says so; ``perceptual: ssim`` keeps the earlier stand-in, ``1 - SSIM`` (piq). The
optimisation runs on the harness's shared engine (Adam, no budget: ``eps`` 1).
"""

from __future__ import annotations

import torch

from harness.diffusion import decode, encode_mean
from harness.metrics.similarity import PERCEPTUAL_LABELS, check_perceptual, perceptual_distance
from harness.pgd import PGDSettings, frozen, run_pgd
from harness.protocols import Context, Purifier, PurifierOutput, check_int, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet


class Impress(Purifier):
    """IMPRESS / IMPRESS++ with the experiment's model's autoencoder.

    Args:
        steps: Adam steps (3000). lr: learning rate (0.01). budget: e (0.1, in the units of ``perceptual``).
        alpha: a (0.1). initial_noise: Gaussian noise sigma added first (0 = IMPRESS; 0.1 = IMPRESS++).
        perceptual: "stlpips" (ST-LPIPS, for the paper's LPIPS) or "ssim" (1 - SSIM).
    """

    name = "impress"
    version = "1"
    uses_model = True

    def __init__(
        self,
        steps: int = 3000,
        lr: float = 0.01,
        budget: float = 0.1,
        alpha: float = 0.1,
        initial_noise: float = 0.1,
        perceptual: str = "stlpips",
    ):
        check_int("purifier.steps", steps, 0)
        self.steps = steps
        self.lr = check_range("purifier.lr", lr, 0.0, 1.0)
        self.budget = check_range("purifier.budget", budget, 0.0, 1.0)
        self.alpha = check_range("purifier.alpha", alpha, 0.0, 1e6)
        self.initial_noise = check_range("purifier.initial_noise", initial_noise, 0.0, 1.0)
        self.perceptual = check_perceptual("purifier.perceptual", perceptual)

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return self.initial_noise > 0

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        pipe = ctx.pipeline("img2img")
        vae = pipe.vae
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        x = images.images
        if self.initial_noise > 0 and len(x):
            noise = torch.stack(
                [torch.randn(x.shape[1:], generator=make_generator(derive_seed(base, i))) for i in images.ids]
            )
            start = (x + self.initial_noise * noise).clamp(0, 1)
        else:
            start = x.clone()
        reference = dict(zip(images.ids, x, strict=True))

        def objective(xp: torch.Tensor, draws) -> torch.Tensor:
            x0 = torch.stack([reference[i] for i in draws.ids]).to(xp.device)
            recon = decode(vae, encode_mean(vae, xp) * vae.config.scaling_factor)
            consistency = (recon - xp).pow(2).flatten(1).mean(dim=1)
            return consistency + self.alpha * (perceptual_distance(x0, xp, self.perceptual) - self.budget).clamp_min(0)

        settings = PGDSettings(
            eps=1.0, steps=self.steps, step_size=self.lr, update="adam", random_start=False, option="purifier"
        )
        with frozen(vae):
            res = run_pgd(
                start,
                images.ids,
                objective,
                settings,
                generator,
                ctx,
                init=torch.zeros_like(start),
                desc=self.name,
                measure=True,
            )
        params = {
            "steps": self.steps,
            "lr": self.lr,
            "budget": self.budget,
            "alpha": self.alpha,
            "initial_noise": self.initial_noise,
            "perceptual": PERCEPTUAL_LABELS[self.perceptual],
            "noise_seed": base,
            "objective_before": float(res.objective_before.mean()),
            "objective_after": float(res.objective_after.mean()),
        }
        return PurifierOutput(images.with_images(res.images), params)
