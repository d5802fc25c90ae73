"""Full-reference image similarity: PSNR and SSIM (PhotoGuard's Table 1 uses both)."""

from __future__ import annotations

import piq
import torch

from harness.protocols import ConfigError, Metric, check_range
from harness.types import ImageSet


class PSNR(Metric):
    """Peak signal-to-noise ratio in dB, data range 1, per image over all pixels and channels.

    Matches ``skimage.metrics.peak_signal_noise_ratio(x, y, data_range=1)``, except that identical images
    give ``max_db`` instead of +inf so that means and intervals stay finite.

    Args:
        max_db: value reported for identical images (and the cap for all images), default 100 dB.
    """

    name = "psnr"
    version = "1"
    higher_is_better = True

    def __init__(self, max_db: float = 100.0):
        self.max_db = check_range("metrics.psnr.max_db", max_db, 1.0, 1000.0)

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        mse = (outputs.images.double() - references.images.double()).pow(2).flatten(1).mean(dim=1)
        with torch.no_grad():
            psnr = 10.0 * torch.log10(1.0 / mse)
        return psnr.clamp(max=self.max_db).nan_to_num(self.max_db)


class SSIM(Metric):
    """Structural similarity (Wang et al. 2004), per image, averaged over RGB channels, via ``piq.ssim``.

    Gaussian window 11 x 11, sigma 1.5, K1 0.01, K2 0.03, data range 1, no downsampling; the same number as
    ``skimage.metrics.structural_similarity(x, y, channel_axis=-1, data_range=1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``. Images must be at least ``kernel_size`` pixels on each side.
    """

    name = "ssim"
    version = "1"
    higher_is_better = True

    def __init__(self, kernel_size: int = 11, kernel_sigma: float = 1.5):
        if int(kernel_size) != kernel_size or kernel_size < 3 or kernel_size % 2 == 0:
            raise ConfigError(f"metrics.ssim.kernel_size must be an odd integer >= 3, got {kernel_size!r}")
        self.kernel_size = int(kernel_size)
        self.kernel_sigma = check_range("metrics.ssim.kernel_sigma", kernel_sigma, 0.1, 10.0)

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        h, w = outputs.size
        if min(h, w) < self.kernel_size:
            raise ValueError(f"ssim needs images of at least {self.kernel_size} px a side, got {h} x {w}")
        return piq.ssim(
            outputs.images.double(),
            references.images.double(),
            kernel_size=self.kernel_size,
            kernel_sigma=self.kernel_sigma,
            data_range=1.0,
            reduction="none",
            downsample=False,
        )


class SSIMAtLeast(Metric):
    """1 where an image's SSIM (:class:`SSIM`) to its reference is at least ``threshold``, else 0: the fraction of
    images an attacker recovered (a yes/no judgement; its intervals use the Jeffreys-smoothed bootstrap).

    Args:
        threshold: in [0, 1].
    """

    name = "ssim_at_least"
    version = "1"
    higher_is_better = True
    binary = True

    def __init__(self, threshold: float = 0.5, kernel_size: int = 11, kernel_sigma: float = 1.5):
        self.threshold = check_range("metrics.ssim_at_least.threshold", threshold, 0.0, 1.0)
        self.ssim = SSIM(kernel_size, kernel_sigma)

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        return (self.ssim.per_image(outputs, references) >= self.threshold).double()


class VIFp(Metric):
    """Pixel-domain visual information fidelity (Sheikh & Bovik 2006), per image, via ``piq.vif_p``.

    PhotoGuard's Table 1 reports it between edits of immunized and clean images. ``references`` is the
    reference image (VIF is not symmetric). Images must be at least 41 px a side (piq's four scales).
    """

    name = "vifp"
    version = "1"
    higher_is_better = True

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        h, w = outputs.size
        if min(h, w) < 41:
            raise ValueError(f"vifp needs images of at least 41 px a side, got {h} x {w}")
        return piq.vif_p(outputs.images.double(), references.images.double(), data_range=1.0, reduction="none")


class FSIM(Metric):
    """Feature similarity (Zhang et al. 2011), chromatic FSIMc, per image, via ``piq.fsim`` (PhotoGuard's
    Table 1)."""

    name = "fsim"
    version = "1"
    higher_is_better = True

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        return piq.fsim(outputs.images.double(), references.images.double(), data_range=1.0, reduction="none")


class LPIPS(Metric):
    """Learned perceptual image patch similarity (Zhang et al., CVPR 2018), VGG-16 variant, via piq's
    ``ContentLoss`` with LPIPS's layer weights. Lower: more alike.

    Its two weight files cannot be downloaded here, so they are given as local paths:

    - ``vgg_weights``: torchvision's ImageNet VGG-16 state dict (``vgg16-397923af.pth``);
    - ``lpips_weights``: piq's LPIPS layer weights (``lpips_weights.pt`` from piq's v0.4.0 release), five
      tensors of shape (1, C, 1, 1) for relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    """

    name = "lpips"
    version = "1"
    higher_is_better = False

    LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

    def __init__(self, vgg_weights: str | None = None, lpips_weights: str | None = None):
        from pathlib import Path

        for option, value in (("vgg_weights", vgg_weights), ("lpips_weights", lpips_weights)):
            if not value or not Path(value).expanduser().is_file():
                raise ConfigError(
                    f"metrics.lpips.{option}: weights file not found ({value!r}). LPIPS needs torchvision's VGG-16 "
                    "ImageNet weights (vgg16-397923af.pth) and piq's lpips_weights.pt; download them on a machine "
                    "with network and give both paths"
                )
        self.vgg_weights = str(Path(vgg_weights).expanduser())
        self.lpips_weights = str(Path(lpips_weights).expanduser())
        self._loss = None

    def _model(self):
        if self._loss is None:
            import torchvision
            from piq.perceptual import VGG16_LAYERS, ContentLoss

            vgg = torchvision.models.vgg16(weights=None)
            vgg.load_state_dict(torch.load(self.vgg_weights, map_location="cpu"))
            weights = list(torch.load(self.lpips_weights, map_location="cpu"))
            if len(weights) != len(self.LAYERS):
                raise ConfigError(f"metrics.lpips.lpips_weights: expected 5 layer weights, got {len(weights)}")
            self._loss = ContentLoss(
                feature_extractor=vgg.features.eval(),
                layers=[VGG16_LAYERS[n] for n in self.LAYERS],
                weights=weights,
                distance="mse",
                reduction="none",
                normalize_features=True,
            )
        return self._loss

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        with torch.no_grad():
            return self._model()(outputs.images.float(), references.images.float()).double().flatten()


#: the differentiable perceptual distances a defense's or purifier's budget term may use (``perceptual``):
#: "stlpips" (ST-LPIPS, Ghildyal & Liu 2022: LPIPS on an anti-aliased VGG-16 with ImageNet features; the
#: published methods use LPIPS) and "ssim" (1 - SSIM, the stand-in of earlier versions of the harness).
PERCEPTUAL_DISTANCES: tuple[str, ...] = ("stlpips", "ssim")
#: how rows name each distance
PERCEPTUAL_LABELS = {"stlpips": "ST-LPIPS (VGG; the published LPIPS term)", "ssim": "1 - SSIM (LPIPS substitute)"}


def check_perceptual(option: str, kind: str) -> str:
    """``kind`` if it is one of :data:`PERCEPTUAL_DISTANCES`, else a ConfigError naming ``option``."""
    if kind not in PERCEPTUAL_DISTANCES:
        raise ConfigError(f"{option} must be one of {list(PERCEPTUAL_DISTANCES)}, got {kind!r}")
    return kind


def perceptual_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "ssim") -> torch.Tensor:
    """Differentiable perceptual distance per image between [0, 1] batches: ``kind`` "ssim" is 1 - SSIM (piq,
    11x11 Gaussian window; smaller images use a smaller window); "stlpips" is ST-LPIPS (the ``perceptual``
    extra's weight file; images of at least 32 px a side)."""
    if check_perceptual("perceptual", kind) == "stlpips":
        from harness.metrics.perceptual import load_stlpips_vgg, stlpips_distance

        net = load_stlpips_vgg().to(a.device)
        return stlpips_distance(net, b.clamp(0, 1).float(), a.clamp(0, 1).float()).to(a.dtype)
    k = 11 if min(a.shape[-2:]) >= 11 else (min(a.shape[-2:]) // 2) * 2 - 1
    s = piq.ssim(a.clamp(0, 1).float(), b.clamp(0, 1).float(), data_range=1.0, reduction="none", kernel_size=k)
    return 1.0 - s
