"""Distribution distances between two image sets: FID and KID with a pluggable feature extractor.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) compare feature statistics of two sets. The numbers
depend entirely on the feature extractor:

- ``features: tiny-clip`` (the embedded default): the shipped tiny-clip image tower. Call these "FID-tiny-clip":
  they are comparable only with each other, never with published FID.
- ``features: inception`` with ``weights``: torchvision's Inception-v3 pool features (2048-d) from a weights
  file the user supplies (``inception_v3_google-*.pth``); closer to, but not bit-identical with, the
  TF-Inception FID of the papers.

``Precision`` is the improved precision of Kynkäänniemi et al. 2019 (PhotoGuard's Table 1 "PR"): the
fraction of outputs that fall inside the k-nearest-neighbour balls of the references' features.

All are set-level: :class:`SetMetric` returns one number per run (the tables aggregate over seeds).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from harness.protocols import ConfigError, SetMetric
from harness.types import ImageSet

__all__ = ["FID", "KID", "Precision", "extract_features"]

EXTRACTORS = ("tiny-clip", "inception")
_INCEPTION: dict[str, torch.nn.Module] = {}


def _inception(weights: str) -> torch.nn.Module:
    if weights not in _INCEPTION:
        import torchvision

        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"metrics: Inception weights not found at {path}; download torchvision's inception_v3 weights "
                "(inception_v3_google-*.pth) on a machine with network and set metrics.<name>.weights to the file"
            )
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        net.load_state_dict(torch.load(path, map_location="cpu"))
        net.fc = torch.nn.Identity()
        _INCEPTION[weights] = net.eval()
    return _INCEPTION[weights]


def extract_features(images: torch.Tensor, features: str = "tiny-clip", weights: str | None = None) -> torch.Tensor:
    """(N, D) float64 features of images (N, 3, H, W) in [0, 1]."""
    if features == "tiny-clip":
        from harness.metrics.clip import load_clip

        return load_clip("tiny-clip").encode_images(images).double()
    if features == "inception":
        if not weights:
            raise ConfigError("metrics: features=inception needs weights=<path to inception_v3 weights file>")
        net = _inception(weights)
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            return net((x - mean) / std).double()
    raise ConfigError(f"metrics: features must be one of {list(EXTRACTORS)}, got {features!r}")


class FID(SetMetric):
    """Fréchet distance between Gaussian fits of the two sets' features (piq). Lower: the outputs are
    distributed like the references."""

    name = "fid"
    version = "1"
    higher_is_better = False

    def __init__(self, features: str = "tiny-clip", weights: str | None = None):
        if features not in EXTRACTORS:
            raise ConfigError(f"metrics.fid.features must be one of {list(EXTRACTORS)}, got {features!r}")
        self.features, self.weights = features, weights

    def value(self, outputs: ImageSet, references: ImageSet) -> float:
        import piq

        fx = extract_features(outputs.images, self.features, self.weights)
        fy = extract_features(references.images, self.features, self.weights)
        return float(piq.FID().compute_metric(fx, fy))


class KID(SetMetric):
    """Kernel inception distance (cubic polynomial kernel MMD, unbiased; piq) on the same features. Lower is
    closer. Usable with small sets, unlike FID."""

    name = "kid"
    version = "1"
    higher_is_better = False

    def __init__(self, features: str = "tiny-clip", weights: str | None = None):
        if features not in EXTRACTORS:
            raise ConfigError(f"metrics.kid.features must be one of {list(EXTRACTORS)}, got {features!r}")
        self.features, self.weights = features, weights

    def value(self, outputs: ImageSet, references: ImageSet) -> float:
        import piq

        fx = extract_features(outputs.images, self.features, self.weights)
        fy = extract_features(references.images, self.features, self.weights)
        n = min(len(fx), len(fy))
        return float(piq.KID(subset_size=n, n_subsets=50).compute_metric(fx, fy))


class Precision(SetMetric):
    """Improved precision (Kynkäänniemi et al. 2019; piq): the fraction of outputs whose features lie within
    the distance of some reference's k-th nearest reference neighbour. 1: every output looks like a reference
    (for an edit of a protected image, like an edit of the clean one). ``nearest_k`` 3 as in the paper; it
    must be smaller than the number of references."""

    name = "precision"
    version = "1"
    higher_is_better = True

    def __init__(self, features: str = "tiny-clip", weights: str | None = None, nearest_k: int = 3):
        if features not in EXTRACTORS:
            raise ConfigError(f"metrics.precision.features must be one of {list(EXTRACTORS)}, got {features!r}")
        if isinstance(nearest_k, bool) or not isinstance(nearest_k, int) or nearest_k < 1:
            raise ConfigError(f"metrics.precision.nearest_k must be a positive integer, got {nearest_k!r}")
        self.features, self.weights, self.nearest_k = features, weights, nearest_k

    def value(self, outputs: ImageSet, references: ImageSet) -> float:
        import piq

        if len(references) <= self.nearest_k:
            raise ConfigError(
                f"metrics.precision.nearest_k={self.nearest_k} needs more than {self.nearest_k} reference images, "
                f"got {len(references)}"
            )
        fx = extract_features(outputs.images, self.features, self.weights)
        fy = extract_features(references.images, self.features, self.weights)
        precision, _ = piq.PR(nearest_k=self.nearest_k).compute_metric(fy, fx)
        return float(precision)
