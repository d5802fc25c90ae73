import pytest
import torch

from harness.seeding import derive_seed, isolated_torch_rng, make_generator
from harness.types import ImageSet, ImageSetError
from tests.conftest import random_imageset


def test_imageset_validates_convention():
    x = torch.rand(2, 3, 8, 8)
    ImageSet(x, ("a", "b"), ("", ""))
    with pytest.raises(ImageSetError, match="shape"):
        ImageSet(torch.rand(2, 1, 8, 8), ("a", "b"), ("", ""))
    with pytest.raises(ImageSetError, match="float32"):
        ImageSet(x.double(), ("a", "b"), ("", ""))
    with pytest.raises(ImageSetError, match=r"\[0, 1\]"):
        ImageSet(x + 1, ("a", "b"), ("", ""))
    with pytest.raises(ImageSetError, match="unique"):
        ImageSet(x, ("a", "a"), ("", ""))
    with pytest.raises(ImageSetError, match="ids"):
        ImageSet(x, ("a",), ("", ""))
    with pytest.raises(ImageSetError, match="NaN"):
        ImageSet(torch.full((1, 3, 2, 2), float("nan")), ("a",), ("",))


def test_uint8_round_trip_is_exact_on_quantized_images():
    s = random_imageset(quantized=False)
    q = s.quantized()
    assert (q.images - s.images).abs().max() <= 0.5 / 255 + 1e-7
    assert torch.equal(q.quantized().images, q.images)
    assert q.ids == s.ids and q.captions == s.captions


def test_select_batches_concat():
    s = random_imageset(5)
    parts = [b for _, b in s.batches(2)]
    assert [len(p) for p in parts] == [2, 2, 1]
    assert torch.equal(ImageSet.concat(parts).images, s.images)
    assert s.select([3, 1]).ids == ("img3", "img1")


def test_derive_seed_is_stable_and_separates_stages():
    # fixed value: the derivation must never change, or every cache key would silently change
    assert derive_seed(0, "purify") == derive_seed(0, "purify")
    assert derive_seed(0, "purify") != derive_seed(0, "protect")
    assert derive_seed(0, "purify") != derive_seed(1, "purify")
    assert 0 <= derive_seed(123, "a", 4) < 2**63
    assert derive_seed(0, "protect") == 355171044343577672


def test_generators_are_cpu_and_reproducible():
    a = torch.rand(4, generator=make_generator(7))
    b = torch.rand(4, generator=make_generator(7))
    assert torch.equal(a, b)
    assert make_generator(7).device.type == "cpu"


def test_isolated_rng_leaves_global_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with isolated_torch_rng(5):
        torch.rand(10)
    assert torch.equal(torch.rand(3), expected)
