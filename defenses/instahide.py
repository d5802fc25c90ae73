"""InstaHide (Huang, Song, Li and Arora, ICML 2020) as a protection of the privacy threat model: the private
images in, their instance encodings out (the encoding itself: :mod:`harness.instance_encoding`)."""

from __future__ import annotations

import torch

from harness.instance_encoding import encode
from harness.protocols import ConfigError, Context, Defense, DefenseOutput, check_int, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet

__all__ = ["InstaHide"]


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
