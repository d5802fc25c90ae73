"""Model-based purifiers on the shipped tiny-sd: they keep the image and remove a protection's structure."""

import pytest
import torch

from harness.protocols import Context
from harness.seeding import make_generator


@pytest.fixture(scope="module")
def ctx():
    from harness.models import ModelSpec

    return Context(device="cpu", batch_size=4, model=ModelSpec(source="tiny-sd", resolution=128))


@pytest.fixture(scope="module")
def photos():
    from harness.world import WorldPhotos

    return WorldPhotos(size=128).load().select(slice(0, 4))


def _psnr(a, b):
    return float((10 * torch.log10(1 / (a - b).pow(2).flatten(1).mean(1))).mean())


def test_diffpure_keeps_the_photo(ctx, photos):
    from purifiers.diffpure import DiffPure

    out = DiffPure(strength=0.1, steps=50).purify(photos, make_generator(0), ctx).images.images
    assert _psnr(out, photos.images) > 18  # the VAE alone reconstructs photos at about 26 dB
    stronger = DiffPure(strength=0.6, steps=50).purify(photos, make_generator(0), ctx).images.images
    assert _psnr(stronger, photos.images) < _psnr(out, photos.images)


def test_impress_lowers_its_consistency_loss(ctx, photos):
    from purifiers.impress import Impress

    out = Impress(steps=10, initial_noise=0.0).purify(photos, make_generator(0), ctx)
    assert out.params["objective_after"] < out.params["objective_before"]
    assert _psnr(out.images.images, photos.images) > 25


def test_gridpure_one_pass_keeps_the_photo(ctx, photos):
    from purifiers.gridpure import GrIDPure

    out = GrIDPure(passes=1, steps=50).purify(photos.select([0]), make_generator(0), ctx).images.images
    assert _psnr(out, photos.images[:1]) > 16
