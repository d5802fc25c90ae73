"""Seeds derived per stage and CPU generators.

Library code never touches the global RNG: every random draw goes through a ``torch.Generator`` made on
the CPU from a seed derived from the experiment seed and the stage name, so adding a purifier never shifts
the noise a defense draws, and a cached stage and a fresh one see the same randomness.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

__all__ = ["derive_seed", "make_generator", "isolated_torch_rng"]

_MAX_SEED = 2**63 - 1


def derive_seed(seed: int, *names: str | int) -> int:
    """A 63-bit seed from a base seed and a path of names, e.g. ``derive_seed(0, "purify")``.

    Uses SHA-256, so it is the same on every platform and Python version (unlike ``hash``).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    text = "/".join([str(seed), *(str(n) for n in names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & _MAX_SEED


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) & _MAX_SEED)
    return gen


@contextlib.contextmanager
def isolated_torch_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG inside the block and restore it afterwards.

    Only for third-party code that draws from the global RNG and takes no generator (module weight
    initialisation, for example); the caller's RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) & _MAX_SEED)
        yield
