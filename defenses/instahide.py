"""InstaHide (Huang, Song, Li and Arora, ICML 2020): instance encoding of private training images.

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

from harness.protocols import ConfigError, Context, Defense, DefenseOutput, check_int, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet

__all__ = ["Encoding", "mixing_weights", "encode", "InstaHide"]


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


def _load_public(public: object, option: str) -> torch.Tensor | None:
    """The public images of a dataset object (anything with ``load() -> ImageSet``), or None."""
    if public is None:
        return None
    load = getattr(public, "load", None)
    if not callable(load):
        raise ConfigError(f"{option}: expected a dataset config (with _target_), got {public!r}")
    images = load()
    if len(images) == 0:
        raise ConfigError(f"{option}: the public dataset is empty")
    return images


class InstaHide(Defense):
    """InstaHide as a protection of the privacy threat model: the private images in, their encodings out.

    The protected set is the ``N x encodings_per_image`` encodings, each mapped from [-1, 1] to [0, 1] as
    ``(e + 1) / 2`` and stored as 8-bit images like every stage (a step of 2/255 in ``e``; the challenge released
    float arrays). Encodings are shuffled (by the defense's seed) and named ``enc00000`` ...: neither their order
    nor their ids tell which private image an encoding came from. Every caption is the scheme's public parameters
    (:func:`harness.threat_models.privacy.describe_encodings`).

    Args:
        k: images mixed per encoding (the paper: 4 inside-dataset; the challenge: 6 cross-dataset).
        encodings_per_image: encodings of each private image (the challenge: 50).
        public: None for the inside-dataset variant, or a dataset config (``_target_``) of public images for the
            cross-dataset one, resized to the private images' size.
        private_slots: cross-dataset only: private images per encoding (the challenge: 2).
        max_weight: the largest mixing weight (0.65).
        min_private_share: cross-dataset only: the least total weight of the private images (0.3).
    """

    name = "instahide"
    version = "1"
    threat_models = ("privacy",)
    changes_layout = True

    def __init__(
        self,
        k: int = 4,
        encodings_per_image: int = 10,
        public: object = None,
        private_slots: int = 2,
        max_weight: float = 0.65,
        min_private_share: float = 0.3,
    ) -> None:
        self.k = check_int("defense.k", k, 1)
        self.encodings_per_image = check_int("defense.encodings_per_image", encodings_per_image, 1)
        self.private_slots = check_int("defense.private_slots", private_slots, 1)
        self.max_weight = check_range("defense.max_weight", max_weight, 0.0, 1.0)
        self.min_private_share = check_range("defense.min_private_share", min_private_share, 0.0, 1.0)
        if self.k > 1 and self.k * self.max_weight < 1.0:
            raise ConfigError(f"defense.max_weight: {max_weight} x k = {k} is below 1; no weights can sum to 1")
        self.public = public
        if public is not None:
            _load_public(public, "defense.public")  # fail at once on a bad public set

    @property
    def private_per_encoding(self) -> int:
        return min(self.private_slots, self.k) if self.public is not None else self.k

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        from harness.threat_models.privacy import describe_encodings

        seed = generator.initial_seed()
        public = _load_public(self.public, "defense.public")
        pub = None if public is None else public.resized(images.size[0]).images
        enc = encode(
            images.images,
            images.ids,
            seed,
            k=self.k,
            encodings_per_image=self.encodings_per_image,
            public=pub,
            private_slots=self.private_slots,
            max_weight=self.max_weight,
            min_private_share=self.min_private_share,
        )
        order = torch.randperm(len(enc.images), generator=make_generator(derive_seed(seed, "instahide-order")))
        caption = describe_encodings(
            private_images=len(images),
            k=self.k,
            private_per_encoding=self.private_per_encoding,
            encodings_per_image=self.encodings_per_image,
        )
        m = len(order)
        out = ImageSet(
            ((enc.images[order] + 1) / 2).clamp(0, 1),
            tuple(f"enc{j:05d}" for j in range(m)),
            (caption,) * m,
        )
        owner_weight = enc.weights[:, 0]
        private = enc.members >= 0
        info = {
            "encodings": float(m),
            "private_images": float(len(images)),
            "owner_weight_mean": float(owner_weight.mean()),
            "private_share_mean": float((enc.weights * private).sum(1).mean()),
            "max_weight_max": float(enc.weights.max()),
        }
        return DefenseOutput(out, info)
