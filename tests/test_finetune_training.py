"""The finetune loop's memo of training images' VAE posteriors: a finetune gives the same result whether its
images were encoded before (in another cell's batch) or not, and only new images are encoded."""

from __future__ import annotations

import copy

import torch

from tests.conftest import random_imageset


def _pipe(source: str = "tiny-sd", resolution: int = 128):
    from harness.models import ModelSpec, load_pipeline

    return load_pipeline(ModelSpec(source=source, resolution=resolution), task="text2img")


def _direct(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encode the loop did before the memo: the images and their flips in one batch."""
    with torch.no_grad():
        x = images * 2 - 1
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    return post.mean.float(), post.std.float()


def test_posteriors_equal_one_batched_encode_and_encode_only_new_images():
    from finetune.training import PosteriorMemo

    vae = _pipe().vae
    images = random_imageset(n=7, size=128, seed=3).images
    memo = PosteriorMemo()
    first = memo.posteriors(vae, images[:4], "cpu")
    assert memo.encoded == 4
    # a later finetune on a superset, in another order, with a repeated image: only the 3 new ones are encoded
    order = [5, 0, 6, 3, 1, 4, 2, 0]
    means, stds = memo.posteriors(vae, images[order], "cpu")
    assert memo.encoded == 7
    ref_means, ref_stds = _direct(vae, images[order])
    # on CPU the posterior of an image does not depend on the batch it was encoded in: exactly equal
    assert torch.equal(means, ref_means) and torch.equal(stds, ref_stds)
    assert torch.equal(first[0], _direct(vae, images[:4])[0])
    # flips follow the images, as in the loop's single batch
    assert means.shape[0] == 2 * len(order)


def test_posteriors_are_recomputed_for_a_changed_or_different_vae():
    from finetune.training import PosteriorMemo

    vae = _pipe("tiny-random", 32).vae
    images = random_imageset(n=2, size=32).images
    memo = PosteriorMemo()
    before, _ = memo.posteriors(vae, images, "cpu")
    other = copy.deepcopy(vae)  # another object: none of the first one's entries
    memo.posteriors(other, images, "cpu")
    assert memo.encoded == 4
    with torch.no_grad():  # an in-place change of a weight invalidates the entries
        next(other.encoder.parameters()).add_(0.5)
    after, _ = memo.posteriors(other, images, "cpu")
    assert memo.encoded == 6
    assert not torch.equal(before, after)
    assert torch.equal(after, _direct(other, images)[0])


def test_memo_stays_within_its_byte_bound():
    from finetune.training import PosteriorMemo

    vae = _pipe("tiny-random", 32).vae
    memo = PosteriorMemo(max_bytes=1)
    for seed in range(3):
        memo.posteriors(vae, random_imageset(n=2, size=32, seed=seed).images, "cpu")
        assert len(memo.entries) == 2  # the call's own images stay until it returns; older ones go
    assert memo.encoded == 6


def test_a_finetune_is_the_same_with_its_images_encoded_before(monkeypatch):
    import finetune.training as training
    from harness.types import ImageSet

    pipe = _pipe("tiny-random", 32)
    data = random_imageset(n=4, size=32)
    results = []
    for warm in (False, True):
        memo = training.PosteriorMemo()
        monkeypatch.setattr(training, "POSTERIORS", memo)
        if warm:  # another cell encoded two of the images, in a batch with an image this finetune does not use
            extra = random_imageset(n=1, size=32, seed=9).images
            memo.posteriors(pipe.vae, torch.cat([data.images[1:3], extra]), "cpu")
        unet = copy.deepcopy(pipe.unet).float().requires_grad_(True)
        training.finetune_unet(
            pipe,
            unet,
            list(unet.parameters()),
            ImageSet(data.images, data.ids, data.captions),
            list(data.captions),
            steps=3,
            lr=1e-3,
            batch_size=2,
            seed=0,
        )
        results.append(torch.cat([p.flatten() for p in unet.parameters()]))
        assert memo.encoded == (5 if warm else 4)
    assert torch.equal(results[0], results[1])
