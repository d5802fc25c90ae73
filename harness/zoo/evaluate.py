"""Quality figures of the shipped models, measured on fresh images of the embedded world.

Every figure here is computed on the ``"eval"`` split (images no model saw in training) with fixed seeds, by
``python -m harness.zoo evaluate``, which writes them to ``harness/zoo/<model>/figures.json`` and into the
model cards. Style judgements use tiny-clip's zero-shot style classifier over all 13 artists (chance 1/13).

- tiny-clip: zero-shot style accuracy (per artist and overall).
- tiny-vae: reconstruction PSNR per artist and per held-out photo; the encoder attack's reach beside noise.
- tiny-sd: style accuracy of text-to-image samples for "<subject> in the style of <artist>"; img2img toward
  another artist's style; the edit response (does a latent shift reach the edit?); the LoRA positive control
  on the held-out artists' posted artworks, over several finetune seeds.
- concepts (the poisoning threat model's world): tiny-clip's zero-shot subject accuracy, and how much tiny-sd's
  prompt's subject conditions it beside its artist (text-encoder distance and denoising-loss gap).
- tiny-sd-inpaint: a centre square is repainted with a prompt naming another artist; the repainted square is
  classified by tiny-clip (is it in the prompted style?), and the unmasked border is compared with the input.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from harness.metrics.clip import ClipModel, ZeroShotClassifier, style_classifier, subject_classifier
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet
from harness.world import (
    ARTISTS,
    HELD_OUT_ARTISTS,
    SUBJECTS,
    TRAIN_ARTISTS,
    ProceduralArt,
    WorldPhotos,
    artwork_caption,
)
from harness.zoo import architectures as arch

#: sampling settings used for every figure (DDIM steps and classifier-free guidance).
SAMPLE_STEPS = 30
GUIDANCE = 5.0

#: the LoRA mimic's Hydra config: its ``_target_`` names the module whose ``train_lora`` the positive control runs
LORA_MIMIC_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "mimic" / "lora.yaml"
#: the img2img edit's Hydra config: the edit whose response to a latent shift the tiny-sd card measures
IMG2IMG_MIMIC_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "mimic" / "img2img.yaml"

#: the dataset a mimicry audit finetunes on by default: its artist is the LoRA positive control's default
HELD_OUT_ARTIST_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "dataset" / "held_out_artist.yaml"


def audited_artists() -> list[str]:
    """The held-out artists the default mimicry audit finetunes on (``dataset=held_out_artist``)."""
    return [str(a) for a in OmegaConf.load(HELD_OUT_ARTIST_CONFIG).artists]


#: issue 16's targets for the 128 px models: the LoRA positive control's mean style match over its finetune
#: seeds, the CPU seconds one finetune may take, and the inpainting model's unmasked-region PSNR
LORA_CONTROL_TARGET = 0.9
LORA_CONTROL_SECONDS = 600
LORA_CONTROL_SEEDS = 3
INPAINT_KEEP_TARGET_DB = 25.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0, 1] images (the skimage definition, data range 1)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    seed: int,
    *,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    batch: int = 50,
    **kwargs: Any,
) -> torch.Tensor:
    """Run ``pipe`` on each prompt with its own generator (seeded by ``seed`` and the prompt's index), in
    batches; extra keyword arguments (``image``, ``mask_image``, ``strength``) are sliced per batch when they
    are tensors. Returns (N, 3, H, W) float32 in [0, 1] on CPU."""
    out = []
    for i in range(0, len(prompts), batch):
        sl = slice(i, i + batch)
        gens = [make_generator(derive_seed(seed, j)) for j in range(i, min(i + batch, len(prompts)))]
        extra = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        images = pipe(
            prompt=list(prompts[sl]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pt",
            **extra,
        ).images
        out.append(images.float().cpu().clamp(0, 1))
    return torch.cat(out)


def pipeline_side(pipe: Any) -> int:
    """The image side a latent diffusion pipeline was built for: its UNet's latent side times the VAE's factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def eval_art(
    artists: Sequence[str], per_pair: int, seed: int = 0, size: int = arch.RESOLUTION
) -> tuple[ImageSet, list[str], list[str]]:
    """Fresh artworks of ``artists`` with their artist and subject labels."""
    art = ProceduralArt(artists=list(artists), per_pair=per_pair, seed=seed, split="eval", size=size).load()
    who = [i.split("/")[0] for i in art.ids]
    what = [i.split("/")[1] for i in art.ids]
    return art, who, what


def _mean_per_artist(values: Sequence[float], labels: Sequence[str], digits: int) -> dict[str, float]:
    """Mean of ``values`` per label, labels in order of first appearance."""
    out: dict[str, list[float]] = {}
    for v, t in zip(values, labels, strict=True):
        out.setdefault(t, []).append(v)
    return {a: round(float(np.mean(v)), digits) for a, v in out.items()}


def _per_artist(pred: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Style accuracy per true artist."""
    return _mean_per_artist([p == t for p, t in zip(pred, labels, strict=False)], labels, 4)


def evaluate_clip(clip: ClipModel, per_pair: int = 5) -> dict[str, Any]:
    """Zero-shot style accuracy of ``clip`` on fresh artworks of every artist."""
    clf = style_classifier(clip)
    art, who, _ = eval_art(ARTISTS, per_pair)
    pred = clf.predict(art.images)
    per = _per_artist(pred, who)
    photos = WorldPhotos(crops_per_photo=3, split="eval").load()
    captions = sorted(set(photos.captions))
    photo_clf = ZeroShotClassifier(clip, {c: [c] for c in captions})
    photo_acc = photo_clf.accuracy(photos.images, list(photos.captions))
    return {
        "zero_shot_style_accuracy": round(float(np.mean([p == t for p, t in zip(pred, who, strict=False)])), 4),
        "zero_shot_style_accuracy_per_artist": per,
        "images": len(art),
        "classes": len(ARTISTS),
        "photo_caption_top1": round(photo_acc, 4),
        "photo_images": len(photos),
        "photo_classes": len(captions),
    }


# ------------------------------------------------------------------ concepts (the poisoning threat model)


def evaluate_subject_judge(clip: ClipModel, per_pair: int = 5) -> dict[str, Any]:
    """The poisoning threat model's judge: ``clip``'s zero-shot subject accuracy over the world's subjects
    (:func:`harness.metrics.clip.subject_classifier`) on fresh artworks (eval split) of every artist, overall,
    per subject and per artist (chance 1 / number of subjects)."""
    clf = subject_classifier(clip)
    art, who, what = eval_art(ARTISTS, per_pair)
    pred = clf.predict(art.images)
    hits = [p == t for p, t in zip(pred, what, strict=True)]
    return {
        "zero_shot_subject_accuracy": round(float(np.mean(hits)), 4),
        "zero_shot_subject_accuracy_per_subject": _per_artist(pred, what),
        "zero_shot_subject_accuracy_per_artist": {
            a: round(float(np.mean([h for h, w in zip(hits, who, strict=True) if w == a])), 4) for a in ARTISTS
        },
        "images": len(art),
        "classes": len(SUBJECTS),
        "chance": round(1 / len(SUBJECTS), 4),
    }


def _swapped(caption: str, old: str, new: str) -> str:
    if old not in caption:
        raise ValueError(f"{old!r} is not in the caption {caption!r}")
    return caption.replace(old, new)


@torch.no_grad()
def subject_conditioning(pipe: Any, per_pair: int = 2, draws: int = 4, seed: int = 0) -> dict[str, Any]:
    """How much the prompt's subject conditions a text-to-image model, beside its artist.

    On fresh artworks (eval split) of the training artists, each with its world caption ("a house in the style
    of dottori"), and the same caption with the subject swapped for the next of :data:`SUBJECTS` or the artist
    for the next training artist:

    - the text encoder's output moves by ``||e(swapped) - e(caption)|| / ||e(caption)||``;
    - the denoising loss (epsilon MSE, the same noise and timesteps, ``draws`` per image) rises by a gap under
      the swapped caption. ``subject_gap_share_of_artist_gap`` is the subject swap's gap over the artist
      swap's: a model that draws what it is prompted with shows comparable gaps; near 0, the subject barely
      conditions the model, and poisoning a subject cannot be measured on it.
    """
    from harness.diffusion import denoising_prediction, encode_mean, text_embeddings

    art, who, what = eval_art(TRAIN_ARTISTS, per_pair, seed=seed, size=pipeline_side(pipe))
    captions = [artwork_caption(s, a) for s, a in zip(what, who, strict=True)]
    other_subject = [
        _swapped(c, s, SUBJECTS[(SUBJECTS.index(s) + 1) % len(SUBJECTS)]) for c, s in zip(captions, what, strict=True)
    ]
    other_artist = [
        _swapped(c, a, TRAIN_ARTISTS[(TRAIN_ARTISTS.index(a) + 1) % len(TRAIN_ARTISTS)])
        for c, a in zip(captions, who, strict=True)
    ]
    emb = {
        k: text_embeddings(pipe, v).float().cpu()
        for k, v in (("own", captions), ("subject", other_subject), ("artist", other_artist))
    }

    def moved(key: str) -> float:
        return float(((emb[key] - emb["own"]).flatten(1).norm(dim=1) / emb["own"].flatten(1).norm(dim=1)).mean())

    unet, sched, device = pipe.unet, pipe.scheduler, pipe.unet.device
    gen = make_generator(derive_seed(seed, "subject_conditioning"))
    losses: dict[str, list[float]] = {"own": [], "subject": [], "artist": []}
    for i in range(0, len(art), 16):
        x = art.images[i : i + 16]
        z = (encode_mean(pipe.vae, x.to(device)) * pipe.vae.config.scaling_factor).float()
        for _ in range(draws):
            noise = torch.randn(z.shape, generator=gen).to(device)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x),), generator=gen).to(device)
            for key in losses:
                pred, target, _ = denoising_prediction(unet, sched, z, noise, t, emb[key][i : i + 16].to(device))
                losses[key] += ((pred - target) ** 2).flatten(1).mean(1).cpu().tolist()
    own = float(np.mean(losses["own"]))
    gap = {k: float(np.mean(losses[k])) - own for k in ("subject", "artist")}
    return {
        "text_embedding_moved_by_subject_swap": round(moved("subject"), 4),
        "text_embedding_moved_by_artist_swap": round(moved("artist"), 4),
        "denoising_loss_own_caption": round(own, 6),
        "denoising_loss_gap_subject_swap": round(gap["subject"], 7),
        "denoising_loss_gap_artist_swap": round(gap["artist"], 7),
        "subject_gap_share_of_artist_gap": round(gap["subject"] / gap["artist"], 4) if gap["artist"] > 0 else None,
        "images": len(art),
        "draws_per_image": draws,
    }


# --------------------------------------------------------------------------- tiny-vae (embedded world v2)

#: targets of the world v2 autoencoder's card (issue 16): reconstruction per held-out artist and per held-out
#: photo, and what uniform noise of the encoder attack's budget may close at most
AUTOENCODER_PSNR_TARGET_DB = 25.0
NOISE_CLOSED_MAX = 0.05
#: the PhotoGuard encoder attack's config: its published budget and schedule are read from it
PHOTOGUARD_ENCODER_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "defense" / "photoguard_encoder.yaml"


def held_out_photos(size: int) -> ImageSet:
    """The whole held-out photos (:data:`harness.data.HELD_OUT_PHOTOS`) at ``size`` px, resized and centre
    cropped: the images edits are measured on, never seen by a model of the world in training."""
    from harness.data import HELD_OUT_PHOTOS, SamplePhotos

    return SamplePhotos(names=list(HELD_OUT_PHOTOS), size=size).load()


def training_photos(size: int) -> ImageSet:
    """The whole training photos (:data:`harness.data.TRAIN_PHOTOS`, whose random crops the world's models
    trained on) at ``size`` px, resized and centre cropped as the held-out photos are: the same view of images
    the autoencoder has seen, to tell underfitting from too few or too narrow training images."""
    from harness.data import TRAIN_PHOTOS, SamplePhotos

    return SamplePhotos(names=list(TRAIN_PHOTOS), size=size).load()


def vae_reconstruction(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A diffusers AutoencoderKL as a reconstruction: encode to the posterior mean and decode, [0, 1] in and out."""

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        xb = x.to(vae.device, vae.dtype) * 2 - 1
        return ((vae.decode(vae.encode(xb).latent_dist.mean).sample.float().cpu() + 1) / 2).clamp(0, 1)

    return reconstruct


def _batched(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([reconstruct(x[i : i + batch]).float().cpu() for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def evaluate_autoencoder(
    reconstruct: Callable[[torch.Tensor], torch.Tensor], size: int = 128, per_pair: int = 2
) -> dict[str, Any]:
    """Reconstruction PSNR of an autoencoder (``reconstruct``: [0, 1] images in and out, e.g.
    :func:`vae_reconstruction`) at ``size`` px: per artist on fresh artworks (eval split) of the training and
    the held-out artists, per held-out photo and per training photo (whole photos). The same for ``tiny-vae``
    and the reference."""
    out: dict[str, Any] = {"size_px": size}
    for group, artists in (("train_artists", TRAIN_ARTISTS), ("held_out_artists", HELD_OUT_ARTISTS)):
        art, who, _ = eval_art(artists, per_pair, size=size)
        psnr = _psnr(_batched(reconstruct, art.images), art.images)
        out[group] = {
            "psnr_db_mean": round(float(psnr.mean()), 2),
            "psnr_db_min": round(float(psnr.min()), 2),
            "images": len(art),
            "psnr_db_mean_per_artist": _mean_per_artist(psnr.tolist(), who, 2),
        }
    for group, photos in (("held_out_photos", held_out_photos(size)), ("training_photos", training_photos(size))):
        psnr = _psnr(_batched(reconstruct, photos.images), photos.images)
        out[group] = {
            "psnr_db_mean": round(float(psnr.mean()), 2),
            "psnr_db_per_photo": {i: round(float(v), 2) for i, v in zip(photos.ids, psnr.tolist(), strict=True)},
        }
    return out


def photoguard_encoder_settings(steps: int | None = None) -> Any:
    """PGD settings of the PhotoGuard encoder attack, read from its config (published budget: L-inf 0.03 in
    [0, 1] units, first step 0.01 decaying linearly to 1/100, 1000 steps, random start); ``steps`` overrides."""
    from harness.pgd import PGDSettings

    cfg = OmegaConf.load(PHOTOGUARD_ENCODER_CONFIG)
    return PGDSettings(
        eps=float(cfg.eps),
        steps=int(cfg.steps if steps is None else steps),
        step_size=float(cfg.step_size),
        schedule=str(cfg.schedule),
        final_step_fraction=float(cfg.final_step_fraction),
        random_start=bool(cfg.random_start),
        eval_samples=1,
    )


def encoder_susceptibility(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: ImageSet,
    settings: Any,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 4,
) -> dict[str, Any]:
    """How far PhotoGuard's encoder attack moves an encoder's latent toward a grey image's, against uniform
    noise of the same L-inf budget, on the same images with the same settings for any encoder.

    ``encode`` maps [0, 1] images (N, 3, H, W) to latents. Per image, with ``d`` the latent distance to the
    target: the share of the squared distance closed, ``1 - d_after^2 / d_before^2`` (the measure of the
    embedded-world issue's table), and of the distance itself. Negative values: the latent moved away.
    """
    from harness.pgd import image_generators, run_pgd, uniform_noise
    from harness.protocols import Context

    x = images.images
    h, w = images.size
    with torch.no_grad():
        target = encode(torch.full((1, 3, h, w), 0.5, device=device)).float()

    def distance(batch: torch.Tensor, draws: Any = None) -> torch.Tensor:
        return (encode(batch).float() - target).flatten(1).norm(dim=1)

    ctx = Context(device=device, batch_size=batch_size)
    result = run_pgd(x, images.ids, distance, settings, make_generator(seed), ctx, desc="encoder attack")
    noise = uniform_noise(x, settings.eps, "linf", image_generators(derive_seed(seed, "noise"), images.ids, "noise"))

    @torch.no_grad()
    def distances(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [distance(batch[i : i + batch_size].to(device)).cpu() for i in range(0, len(batch), batch_size)]
        )

    d0, dn, da = (distances(b).double() for b in (x, (x + noise).clamp(0, 1), result.images))

    def share(after: torch.Tensor, power: int) -> torch.Tensor:
        return 1 - (after / d0) ** power

    attack_sq, noise_sq = share(da, 2), share(dn, 2)
    return {
        "attack": f"PhotoGuard encoder attack toward a grey image's latent, L-inf {settings.eps:g}, {settings.steps} "
        f"steps ({settings.schedule} step {settings.step_size:g} to x{settings.final_step_fraction:g}), "
        f"random start {settings.random_start}",
        "images": len(x),
        "size_px": h,
        "attack_closed_squared": round(float(attack_sq.mean()), 4),
        "attack_closed_distance": round(float(share(da, 1).mean()), 4),
        "noise_closed_squared": round(float(noise_sq.mean()), 4),
        "noise_closed_distance": round(float(share(dn, 1).mean()), 4),
        "attack_closed_squared_per_image": {i: round(float(v), 4) for i, v in zip(images.ids, attack_sq, strict=True)},
        "realised_linf": round(float((result.images - x).abs().max()), 5),
        "seconds": round(result.seconds, 1),
    }


@contextlib.contextmanager
def latent_moved_toward(vae: Any, target: torch.Tensor, fraction: float) -> Iterator[None]:
    """Inside the block, ``vae.encode`` returns the posterior with its mean moved ``fraction`` of the way from
    each image's own mean to ``target`` (unscaled latents, broadcast over the batch), its variance unchanged:
    the latent shift an encoder attack would make, applied exactly, whatever the pipeline does with it."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    original = vae.encode

    def encode(x: torch.Tensor, return_dict: bool = True) -> Any:
        dist = original(x).latent_dist
        mean = dist.mean + fraction * (target.to(dist.mean) - dist.mean)
        moved = DiagonalGaussianDistribution(torch.cat([mean, dist.logvar], dim=1))
        return AutoencoderKLOutput(latent_dist=moved) if return_dict else (moved,)

    vae.encode = encode
    try:
        yield
    finally:
        del vae.encode  # the instance attribute: the class's method shows through again


#: fractions of the way from the clean latent to the attack's target at which the edit response is measured
EDIT_RESPONSE_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 1.0)


@torch.no_grad()
def edit_response(
    mimic: Any, images: ImageSet, ctx: Any, fractions: Sequence[float] = EDIT_RESPONSE_FRACTIONS, seed: int = 0
) -> dict[str, Any]:
    """Whether the UNet and the decoder carry a latent shift into an edit or wash it out.

    For each fraction f, every image's latent is moved f of the way to the PhotoGuard encoder attack's target
    (a flat grey image's latent) and edited by ``mimic`` (an img2img edit) with the same seed as the clean
    edit; the SSIM of that edit to the clean edit, mean over images, is reported beside the seed floor (the
    clean edit under another seed). 1 at f = 0 by construction."""
    from harness.metrics import SSIM

    vae = ctx.pipeline("img2img").vae
    h, w = images.size
    grey = torch.full((1, 3, h, w), 0.5, device=vae.device, dtype=vae.dtype)
    target = vae.encode(grey * 2 - 1).latent_dist.mean
    ssim = SSIM()
    clean = mimic.run(images, make_generator(seed), ctx)
    other = mimic.run(images, make_generator(derive_seed(seed, "seed floor")), ctx)
    out: dict[str, Any] = {"images": len(images), "size_px": h, "fractions": {}}
    for f in fractions:
        with latent_moved_toward(vae, target, float(f)):
            edited = mimic.run(images, make_generator(seed), ctx)
        out["fractions"][f"{f:g}"] = round(float(ssim(edited, clean).mean()), 4)
    out["seed_floor"] = round(float(ssim(other, clean).mean()), 4)
    return out


def img2img_edit() -> Any:
    """The img2img edit configured in :data:`IMG2IMG_MIMIC_CONFIG`, instantiated at run time (the core package
    imports no component package)."""
    from hydra.utils import instantiate

    return instantiate(OmegaConf.load(IMG2IMG_MIMIC_CONFIG))


def evaluate_text2img(
    pipe: Any, clf: ZeroShotClassifier, seeds: int = 2, seed: int = 0
) -> tuple[dict[str, Any], torch.Tensor]:
    """Style accuracy of samples for "<subject> in the style of <artist>", every artist x subject x seed.

    Returns the figures and the samples (artists x subjects x seeds, in that order) for grids.
    """
    prompts, labels = [], []
    for a in ARTISTS:
        for s in SUBJECTS:
            for _ in range(seeds):
                prompts.append(artwork_caption(s, a))
                labels.append(a)
    images = generate(pipe, prompts, seed)
    pred = clf.predict(images)
    per = _per_artist(pred, labels)
    train = [p == t for p, t in zip(pred, labels, strict=False) if t in TRAIN_ARTISTS]
    held = [p == t for p, t in zip(pred, labels, strict=False) if t in HELD_OUT_ARTISTS]
    return {
        "style_accuracy_train_artists": round(float(np.mean(train)), 4),
        "style_accuracy_held_out_artists": round(float(np.mean(held)), 4),
        "style_accuracy_per_artist": per,
        "samples": len(prompts),
        "sampler": f"DDIM {SAMPLE_STEPS} steps, guidance {GUIDANCE}",
    }, images


def evaluate_img2img(pipe: Any, clf: ZeroShotClassifier, strength: float = 0.7, seed: int = 0) -> dict[str, Any]:
    """img2img of fresh artworks (training artists) with a prompt naming the next training artist."""
    art, who, what = eval_art(TRAIN_ARTISTS, 1, size=pipeline_side(pipe))
    targets = [TRAIN_ARTISTS[(TRAIN_ARTISTS.index(a) + 1) % len(TRAIN_ARTISTS)] for a in who]
    prompts = [artwork_caption(s, t) for s, t in zip(what, targets, strict=False)]
    edited = generate(pipe, prompts, seed, image=art.images, strength=strength)
    before = clf.predict(art.images)
    after = clf.predict(edited)
    return {
        "moved_to_prompted_style": round(float(np.mean([p == t for p, t in zip(after, targets, strict=False)])), 4),
        "prompted_style_before_edit": round(float(np.mean([p == t for p, t in zip(before, targets, strict=False)])), 4),
        "source_style_after_edit": round(float(np.mean([p == a for p, a in zip(after, who, strict=False)])), 4),
        "strength": strength,
        "images": len(art),
    }


def centre_mask(size: int, side: int) -> torch.Tensor:
    """(1, 1, size, size) mask, 1 inside the centred ``side`` x ``side`` square."""
    m = torch.zeros(1, 1, size, size)
    o = (size - side) // 2
    m[..., o : o + side, o : o + side] = 1
    return m


def border_ceilings(vae: Any, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a latent inpainter can at best keep of the unmasked region, decoded by its own VAE: the images'
    reconstructions (nothing repainted), and the images decoded from their own latents outside the mask
    (the pipeline's latent-size mask) with the next image's latents inside it (a model that keeps every
    unmasked latent exactly while repainting the hole). The decoder's receptive field carries the hole into
    the border, so the second bounds the border's PSNR for any model on this VAE and mask."""
    from harness.diffusion import inpaint_mask_latent

    dev, dtype = vae.device, vae.dtype
    with torch.no_grad():
        z = vae.encode((images * 2 - 1).to(dev, dtype)).latent_dist.mean
        m = inpaint_mask_latent(vae, mask, *images.shape[-2:]).to(dev, dtype)
        swapped = z * (1 - m) + z.roll(1, dims=0) * m

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return (vae.decode(latents).sample.float().cpu() / 2 + 0.5).clamp(0, 1)

        return decode(z), decode(swapped)


def evaluate_inpaint(pipe: Any, clf: ZeroShotClassifier, side: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Repaint the centre square (``side`` px; default 11/16 of the model's side) of fresh artworks with a
    prompt naming the same or another training artist.

    The repainted square (cropped and resized to the model size) is classified by tiny-clip; the border
    (outside the mask) is compared with the input by PSNR.
    """
    size = pipeline_side(pipe)
    side = side or size * 11 // 16
    art, who, what = eval_art(TRAIN_ARTISTS, 1, size=size)
    mask = centre_mask(size, side).expand(len(art), 1, size, size).contiguous()
    o = (size - side) // 2

    def crop(x: torch.Tensor) -> torch.Tensor:
        c = x[..., o : o + side, o : o + side]
        return F.interpolate(c, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)

    def repaint(styles: Sequence[str]) -> torch.Tensor:
        prompts = [artwork_caption(s, a) for s, a in zip(what, styles, strict=False)]
        return generate(pipe, prompts, seed, image=art.images, mask_image=mask, strength=1.0)

    targets = [TRAIN_ARTISTS[(TRAIN_ARTISTS.index(a) + 3) % len(TRAIN_ARTISTS)] for a in who]
    other, same = repaint(targets), repaint(who)
    pred_other, pred_same, pred_orig = clf.predict(crop(other)), clf.predict(crop(same)), clf.predict(crop(art.images))
    keep = (1 - mask).bool().expand_as(art.images)

    def border_psnr(outputs: torch.Tensor) -> float:
        mse = torch.stack([((o_[k] - i_[k]) ** 2).mean() for o_, i_, k in zip(outputs, art.images, keep, strict=False)])
        return round(float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean()), 2)

    reconstructed, latent_copy = border_ceilings(pipe.vae, art.images, mask)
    return {
        "other_style_prompt_region_in_prompted_style": round(
            float(np.mean([p == t for p, t in zip(pred_other, targets, strict=False)])), 4
        ),
        "same_style_prompt_region_in_prompted_style": round(
            float(np.mean([p == a for p, a in zip(pred_same, who, strict=False)])), 4
        ),
        "original_region_in_other_style": round(
            float(np.mean([p == t for p, t in zip(pred_orig, targets, strict=False)])), 4
        ),
        "original_region_in_own_style": round(
            float(np.mean([p == a for p, a in zip(pred_orig, who, strict=False)])), 4
        ),
        "border_psnr_db": border_psnr(other),
        "border_psnr_db_vae_reconstruction": border_psnr(reconstructed),
        "border_psnr_db_perfect_latent_copy": border_psnr(latent_copy),
        "mask": f"centre square {side}x{side} of {size}x{size}",
        "images": len(art),
    }


def lora_finetune() -> Callable[..., tuple[Any, dict[str, Any]]]:
    """The LoRA mimic's finetune, ``train_lora(pipe, images, *, rank, steps, lr, seed, ...)``, from the module that
    :data:`LORA_MIMIC_CONFIG`'s ``_target_`` names (``finetune.lora``), imported at run time: the core package
    imports no component package."""
    target = str(OmegaConf.load(LORA_MIMIC_CONFIG)["_target_"])
    return importlib.import_module(target.rpartition(".")[0]).train_lora


#: the recipe options of the LoRA mimic that the positive control takes from :data:`LORA_MIMIC_CONFIG`
LORA_RECIPE_KEYS = ("rank", "steps", "lr", "batch_size")


def lora_recipe(**overrides: Any) -> dict[str, Any]:
    """The LoRA mimic's recipe (rank, steps, lr, batch size) as :data:`LORA_MIMIC_CONFIG` sets it for every
    audit, with the ``overrides`` that are not None: the positive control finetunes as the audits' mimic does
    unless told otherwise. An override that is not a recipe option is an error naming it."""
    unknown = sorted(set(overrides) - set(LORA_RECIPE_KEYS))
    if unknown:
        raise ValueError(f"not a LoRA recipe option: {', '.join(unknown)} (options: {', '.join(LORA_RECIPE_KEYS)})")
    cfg = OmegaConf.load(LORA_MIMIC_CONFIG)
    recipe = {k: cfg[k] for k in LORA_RECIPE_KEYS}
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    return recipe


def evaluate_lora(
    pipe: Any,
    clf: ZeroShotClassifier,
    artists: Sequence[str] | None = None,
    train_images: int = 16,
    steps: int | None = None,
    rank: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seeds: int = 4,
    finetune_seeds: int = LORA_CONTROL_SEEDS,
    seed: int = 0,
) -> dict[str, Any]:
    """The mimicry positive control: LoRA on ``train_images`` posted artworks of each held-out artist, repeated
    with ``finetune_seeds`` finetune seeds.

    Style accuracy of "<subject> in the style of <artist>" samples (every subject, ``seeds`` each) before and
    after each finetune. Training images are the ``posted`` split (no shipped model saw them) of the first 8
    subjects (``train_images // 8`` each); the last 2 subjects are unseen. The samples use the same seeds for
    every finetune, so the seeds' spread is the finetune's. ``artists``: None for :func:`audited_artists`.
    ``steps``, ``rank``, ``lr``, ``batch_size``: None for the audits' LoRA recipe (:func:`lora_recipe`); the
    settings record whether the recipe is the audits' (``audit_recipe``).
    """
    train_lora = lora_finetune()
    recipe = lora_recipe(steps=steps, rank=rank, lr=lr, batch_size=batch_size)
    artists = audited_artists() if artists is None else list(artists)
    size = pipeline_side(pipe)
    subjects_of = [s for s in SUBJECTS for _ in range(seeds)]
    out: dict[str, Any] = {}
    for a in artists:
        per = max(1, train_images // 8)
        train = ProceduralArt(
            artists=[a], subjects=list(SUBJECTS[:8]), per_pair=per, seed=seed, split="posted", size=size, template=0
        ).load()
        prompts = [artwork_caption(s, a) for s in subjects_of]
        sample_seed = derive_seed(seed, f"lora/{a}")
        acc_before = float(np.mean([p == a for p in clf.predict(generate(pipe, prompts, sample_seed))]))
        after, unseen, seconds, losses = [], [], [], []
        for k in range(finetune_seeds):
            t0 = time.time()
            tuned, record = train_lora(pipe, train, **recipe, seed=derive_seed(seed, f"lora/{a}/{k}"))
            seconds.append(round(time.time() - t0, 1))
            pred = clf.predict(generate(tuned, prompts, sample_seed))
            after.append(round(float(np.mean([p == a for p in pred])), 4))
            unseen.append(
                round(float(np.mean([p == a for p, s in zip(pred, subjects_of, strict=True) if s in SUBJECTS[8:]])), 4)
            )
            losses.append(round(record["final_loss"], 4))
        out[a] = {
            "accuracy_before": round(acc_before, 4),
            "accuracy_after": round(float(np.mean(after)), 4),
            "accuracy_after_per_finetune_seed": after,
            "accuracy_after_unseen_subjects_per_finetune_seed": unseen,
            "train_seconds_per_finetune_seed": seconds,
            "trainable_params": record["trainable_params"],
            "final_loss_per_finetune_seed": losses,
        }
    out["settings"] = {
        "train_images": train_images,
        "split": "posted",
        "size_px": size,
        **recipe,
        "audit_recipe": recipe == lora_recipe(),
        "finetune_seeds": finetune_seeds,
        "samples_per_artist": len(SUBJECTS) * seeds,
        "threads": torch.get_num_threads(),
    }
    return out


def control_artists(control: dict[str, Any]) -> list[str]:
    """The artists a LoRA positive control (or trial) measured: its entries with per-seed style matches."""
    return [a for a, v in control.items() if isinstance(v, dict) and "accuracy_after_per_finetune_seed" in v]


def lora_control_met(control: dict[str, Any], artist: str, device: str = "cpu") -> bool | None:
    """Whether the positive control on ``artist`` meets the target: mean style match over its finetune seeds
    >= :data:`LORA_CONTROL_TARGET` from at least :data:`LORA_CONTROL_SEEDS` seeds, each finetune within
    :data:`LORA_CONTROL_SECONDS` CPU seconds (None when not measured). ``device``: where the finetunes were timed;
    seconds timed on another device do not answer the CPU-time part, so a control that meets the rest is then
    None (not known), and one that misses the rest is False."""
    row = control.get(artist)
    if not isinstance(row, dict) or "accuracy_after_per_finetune_seed" not in row:
        return None
    quality = len(row["accuracy_after_per_finetune_seed"]) >= LORA_CONTROL_SEEDS and (
        row["accuracy_after"] >= LORA_CONTROL_TARGET
    )
    if not quality:
        return False
    if device != "cpu":
        return None
    return max(row["train_seconds_per_finetune_seed"]) <= LORA_CONTROL_SECONDS
