"""Shared fixtures. Tests never touch a model hub: HF_HUB_OFFLINE is set before anything imports it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.types import ImageSet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def random_imageset(n: int = 3, size: int = 32, seed: int = 0, quantized: bool = True) -> ImageSet:
    """Smooth random images (more photo-like than white noise), 8-bit values like a PNG."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(size // 8, 1), max(size // 8, 1), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    s = ImageSet(x, tuple(f"img{i}" for i in range(n)), tuple(f"a photo number {i}" for i in range(n)))
    return s.quantized() if quantized else s


@pytest.fixture
def images() -> ImageSet:
    return random_imageset()


@pytest.fixture
def ctx():
    from harness.models import ModelSpec
    from harness.protocols import Context

    return Context(device="cpu", batch_size=2, model=ModelSpec(source="tiny-random", resolution=32))


@pytest.fixture(scope="session")
def tiny_upscaler_dir(tmp_path_factory) -> Path:
    """A tiny random SD-x4-upscaler-shaped pipeline saved with save_pretrained (built offline, once per session)."""
    from harness.tiny_random import save_tiny_random_upscaler

    return save_tiny_random_upscaler(tmp_path_factory.mktemp("tiny-x4-upscaler"))


@pytest.fixture()
def toy_world(monkeypatch):
    """Shrink the zoo's training sets (two artists, one image each per subject, one crop of one photo) so every
    training stage runs in seconds; returns ``harness.zoo.train``."""
    import harness.zoo.train as train

    original = train.world_data

    def small(artists, per_pair, crops_per_photo, seed, split="train", size=64, photos=None):
        return original(tuple(artists)[:2], 1, 1, seed, split, size, (photos or ("skimage/camera",))[:1])

    monkeypatch.setattr(train, "world_data", small)
    return train
