"""InstaHide's encoding (defenses/instahide.py): the mixing weights as released, the encodings as the formula
says, per-image determinism, and the k = 1 case (the image up to sign)."""

from __future__ import annotations

import pytest
import torch

from defenses.instahide import encode, mixing_weights
from harness.errors import ConfigError


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


def _matched_ssim(recon: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM of the best one-to-one matching of reconstructions to targets (the challenge's "max SSIM")."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from skimage.metrics import structural_similarity

    s = np.array(
        [
            [
                structural_similarity(
                    r.permute(1, 2, 0).numpy(), t.permute(1, 2, 0).numpy(), channel_axis=2, data_range=1.0
                )
                for t in target
            ]
            for r in recon
        ]
    )
    rows, cols = linear_sum_assignment(-s)
    return float(s[rows, cols].mean())


def test_attack_recovers_single_image_encodings_up_to_sign_and_beats_the_floor_at_k_two():
    """k = 1: every encoding is the image with its signs flipped, so the attack groups them exactly and recovers
    |2 p - 1|. k = 2 (each encoding mixes its image with one other): the reconstructions match the originals'
    absolute values better than the floor, the mean absolute encoding, does."""
    from finetune.reconstruction import reconstruct
    from harness.data import SamplePhotos

    photos = SamplePhotos(names=None, size=32, limit=8).load()
    target = (photos.images * 2 - 1).abs()
    single = encode(photos.images, list(photos.ids), seed=0, k=1, encodings_per_image=5)
    recon, labels = reconstruct(single.images, len(photos))
    assert all(len(set(labels[single.owner.numpy() == i])) == 1 for i in range(len(photos)))
    assert _matched_ssim(recon, target) > 0.98
    mixed = encode(photos.images, list(photos.ids), seed=0, k=2, encodings_per_image=30)
    recon, _ = reconstruct(mixed.images, len(photos))
    floor = mixed.images.abs().mean(0, keepdim=True)
    floor = (floor / floor.max()).expand_as(recon)
    assert _matched_ssim(recon, target) > _matched_ssim(floor, target) + 0.1
