"""A user's images keep their resolution until a model needs another (issue 16, item 4): ``dataset.size=native``
loads a folder at the images' own side; model-free stages run there, model-based ones at the model's
resolution; comparisons bring the clean images to the other side's size; rows and reports say which size each
stage ran at."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import DataError, ImageFolder, native_side
from harness.protocols import ConfigError
from harness.types import ImageSet


def _save(folder, name, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)


def test_native_size_is_the_smallest_shorter_side_and_nothing_is_upscaled(tmp_path):
    _save(tmp_path, "a.png", 96, 96)
    _save(tmp_path, "b.png", 120, 80, seed=1)
    assert native_side([tmp_path / "a.png", tmp_path / "b.png"]) == 80
    images = ImageFolder(str(tmp_path), size="native").load()
    assert images.images.shape == (2, 3, 80, 80)
    # a folder of equal-sized images is loaded exactly as stored (no resampling)
    (tmp_path / "b.png").unlink()
    one = ImageFolder(str(tmp_path), size="native").load()
    stored = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png"), np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(one.images[0], stored)


def test_native_size_names_a_bad_option_or_file(tmp_path):
    with pytest.raises(ConfigError, match="dataset.size"):
        ImageFolder(str(tmp_path), size="natve")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolder(str(tmp_path), size="native").load()


def test_resized_is_identity_at_the_same_size_and_antialiased_otherwise():
    x = ImageSet(torch.rand(2, 3, 16, 16), ["a", "b"], ["", ""])
    assert x.resized(16) is x
    checker = ImageSet(
        ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2).float().expand(1, 3, 64, 64), ["c"], [""]
    )
    small = checker.resized(16)
    assert small.images.shape == (1, 3, 16, 16)
    assert float((small.images - 0.5).abs().max()) < 0.05  # the checkerboard averages out instead of aliasing


def test_model_free_stages_keep_the_native_size_and_model_based_ones_run_at_the_model_resolution(tmp_path):
    from defenses.noise import UniformNoise
    from finetune.editing import Img2ImgEdit
    from harness.cache import ArtifactStore
    from harness.metrics import PSNR
    from harness.models import ModelSpec
    from harness.pipeline import Experiment, run_experiment
    from harness.protocols import Context
    from harness.summary import sizes_line
    from purifiers.identity import NoPurifier
    from purifiers.impress import Impress

    for i in range(2):
        _save(tmp_path, f"img{i}.png", 48, 48, seed=i)
    spec = ModelSpec(source="tiny-random", resolution=32)
    ctx = Context(batch_size=2, model=spec)
    store = ArtifactStore(tmp_path / "cache")

    def experiment(purifier, name):
        return Experiment(
            dataset=ImageFolder(str(tmp_path), size="native"),
            defense=UniformNoise(0.03),
            purifier=purifier,
            mimic=Img2ImgEdit(steps=2),
            metrics={"psnr": PSNR()},
            model=spec,
            seed=0,
            configs={"dataset": {"size": "native"}, "defense": {"eps": 0.03}, "purifier": {"p": name}, "mimic": {}},
        )

    plain = run_experiment(experiment(NoPurifier(), "none"), store, ctx)
    assert plain.sizes == {"data": 48, "protect": 48, "purify": 48, "mimic": 32}
    # the noise budget is measured at the images' own size: the uniform noise's bound holds there
    assert max(plain.per_image["budget/linf"]) <= 0.03 + 1 / 255
    consistent = run_experiment(
        experiment(Impress(steps=1, initial_noise=0.0, perceptual="ssim"), "impress"), store, ctx
    )
    assert consistent.sizes == {"data": 48, "protect": 48, "purify": 32, "mimic": 32}
    assert len(consistent.per_image["purified/psnr"]) == 2  # compared with the clean images brought to 32 px
    rows = [
        {"sizes": plain.sizes, "labels": {"purifier": "none"}},
        {"sizes": consistent.sizes, "labels": {"purifier": "impress"}},
    ]
    line = sizes_line(rows)
    assert "data 48 px" in line and "purify 32 px (impress), 48 px (none)" in line and "mimic 32 px" in line
    assert sizes_line([{"labels": {}}]) is None  # rows from before sizes were recorded
