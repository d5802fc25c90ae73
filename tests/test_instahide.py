"""InstaHide's encoding (defenses/instahide.py): the mixing weights as released, the encodings as the formula
says, per-image determinism, and the k = 1 case (the image up to sign)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import ConfigError
from harness.instance_encoding import encode, mixing_weights


def _images(n: int, side: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_weights_sum_to_one_within_the_published_bounds():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        w = mixing_weights(6, gen, max_weight=0.65, private_slots=2, min_private_share=0.3)
        assert abs(float(w.sum()) - 1) < 1e-6 and float(w.max()) <= 0.65 + 1e-7 and float(w[:2].sum()) >= 0.3 - 1e-7
        assert bool((w >= 0).all())
    with pytest.raises(ConfigError, match="max_weight"):
        mixing_weights(2, gen, max_weight=0.4)


@pytest.mark.parametrize("cross", [False, True])
def test_each_encoding_is_its_sign_mask_times_the_weighted_mix(cross):
    private, public = _images(5), _images(7, seed=1)
    enc = encode(
        private,
        [f"p{i}" for i in range(5)],
        seed=3,
        k=4,
        encodings_per_image=3,
        public=public if cross else None,
        private_slots=2,
    )
    assert enc.images.shape == (15, 3, 8, 8) and enc.members.shape == (15, 4)
    assert enc.owner.tolist() == [i for i in range(5) for _ in range(3)]
    for m in range(15):
        parts = [private[c] * 2 - 1 if c >= 0 else public[-1 - c] * 2 - 1 for c in enc.members[m].tolist()]
        mix = sum(w * p for w, p in zip(enc.weights[m], parts, strict=True))
        assert torch.allclose(enc.images[m], enc.signs[m] * mix, atol=1e-6)
        row = enc.members[m].tolist()
        assert row[0] == enc.owner[m] and row[0] not in row[1:]  # slot 0 is the owner, not repeated
        privates = [c for c in row if c >= 0]
        assert len(privates) == (2 if cross else 4) and len(set(privates)) == len(privates)
    assert set(enc.signs.unique().tolist()) == {-1.0, 1.0}
    assert float(enc.images.abs().max()) <= 1.0


def test_encodings_are_seeded_per_image_and_ignore_the_set_order():
    private, ids = _images(4), ["a", "b", "c", "d"]
    first = encode(private, ids, seed=1, k=2, encodings_per_image=2)
    again = encode(private, ids, seed=1, k=2, encodings_per_image=2)
    assert torch.equal(first.images, again.images)
    order = [2, 0, 3, 1]
    shuffled = encode(private[order], [ids[i] for i in order], seed=1, k=2, encodings_per_image=2)
    for pos, i in enumerate(order):  # image i sits at position pos in the shuffled set
        assert torch.equal(shuffled.images[2 * pos : 2 * pos + 2], first.images[2 * i : 2 * i + 2])
    other_seed = encode(private, ids, seed=2, k=2, encodings_per_image=2)
    assert not torch.equal(first.images, other_seed.images)


def test_k_one_is_the_image_up_to_sign():
    private = _images(3)
    enc = encode(private, ["x", "y", "z"], seed=0, k=1, encodings_per_image=2)
    assert torch.allclose(enc.images.abs(), (private * 2 - 1).abs().repeat_interleave(2, 0), atol=1e-6)
    assert torch.equal(enc.weights, torch.ones(6, 1))


def test_bad_settings_name_the_option():
    with pytest.raises(ConfigError, match="defense.k"):
        encode(_images(2), ["a", "b"], seed=0, k=4)  # 4 private images per encoding, 2 exist
    with pytest.raises(ConfigError, match="defense.public"):
        encode(_images(2), ["a", "b"], seed=0, k=4, public=_images(0))


def _matched_ssim(recon: torch.Tensor, private: torch.Tensor) -> float:
    from harness.metrics import SSIM
    from harness.threat_models.privacy import match_to_references, recoverable
    from harness.types import ImageSet

    n = len(private)
    refs = recoverable(ImageSet(private, tuple(f"p{i}" for i in range(n)), ("",) * n))
    out = ImageSet(recon, tuple(f"r{i}" for i in range(len(recon))), ("",) * len(recon))
    return float(SSIM()(match_to_references(out, refs), refs).mean())


def test_k1_encodings_give_back_each_image_up_to_sign():
    """k = 1: every encoding is the image times a sign mask; the attack returns |2p - 1| exactly."""
    from finetune.reconstruction import reconstruct

    private = _images(4, side=16)
    enc = encode(private, [f"p{i}" for i in range(4)], seed=0, k=1, encodings_per_image=5)
    recon, labels = reconstruct(enc.images, 4, k=1, iterations=50)
    assert sorted(np.bincount(labels).tolist()) == [5, 5, 5, 5]  # each group is one image's encodings
    target = (2 * private - 1).abs()
    for g in range(4):
        owner = int(enc.owner[labels == g][0])
        assert torch.allclose(recon[g], target[owner], atol=1e-5)


def test_hand_built_k2_case_with_disjoint_images_is_recovered():
    """k = 2 on images that are mid-grey (0 after 2p - 1) outside their own quadrant: |l_a x_a + l_b x_b| =
    l_a |x_a| + l_b |x_b| exactly, so the attack's model holds and each image must come back."""
    from finetune.reconstruction import reconstruct

    side, n = 16, 4
    private = torch.full((n, 3, side, side), 0.5)
    gen = torch.Generator().manual_seed(1)
    for i in range(n):
        r, c = divmod(i, 2)
        patch = torch.rand(3, side // 2, side // 2, generator=gen)
        private[i, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = torch.where(patch > 0.5, 0.95, 0.05)
    enc = encode(private, [f"p{i}" for i in range(n)], seed=0, k=2, encodings_per_image=12)
    recon, _ = reconstruct(enc.images, n, k=2, iterations=300)
    assert _matched_ssim(recon, private) > 0.9
    assert _matched_ssim(enc.images.abs()[:n], private) < 0.6  # raw encodings are not the images


def test_matching_finds_a_permutation_and_scores_a_missing_reconstruction_as_blank():
    from harness.threat_models.privacy import match_to_references
    from harness.types import ImageSet

    refs = ImageSet(_images(5, side=16), tuple(f"p{i}" for i in range(5)), ("",) * 5)
    perm = [3, 0, 4, 1, 2]
    out = ImageSet(refs.images[perm], tuple(f"r{i}" for i in range(5)), ("",) * 5)
    matched = match_to_references(out, refs)
    assert matched.ids == refs.ids and torch.equal(matched.images, refs.images)
    fewer = match_to_references(out.select([0, 1]), refs)
    assert int((fewer.images.flatten(1).abs().sum(1) == 0).sum()) == 3


def test_public_parameters_round_trip_through_the_caption():
    from harness.threat_models.privacy import describe_encodings, read_encodings_caption

    params = {"private_images": 8, "k": 4, "private_per_encoding": 4, "encodings_per_image": 30}
    assert read_encodings_caption(describe_encodings(**params)) == params
    assert read_encodings_caption("a photo of a cat") is None


def test_instahide_defense_hides_the_owner_in_order_and_ids():
    from defenses.instahide import InstaHide
    from harness.protocols import Context
    from harness.seeding import make_generator
    from harness.threat_models.privacy import read_encodings_caption
    from harness.types import ImageSet

    clean = ImageSet(_images(4), tuple(f"p{i}" for i in range(4)), ("",) * 4)
    out = InstaHide(k=2, encodings_per_image=3).protect(clean, make_generator(7), Context())
    assert len(out.images) == 12 and out.images.ids[0] == "enc00000"
    assert read_encodings_caption(out.images.captions[0])["private_images"] == 4
    enc = encode(clean.images, clean.ids, 7, k=2, encodings_per_image=3)
    stored = out.images.images * 2 - 1
    assert not torch.allclose(stored, enc.images)  # shuffled: not grouped by owner
    assert torch.allclose(stored.abs().sum(), enc.images.abs().sum(), rtol=1e-5)
    with pytest.raises(ConfigError, match="defense.encodings_per_image"):
        InstaHide(encodings_per_image=0)


def test_privacy_run_end_to_end_between_its_controls(tmp_path):
    """The pipeline with a defense that changes the layout: the clean control recovers everything, the floor
    (public images) little, and k = 2 encodings of 8 photos lie in between; a second run computes nothing."""
    from harness.run import compose_config, run_from_config

    common = [
        "dataset=private_photos",
        "dataset.size=32",
        "~model",
        "defense=instahide",
        "defense.k=2",
        "defense.encodings_per_image=6",
        "mimic=instahide_reconstruction",
        "mimic.refine_iterations=50",
        "metrics=privacy",
        "purifier=none",
        f"runtime.results_dir={tmp_path / 'res'}",
        f"runtime.cache_dir={tmp_path / 'cache'}",
        "runtime.progress=false",
    ]
    values = {}
    for control in ("null", "clean", "floor"):
        cfg, choices = compose_config([*common, f"control={control}"])
        row = run_from_config(cfg, choices=choices, overrides=common)
        values[control] = row["metrics"]["privacy/ssim"]
        assert "budget/linf" not in row["metrics"] or control != "null"
    assert values["clean"] > 0.999 and values["floor"] < values["null"] < values["clean"]
    cfg, choices = compose_config([*common, "control=null"])
    again = run_from_config(cfg, choices=choices, overrides=common)
    assert all(s["cached"] for s in again["stages"].values())
