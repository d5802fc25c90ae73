"""The image convention shared by every stage.

An :class:`ImageSet` is a batch of RGB images, float32, shape ``(N, 3, H, W)``, values in ``[0, 1]``, on the
CPU, each with a stable string id and a caption. Ids survive every stage (protect, purify, mimic), so the
output of a stage can always be paired with the clean image it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Budget", "NORMS", "ImageSet", "ImageSetError"]

#: the norms a perturbation budget can be stated in
NORMS = ("linf", "l2")


class ImageSetError(ValueError):
    """An ImageSet was built from data that breaks the image convention."""


@dataclass(frozen=True)
class ImageSet:
    """Images with ids and captions.

    Args:
        images: float32 tensor, shape (N, 3, H, W), values in [0, 1], on the CPU.
        ids: N unique, non-empty strings; stable across runs (file stem, sample-photo name, ...).
        captions: N strings (may be empty).
    """

    images: torch.Tensor
    ids: tuple[str, ...]
    captions: tuple[str, ...]

    def __post_init__(self) -> None:
        x = self.images
        if not isinstance(x, torch.Tensor):
            raise ImageSetError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ImageSetError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise ImageSetError(f"images must be float32, got {x.dtype}")
        if x.device.type != "cpu":
            raise ImageSetError(f"images must be on the CPU between stages, got {x.device}")
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "captions", tuple(str(c) for c in self.captions))
        if len(self.ids) != x.shape[0] or len(self.captions) != x.shape[0]:
            raise ImageSetError(f"{x.shape[0]} images but {len(self.ids)} ids and {len(self.captions)} captions")
        if len(set(self.ids)) != len(self.ids):
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise ImageSetError(f"ids must be unique; repeated: {dup[:5]}")
        if any(not i for i in self.ids):
            raise ImageSetError("ids must be non-empty strings")
        if x.numel() and not torch.isfinite(x).all():
            raise ImageSetError("images contain NaN or infinite values")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ImageSetError(f"images must lie in [0, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}]")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def with_images(self, images: torch.Tensor) -> ImageSet:
        """The same ids and captions with new pixels (clamped to [0, 1], moved to CPU float32)."""
        images = images.detach().to("cpu", torch.float32).clamp(0, 1)
        return ImageSet(images, self.ids, self.captions)

    def resized(self, side: int) -> ImageSet:
        """The images at ``side`` x ``side`` (antialiased bicubic, clamped to [0, 1]); the same set when they are
        already that size."""
        if self.size == (side, side) or len(self) == 0:
            return self
        import torch.nn.functional as F

        out = F.interpolate(self.images, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        return self.with_images(out)

    def with_captions(self, captions: Sequence[str]) -> ImageSet:
        return ImageSet(self.images, self.ids, tuple(captions))

    def select(self, index: Sequence[int] | slice) -> ImageSet:
        """A subset, in the given order."""
        if isinstance(index, slice):
            idx = list(range(len(self)))[index]
        else:
            idx = [int(i) for i in index]
        return ImageSet(
            self.images[idx].clone(),
            tuple(self.ids[i] for i in idx),
            tuple(self.captions[i] for i in idx),
        )

    def batches(self, batch_size: int):
        """Yield (start, ImageSet) chunks of at most ``batch_size`` images."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield start, self.select(slice(start, start + batch_size))

    def to_uint8(self) -> np.ndarray:
        """(N, H, W, 3) uint8 array, rounded to nearest."""
        return (self.images.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)

    @staticmethod
    def from_uint8(array: np.ndarray, ids: Sequence[str], captions: Sequence[str]) -> ImageSet:
        """Inverse of :meth:`to_uint8`."""
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ImageSetError(f"expected (N, H, W, 3) uint8, got {array.shape} {array.dtype}")
        images = torch.from_numpy(array.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        return ImageSet(images, tuple(ids), tuple(captions))

    def quantized(self) -> ImageSet:
        """The images as an 8-bit file would hold them (what every stage hands to the next)."""
        return ImageSet.from_uint8(self.to_uint8(), self.ids, self.captions)

    @staticmethod
    def concat(sets: Sequence[ImageSet]) -> ImageSet:
        if not sets:
            raise ImageSetError("cannot concatenate zero ImageSets")
        return ImageSet(
            torch.cat([s.images for s in sets]),
            tuple(i for s in sets for i in s.ids),
            tuple(c for s in sets for c in s.captions),
        )


@dataclass(frozen=True)
class Budget:
    """A perturbation budget: a ``radius`` in the ``norm`` the defense optimises under ("linf" or "l2"), in
    [0, 1] pixel units. ``note`` says how the radius is read where that is not plain (an L2 radius stated at
    512 px and scaled to the images' size). A config's ``defense.eps`` is this radius, in this norm."""

    norm: str
    radius: float
    note: str = ""

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"a budget's norm must be one of {list(NORMS)}, got {self.norm!r}")
        if not (self.radius >= 0):
            raise ValueError(f"a budget's radius must be >= 0, got {self.radius!r}")

    @property
    def linf(self) -> float | None:
        """The L-inf bound the budget implies (None for an L2 budget: it bounds no pixel on its own)."""
        return self.radius if self.norm == "linf" else None

    def as_dict(self) -> dict[str, object]:
        return {"norm": self.norm, "radius": self.radius, **({"note": self.note} if self.note else {})}

    def __str__(self) -> str:
        r = f"{255 * self.radius:.4g}/255" if self.norm == "linf" else f"{self.radius:.4g}"
        return f"{self.norm} {r}" + (f" ({self.note})" if self.note else "")
