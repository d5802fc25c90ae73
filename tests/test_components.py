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
    "photoguard_diffusion_inpaint": ["defense.steps=2", "defense.grad_repeats=1", "defense.edit_steps=2"],
    "advdm": ["defense.steps=3"],
    "mist": ["defense.steps=3"],
    "sds": ["defense.steps=3"],
    "sds_plus": ["defense.steps=3"],
    "glaze_style": ["defense.steps=3", "defense.target_steps=5"],
    "aspl": ["defense.rounds=2", "defense.surrogate_steps=1", "defense.pgd_steps=2", "defense.prior_images=1"],
    # the contract's 3 images: an inside-dataset encoding can mix at most 3 private images
    "instahide": ["defense.k=3", "defense.encodings_per_image=2"],
    "nightshade": ["defense.steps=3", "defense.anchor_steps=2"],
    # the contract's random images are not the embedded world's artworks: the target images are generated
    "dirty_label": ["defense.images=model", "defense.steps=2"],
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


def test_every_iterative_defense_has_fast_test_settings():
    """A new defense config with published iteration counts must get FAST settings, or its contract test
    would run the published budget (minutes to hours on CPU)."""
    for name in options("defense"):
        node = compose_group("defense", name)["defense"]
        heavy = any(int(node.get(k) or 0) > 10 for k in ("steps", "rounds", "grad_repeats"))
        assert not heavy or name in FAST, f"add defense {name!r} to FAST"


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
    if defense.changes_layout:  # instance encodings: a new set of images at the same size, deterministic
        assert prot.size == clean.size and len(prot) >= 1 and prot.images.dtype == torch.float32
        assert 0 <= prot.images.min() and prot.images.max() <= 1 and not set(prot.ids) & set(clean.ids)
        assert all(isinstance(v, float) for v in out.info.values()) and defense.budget is None
        assert torch.equal(defense.protect(clean, make_generator(0), ctx).images.images, prot.images)
        return
    assert prot.images.shape == clean.images.shape and prot.images.dtype == torch.float32
    assert 0 <= prot.images.min() and prot.images.max() <= 1
    assert prot.ids == clean.ids and prot.captions == clean.captions
    for k, v in out.info.items():  # numbers; an objective's per-image values: lists of floats, one per image
        if k.endswith("_per_image"):
            assert set(v) == {"clean", "noise", "protected"} and all(len(x) == len(clean) for x in v.values()), k
            assert all(isinstance(x, float) for xs in v.values() for x in xs), k
        else:
            assert isinstance(v, float), (k, v)
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


#: overrides that make each purifier fast enough for a contract test (tiny-random model, 32 px)
FAST_PURIFIERS = {
    "diffpure": ["purifier.steps=20"],
    "gridpure": ["purifier.passes=1", "purifier.steps=20"],
    "impress": ["purifier.steps=3"],
}
#: purifier configs whose weights are not available offline: override -> the fixture that provides its value
PURIFIER_FIXTURES = {
    "noisy_upscale_sd": {"purifier.upscaler_source": "tiny_upscaler_dir"},
}


@pytest.mark.parametrize("name", options("purifier"))
def test_purifier_contract(name, ctx, request):
    overrides = [f"{k}={request.getfixturevalue(f)}" for k, f in PURIFIER_FIXTURES.get(name, {}).items()]
    overrides += FAST_PURIFIERS.get(name, [])
    purifier = instantiate(compose_group("purifier", name, overrides)["purifier"], _convert_="all")
    x = random_imageset(3, 32)
    out = purifier.purify(x, make_generator(1), ctx)
    assert out.images.images.shape == x.images.shape and out.images.ids == x.ids
    assert out.images.captions == x.captions and out.images.images.dtype == torch.float32
    assert 0 <= out.images.images.min() and out.images.images.max() <= 1
    assert torch.equal(purifier.purify(x, make_generator(1), ctx).images.images, out.images.images)
    assert isinstance(out.params, dict)
    assert isinstance(purifier.randomized, bool)
    if purifier.randomized:  # another generator, another draw
        other = purifier.purify(x, make_generator(2), ctx).images.images
        assert not torch.equal(other, out.images.images)
    if name == "none":
        assert torch.equal(out.images.images, x.images)
    if getattr(purifier, "uses_model", False):
        return  # a tiny-random model's autoencoder does not reconstruct; see tests/test_purifiers_tiny_sd.py
    # every model-free purifier keeps each image's content: closer to its own input than to another image
    d_own = (out.images.images - x.images).abs().mean()
    d_other = (out.images.images - x.images.roll(1, 0)).abs().mean()
    assert d_own < d_other, (d_own, d_other)


def test_identity_settings_are_identities(ctx):
    from purifiers.blur import GaussianBlur
    from purifiers.crop_flip import CropFlip
    from purifiers.gaussian_noise import GaussianNoise
    from purifiers.resize import Resize

    x = random_imageset(2, 32)
    for p in (GaussianNoise(sigma=0), Resize(factor=1.0), GaussianBlur(sigma=0), CropFlip(scale=1.0, flip_p=0)):
        assert torch.allclose(p.purify(x, make_generator(0), ctx).images.images, x.images, atol=1e-6), p.name


def test_blur_and_resize_match_hand_computations(ctx):
    from scipy.ndimage import gaussian_filter

    from purifiers.blur import GaussianBlur
    from purifiers.resize import Resize

    x = random_imageset(1, 32)
    got = GaussianBlur(sigma=1.0).purify(x, make_generator(0), ctx).images.images[0].numpy()
    ref = np.stack([gaussian_filter(c, sigma=1.0, mode="reflect", truncate=3.0) for c in x.images[0].numpy()])
    assert np.abs(got - ref)[:, 4:-4, 4:-4].max() < 2e-3  # interior: border conventions differ by half a pixel
    const = ImageSet(torch.full((1, 3, 32, 32), 0.3), ("c",), ("",))
    assert torch.allclose(Resize(0.5).purify(const, make_generator(0), ctx).images.images, const.images, atol=1e-6)


def test_gaussian_noise_statistics(ctx):
    from purifiers.gaussian_noise import GaussianNoise

    x = ImageSet(torch.full((4, 3, 32, 32), 0.5), tuple("abcd"), ("",) * 4)
    out = GaussianNoise(sigma=0.05).purify(x, make_generator(0), ctx)
    d = out.images.images - 0.5
    assert abs(float(d.std()) - 0.05) < 0.003 and abs(float(d.mean())) < 0.003
    # per-image noise: the same id gets the same noise in any batch
    one = GaussianNoise(sigma=0.05).purify(x.select([2]), make_generator(0), ctx).images.images
    assert torch.equal(one[0], out.images.images[2])


def test_differentiable_jpeg_surrogate_has_gradients_and_tracks_the_codec(ctx):
    from purifiers.jpeg import JPEG, DifferentiableJPEG

    x = random_imageset(2, 32)
    t = x.images.clone().requires_grad_(True)
    y = DifferentiableJPEG(quality=75).apply(t)
    (g,) = torch.autograd.grad(y.sum(), t)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    real = JPEG(quality=75, subsampling="4:2:0").purify(x, make_generator(0), ctx).images.images
    assert (y.detach() - real).abs().mean() < 0.02


def test_chain_applies_steps_in_order(ctx):
    from purifiers.chain import Chain
    from purifiers.jpeg import JPEG
    from purifiers.resize import Resize

    x = random_imageset(2, 32)
    chain = Chain([Resize(0.5), JPEG(quality=50)])
    by_hand = JPEG(quality=50).purify(Resize(0.5).purify(x, make_generator(0), ctx).images, make_generator(0), ctx)
    out = chain.purify(x, make_generator(0), ctx)
    assert torch.equal(out.images.images, by_hand.images.images)
    assert [p["purifier"] for p in out.params["chain"]] == ["resize", "jpeg"]
    assert "resize@1" in chain.version
    with pytest.raises(ConfigError, match="purifier.steps"):
        Chain([])


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


@pytest.mark.parametrize("name", ["dreambooth_lora", "full_finetune"])
def test_finetune_recipes_run_are_deterministic_and_change_the_model(name):
    from finetune.full import FullFinetuneMimic
    from finetune.generate import generate_per_image
    from finetune.lora import DreamBoothLoraMimic
    from harness.models import ModelSpec, load_pipeline

    spec = ModelSpec(source="tiny-random", resolution=32)
    ctx = Context(device="cpu", batch_size=2, model=spec)
    fast = {"steps": 3, "batch_size": 2, "sample_steps": 2}
    mimic = DreamBoothLoraMimic(class_images=2, **fast) if name == "dreambooth_lora" else FullFinetuneMimic(**fast)
    x = random_imageset(2, 32)
    out = mimic.run(x, make_generator(4), ctx)
    assert out.images.shape == x.images.shape and out.ids == x.ids and mimic.threat_model == "mimicry"
    assert torch.equal(mimic.run(x, make_generator(4), ctx).images, out.images)
    prompts = [getattr(mimic, "generation_prompt", None) or c for c in x.captions]
    base = generate_per_image(load_pipeline(spec, "text2img"), x, prompts, 4, 2, mimic.guidance_scale, ctx, "base")
    assert not torch.equal(base.images, out.images)  # the finetune changed the model
    with pytest.raises(ConfigError, match="mimic.steps"):
        type(mimic)(steps=0)


def test_full_finetune_optimizer_option():
    import importlib.util

    from finetune.full import FullFinetuneMimic
    from finetune.training import make_optimizer

    with pytest.raises(ConfigError, match="mimic.optimizer"):
        FullFinetuneMimic(optimizer="sgd")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="bitsandbytes"):
            make_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-3)
