"""Metrics against hand computations and invariants."""

import numpy as np
import pytest
import torch
from scipy import linalg

from harness.metrics import FSIM, VIFp
from harness.metrics.clip import ClipImageSimilarity, ClipPromptSimilarity
from harness.metrics.distribution import FID, KID, Precision, extract_features
from harness.protocols import ConfigError
from harness.types import ImageSet
from harness.world import ProceduralArt
from tests.conftest import random_imageset


def _art(artist, n_subjects=4, seed=0):
    return ProceduralArt(artists=[artist], per_pair=1, size=64, seed=seed).load().select(slice(0, n_subjects))


def test_vifp_and_fsim_are_one_on_identical_images_and_lower_otherwise():
    a, b = random_imageset(2, 48, seed=1), random_imageset(2, 48, seed=2)
    b = ImageSet(b.images, a.ids, a.captions)
    for m in (VIFp(), FSIM()):
        assert torch.allclose(m(a, a), torch.ones(2, dtype=torch.float64), atol=1e-4), m.name
        assert (m(b, a) < 0.9).all(), m.name


def test_fid_matches_a_hand_computation_and_is_zero_for_identical_sets():
    # FID needs more images than the features have dimensions (tiny-clip: 128): 13 renderings x 10 subjects
    x = ProceduralArt(artists=["cyanora"], per_pair=13, size=64, seed=0).load()
    y = ProceduralArt(artists=["impastel"], per_pair=13, size=64, seed=0).load()
    assert len(x) == 130 and extract_features(x.images[:1]).shape[1] == 128
    fx, fy = extract_features(x.images).numpy(), extract_features(y.images).numpy()
    mu1, mu2 = fx.mean(0), fy.mean(0)
    s1, s2 = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    by_hand = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    y_ids = ImageSet(y.images, x.ids, x.captions)
    assert FID().value(y_ids, x) == pytest.approx(by_hand, rel=0.02, abs=1e-3)
    assert abs(FID().value(x, x)) < 1e-3
    # on 10 images FID refuses (NaN); unbiased KID of a set with itself is only about 0
    x10, y10 = x.select(slice(0, 10)), y_ids.select(slice(0, 10))
    assert np.isnan(FID().value(y10, x10))
    assert KID().value(y10, x10) > 10 * abs(KID().value(x10, x10))
    with pytest.raises(ConfigError, match="weights"):
        FID(features="inception").value(x, x)


def test_precision_matches_a_hand_computation_of_the_k_nn_balls():
    # more images than tiny-clip's 128 feature dimensions: 13 renderings x 10 subjects per artist
    x = ProceduralArt(artists=["cyanora"], per_pair=13, size=64, seed=0).load()
    y = ImageSet(ProceduralArt(artists=["impastel"], per_pair=13, size=64, seed=0).load().images, x.ids, x.captions)
    mixed = ImageSet(torch.cat([x.images[:65], y.images[65:]]), x.ids, x.captions)
    fr, fo = extract_features(x.images).double(), extract_features(mixed.images).double()
    d_rr = torch.cdist(fr, fr)
    radius = d_rr.sort(dim=1).values[:, 3]  # k = 3 (column 0 is the point itself)
    by_hand = (torch.cdist(fr, fo) <= radius[:, None]).any(dim=0).double().mean().item()
    assert Precision().value(mixed, x) == pytest.approx(by_hand)
    assert Precision().value(x, x) == 1.0
    assert Precision().value(y, x) < 0.5  # another artist lies mostly outside cyanora's manifold
    x10 = x.select(slice(0, 10))
    assert np.isnan(Precision().value(x10, x10))  # 10 images in 128 dimensions: refused
    with pytest.raises(ConfigError, match="nearest_k"):
        Precision(nearest_k=0)
    assert np.isnan(Precision(nearest_k=70).value(x, x))  # 130 images < 2k + 1: refused


def test_clip_similarities_prefer_the_right_prompt_and_artist():
    x = _art("cyanora")
    other = ImageSet(_art("neonika").images, x.ids, x.captions)
    same = ImageSet(_art("cyanora", seed=5).images, x.ids, x.captions)
    right = ClipPromptSimilarity()(x, x)  # each image against its own caption
    wrong = ClipPromptSimilarity(prompt="a boat in the style of neonika")(x, x)
    assert (right > wrong).all()
    sim = ClipImageSimilarity()
    assert sim(same, x).mean() > sim(other, x).mean() + 0.1


def test_set_metrics_reach_rows_and_tables(tmp_path):
    from defenses.noise import UniformNoise
    from finetune.editing import Img2ImgEdit
    from harness.cache import ArtifactStore
    from harness.metrics import PSNR
    from harness.models import ModelSpec
    from harness.pipeline import Experiment, run_experiment
    from harness.protocols import Context
    from harness.summary import summarize
    from purifiers.identity import NoPurifier

    class Data:
        name, version = "random", "1"

        def load(self):
            return random_imageset(3, 32)

    spec = ModelSpec(source="tiny-random", resolution=32)
    exp = Experiment(
        dataset=Data(),
        defense=UniformNoise(0.03),
        purifier=NoPurifier(),
        mimic=Img2ImgEdit(steps=2),
        metrics={"psnr": PSNR(), "kid": KID()},
        model=spec,
        seed=0,
        configs={"dataset": {}, "defense": {"eps": 0.03}, "purifier": {}, "mimic": {"steps": 2}, "metrics": {"k": 1}},
    )
    result = run_experiment(exp, ArtifactStore(tmp_path), Context(batch_size=2, model=spec))
    assert set(result.per_set) == {"editing/kid"} and "editing/kid" not in result.per_image
    assert result.metrics["editing/kid"] == result.per_set["editing/kid"]
    row = {
        "labels": {"defense": "noise"},
        "seed": 0,
        "image_ids": result.image_ids,
        "per_image": result.per_image,
        "set_metrics": result.per_set,
        "higher_is_better": result.higher_is_better,
    }
    table, higher = summarize([row])
    assert table["editing/kid mean"].iloc[0] == pytest.approx(result.per_set["editing/kid"])
    assert higher["editing/kid"] is False


def test_lpips_needs_local_weights_and_is_zero_on_identical_images(tmp_path):
    import torchvision

    from harness.metrics import LPIPS

    with pytest.raises(ConfigError, match="vgg_weights"):
        LPIPS(vgg_weights=str(tmp_path / "missing.pth"), lpips_weights=str(tmp_path / "missing.pt"))
    # random stand-ins for the two files (the real ones cannot be downloaded here): checks the wiring
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path / "vgg.pth")
    torch.save([torch.rand(1, c, 1, 1) for c in (64, 128, 256, 512, 512)], tmp_path / "lpips.pt")
    metric = LPIPS(vgg_weights=str(tmp_path / "vgg.pth"), lpips_weights=str(tmp_path / "lpips.pt"))
    a, b = random_imageset(2, 32, seed=1), random_imageset(2, 32, seed=2)
    b = ImageSet(b.images, a.ids, a.captions)
    assert torch.allclose(metric(a, a), torch.zeros(2, dtype=torch.float64), atol=1e-7)
    assert (metric(b, a) > 0).all() and not metric.higher_is_better


def test_noise_excess_is_the_wavelet_noise_level_difference_and_sees_added_noise():
    from harness.metrics.quality import NoiseExcess, noise_level

    # white Gaussian noise of known sigma on a flat image: the estimator recovers sigma
    g = torch.Generator().manual_seed(0)
    flat = torch.full((2, 3, 128, 128), 0.5) + 0.04 * torch.randn(2, 3, 128, 128, generator=g)
    assert torch.allclose(noise_level(flat), torch.full((2,), 0.04, dtype=torch.float64), rtol=0.05)
    # by hand on a 2 x 2 image: one diagonal coefficient per channel
    tiny = torch.tensor([[[0.1, 0.3], [0.2, 0.9]]]).expand(1, 3, 2, 2)
    assert float(noise_level(tiny)[0]) == pytest.approx(abs(0.1 - 0.3 - 0.2 + 0.9) / 2 / 0.6744897501960817)

    art = ProceduralArt(artists=["cyanora", "aquarela"], per_pair=1, size=64).load().select(slice(0, 4))
    metric = NoiseExcess()
    assert torch.allclose(metric(art, art), torch.zeros(4, dtype=torch.float64))
    noisy = art.with_images(art.images + 0.05 * torch.randn(art.images.shape, generator=g))
    excess = metric(noisy, art)
    assert (excess > 0.03).all() and (excess < 0.06).all()  # most of the 0.05 (clipping to [0, 1] removes some)
    # another clean render of the same artists is not mistaken for noise
    other = ProceduralArt(artists=["cyanora", "aquarela"], per_pair=1, size=64, seed=7).load().select(slice(0, 4))
    assert float(metric(ImageSet(other.images, art.ids, art.captions), art).abs().max()) < 0.5 * float(excess.min())


def test_ssim_at_least_is_the_thresholded_ssim_against_scikit_image():
    from skimage.metrics import structural_similarity

    from harness.metrics import SSIMAtLeast

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(6, 3, 16, 16, generator=g)
    noise = torch.linspace(0.02, 0.6, 6).view(6, 1, 1, 1) * torch.randn(6, 3, 16, 16, generator=g)
    out = (ref + noise).clamp(0, 1)
    ids = tuple(f"i{j}" for j in range(6))
    a, b = ImageSet(out, ids, ("",) * 6), ImageSet(ref, ids, ("",) * 6)
    expect = [
        structural_similarity(
            o.permute(1, 2, 0).numpy(),
            r.permute(1, 2, 0).numpy(),
            channel_axis=2,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        >= 0.5
        for o, r in zip(out, ref, strict=True)
    ]
    got = SSIMAtLeast(0.5)(a, b).tolist()
    assert got == [float(e) for e in expect] and 0 < sum(got) < 6 and SSIMAtLeast.binary
    with pytest.raises(ConfigError, match="threshold"):
        SSIMAtLeast(1.5)
