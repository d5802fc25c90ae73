"""The inpainting attacks optimise exactly the conditioning ``StableDiffusionInpaintPipeline`` feeds its UNet.

The pipeline fills the repainted region of its masked image with 0 in [-1, 1] units (grey), binarises the mask
at 0.5, encodes a posterior sample and multiplies it by the VAE's scaling factor. The defenses' masked-image
latents (:func:`harness.diffusion.masked_image_latents`) and the diffusion attack's 9-channel UNet input
(:func:`harness.diffusion.edit_through_pipeline`) are compared with the pipeline's own, computed by its own
processors and captured at its UNet's input during a real call, on the same images, mask and generators.
"""

import pytest
import torch

from harness.diffusion import (
    edit_through_pipeline,
    encode_mean,
    encode_sample,
    inpaint_mask_latent,
    masked_image_latents,
    text_embeddings,
    vae_scale_factor,
)
from harness.masks import edit_mask
from harness.models import ModelSpec, load_pipeline
from harness.pgd import Draws
from harness.protocols import Context
from harness.seeding import make_generator
from tests.conftest import random_imageset

SPECS = {
    "tiny-random-inpaint": ModelSpec(source="tiny-random-inpaint", resolution=32),
    "tiny-sd-inpaint": ModelSpec(source="tiny-sd-inpaint", resolution=128),
}
N = 2
SEEDS = (11, 12)
ATOL = 1e-5


@pytest.fixture(scope="module", params=list(SPECS))
def setup(request):
    spec = SPECS[request.param]
    pipe = load_pipeline(spec, "inpaint")
    assert pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels + 1
    size = spec.resolution
    images = random_imageset(N, size, seed=3).images
    mask = edit_mask("border", size, size, 0.5).expand(N, -1, -1, -1)  # as InpaintEdit passes it
    return request.param, pipe, images, mask


def _gens() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def _pipeline_conditioning(pipe, images, mask, gens):
    """(mask, masked_image_latents) computed by the pipeline's own code, as its ``__call__`` steps 5 and 7 do."""
    h, w = images.shape[-2:]
    init_image = pipe.image_processor.preprocess(images, height=h, width=w).to(dtype=torch.float32)
    mask_condition = pipe.mask_processor.preprocess(mask, height=h, width=w)
    masked = init_image * (mask_condition < 0.5)
    with torch.no_grad():
        return pipe.prepare_mask_latents(
            mask_condition, masked, len(images), h, w, torch.float32, torch.device("cpu"), gens, False
        )


def _capture_unet_inputs(pipe, fn):
    """Run ``fn`` and return the sample tensors the pipeline's UNet received, in call order."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["sample"]).detach().clone())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            fn()
    finally:
        handle.remove()
    return seen


def test_masked_image_latents_equal_the_pipelines_own(setup):
    _, pipe, images, mask = setup
    h, w = images.shape[-2:]
    for m in (mask, torch.rand(N, 1, h, w, generator=torch.Generator().manual_seed(5))):  # binary, then soft
        ref_mask, ref_latents = _pipeline_conditioning(pipe, images, m, _gens())
        with torch.no_grad():
            ours = masked_image_latents(pipe.vae, images, m, Draws(_gens(), "cpu"))
        assert ours.shape == ref_latents.shape
        assert torch.allclose(ours, ref_latents, atol=ATOL, rtol=0), (ours - ref_latents).abs().max()
        assert torch.equal(inpaint_mask_latent(pipe.vae, m, h, w), ref_mask)
    assert vae_scale_factor(pipe.vae) == pipe.vae_scale_factor


def test_the_unet_sees_the_defense_conditioning_during_an_edit(setup):
    # a real one-step edit called as finetune.editing.InpaintEdit calls it: the UNet's channels c (mask) and
    # c+1..2c (masked-image latents; c latent channels) equal the defense's, for each image's generator after the initial noise draw
    _, pipe, images, mask = setup
    h, w = images.shape[-2:]
    f = pipe.vae_scale_factor
    prompts = ["a photo"] * N

    def edit():
        pipe(
            prompt=prompts,
            image=images,
            mask_image=mask,
            height=h,
            width=w,
            strength=1.0,
            guidance_scale=7.5,
            num_inference_steps=1,
            generator=_gens(),
            output_type="pt",
        )

    (unet_in,) = _capture_unet_inputs(pipe, edit)
    c = pipe.vae.config.latent_channels  # 4 (SD: 9 UNet inputs) or 16 (tiny-sd-inpaint: 33)
    assert unet_in.shape == (2 * N, 2 * c + 1, h // f, w // f)  # classifier-free guidance doubles the batch
    gens = _gens()
    noise = torch.stack([torch.randn((c, h // f, w // f), generator=g) for g in gens])  # the pipeline's first draw
    with torch.no_grad():
        ours = masked_image_latents(pipe.vae, images, mask, Draws(gens, "cpu"))
    small = inpaint_mask_latent(pipe.vae, mask, h, w)
    for half in unet_in.chunk(2):
        assert torch.allclose(half[:, :c], noise * pipe.scheduler.init_noise_sigma, atol=ATOL, rtol=0)
        assert torch.equal(half[:, c : c + 1], small)
        assert torch.allclose(half[:, c + 1 :], ours, atol=ATOL, rtol=0), (half[:, c + 1 :] - ours).abs().max()

    # the diffusion attack's differentiable edit feeds the UNet the same 2c + 1 channels at its first step
    cond = text_embeddings(pipe, prompts)
    uncond = text_embeddings(pipe, [""]).expand_as(cond)
    (attack_in,) = _capture_unet_inputs(
        pipe,
        lambda: edit_through_pipeline(
            pipe, images, cond, uncond, Draws(_gens(), "cpu"), 1.0, 1, 7.5, mask=mask.float().contiguous()
        ),
    )
    assert attack_in.shape == unet_in.shape
    assert torch.allclose(attack_in, unet_in, atol=ATOL, rtol=0), (attack_in - unet_in).abs().max()


def test_the_old_black_fill_is_far_from_the_pipelines_conditioning(setup):
    # the conditioning the attacks used before (the repainted region black in [0, 1] units): the comparison
    # above fails on it by far more than its tolerance
    _, pipe, images, mask = setup
    _, ref = _pipeline_conditioning(pipe, images, mask, _gens())
    with torch.no_grad():
        old = encode_sample(pipe.vae, images * (1 - mask), Draws(_gens(), "cpu"))
    gap = (old - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert (old - ref).abs().max() > 1e4 * ATOL
    assert bool((gap > 0.1).all()), gap  # tiny-sd-inpaint: about 1.8; the random VAE: about 0.2


def test_encoder_attack_measures_the_pipelines_masked_latents():
    # PhotoGuardEncoder(variant="inpaint") with no steps reports the distance of the pipeline's masked-image
    # latents of the clean images to the grey target (tiny-sd's VAE posterior is narrow, so the sample's noise
    # moves the distance by far less than the tolerance)
    from defenses.photoguard import PhotoGuardEncoder

    spec = SPECS["tiny-sd-inpaint"]
    pipe = load_pipeline(spec, "inpaint")
    clean = random_imageset(N, 128, seed=4)
    mask = edit_mask("border", 128, 128, 0.5).expand(N, -1, -1, -1)
    _, ref = _pipeline_conditioning(pipe, clean.images, mask, _gens())
    with torch.no_grad():
        grey = pipe.vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean * pipe.vae.config.scaling_factor
    expected = float((ref - grey).flatten(1).norm(dim=1).mean())
    ctx = Context(device="cpu", batch_size=N, model=spec)
    d = PhotoGuardEncoder(variant="inpaint", steps=0, random_start=False)
    info = d.protect(clean, make_generator(0), ctx).info
    assert info["latent_distance_clean"] == pytest.approx(expected, rel=1e-3), (info, expected)
    with torch.no_grad():  # what version 1 measured (black fill), in the same scaled units
        old = encode_mean(pipe.vae, clean.images * (1 - mask)) * pipe.vae.config.scaling_factor
    assert float((old - grey).flatten(1).norm(dim=1).mean()) > 1.2 * expected


# ------------------------------------------------------------------ inpainting UNets on other latent widths


def _wide_latent_pipeline(channels: int):
    """tiny-random-inpaint with a VAE of ``channels`` latent channels and a ``2 * channels + 1``-input UNet
    (random weights, built from the tiny configs)."""
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel

    pipe = load_pipeline(SPECS["tiny-random-inpaint"], "inpaint")
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({**pipe.vae.config, "latent_channels": channels})
    unet = UNet2DConditionModel.from_config(
        {**pipe.unet.config, "in_channels": 2 * channels + 1, "out_channels": channels}
    )
    return StableDiffusionInpaintPipeline(**{**pipe.components, "vae": vae, "unet": unet})


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_latent_inpaint_pipeline_gives_diffusers_images_on_a_9_channel_unet(strength):
    from harness.inpainting import latent_inpaint_pipeline

    pipe = load_pipeline(SPECS["tiny-random-inpaint"], "inpaint")
    ours = latent_inpaint_pipeline(pipe)
    images = random_imageset(N, 32, seed=5).images
    mask = edit_mask("border", 32, 32, 0.5).expand(N, -1, -1, -1)
    kwargs = dict(prompt=["a photo"] * N, image=images, mask_image=mask, strength=strength, output_type="pt")
    kwargs |= dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
    theirs = pipe(generator=_gens(), **kwargs).images
    mine = ours(generator=_gens(), **kwargs).images
    assert mine.shape == theirs.shape == (N, 3, 32, 32)
    assert torch.allclose(mine, theirs, atol=1e-5), (mine - theirs).abs().max()
    other = ours(generator=[torch.Generator().manual_seed(99)] * N, **kwargs).images
    assert not torch.allclose(other, theirs, atol=1e-3)  # the comparison can fail


def test_load_pipeline_serves_inpainting_unets_on_16_channel_latents():
    """diffusers' inpainting pipeline refuses a UNet that is not 4- or 9-channel; the harness serves a
    ``2c + 1``-channel one through LatentInpaintPipeline, and refuses it for img2img."""
    from diffusers import StableDiffusionPipeline

    from harness.errors import ConfigError
    from harness.models import _task_pipeline

    wide = _wide_latent_pipeline(16)
    mask = edit_mask("border", 32, 32, 0.5).expand(1, -1, -1, -1)
    call = dict(prompt=["a photo"], image=random_imageset(1, 32).images, mask_image=mask, output_type="pt")
    call |= dict(num_inference_steps=2, height=32, width=32)
    with pytest.raises(ValueError, match="4 or 9 input channels"):
        wide(**call)
    base = StableDiffusionPipeline(**{k: v for k, v in wide.components.items() if k != "image_encoder"})
    served = _task_pipeline(base, "inpaint", SPECS["tiny-random-inpaint"])
    out = served(generator=[torch.Generator().manual_seed(0)], **call).images
    assert type(served).__name__ == "LatentInpaintPipeline" and out.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="33 input channels"):
        _task_pipeline(base, "img2img", SPECS["tiny-random-inpaint"])
