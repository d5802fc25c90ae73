"""InstaHide's encoding (Huang, Song, Li and Arora, ICML 2020): instance encoding of private training images.

Shared by the protection (``defenses/instahide.py``) and the attacker, who knows the scheme and encodes its own
public images with it to tune the attack (``finetune/reconstruction.py``).

Each encoding mixes one private image with ``k - 1`` others and flips the sign of every pixel at random:

    e = s * sum_j lambda_j x_j,   x_j in [-1, 1],   s in {-1, +1}^(3 x H x W) uniform,   sum_j lambda_j = 1.

The mixing weights follow the released code: ``|N(0, 1)|`` draws normalised to sum to 1, drawn again until the
largest is at most ``max_weight`` (0.65 in the paper and the challenge) and, in the cross-dataset variant, until
the private images' share is at least ``min_private_share`` (the challenge: 0.3 over its 2 private slots).
Slot 0 is the encoded private image itself. The other slots hold:

- **inside-dataset** (``public`` is None): ``k - 1`` other private images drawn at random (the paper: k = 4);
- **cross-dataset**: ``private_slots - 1`` other private images and ``k - private_slots`` public images (the
  InstaHide Challenge: k = 6, 2 private and 4 public).

Every private image gets ``encodings_per_image`` encodings (the released code draws fresh weights, partners and
signs every epoch), each with a fresh sign mask. All randomness of an image's encodings comes from a generator
seeded by the defense's seed and the image's id, so they do not depend on the order or the number of the other
images (only on which images are there to be drawn as partners).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import ConfigError
from harness.protocols import check_int, check_range
from harness.seeding import derive_seed, make_generator

__all__ = ["Encoding", "mixing_weights", "encode"]


@dataclass(frozen=True)
class Encoding:
    """Encodings of a set of private images and what made them (known to the defender only).

    Attributes:
        images: (M, 3, H, W) in [-1, 1], M = N x ``encodings_per_image``, grouped by private image.
        owner: (M,) the private image each encoding encodes (its slot 0).
        members: (M, k) the mixed images: index ``i >= 0`` a private image, ``-1 - j`` the public image ``j``.
        weights: (M, k) the mixing weights (rows sum to 1).
        signs: (M, 3, H, W) the sign masks in {-1, +1}.
    """

    images: torch.Tensor
    owner: torch.Tensor
    members: torch.Tensor
    weights: torch.Tensor
    signs: torch.Tensor


def mixing_weights(
    k: int, generator: torch.Generator, max_weight: float = 0.65, private_slots: int = 0, min_private_share: float = 0.0
) -> torch.Tensor:
    """One encoding's k weights: ``|N(0, 1)|`` normalised to sum 1, redrawn until the largest is at most
    ``max_weight`` and the first ``private_slots`` weights sum to at least ``min_private_share``."""
    if k > 1 and k * max_weight < 1.0:
        raise ConfigError(f"defense.max_weight: {max_weight} x k = {k} is below 1; no weights can sum to 1")
    for _ in range(100_000):
        w = torch.randn(k, generator=generator, dtype=torch.float64).abs()
        w = w / w.sum()
        if k == 1 or (float(w.max()) <= max_weight and float(w[:private_slots].sum()) >= min_private_share):
            return w.float()
    raise ConfigError(f"defense.max_weight={max_weight}, min_private_share={min_private_share}: no weights found")


def encode(
    private: torch.Tensor,
    ids: list[str] | tuple[str, ...],
    seed: int,
    k: int = 4,
    encodings_per_image: int = 10,
    public: torch.Tensor | None = None,
    private_slots: int = 2,
    max_weight: float = 0.65,
    min_private_share: float = 0.3,
) -> Encoding:
    """Encode ``private`` ((N, 3, H, W) in [0, 1]) as InstaHide does (see the module docstring).

    Args:
        private: the private images, in [0, 1] (mapped to [-1, 1] as the paper's pipeline normalises them).
        ids: their ids (seed each image's encodings).
        seed: the defense's seed.
        k: images per encoding (1: the image alone, its sign flipped at random).
        encodings_per_image: encodings of each private image.
        public: (P, 3, H, W) in [0, 1] for the cross-dataset variant; None: inside-dataset.
        private_slots: cross-dataset only: private images per encoding (slot 0 and ``private_slots - 1``
            others), the rest public.
        max_weight: the largest weight allowed.
        min_private_share: cross-dataset only: the least total weight of the private slots.
    """
    check_int("defense.k", k, 1)
    check_int("defense.encodings_per_image", encodings_per_image, 1)
    check_range("defense.max_weight", max_weight, 0.0, 1.0)
    n = len(private)
    if len(ids) != n:
        raise ValueError("ids and images differ in length")
    cross = public is not None
    n_private = min(private_slots, k) if cross else k
    if cross:
        check_int("defense.private_slots", private_slots, 1)
        check_range("defense.min_private_share", min_private_share, 0.0, 1.0)
        if k > n_private and len(public) == 0:
            raise ConfigError("defense.public: the cross-dataset variant needs public images")
    if n_private > 1 and n < 2:
        raise ConfigError(f"defense.k={k}: mixing private images with each other needs at least 2 of them, got {n}")
    if n_private > n:
        raise ConfigError(f"defense.k={k}: an encoding mixes {n_private} private images, but there are only {n}")
    x = private.float() * 2 - 1
    pub = None if public is None else public.float() * 2 - 1
    by_id = sorted(range(n), key=lambda j: ids[j])  # partners are drawn by id, so the order of the set is irrelevant
    images, owner, members, weights, signs = [], [], [], [], []
    for i, image_id in enumerate(ids):
        gen = make_generator(derive_seed(seed, "instahide", image_id))
        candidates = [j for j in by_id if j != i]
        for _ in range(encodings_per_image):
            others = torch.randperm(n - 1, generator=gen)[: n_private - 1].tolist()
            chosen = [i] + [candidates[o] for o in others]  # other private images, never i itself
            if cross:
                picks = torch.randint(0, len(pub), (k - n_private,), generator=gen) if k > n_private else []
                chosen += [-1 - int(j) for j in picks]
            w = mixing_weights(k, gen, max_weight, n_private if cross else 0, min_private_share if cross else 0.0)
            parts = torch.stack([x[c] if c >= 0 else pub[-1 - c] for c in chosen])
            mix = (w.view(-1, 1, 1, 1) * parts).sum(0)
            s = torch.randint(0, 2, mix.shape, generator=gen).float() * 2 - 1
            images.append(s * mix)
            owner.append(i)
            members.append(chosen)
            weights.append(w)
            signs.append(s)
    return Encoding(
        images=torch.stack(images),
        owner=torch.tensor(owner),
        members=torch.tensor(members),
        weights=torch.stack(weights),
        signs=torch.stack(signs),
    )
