"""Perceptual and style distances on the anti-aliased VGG-16 of ST-LPIPS: work on any art, not only the
embedded world's artists.

- :class:`STLPIPS`: the shift-tolerant LPIPS distance (Ghildyal & Liu, ECCV 2022), per image, output against
  the reference with the same id. Lower: more alike.
- :class:`StyleGramDistance`: a Gram-matrix style distance after Gatys et al. (CVPR 2016), per image.
- :class:`StyleGramSetDistance`: the same distance between the *mean* Gram matrices of two sets, so that
  generations can be compared with an artist's images that are not paired with them by id.

Weights: ``stlpips_pytorch/weights/vST0.0/vgg_shift_tolerant.pth`` from the ``stlpips-pytorch`` package (BSD-2),
installed by the ``perceptual`` extra (``pip install -e ".[perceptual]"``). The file holds the trunk's
convolutions and blur filters, the input scaling layer and the five LPIPS linear heads. The harness loads it
into its own definition of the network below and never imports the package's code (its anti-aliasing module
``models_lpf`` is licensed for non-commercial use only).

The network, as the weight file and the ST-LPIPS paper describe it: VGG-16 (configuration D: 2, 2, 3, 3, 3
3x3 convolutions with ReLU, 64-128-256-512-512 channels), where each 2x2 max-pool of stride 2 is replaced by
anti-aliased downsampling (Zhang, ICML 2019, "Making convolutional networks shift-invariant again"): a 2x2
max-pool of stride 1, then a depthwise normalised binomial blur of size k (k = 3 here: [1, 2, 1] x [1, 2, 1] / 16,
the size the file's filters have) applied with stride 2 after reflection padding of k - 1 pixels on each side.
Features are read after the last ReLU of each block: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

Input: images in [0, 1] are mapped to [-1, 1], then shifted and scaled per channel by the file's scaling layer
(an ImageNet mean/std normalisation expressed in [-1, 1] units). ST-LPIPS then, per block, divides each feature
vector by its L2 norm over channels (+1e-10), squares the difference of the two images' normalised features,
weights the channels with the block's linear head (1x1 convolution, no bias), averages over positions and sums
the five blocks.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.metrics.package_weights import STLPIPS_VGG, packaged_file
from harness.protocols import ConfigError, Metric, SetMetric, check_int
from harness.types import ImageSet

__all__ = [
    "LAYERS",
    "AntiAliasedVGG16",
    "BlurDownsample",
    "STLPIPS",
    "StyleGramDistance",
    "StyleGramSetDistance",
    "GRAM_NORMALISATIONS",
    "gram_distance",
    "gram_matrix",
    "load_stlpips_vgg",
]

LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
#: (channels, convolutions) of VGG-16's five blocks
_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
#: smallest side the five blocks accept (the reflection padding of the last downsampling needs 3 px)
MIN_SIZE = 32


def binomial_filter(size: int) -> torch.Tensor:
    """The normalised 2-D binomial filter of side ``size`` (outer product of a row of Pascal's triangle)."""
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float32)
    kernel = row[:, None] * row[None, :]
    return kernel / kernel.sum()


class BlurDownsample(nn.Module):
    """Anti-aliased stride-2 downsampling: reflection padding of ``size - 1`` px per side, then a depthwise
    normalised binomial blur of side ``size`` with stride 2."""

    def __init__(self, channels: int, size: int = 3):
        super().__init__()
        self.size = size
        self.register_buffer("kernel", binomial_filter(size).expand(channels, 1, size, size).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.size - 1
        return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), self.kernel, stride=2, groups=x.shape[1])


class AntiAliasedVGG16(nn.Module):
    """VGG-16's convolutional trunk with anti-aliased downsampling (see the module docstring), returning the
    features after each block. ``forward`` takes images in [0, 1]."""

    def __init__(self, blur_size: int = 3):
        super().__init__()
        blocks, cin = [], 3
        for i, (cout, n_conv) in enumerate(_BLOCKS):
            mods: list[nn.Module] = []
            if i > 0:
                mods += [nn.MaxPool2d(kernel_size=2, stride=1), BlurDownsample(cin, blur_size)]
            for _ in range(n_conv):
                mods += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU()]
                cin = cout
            blocks.append(nn.Sequential(*mods))
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("shift", torch.zeros(1, 3, 1, 1))
        self.register_buffer("scale", torch.ones(1, 3, 1, 1))
        #: LPIPS linear heads, (1, C, 1, 1) per block (non-negative weights)
        self.heads = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1), requires_grad=False) for c, _ in _BLOCKS])

    def convs(self) -> list[list[nn.Conv2d]]:
        return [[m for m in block if isinstance(m, nn.Conv2d)] for block in self.blocks]

    def forward(self, images: torch.Tensor, n_blocks: int = 5) -> list[torch.Tensor]:
        h, w = images.shape[-2:]
        if min(h, w) < MIN_SIZE:
            raise ValueError(f"the anti-aliased VGG-16 needs images of at least {MIN_SIZE} px a side, got {h} x {w}")
        x = (images.float() * 2 - 1 - self.shift) / self.scale
        out = []
        for block in self.blocks[:n_blocks]:
            x = block(x)
            out.append(x)
        return out


_KEY = re.compile(r"^net\.slice(\d)\.(\d+)\.(weight|bias|filt)$")


def _load_state(net: AntiAliasedVGG16, state: dict[str, torch.Tensor], path: Path) -> AntiAliasedVGG16:
    """Copy the ST-LPIPS state dict (its own key names) into ``net``; every tensor must be used and fit."""
    convs: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    filters: dict[int, torch.Tensor] = {}
    used = set()
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            continue
        block, index, kind = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
        if kind == "filt":
            filters[block] = value
        else:
            convs.setdefault(block, {}).setdefault(index, {})[kind] = value
        used.add(key)
    bad = f"{path} is not the ST-LPIPS VGG-16 weight file"
    for block, layers in zip(range(5), net.convs(), strict=True):
        stored = [convs.get(block, {})[i] for i in sorted(convs.get(block, {}))]
        if len(stored) != len(layers):
            raise ConfigError(f"{bad}: block {block + 1} has {len(stored)} convolutions, expected {len(layers)}")
        for conv, tensors in zip(layers, stored, strict=True):
            if tensors["weight"].shape != conv.weight.shape or tensors["bias"].shape != conv.bias.shape:
                raise ConfigError(f"{bad}: convolution of shape {tuple(tensors['weight'].shape)} in block {block + 1}")
            conv.weight.data.copy_(tensors["weight"])
            conv.bias.data.copy_(tensors["bias"])
        if block > 0:  # the blur filter: its size is read from the file and its values must be the binomial ones
            blur = next(m for m in net.blocks[block] if isinstance(m, BlurDownsample))
            stored_filter = filters.get(block)
            if stored_filter is None or stored_filter.shape != blur.kernel.shape:
                raise ConfigError(f"{bad}: blur filter of block {block + 1} missing or of another size")
            if not torch.allclose(stored_filter, blur.kernel, atol=1e-6):
                raise ConfigError(f"{bad}: the blur filter of block {block + 1} is not the binomial filter")
    for name in ("shift", "scale"):
        key = f"scaling_layer.{name}"
        getattr(net, name).copy_(state[key].view(1, 3, 1, 1))
        used.add(key)
    for i, head in enumerate(net.heads):
        key = f"lin{i}.model.1.weight"
        if key not in state or state[key].shape != head.shape:
            raise ConfigError(f"{bad}: linear head {key} missing or of another shape")
        head.data.copy_(state[key])
        used.add(key)
    if set(state) - used:
        raise ConfigError(f"{bad}: unexpected tensors {sorted(set(state) - used)}")
    return net.eval().requires_grad_(False)


_LOCK = threading.Lock()
_NETS: dict[str, AntiAliasedVGG16] = {}


def load_stlpips_vgg(weights: str | Path | None = None) -> AntiAliasedVGG16:
    """The anti-aliased VGG-16 with ST-LPIPS's weights (memoized per file), on the CPU, in eval mode.

    Args:
        weights: the weight file; None: the one the ``stlpips-pytorch`` package installed.

    Raises:
        ModelNotFoundError: no weights; the message names the extra to install.
    """
    path = packaged_file(STLPIPS_VGG, str(weights) if weights else None, "metrics.stlpips")
    with _LOCK:
        key = str(path.resolve())
        if key not in _NETS:
            state = torch.load(path, map_location="cpu", weights_only=True)
            filt = [v for k, v in state.items() if k.endswith(".filt")]
            blur_size = int(filt[0].shape[-1]) if filt else 3
            _NETS[key] = _load_state(AntiAliasedVGG16(blur_size=blur_size), state, path)
        return _NETS[key]


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def stlpips_distance(net: AntiAliasedVGG16, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ST-LPIPS distance (N,) between image batches ``x`` and ``y`` (N, 3, H, W) in [0, 1].

    When only ``x`` needs gradients (a loss toward a fixed target), ``y``'s features are computed without
    building a graph; the values are the same."""
    n = x.shape[0]
    if x.requires_grad and not y.requires_grad:
        fx = net(x)
        with torch.no_grad():
            fy = net(y)
    else:
        feats = net(torch.cat([x, y]))
        fx, fy = [f[:n] for f in feats], [f[n:] for f in feats]
    total = torch.zeros(n, dtype=torch.float64, device=x.device)
    for a, b, head in zip(fx, fy, net.heads, strict=True):
        diff = (_unit(a) - _unit(b)).pow(2)
        total += F.conv2d(diff, head).mean(dim=(1, 2, 3)).double()
    return total


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Normalised Gram matrices (N, C, C) of feature maps (N, C, H, W): ``F F^T / (H W)`` in float64, the mean
    over positions of the outer product of the feature vector with itself."""
    f = features.double().flatten(2)
    return f @ f.transpose(1, 2) / f.shape[-1]


#: how :func:`gram_distance` compares two Gram matrices of a layer
GRAM_NORMALISATIONS = ("energy", "gatys")


def gram_distance(
    gx: Sequence[torch.Tensor], gy: Sequence[torch.Tensor], normalisation: str = "energy"
) -> torch.Tensor:
    """Distance between Gram matrices, summed over layers; (N,) for per-image Grams (N, C, C).

    - ``"energy"`` (default): ``sum_l |G_l(x) - G_l(y)|_F^2 / (|G_l(x)|_F^2 + |G_l(y)|_F^2)``; each layer's term
      lies in [0, 2], so every layer counts whatever the scale of its activations.
    - ``"gatys"``: ``sum_l mean_ij (G_l(x) - G_l(y))_ij^2``, Gatys et al.'s style loss (their eq. 4-5) times 4
      with equal layer weights of 1; dominated by the layers with the largest activations (relu4_3 here).
    """
    if normalisation not in GRAM_NORMALISATIONS:
        raise ConfigError(f"gram normalisation must be one of {list(GRAM_NORMALISATIONS)}, got {normalisation!r}")
    total = 0
    for a, b in zip(gx, gy, strict=True):
        if normalisation == "gatys":
            total = total + (a - b).pow(2).mean(dim=(-2, -1))
        else:
            energy = a.pow(2).sum(dim=(-2, -1)) + b.pow(2).sum(dim=(-2, -1))
            total = total + (a - b).pow(2).sum(dim=(-2, -1)) / energy.clamp_min(1e-30)
    return total


class _VGGMetric:
    """Shared options of the metrics on the anti-aliased VGG-16: weight file and batch size."""

    def _setup(self, option: str, weights: str | None, batch_size: int) -> None:
        self.weights = str(packaged_file(STLPIPS_VGG, weights, f"metrics.{option}"))
        self.batch_size = check_int(f"metrics.{option}.batch_size", batch_size, 1)

    def net(self) -> AntiAliasedVGG16:
        return load_stlpips_vgg(self.weights)

    def _batches(self, images: torch.Tensor):
        for i in range(0, images.shape[0], self.batch_size):
            yield images[i : i + self.batch_size]


def _check_layers(option: str, layers: Sequence[str]) -> tuple[str, ...]:
    layers = tuple(layers)
    unknown = [name for name in layers if name not in LAYERS]
    if not layers or unknown:
        raise ConfigError(f"metrics.{option}.layers must be a non-empty subset of {list(LAYERS)}, got {list(layers)}")
    return layers


def _check_normalisation(option: str, normalisation: str) -> str:
    if normalisation not in GRAM_NORMALISATIONS:
        raise ConfigError(
            f"metrics.{option}.normalisation must be one of {list(GRAM_NORMALISATIONS)}, got {normalisation!r}"
        )
    return normalisation


class _GramFeatures(_VGGMetric):
    """Gram matrices of the trunk's features; the options of both Gram distances (validated under their name)."""

    layers: tuple[str, ...]

    def __init__(
        self,
        layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
        normalisation: str = "energy",
        weights: str | None = None,
        batch_size: int = 8,
    ):
        self.layers = _check_layers(self.name, layers)
        self.normalisation = _check_normalisation(self.name, normalisation)
        self._setup(self.name, weights, batch_size)

    def grams(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-image Gram matrices, one (N, C, C) tensor per configured layer."""
        idx = [LAYERS.index(name) for name in self.layers]
        out: list[list[torch.Tensor]] = [[] for _ in idx]
        with torch.no_grad():
            for batch in self._batches(images):
                feats = self.net()(batch, n_blocks=max(idx) + 1)
                for j, i in enumerate(idx):
                    out[j].append(gram_matrix(feats[i]))
        return [torch.cat(g) for g in out]


class STLPIPS(_VGGMetric, Metric):
    """Shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022), VGG variant, between each output and the reference
    with the same id. 0 for identical images; lower: more alike; tolerant of small shifts, unlike LPIPS.

    Args:
        weights: the ST-LPIPS VGG weight file (None: the ``stlpips-pytorch`` package's, extra ``perceptual``).
        batch_size: image pairs per forward pass (does not change the values).
    """

    name = "stlpips"
    version = "1"
    higher_is_better = False

    def __init__(self, weights: str | None = None, batch_size: int = 8):
        self._setup("stlpips", weights, batch_size)

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        net, out = self.net(), []
        with torch.no_grad():
            for i in range(0, len(outputs), self.batch_size):
                sl = slice(i, i + self.batch_size)
                out.append(stlpips_distance(net, outputs.images[sl], references.images[sl]))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class StyleGramDistance(_GramFeatures, Metric):
    """Gram-matrix style distance (Gatys et al., CVPR 2016) between each output and the reference with the
    same id, on the anti-aliased VGG-16's features. Per layer l the normalised Gram matrix is
    ``G_l = F_l F_l^T / M_l`` (C x C, ``M_l`` positions: the mean outer product of the feature vectors); the
    distance sums over layers the squared difference of the two images' Grams, normalised per layer by their
    energy (``normalisation="energy"``, see :func:`gram_distance`; each layer's term in [0, 2]) or as in Gatys
    et al. (``"gatys"``: the mean squared difference). Gram matrices discard where things are, so the distance
    measures texture and colour statistics (style), not layout. 0 for the same image; lower: closer style.

    On the embedded world (64 px, 13 artists, 6 subjects, two renderings) an image is closer to another
    rendering of its artist than to another artist's image of the same subject in 95.6% of pairs with
    ``energy`` and 79.6% with ``gatys`` (which relu4_3 dominates), layers relu1_2 to relu4_3.

    Args:
        layers: feature layers (default relu1_2 to relu4_3).
        normalisation: ``"energy"`` (default) or ``"gatys"``.
        weights, batch_size: as for :class:`STLPIPS`.
    """

    name = "style_gram_distance"
    version = "1"
    higher_is_better = False

    def per_image(self, outputs: ImageSet, references: ImageSet) -> torch.Tensor:
        if len(outputs) == 0:
            return torch.zeros(0, dtype=torch.float64)
        return gram_distance(self.grams(outputs.images), self.grams(references.images), self.normalisation)


class StyleGramSetDistance(_GramFeatures, SetMetric):
    """Gram-matrix style distance between two *sets*: the distance of :class:`StyleGramDistance` between the
    mean Gram matrix of the outputs and the mean Gram matrix of the references, layer by layer. The sets need
    not be paired (e.g. generations against an artist's held-out works) nor of equal size or image size.
    Lower: the outputs share the references' style statistics. NaN for an empty set.

    Args: as for :class:`StyleGramDistance`.
    """

    name = "style_gram_set_distance"
    version = "1"
    higher_is_better = False

    def value(self, outputs: ImageSet, references: ImageSet) -> float:
        if len(outputs) == 0 or len(references) == 0:
            return float("nan")
        gx = [g.mean(0, keepdim=True) for g in self.grams(outputs.images)]
        gy = [g.mean(0, keepdim=True) for g in self.grams(references.images)]
        return float(gram_distance(gx, gy, self.normalisation)[0])
