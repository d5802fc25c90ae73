"""The four kinds of component the pipeline composes: Defense, Purifier, Mimic and Metric.

Components are plain classes with typed constructor arguments that validate at once and raise
:class:`ConfigError` naming the bad option. They never import Hydra. Each has ``name`` and ``version``
class attributes: bump ``version`` whenever behaviour changes; it is part of the stage key, so only that
component's cached artifacts are invalidated.

Every call receives a CPU ``torch.Generator`` (derived per stage, see :mod:`harness.seeding`) and a
:class:`Context` with the runtime settings (device, batch size, the shared model loader). Runtime settings
never change a result's cache key, so a component must give the same output whatever the batch size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from harness.errors import ConfigError
from harness.types import Budget, ImageSet

__all__ = [
    "ConfigError",
    "Context",
    "Component",
    "Defense",
    "DefenseOutput",
    "Purifier",
    "PurifierOutput",
    "Mimic",
    "Metric",
    "SetMetric",
]


def check_range(option: str, value: float, low: float, high: float) -> float:
    """Return ``value`` as float if ``low <= value <= high``, else raise a ConfigError naming ``option``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} must be a number, got {value!r}") from None
    if not (low <= v <= high):
        raise ConfigError(f"{option} must be in [{low}, {high}], got {value!r}")
    return v


def check_int(option: str, value: Any, low: int) -> int:
    """Return ``value`` if it is an integer (not a bool) ``>= low``, else raise a ConfigError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{option} must be an integer >= {low}, got {value!r}")
    return value


def _identity_progress(iterable: Iterable, **_: Any) -> Iterable:
    return iterable


@dataclass
class Context:
    """Runtime settings handed to every component call. Never part of a cache key.

    Attributes:
        device: torch device string for model work ("cpu", "cuda", "cuda:1").
        batch_size: images per forward pass.
        model: the experiment's model spec (``harness.models.ModelSpec``) or None if none is configured.
        progress: wraps an iterable in a progress bar: ``for x in ctx.progress(it, desc=..., total=...)``.
    """

    device: str = "cpu"
    batch_size: int = 8
    model: Any = None
    progress: Callable[..., Iterable] = field(default=_identity_progress)

    def pipeline(self, task: str = "img2img") -> Any:
        """The memoized diffusers pipeline for ``task`` of the experiment's model."""
        if self.model is None:
            raise ConfigError("this component needs a model, but the experiment configures none (model=...)")
        from harness.models import load_pipeline

        return load_pipeline(self.model, task=task, device=self.device)


class Component(ABC):  # noqa: B024 (the kinds below declare the abstract methods)
    """Base of every component: ``name`` and ``version`` identify its behaviour in cache keys."""

    name: ClassVar[str] = "component"
    version: ClassVar[str] = "1"
    #: True when the component's output depends on the model configured for the experiment.
    uses_model: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


@dataclass
class DefenseOutput:
    """What a defense returns.

    Attributes:
        images: the protected images (same ids, captions and size as the input).
        info: flat map of numbers describing the optimisation, e.g. ``objective_before`` and
            ``objective_after`` (a row shows that the protection did what it claims on its target model);
            ``<objective>_per_image`` entries map "clean", "noise" and "protected" to one value per image.
    """

    images: ImageSet
    info: dict[str, float] = field(default_factory=dict)


class Defense(Component):
    """A protection: clean images in, protected images out."""

    #: the budget's L-inf bound in [0, 1] pixel units, or None when the defense has no L-inf budget.
    eps: float | None = None

    @property
    def budget(self) -> Budget | None:
        """The perturbation budget as (norm, radius): by default the L-inf ``eps``; a defense that optimises
        under another norm overrides this. None: no budget of its own (an external tool's images)."""
        return Budget("linf", float(self.eps)) if self.eps is not None else None

    #: the threat models the protection claims to defend (an audit runs these): "editing", "mimicry", "privacy".
    threat_models: ClassVar[tuple[str, ...]] = ("editing", "mimicry")
    #: True when the protected set is not the clean images perturbed but a new set at the same size (instance
    #: encodings: other ids, another number of images); then no per-image budget is measured.
    changes_layout: ClassVar[bool] = False

    @abstractmethod
    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        """Protect ``images``. Shape (N, 3, H, W) in [0, 1] in and out; ids and captions kept."""


@dataclass
class PurifierOutput:
    """What a purifier returns: the purified images and the parameters it used (sampled ones included)."""

    images: ImageSet
    params: dict[str, Any] = field(default_factory=dict)


class Purifier(Component):
    """An attacker's preprocessing that tries to undo a protection."""

    #: True when the output depends on the generator.
    randomized: ClassVar[bool] = False

    @abstractmethod
    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        """Purify ``images``. Shape (N, 3, H, W) in [0, 1] in and out; ids and captions kept."""


class Mimic(Component):
    """An attacker's use of the model: an editor (one output per input) or a finetune-then-generate mimic.

    ``threat_model`` says how success is measured (see docs/architecture.md): ``"editing"`` compares the mimic's
    output on the purified protected images with its output on the clean images, id by id, under the same
    seed; ``"mimicry"`` compares generations with the artist's clean images.
    """

    threat_model: ClassVar[str] = "editing"
    uses_model: ClassVar[bool] = True

    @abstractmethod
    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        """Run the mimic on ``images`` and return its outputs as an ImageSet in [0, 1]."""

    def run_with_info(
        self, images: ImageSet, generator: torch.Generator, ctx: Context
    ) -> tuple[ImageSet, dict[str, float]]:
        """:meth:`run`, and numbers describing what the attacker did besides its outputs (a training-data
        filter's counts, say), which the row keeps as ``mimic_info``. The default has none."""
        return self.run(images, generator, ctx), {}

    def floor(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        """The **floor** control: what the attacker gets from ``images`` with nothing useful to learn from.

        Measured against the same references as every other run, it is the success that carries no
        information about the images: an effect size is scaled between the noise baseline and this floor.
        ``generator`` is the one :meth:`run` gets. For an editor (the default here) the floor is the same edit
        of the same image under another seed: two edits that share nothing but the input and the prompt.
        Finetuning mimics override it: the base model prompted as after finetuning, with no finetune.
        """
        from harness.seeding import derive_seed, make_generator
        from harness.threat_models import threat_model

        if not threat_model(self.threat_model).floor_reseeds:
            raise NotImplementedError(f"{type(self).__name__} defines no floor control")

        return self.run(images, make_generator(derive_seed(generator.initial_seed(), "floor")), ctx)


class Metric(Component):
    """A per-image score of ``outputs`` against ``references`` (paired by position, same ids).

    ``higher_is_better`` tells tables and reports which way is success for the attacker.
    """

    higher_is_better: ClassVar[bool] = True
    #: True when every value is 0 or 1 (a yes/no judgement): its intervals use the Jeffreys-smoothed bootstrap
    binary: ClassVar[bool] = False

    @abstractmethod
    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        """Return a float64 tensor of shape (N,): one value per image."""

    def __call__(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        if outputs.ids != references.ids:
            raise ValueError(f"{self.name}: outputs and references must have the same ids in the same order")
        if outputs.images.shape != references.images.shape:
            raise ValueError(
                f"{self.name}: shapes differ: {tuple(outputs.images.shape)} vs {tuple(references.images.shape)}"
            )
        return self.per_image(outputs, references).to(torch.float64)


class SetMetric(Component):
    """A set-level score of ``outputs`` against ``references`` (FID, KID): one number per run.

    ``higher_is_better`` as for :class:`Metric`. Tables aggregate set metrics over seeds.
    """

    higher_is_better: ClassVar[bool] = True

    @abstractmethod
    def value(self, outputs: ImageSet, references: ImageSet) -> float:
        """One number for the two sets."""
