"""JPEG re-encoding with a real codec (Pillow's libjpeg).

Used as a purifier at quality 75 by MetaCloak, BlurGuard and CopyrightMeter (see docs/methods.md#jpeg).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from harness.protocols import ConfigError, Context, Purifier, PurifierOutput, check_range
from harness.types import ImageSet

_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


class JPEG(Purifier):
    """Encode each image as an 8-bit JPEG and decode it again.

    Args:
        quality: libjpeg quality, 1-100 (default 75).
        subsampling: chroma subsampling, "4:4:4", "4:2:2" or "4:2:0" (libjpeg's default, 4:2:0).

    Shape: (N, 3, H, W) in [0, 1] in and out; deterministic.
    """

    name = "jpeg"
    version = "1"
    randomized = False

    def __init__(self, quality: int = 75, subsampling: str = "4:2:0"):
        q = check_range("purifier.quality", quality, 1, 100)
        if q != int(q):
            raise ConfigError(f"purifier.quality must be an integer, got {quality!r}")
        if subsampling not in _SUBSAMPLING:
            raise ConfigError(f"purifier.subsampling must be one of {sorted(_SUBSAMPLING)}, got {subsampling!r}")
        self.quality = int(q)
        self.subsampling = subsampling

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        arr = images.to_uint8()
        out = np.empty_like(arr)
        for i in range(len(arr)):
            buf = io.BytesIO()
            Image.fromarray(arr[i], mode="RGB").save(
                buf, format="JPEG", quality=self.quality, subsampling=_SUBSAMPLING[self.subsampling]
            )
            buf.seek(0)
            out[i] = np.asarray(Image.open(buf).convert("RGB"))
        result = ImageSet.from_uint8(out, images.ids, images.captions)
        return PurifierOutput(result, {"quality": self.quality, "subsampling": self.subsampling})


class DifferentiableJPEG(Purifier):
    """A differentiable JPEG surrogate (kornia's ``jpeg_codec_differentiable``, Shin & Song 2017 style
    rounding approximation) for adaptive attacks that need gradients through the purifier.

    Args:
        quality: JPEG quality in [1, 100].

    Shape: (N, 3, H, W) in [0, 1] in and out (H and W padded internally to multiples of 16 by kornia's
    rules; sides must be multiples of 16 here); deterministic; differentiable in the input.
    """

    name = "jpeg_differentiable"
    version = "1"
    randomized = False

    def __init__(self, quality: int = 75):
        self.quality = check_range("purifier.quality", quality, 1, 100)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The surrogate on a tensor (N, 3, H, W) in [0, 1], with gradients."""
        import kornia

        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            raise ConfigError(f"jpeg_differentiable needs image sides that are multiples of 16, got {h}x{w}")
        q = torch.full((x.shape[0],), float(self.quality), device=x.device, dtype=x.dtype)
        return kornia.enhance.jpeg_codec_differentiable(x, q).clamp(0, 1)

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        x = images.images
        out = self.apply(x) if len(x) else x.clone()
        return PurifierOutput(images.with_images(out), {"quality": self.quality, "codec": "kornia-differentiable"})
