"""The optimisation engine shared by every perturbation defense: projected gradient descent.

Madry et al. (ICLR 2018) PGD under an L-inf or L2 budget, with the variants the protection papers use:
sign steps (PhotoGuard, AdvDM, Mist, SDS, Anti-DreamBooth) or Adam steps (Glaze-style cloaks), a step size
that stays constant or decays (PhotoGuard's notebook decays it linearly to 1/100), a random start, a mask
that confines the perturbation to an editable region (PhotoGuard's inpainting attack), and expectation over
randomness (several noise draws or timesteps averaged per step; PhotoGuard's "gradient repeats").

Budgets and steps are in [0, 1] pixel units. After every step the perturbation is projected onto the budget
and the image clipped to [0, 1], so after the harness's 8-bit quantization the realised L-inf distance is at
most ``eps + 0.5/255``.

Randomness: every image owns generators seeded from the defense's generator and the image's id, so the
result does not depend on the batch size or on the other images in the set. The objective draws its noise
and timesteps through :class:`Draws`. The objective's value before and after is measured with a second,
fixed set of draws (the same for the clean, the noise-baseline and the protected image), so the three
numbers are comparable.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.protocols import ConfigError, Context, check_int, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import NORMS

__all__ = ["PGDSettings", "Draws", "Objective", "PGDResult", "run_pgd", "frozen", "uniform_noise", "check_norm"]

log = logging.getLogger(__name__)

UPDATES = ("sign", "adam")
SCHEDULES = ("constant", "linear", "cosine")


class Draws:
    """Random draws for a batch, one CPU generator per image (so a batch's draws equal the images' own).

    Args:
        generators: one ``torch.Generator`` per image of the batch.
        device: where the drawn tensors go.
        ids: the batch's image ids (objectives look per-image conditioning, such as prompts, up by id).
    """

    def __init__(self, generators: Sequence[torch.Generator], device: torch.device | str, ids: Sequence[str] = ()):
        self.generators = list(generators)
        self.device = torch.device(device)
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> torch.Tensor:
        """(B, *shape) standard normal."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        """(B, *shape) uniform in [0, 1)."""
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators]).to(self.device)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """(B,) integers in [low, high)."""
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self.generators]).to(self.device)


#: ``objective(images, draws) -> (B,)``: images (B, 3, H, W) in [0, 1] on the model's device; lower is better
#: for the defense unless :attr:`PGDSettings.maximize` is set.
Objective = Callable[[torch.Tensor, Draws], torch.Tensor]


def check_norm(option: str, norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"{option} must be one of {list(NORMS)}, got {norm!r}")
    return norm


@dataclass(frozen=True)
class PGDSettings:
    """How the engine optimises.

    Attributes:
        eps: budget radius in [0, 1] pixel units (L-inf: per pixel; L2: over the whole image).
        steps: optimisation steps (>= 0; 0 returns the random start, or the input).
        step_size: the first step's size in [0, 1] pixel units (the learning rate for Adam).
        norm: "linf" or "l2".
        update: "sign" (steepest ascent for the norm: the gradient's sign for L-inf, the normalised gradient
            for L2) or "adam".
        schedule: "constant", "linear" (decays to ``final_step_fraction`` of the first step) or "cosine".
        final_step_fraction: the last step's size relative to the first, for the decaying schedules.
        random_start: start from uniform noise in the budget (L-inf) or a random point in the L2 ball.
        eot_samples: objective evaluations (fresh draws) averaged per step.
        maximize: ascend the objective instead of descending it.
        eval_samples: draws averaged when the objective is measured before and after.
        autocast: bf16 autocast on CUDA (ignored on CPU).
        option: the config prefix named in error messages.
    """

    eps: float
    steps: int
    step_size: float
    norm: str = "linf"
    update: str = "sign"
    schedule: str = "constant"
    final_step_fraction: float = 0.01
    random_start: bool = True
    eot_samples: int = 1
    maximize: bool = False
    eval_samples: int = 4
    autocast: bool = True
    option: str = "defense"

    def __post_init__(self) -> None:
        o = self.option
        check_norm(f"{o}.norm", self.norm)
        high = 1.0 if self.norm == "linf" else 1e4
        check_range(f"{o}.eps", self.eps, 0.0, high)
        check_range(f"{o}.step_size", self.step_size, 0.0, high)
        for name in ("steps", "eot_samples", "eval_samples"):
            check_int(f"{o}.{name}", getattr(self, name), 0 if name == "steps" else 1)
        if self.update not in UPDATES:
            raise ConfigError(f"{o}.update must be one of {list(UPDATES)}, got {self.update!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{o}.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        check_range(f"{o}.final_step_fraction", self.final_step_fraction, 0.0, 1.0)

    def step_at(self, k: int) -> float:
        """The step size of step ``k`` (0-based)."""
        if self.schedule == "constant" or self.steps <= 1:
            return self.step_size
        frac = k / (self.steps - 1)
        lo = self.final_step_fraction
        if self.schedule == "linear":
            return self.step_size * (1 - (1 - lo) * frac)
        return self.step_size * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class PGDResult:
    """The engine's output.

    Attributes:
        images: protected images (N, 3, H, W) in [0, 1], on CPU.
        objective_before: the objective on the inputs, per image (fixed evaluation draws).
        objective_after: the objective on the outputs, per image (same draws).
        vanished: per image, True when its gradient was exactly zero at some step.
        seconds: wall time.
    """

    images: torch.Tensor
    objective_before: torch.Tensor
    objective_after: torch.Tensor
    vanished: torch.Tensor
    seconds: float
    history: list[float] = field(default_factory=list)

    def info(self, prefix: str = "objective") -> dict[str, float]:
        return {
            f"{prefix}_before": float(self.objective_before.mean()),
            f"{prefix}_after": float(self.objective_after.mean()),
            "vanished_gradient_images": float(self.vanished.sum()),
            "optimisation_seconds": round(self.seconds, 3),
        }


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        delta = delta * mask
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / n, max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


def uniform_noise(x: torch.Tensor, eps: float, norm: str, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """A random perturbation inside the budget, one generator per image: (N, 3, H, W), not yet clipped."""
    out = torch.empty_like(x, device="cpu")
    for i, g in enumerate(generators):
        if norm == "linf":
            out[i].uniform_(-eps, eps, generator=g)
        else:  # uniform in the L2 ball: a random direction, radius eps * u^(1/d)
            d = torch.randn(x[i].shape, generator=g)
            r = eps * float(torch.rand((), generator=g)) ** (1.0 / d.numel())
            out[i] = d / d.norm().clamp_min(1e-12) * r
    return out.to(x.device)


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Turn off parameter gradients of ``modules`` inside the block and restore them afterwards."""
    saved = []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            saved.append((p, p.requires_grad))
            p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def image_generators(base_seed: int, ids: Sequence[str], purpose: str) -> list[torch.Generator]:
    """One generator per image id for ``purpose`` (independent of batch composition)."""
    return [make_generator(derive_seed(base_seed, purpose, i)) for i in ids]


def evaluate_objective(
    objective: Objective, x: torch.Tensor, ids: Sequence[str], base_seed: int, settings: PGDSettings, ctx: Context
) -> torch.Tensor:
    """The objective on ``x`` (N, 3, H, W), averaged over ``settings.eval_samples`` fixed draws, per image."""
    device = torch.device(ctx.device)
    values = []
    for start in range(0, len(x), max(1, ctx.batch_size)):
        sl = slice(start, start + ctx.batch_size)
        draws = Draws(image_generators(base_seed, ids[sl], "eval"), device, ids[sl])
        with torch.no_grad(), _autocast(device, settings.autocast):
            xb = x[sl].to(device)
            v = sum(objective(xb, draws).float() for _ in range(settings.eval_samples)) / settings.eval_samples
        values.append(v.detach().cpu())
    return torch.cat(values).to(torch.float64) if values else torch.zeros(0, dtype=torch.float64)


def run_pgd(
    images: torch.Tensor,
    ids: Sequence[str],
    objective: Objective,
    settings: PGDSettings,
    generator: torch.Generator,
    ctx: Context,
    mask: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    desc: str = "pgd",
    measure: bool = True,
) -> PGDResult:
    """Optimise a perturbation of ``images`` within the budget.

    Args:
        images: (N, 3, H, W) in [0, 1] (CPU).
        ids: the images' ids (seed each image's draws).
        objective: per-image loss of a batch, see :data:`Objective`.
        settings: the optimisation settings.
        generator: the defense's CPU generator (one draw from it seeds every per-image generator).
        ctx: runtime context (device, batch size, progress bar).
        mask: optional (N or 1, 1, H, W) in [0, 1]: where the perturbation may be non-zero.
        init: optional starting perturbation (N, 3, H, W) (continuing an earlier run; no random start then).
        desc: label of the progress bar.
        measure: measure the objective before and after (skip when the caller measures itself).

    Returns:
        :class:`PGDResult`.
    """
    t0 = time.perf_counter()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if len(ids) != len(images):
        raise ValueError("ids and images differ in length")
    device = torch.device(ctx.device)
    base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    x_all = images.float()
    n = len(x_all)
    out = torch.empty_like(x_all)
    vanished = torch.zeros(n, dtype=torch.bool)
    history: list[float] = []
    bs = max(1, ctx.batch_size)
    batches = [slice(s, s + bs) for s in range(0, n, bs)]
    sign = -1.0 if settings.maximize else 1.0
    for sl in ctx.progress(batches, desc=desc, unit="batch"):
        x = x_all[sl].to(device)
        bids = list(ids[sl])
        m = None if mask is None else (mask if mask.shape[0] == 1 else mask[sl]).to(device, x.dtype)
        if init is not None:
            delta = init[sl].to(device).float()
        elif settings.random_start and settings.eps > 0:
            delta = uniform_noise(x, settings.eps, settings.norm, image_generators(base_seed, bids, "start"))
        else:
            delta = torch.zeros_like(x)
        delta = _project(delta, x, settings.eps, settings.norm, m)
        draws = Draws(image_generators(base_seed, bids, "steps"), device, bids)
        adam_m = torch.zeros_like(delta)
        adam_v = torch.zeros_like(delta)
        for k in range(settings.steps):
            delta.requires_grad_(True)
            with _autocast(device, settings.autocast):
                loss = sum(objective(x + delta, draws).float() for _ in range(settings.eot_samples))
                loss = loss / settings.eot_samples
            (grad,) = torch.autograd.grad(sign * loss.sum(), delta)
            delta = delta.detach()
            grad = grad.float()
            if m is not None:
                grad = grad * m
            vanished[sl] |= (grad.flatten(1).abs().amax(dim=1) == 0).cpu()
            alpha = settings.step_at(k)
            if settings.update == "adam":
                b1, b2 = 0.9, 0.999
                adam_m = b1 * adam_m + (1 - b1) * grad
                adam_v = b2 * adam_v + (1 - b2) * grad * grad
                mh = adam_m / (1 - b1 ** (k + 1))
                vh = adam_v / (1 - b2 ** (k + 1))
                step = mh / (vh.sqrt() + 1e-8)
            elif settings.norm == "linf":
                step = grad.sign()
            else:
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = _project(delta - alpha * step, x, settings.eps, settings.norm, m)
            if sl.start == 0:
                history.append(float(loss.detach().mean()))
        out[sl] = (x + delta).clamp(0, 1).detach().cpu()
    if vanished.any():
        log.warning(
            "%s: the gradient was exactly zero at some step for %d of %d images; the defense may not be optimising",
            desc,
            int(vanished.sum()),
            n,
        )
    if measure:
        before = evaluate_objective(objective, x_all, ids, base_seed, settings, ctx)
        after = evaluate_objective(objective, out, ids, base_seed, settings, ctx)
    else:
        before = after = torch.full((n,), float("nan"), dtype=torch.float64)
    return PGDResult(out, before, after, vanished, time.perf_counter() - t0, history)


def objective_report(
    objective: Objective,
    clean: torch.Tensor,
    protected: torch.Tensor,
    ids: Sequence[str],
    settings: PGDSettings,
    generator_seed: int,
    ctx: Context,
    name: str = "objective",
) -> dict[str, Any]:
    """The objective on the clean images, on uniform noise of the same budget, and on the protected images.

    All three use the same fixed evaluation draws, so the defense beats the random-noise baseline on its own
    objective when ``{name}_protected`` is further from ``{name}_clean`` (in the defense's direction) than
    ``{name}_noise``.
    """
    gens = image_generators(generator_seed, ids, "noise-baseline")
    noisy = (clean + uniform_noise(clean, settings.eps, settings.norm, gens)).clamp(0, 1)
    noisy = torch.round(noisy * 255) / 255
    values = {
        "clean": evaluate_objective(objective, clean, ids, generator_seed, settings, ctx),
        "noise": evaluate_objective(objective, noisy, ids, generator_seed, settings, ctx),
        "protected": evaluate_objective(
            objective, torch.round(protected * 255) / 255, ids, generator_seed, settings, ctx
        ),
    }
    info: dict[str, Any] = {f"{name}_{k}": float(v.mean()) for k, v in values.items()}
    info[f"{name}_direction"] = 1.0 if settings.maximize else -1.0  # +1: the defense raises the objective
    # per image (in the order of ``ids``): the tables give the protection-vs-noise difference a paired interval
    info[f"{name}_per_image"] = {k: [float(x) for x in v.flatten().tolist()] for k, v in values.items()}
    return info


def optimise_and_report(
    images: Any,
    objective: Objective,
    settings: PGDSettings,
    generator: torch.Generator,
    ctx: Context,
    *,
    name: str,
    desc: str,
    report_objective: Objective | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the engine on an ImageSet and report: the protected images and the row's ``info``.

    ``report_objective`` (default ``objective``) is measured on the clean images, on uniform noise of the same
    budget and on the protected images (see :func:`objective_report`) under the name ``name``.
    """
    res = run_pgd(images.images, images.ids, objective, settings, generator, ctx, mask=mask, desc=desc, measure=False)
    info = objective_report(
        report_objective or objective,
        images.images,
        res.images,
        images.ids,
        settings,
        derive_seed(generator.initial_seed(), "report"),
        ctx,
        name=name,
    )
    info.update({"vanished_gradient_images": float(res.vanished.sum()), "optimisation_seconds": res.seconds})
    return res.images, info
