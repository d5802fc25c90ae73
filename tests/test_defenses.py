"""The PGD engine checked against hand-computable optima, and each defense's behaviour beyond the contract."""

import logging
import sys

import pytest
import torch

from defenses.external import ExternalDefense
from harness.data import DataError
from harness.masks import edit_mask
from harness.pgd import PGDSettings, objective_report, run_pgd
from harness.protocols import ConfigError, Context
from harness.seeding import make_generator
from tests.conftest import random_imageset

CPU = Context(device="cpu", batch_size=2)


def _distance_to(target):
    def objective(x, draws):
        return (x - target.to(x.device)[: len(x)]).pow(2).flatten(1).sum(dim=1)

    return objective


def test_linf_pgd_reaches_the_projected_optimum():
    # min ||x + d - t||^2 s.t. |d| <= eps has the optimum clip(t, x - eps, x + eps): sign steps with a decaying
    # step reach it to within the last few step sizes
    x = random_imageset(2, 16).images
    t = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    eps = 8 / 255
    s = PGDSettings(eps=eps, steps=60, step_size=2 / 255, schedule="linear", final_step_fraction=0.01)
    res = run_pgd(x, ["a", "b"], _distance_to(t), s, make_generator(0), CPU, measure=True)
    best = torch.maximum(torch.minimum(t, x + eps), x - eps).clamp(0, 1)
    assert (res.images - best).abs().max() < 0.1 / 255
    assert (res.images - x).abs().max() <= eps + 1e-6
    assert float(res.objective_after.sum()) < float(res.objective_before.sum())


def test_l2_pgd_stays_in_the_ball_and_moves_toward_the_target():
    x = torch.full((1, 3, 8, 8), 0.5)
    t = torch.full((1, 3, 8, 8), 0.9)
    s = PGDSettings(eps=1.0, steps=30, step_size=0.2, norm="l2", random_start=False)
    res = run_pgd(x, ["a"], _distance_to(t), s, make_generator(0), CPU)
    d = res.images - x
    assert d.flatten(1).norm(dim=1).item() == pytest.approx(1.0, abs=1e-4)
    # the optimum in the ball is x + eps * (t - x)/||t - x||: every pixel moves by 1/sqrt(192)
    assert torch.allclose(d, torch.full_like(d, 1 / 192**0.5), atol=2e-3)


def test_adam_update_and_mask():
    x = random_imageset(2, 16).images
    t = torch.zeros_like(x)
    mask = edit_mask("centre", 16, 16, 0.5)
    s = PGDSettings(eps=0.1, steps=20, step_size=0.01, update="adam", random_start=True)
    res = run_pgd(x, ["a", "b"], _distance_to(t), s, make_generator(0), CPU, mask=mask)
    d = res.images - x
    assert d[..., mask[0, 0] == 0].abs().max() == 0  # nothing changes outside the mask
    assert d[..., mask[0, 0] == 1].mean() < -0.05  # inside, pixels move toward the target 0


def test_result_does_not_depend_on_batch_size_or_neighbours():
    x = random_imageset(3, 16).images
    ids = ["a", "b", "c"]

    def noisy_objective(xb, draws):  # uses per-image random draws, like the diffusion losses
        n = draws.randn(3, 16, 16)
        return (xb - n.sigmoid()).pow(2).flatten(1).sum(dim=1)

    s = PGDSettings(eps=0.05, steps=5, step_size=0.01, eot_samples=2)
    full = run_pgd(x, ids, noisy_objective, s, make_generator(3), Context(batch_size=3)).images
    ones = run_pgd(x, ids, noisy_objective, s, make_generator(3), Context(batch_size=1)).images
    alone = run_pgd(x[1:2], ids[1:2], noisy_objective, s, make_generator(3), Context(batch_size=1)).images
    assert torch.allclose(full, ones, atol=1e-6)
    assert torch.allclose(full[1:2], alone, atol=1e-6)


def test_vanishing_gradient_is_reported(caplog):
    x = random_imageset(2, 8).images

    def flat(xb, draws):
        return (xb * 0).flatten(1).sum(dim=1)

    with caplog.at_level(logging.WARNING):
        res = run_pgd(x, ["a", "b"], flat, PGDSettings(eps=0.1, steps=2, step_size=0.01), make_generator(0), CPU)
    assert res.vanished.all()
    assert "gradient was exactly zero" in caplog.text


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"eps": 1.5}, "defense.eps"),
        ({"eps": -0.1}, "defense.eps"),
        ({"norm": "l1"}, "defense.norm"),
        ({"update": "momentum"}, "defense.update"),
        ({"schedule": "step"}, "defense.schedule"),
        ({"steps": -1}, "defense.steps"),
        ({"eot_samples": 0}, "defense.eot_samples"),
    ],
)
def test_settings_errors_name_the_option(kwargs, option):
    base = {"eps": 0.03, "steps": 1, "step_size": 0.01}
    with pytest.raises(ConfigError, match=option):
        PGDSettings(**{**base, **kwargs})


def test_out_of_range_budgets_of_defenses_are_refused():
    from defenses.advdm import AdvDM
    from defenses.aspl import ASPL
    from defenses.glaze import StyleCloak
    from defenses.photoguard import PhotoGuardEncoder
    from defenses.sds import SDSProtection

    for cls in (PhotoGuardEncoder, AdvDM, SDSProtection, StyleCloak, ASPL):
        with pytest.raises(ConfigError, match="defense.eps"):
            cls(eps=2.0)
    with pytest.raises(ConfigError, match="defense.mode"):
        AdvDM(mode="stylish")
    with pytest.raises(ConfigError, match="defense.variant"):
        PhotoGuardEncoder(variant="outpaint")


def test_linear_schedule_by_hand():
    s = PGDSettings(eps=0.1, steps=5, step_size=0.01, schedule="linear", final_step_fraction=0.01)
    assert [round(s.step_at(k), 6) for k in range(5)] == [0.01, 0.007525, 0.00505, 0.002575, 0.0001]


def test_objective_report_compares_with_noise_of_the_same_budget():
    x = random_imageset(2, 16).images
    t = torch.zeros_like(x)
    s = PGDSettings(eps=0.05, steps=10, step_size=0.01)
    res = run_pgd(x, ["a", "b"], _distance_to(t), s, make_generator(0), CPU)
    info = objective_report(_distance_to(t), x, res.images, ["a", "b"], s, 7, CPU, name="dist")
    assert info["dist_protected"] < info["dist_clean"]
    assert abs(info["dist_noise"] - info["dist_clean"]) < info["dist_clean"] - info["dist_protected"]
    assert info["dist_direction"] == -1.0


# ------------------------------------------------------------------------------------------------ external


def _save_pngs(folder, images, ids):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for img, i in zip(images, ids, strict=True):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")


def test_external_folder_is_matched_by_id_and_missing_files_are_named(tmp_path):
    clean = random_imageset(3, 32)
    shifted = (clean.images + 2 / 255).clamp(0, 1)
    _save_pngs(tmp_path / "out", shifted.flip(0), list(reversed(clean.ids)))  # written in another order
    d = ExternalDefense(folder=str(tmp_path / "out"))
    out = d.protect(clean, make_generator(0), CPU).images
    assert torch.allclose(out.images, shifted, atol=0.5 / 255)
    token = d.cache_token()
    (tmp_path / "out" / "img1.png").unlink()
    assert d.cache_token() != token  # new files, new cache key
    with pytest.raises(DataError, match="img1"):
        d.protect(clean, make_generator(0), CPU)


def test_external_command_runs_per_image(tmp_path):
    script = tmp_path / "darken.py"
    script.write_text(
        "import sys\nfrom PIL import Image, ImageEnhance\n"
        "Image.open(sys.argv[1]).point(lambda v: max(v - 3, 0)).save(sys.argv[2])\n"
    )
    clean = random_imageset(2, 32)
    d = ExternalDefense(command=f"{sys.executable} {script} {{input}} {{output}}", tool="darken")
    out = d.protect(clean, make_generator(0), CPU).images
    expected = (clean.images - 3 / 255).clamp(0, 1)
    assert torch.allclose(out.images, expected, atol=0.5 / 255)
    bad = ExternalDefense(command=f"{sys.executable} -c 'import sys; sys.exit(3)' {{input}} {{output}}")
    with pytest.raises(DataError, match="exit 3"):
        bad.protect(clean, make_generator(0), CPU)


def test_external_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        ExternalDefense()
    with pytest.raises(ConfigError, match="not a folder"):
        ExternalDefense(folder=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="placeholders"):
        ExternalDefense(command="tool --in x")


# ------------------------------------------------------------------------------- on the shipped tiny-sd


@pytest.fixture(scope="module")
def tiny_sd_ctx():
    from harness.models import ModelSpec

    return Context(device="cpu", batch_size=4, model=ModelSpec(source="tiny-sd", resolution=128))


def test_photoguard_encoder_beats_noise_on_tiny_sd(tiny_sd_ctx):
    from defenses.photoguard import PhotoGuardEncoder
    from harness.world import WorldPhotos

    photos = WorldPhotos(size=128).load().select(slice(0, 4))
    out = PhotoGuardEncoder(steps=40).protect(photos, make_generator(0), tiny_sd_ctx)
    info = out.info
    gain = info["latent_distance_clean"] - info["latent_distance_protected"]
    noise_gain = info["latent_distance_clean"] - info["latent_distance_noise"]
    assert gain > 5 * max(noise_gain, 0.1), info


def test_advdm_raises_the_diffusion_loss_more_than_noise_on_tiny_sd(tiny_sd_ctx):
    from defenses.advdm import AdvDM
    from harness.world import ProceduralArt

    art = ProceduralArt(artists=["cyanora"], subjects=["house", "tree"], per_pair=2, size=128).load()
    info = AdvDM(steps=15).protect(art, make_generator(0), tiny_sd_ctx).info
    assert info["semantic_loss_protected"] - info["semantic_loss_clean"] > 2 * abs(
        info["semantic_loss_noise"] - info["semantic_loss_clean"]
    ), info
