"""Reference autoencoders that the embedded world's cards compare with, read from a folder the user names.

The project ships no reference weights and never loads these by a default path: ``python -m harness.zoo
evaluate --taef2 DIR`` measures the reference row that the ``tiny-vae`` card shows, and the tests that use
it skip when the folder is absent.

TAEF2 (Ollin Boer Bohan's tiny autoencoder for FLUX.2's latent space, MIT licence, weight files
``taef2_encoder.pth`` and ``taef2_decoder.pth``) is a real pretrained autoencoder small enough for a CPU.
Its network, as the weight files and the TAESD family's description give it (an architecture is a fact;
the definition below is the harness's own): 64 channels throughout, 8x downsampling, 32 latent channels.

- A *block* is three 3x3 convolutions with ReLU between them plus the identity, then ReLU. The blocks of
  the lowest resolution (the encoder's last three, the decoder's first three) first add a gated term:
  1x1 convolution to 256 channels, GroupNorm with 4 groups, ReLU, 1x1 convolution back to 64.
- Encoder: 3x3 conv to 64, one block; then three times a stride-2 3x3 conv (no bias) and three blocks;
  a 3x3 conv to the 32 latent channels. It takes images in [0, 1].
- Decoder: ``3 tanh(z / 3)``, 3x3 conv to 64, ReLU, three blocks; then three times a nearest 2x upsample,
  a 3x3 conv (no bias) and three blocks (the last stage: one block); a 3x3 conv to RGB, read in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness.errors import ModelNotFoundError

__all__ = ["TAEF2_FILES", "load_taef2"]

#: the files a TAEF2 folder must hold
TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")
_WIDTH, _LATENT = 64, 32
#: TAEF2's latent channels (FLUX.2's), at 8x downsampling
LATENT_CHANNELS = _LATENT


def _conv(cin: int, cout: int, **kw: object) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class _Block(nn.Module):
    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        c = _WIDTH
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
            if gated
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class _SoftClamp(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(z / 3)


def _encoder() -> nn.Sequential:
    c = _WIDTH
    layers: list[nn.Module] = [_conv(3, c), _Block()]
    for level in range(3):
        layers += [_conv(c, c, stride=2, bias=False), *(_Block(gated=level == 2) for _ in range(3))]
    return nn.Sequential(*layers, _conv(c, _LATENT))


def _decoder() -> nn.Sequential:
    c = _WIDTH
    layers: list[nn.Module] = [_SoftClamp(), _conv(_LATENT, c), nn.ReLU(), *(_Block(gated=True) for _ in range(3))]
    for level in range(3):
        layers += [
            nn.Upsample(scale_factor=2),
            _conv(c, c, bias=False),
            *(_Block() for _ in range(3 if level < 2 else 1)),
        ]
    return nn.Sequential(*layers, _conv(c, 3))


class TAEF2(nn.Module):
    """The loaded reference: ``encode`` ([0, 1] images -> (N, 32, H/8, W/8) latents) and ``decode`` (-> [0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = _encoder(), _decoder()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).clamp(0, 1)


def load_taef2(folder: str | Path) -> TAEF2:
    """TAEF2 from ``folder`` (holding :data:`TAEF2_FILES`), in eval mode with frozen weights.

    Raises:
        ModelNotFoundError: a file is missing, or does not fit the network (the message names it).
    """
    folder = Path(folder)
    model = TAEF2()
    for part, file in zip((model.encoder, model.decoder), TAEF2_FILES, strict=True):
        path = folder / file
        if not path.is_file():
            raise ModelNotFoundError(f"TAEF2 reference: {path} does not exist (a TAEF2 folder holds {TAEF2_FILES})")
        try:
            part.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelNotFoundError(f"TAEF2 reference: {path} is not a TAEF2 weight file: {e}") from e
    return model.eval().requires_grad_(False)
