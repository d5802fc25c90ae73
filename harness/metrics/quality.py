"""Quality measures that see artifacts a style judge overlooks.

Hönig et al. (2024) judged robust mimicry by style *and* quality: a generation in the right style but covered
in noise or broken shapes is not a successful mimic. A style classifier (tiny-clip's zero-shot judge, the Gram
distance) can score such an output as a match, so the mimicry measures need one that sees the artifacts.

- :class:`NoiseExcess`: how much noisier each output is than its reference, as the difference of their noise
  levels estimated by Donoho and Johnstone's wavelet estimator: the median absolute value of the finest
  diagonal wavelet coefficients over 0.6745 (the median of |N(0, 1)|), per channel, averaged over channels.
  The wavelet is Haar's (``(a - b - c + d) / 2`` per 2 x 2 block: orthonormal, so white noise of standard
  deviation sigma gives coefficients of standard deviation sigma); scikit-image's ``estimate_sigma`` uses
  Daubechies-2 and needs PyWavelets.
  The estimator reads the finest scale, where adversarial noise (Mist's and AdvDM's textures) and the
  speckle a mimic learns from it sit; comparing with the reference subtracts what the artist's own texture
  contributes. 0: as clean as the reference; lower is better for the attacker.
"""

from __future__ import annotations

import torch

from harness.protocols import Metric
from harness.types import ImageSet

__all__ = ["NoiseExcess", "noise_level"]


#: the median of |N(0, 1)|: MAD / this estimates a Gaussian's standard deviation
MAD_TO_SIGMA = 0.6744897501960817


def noise_level(images: torch.Tensor) -> torch.Tensor:
    """The wavelet noise-level estimate (in [0, 1] pixel units) of each image (N, C, H, W), float64 (N,)."""
    x = images.detach().to("cpu", torch.float64)
    h, w = (x.shape[-2] // 2) * 2, (x.shape[-1] // 2) * 2
    x = x[..., :h, :w]
    hh = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return (hh.abs().flatten(2).median(dim=2).values / MAD_TO_SIGMA).mean(dim=1)


class NoiseExcess(Metric):
    """The output's estimated noise level minus its reference's (see the module docstring). Lower is better
    for the attacker: a mimic whose outputs carry noise its references do not has a quality problem."""

    name = "noise_excess"
    version = "1"
    higher_is_better = False

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        return noise_level(outputs.images) - noise_level(references.images)
