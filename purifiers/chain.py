"""A chain of purifiers applied in order (e.g. noise then JPEG), configured as a list of purifier configs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from harness.protocols import ConfigError, Context, Purifier, PurifierOutput
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet


class Chain(Purifier):
    """Apply ``steps`` one after another; each gets its own generator derived from the chain's and its index.

    Args:
        steps: purifiers (instantiated by Hydra from a list of configs).

    ``params`` lists each step's name and parameters in order. Randomized if any step is.
    """

    name = "chain"
    version = "1"

    def __init__(self, steps: Sequence[Purifier]):
        if not steps:
            raise ConfigError("purifier.steps must list at least one purifier")
        for k, s in enumerate(steps):
            if not isinstance(s, Purifier):
                raise ConfigError(f"purifier.steps[{k}] is not a purifier (got {type(s).__name__})")
        self.steps = list(steps)
        # a step's behaviour change invalidates the chain's cached outputs too
        self.version = "1:" + ",".join(f"{s.name}@{s.version}" for s in self.steps)  # type: ignore[misc]

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return any(s.randomized for s in self.steps)

    @property
    def uses_model(self) -> bool:  # type: ignore[override]
        return any(getattr(s, "uses_model", False) for s in self.steps)

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        params: list[dict[str, Any]] = []
        x = images
        for k, step in enumerate(self.steps):
            out = step.purify(x, make_generator(derive_seed(base, k)), ctx)
            x = out.images
            params.append({"purifier": step.name, **out.params})
        return PurifierOutput(x, {"chain": params})
