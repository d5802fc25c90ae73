"""Contracts for every Defense, Purifier and Metric config shipped under experiments/, and metric values."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from harness.metrics import PSNR, SSIM, L2Distance, LinfDistance
from harness.protocols import ConfigError, Context
from harness.run import CONFIG_DIR
from harness.seeding import make_generator
from harness.types import ImageSet
from tests.conftest import random_imageset

GROUP_DIR = Path(CONFIG_DIR)


def options(group):
    return sorted(p.stem for p in (GROUP_DIR / group).glob("*.yaml"))


EXTRA = {
    "dataset=folder": ["dataset.path=/nonexistent"],
    "model=local": ["model.source=/nonexistent"],
    "defense=external": ["defense.command='cp {input} {output}'"],
}


def compose_group(group, name, extra=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"{group}={name}", *EXTRA.get(f"{group}={name}", []), *extra])


@pytest.mark.parametrize("group", ["dataset", "model", "defense", "purifier", "mimic", "metrics", "runtime"])
def test_every_config_file_composes_and_instantiates(group):
    for name in options(group):
        cfg = compose_group(group, name)
        node = cfg[group]
        if group == "runtime":
            assert {"device", "batch_size", "cache_dir", "results_dir"} <= set(node)
        elif group == "metrics":
            for sub in node.values():
                assert instantiate(sub) is not None
        else:
            obj = instantiate(node, _convert_="all")
            assert hasattr(obj, "name") and (group == "model" or hasattr(obj, "version"))


def test_experiment_and_launcher_configs_compose():
    for name in options("experiment"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params is not None
    for launcher in ("joblib", "slurm", "local_processes"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        assert "_target_" in cfg.hydra.launcher


def _components(group):
    return [(name, instantiate(compose_group(group, name)[group], _convert_="all")) for name in options(group)]


#: overrides that make each defense fast enough for a contract test (tiny-random model, 32 px)
FAST = {
    "photoguard_encoder": ["defense.steps=3"],
    "photoguard_encoder_inpaint": ["defense.steps=3"],
    "photoguard_diffusion": ["defense.steps=2", "defense.grad_repeats=1", "defense.edit_steps=2"],
    "advdm": ["defense.steps=3"],
    "mist": ["defense.steps=3"],
    "sds": ["defense.steps=3"],
    "sds_plus": ["defense.steps=3"],
    "glaze_style": ["defense.steps=3", "defense.target_steps=5"],
    "aspl": ["defense.rounds=2", "defense.surrogate_steps=1", "defense.pgd_steps=2", "defense.prior_images=1"],
}


def _external_folder(tmp_path, clean):
    """A closed tool's output: the clean images plus +-3/255 noise, saved as PNG named like the ids."""
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    noisy = (clean.images + (torch.randint(-3, 4, clean.images.shape, generator=g) / 255)).clamp(0, 1)
    folder = tmp_path / "tool_output"
    folder.mkdir()
    for img, i in zip(noisy, clean.ids, strict=True):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("name", options("defense"))
def test_defense_contract(name, tmp_path):
    from harness.models import ModelSpec

    clean = random_imageset(3, 32)
    extra = list(FAST.get(name, []))
    if name == "external":
        extra = [f"defense.folder={_external_folder(tmp_path, clean)}", "defense.command=null"]
    defense = instantiate(compose_group("defense", name, extra)["defense"], _convert_="all")
    source = "tiny-random-inpaint" if "inpaint" in name else "tiny-random"
    ctx = Context(device="cpu", batch_size=2, model=ModelSpec(source=source, resolution=32))
    out = defense.protect(clean, make_generator(0), ctx)
    prot = out.images
    assert prot.images.shape == clean.images.shape and prot.images.dtype == torch.float32
    assert 0 <= prot.images.min() and prot.images.max() <= 1
    assert prot.ids == clean.ids and prot.captions == clean.captions
    assert all(isinstance(v, float) for v in out.info.values()), out.info
    q = prot.quantized()
    diff = q.images - clean.images
    if defense.eps is not None:
        assert diff.abs().max() <= defense.eps + 1 / 255 + 1e-6
    radius = getattr(defense, "l2_radius", lambda h, w: None)(32, 32)
    if radius is not None:  # L2 budget: quantization adds at most 0.5/255 per value
        assert diff.flatten(1).norm(dim=1).max() <= radius + (diff[0].numel() ** 0.5) * 0.5 / 255 + 1e-6
    again = defense.protect(clean, make_generator(0), ctx).images
    assert torch.equal(again.images, prot.images)
    if name != "none":  # every other defense has a non-zero budget by default
        assert not torch.equal(q.images, clean.images)


#: purifier configs whose weights are not available offline: override -> the fixture that provides its value
PURIFIER_FIXTURES = {
    "noisy_upscale_sd": {"purifier.upscaler_source": "tiny_upscaler_dir"},
}


@pytest.mark.parametrize("name", options("purifier"))
def test_purifier_contract(name, ctx, request):
    overrides = [f"{k}={request.getfixturevalue(f)}" for k, f in PURIFIER_FIXTURES.get(name, {}).items()]
    purifier = instantiate(compose_group("purifier", name, overrides)["purifier"], _convert_="all")
    x = random_imageset(3, 32)
    out = purifier.purify(x, make_generator(1), ctx)
    assert out.images.images.shape == x.images.shape and out.images.ids == x.ids
    assert 0 <= out.images.images.min() and out.images.images.max() <= 1
    assert torch.equal(purifier.purify(x, make_generator(1), ctx).images.images, out.images.images)
    assert isinstance(out.params, dict)
    if name == "none":
        assert torch.equal(out.images.images, x.images)


def test_jpeg_of_constant_image_is_the_image(ctx):
    from purifiers.jpeg import JPEG

    x = ImageSet(torch.full((2, 3, 32, 32), 128 / 255), ("a", "b"), ("", ""))
    assert torch.equal(JPEG(quality=75).purify(x, make_generator(0), ctx).images.images, x.images)
    with pytest.raises(ConfigError, match="purifier.quality"):
        JPEG(quality=0)


def test_noise_budget_out_of_range_is_refused():
    from defenses.noise import UniformNoise

    with pytest.raises(ConfigError, match="defense.eps"):
        UniformNoise(eps=1.5)


def test_metrics_match_scikit_image():
    a, b = random_imageset(3, 40, seed=1), random_imageset(3, 40, seed=2)
    psnr, ssim = PSNR()(a, b), SSIM()(a, b)
    for i in range(3):
        x = a.images[i].permute(1, 2, 0).double().numpy()
        y = b.images[i].permute(1, 2, 0).double().numpy()
        assert psnr[i] == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1), rel=1e-9)
        ref = structural_similarity(
            x, y, channel_axis=-1, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert ssim[i] == pytest.approx(ref, abs=1e-6)
    assert torch.allclose(SSIM()(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.equal(PSNR()(a, a), torch.full((3,), 100.0, dtype=torch.float64))


def test_distances_by_hand():
    x = torch.zeros(1, 3, 4, 4)
    y = x.clone()
    y[0, 1, 2, 3] = 0.5
    y[0, 0, 0, 0] = 0.25
    a, b = ImageSet(x, ("i",), ("",)), ImageSet(y, ("i",), ("",))
    assert float(LinfDistance()(a, b)[0]) == 0.5
    assert float(L2Distance()(a, b)[0]) == pytest.approx(np.sqrt(0.5**2 + 0.25**2))


def test_img2img_mimic_runs_and_shares_noise_per_id(ctx):
    from finetune.editing import Img2ImgEdit

    edit = Img2ImgEdit(strength=0.5, steps=4)
    x = random_imageset(3, 32)
    out = edit.run(x, make_generator(5), ctx)
    assert out.images.shape == x.images.shape and out.ids == x.ids
    # the same id gets the same noise whatever the batch composition
    single = edit.run(x.select([1]), make_generator(5), Context(device="cpu", batch_size=1, model=ctx.model))
    assert (single.images[0] - out.images[1]).abs().max() < 2 / 255
    with pytest.raises(ConfigError, match="mimic.strength"):
        Img2ImgEdit(strength=2)


def test_inpaint_mimic_keeps_the_unmasked_region_close_and_shares_noise_per_id():
    from finetune.editing import InpaintEdit
    from harness.masks import edit_mask
    from harness.models import ModelSpec

    ctx = Context(device="cpu", batch_size=2, model=ModelSpec(source="tiny-random-inpaint", resolution=32))
    edit = InpaintEdit(steps=3, mask="centre")
    x = random_imageset(3, 32)
    out = edit.run(x, make_generator(5), ctx)
    assert out.images.shape == x.images.shape and out.ids == x.ids
    assert 0 <= out.images.min() and out.images.max() <= 1
    single = edit.run(x.select([2]), make_generator(5), Context(device="cpu", batch_size=1, model=ctx.model))
    assert (single.images[0] - out.images[2]).abs().max() < 2 / 255
    assert edit_mask("centre", 32, 32).sum() == 16 * 16
    with pytest.raises(ConfigError, match="mimic.mask"):
        InpaintEdit(mask="left")


def test_lora_mimic_and_style_match_on_tiny_random(monkeypatch):
    from finetune.lora import LoraMimic
    from harness.metrics.clip import StyleMatch
    from harness.models import ModelSpec

    ctx = Context(device="cpu", batch_size=2, model=ModelSpec(source="tiny-random", resolution=32))
    mimic = LoraMimic(steps=2, batch_size=2, sample_steps=2)
    x = random_imageset(3, 32)
    out = mimic.run(x, make_generator(1), ctx)
    assert out.images.shape == x.images.shape and out.ids == x.ids and mimic.threat_model == "mimicry"
    assert torch.equal(mimic.run(x, make_generator(1), ctx).images, out.images)  # deterministic
    with pytest.raises(ConfigError, match="mimic.steps"):
        LoraMimic(steps=0)
    metric = StyleMatch()
    same = metric(x, x)
    assert same.tolist() == [1.0, 1.0, 1.0]  # an image always matches its own style
    assert metric.higher_is_better
    from harness.world import ProceduralArt

    a = ProceduralArt(artists=["cyanora"], subjects=["house", "boat"], size=64).load()
    b = ProceduralArt(artists=["impastel"], subjects=["house", "boat"], size=64).load()
    b = type(b)(b.images, a.ids, a.captions)
    assert metric(a, a).tolist() == [1.0, 1.0] and metric(b, a).tolist() == [0.0, 0.0]
