"""Training of the shipped tiny models on the embedded world v2 (128 px), reproducible from a seed.

Stages (each resumes from its last checkpoint in the work folder when re-run after an interruption):

1. ``tiny-vae``: the autoencoder, Stable Diffusion's recipe scaled down (:class:`AutoencoderRecipe`), on 64 px
   crops of 128 px images. A general-purpose component, as SD's is: it trains on the ``train`` split of every
   artist and on crops of the training photos; the scaling factor is set afterwards to 1 / std of the training
   latents, as for Stable Diffusion.
2. ``clip``: ``tiny-clip``, the judge, contrastively (InfoNCE, Radford et al. 2021) on the ``train`` split of
   *all* artists and crops of the training photos, with soft targets where several captions in a batch describe
   the same content (captions name the artist and the subject, or only the artist, or only the subject, so that
   it tells styles apart and subjects apart across styles); augmented with crops, flips, colour jitter and
   greyscale (so that it judges style by texture as well as palette) and never with noise or blur (which would
   teach it to overlook protection artifacts).
3. ``sd-clip`` then ``sd``: ``tiny-sd``'s text encoder, as Stable Diffusion's, is the frozen text tower of a
   CLIP, trained with the same recipe (without subject-only captions) on the training artists only
   (:func:`train_text_tower`); then the UNet from scratch on ``tiny-vae`` latents of the training artists'
   artworks and training-photo crops (flipped copies included); epsilon loss with min-SNR-5 weighting (Hang et
   al. 2023), 10% empty captions for classifier-free guidance, EMA of the weights.
4. ``inpaint``: ``tiny-sd-inpaint``, initialised from the ``tiny-sd`` UNet (the extra 17 input channels start
   at zero), trained with random rectangles, ellipses, brush strokes and full masks as in SD's inpainting model.

No model sees an image of the ``eval`` split (evaluations), of the ``posted`` split (the artworks that mimics
finetune on and defenses protect) or a held-out photo (:data:`harness.data.HELD_OUT_PHOTOS`, the edits'
images). Held-out artists (:data:`harness.world.HELD_OUT_ARTISTS`) never reach the UNet or the text encoder.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.diffusion import denoising_prediction, inpaint_mask_latent, masked_image, tokenize
from harness.seeding import derive_seed
from harness.world import (
    ARTISTS,
    CAPTION_TEMPLATES,
    TRAIN_ARTISTS,
    ProceduralArt,
    WorldPhotos,
    artwork_caption,
    style_prompt,
    subject_prompt,
)
from harness.zoo import architectures as arch

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- data


@dataclass
class WorldData:
    """Training images (uint8, N x 3 x H x W) with what each shows.

    ``kind[i]`` is ``"art"`` or ``"photo"``; for art ``who[i]`` is the artist and ``what[i]`` the subject; for a
    photo ``who[i]`` is the photo's name and ``what[i]`` its caption.
    """

    images: torch.Tensor
    kind: list[str]
    who: list[str]
    what: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


def world_data(
    artists: tuple[str, ...],
    per_pair: int,
    crops_per_photo: int,
    seed: int,
    split: str = "train",
    size: int = 64,
    photos: tuple[str, ...] | None = None,
) -> WorldData:
    """Render the artworks of ``artists`` (``per_pair`` per subject) and ``crops_per_photo`` crops of each of
    ``photos`` (None: every sample photo), at ``size`` px."""
    art = ProceduralArt(artists=artists, per_pair=per_pair, seed=seed, split=split, size=size).load()
    photos = WorldPhotos(crops_per_photo=crops_per_photo, seed=seed, split=split, size=size, names=photos).load()
    kind, who, what = [], [], []
    for image_id in art.ids:
        artist, subject, _ = image_id.split("/")
        kind.append("art")
        who.append(artist)
        what.append(subject)
    for image_id, caption in zip(photos.ids, photos.captions, strict=False):
        kind.append("photo")
        who.append(image_id.split("/")[1] + "/" + image_id.split("/")[2])
        what.append(caption)
    images = torch.cat([torch.from_numpy(art.to_uint8()), torch.from_numpy(photos.to_uint8())]).permute(0, 3, 1, 2)
    return WorldData(images.contiguous(), kind, who, what)


def rendered_world_data(work: Path, *args: Any, **kwargs: Any) -> WorldData:
    """:func:`world_data` (same arguments), kept in ``work/world_data/`` so that a resumed or a following stage
    does not render the same images again (130 s for tiny-sd's set at 128 px on one core). The file is named by the arguments
    and the source of the renderers (``harness/world.py``, ``harness/data.py``), so a change to either renders
    afresh."""
    import hashlib

    import harness.data
    import harness.world

    digest = hashlib.sha256(repr((args, sorted(kwargs.items()))).encode())
    for module in (harness.world, harness.data):
        digest.update(Path(module.__file__).read_bytes())
    path = work / "world_data" / f"{digest.hexdigest()[:20]}.pt"

    def render() -> dict[str, Any]:
        data = world_data(*args, **kwargs)
        return {"images": data.images, "kind": data.kind, "who": data.who, "what": data.what}

    return WorldData(**_kept(path, render))


def _kept(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The tensors and lists ``compute()`` returns, read from ``path`` when a previous call saved them there
    (written atomically, so an interrupted save leaves no file)."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    saved = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(saved, tmp)
    tmp.replace(path)
    return saved


def random_caption(
    data: WorldData, i: int, rng: np.random.Generator, subjectless: float = 0.0, styleless: float = 0.0
) -> str:
    """A caption for image ``i``: a random template for artworks (or, with probability ``subjectless``, the
    subject-free style prompt; with probability ``styleless``, the style-free subject prompt), the photo's
    caption for photos."""
    if data.kind[i] == "photo":
        return data.what[i]
    u = rng.uniform()
    if u < subjectless:
        return style_prompt(data.who[i])
    if u < subjectless + styleless:
        return subject_prompt(data.what[i])
    return artwork_caption(data.what[i], data.who[i], int(rng.integers(len(CAPTION_TEMPLATES))))


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


# ------------------------------------------------------------------------------------------ checkpoints


class Checkpoint:
    """Atomic save / load of a training state (``torch.save`` to a temporary file, then rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


@dataclass
class Progress:
    name: str
    steps: int
    every: int = 50

    def __post_init__(self) -> None:
        self.start = time.time()
        self.history: list[dict[str, float]] = []

    def log(self, step: int, **values: float) -> None:
        if step % self.every and step != self.steps:
            return
        elapsed = time.time() - self.start
        row = {"step": step, "elapsed_s": round(elapsed, 1), **{k: round(float(v), 5) for k, v in values.items()}}
        self.history.append(row)
        text = " ".join(f"{k}={v}" for k, v in row.items())
        logger.info("[%s] %s", self.name, text)
        print(f"[{self.name}] {text}", flush=True)


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA; none on CPU, where a CPU without native bf16 (no AVX512-BF16 or AMX) emulates it:
    measured 2.5x slower than float32 for a tiny-sd UNet step on this project's 2-core Xeon."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class EMA:
    """Exponential moving average of a module's parameters (and a copy of its buffers)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=False):
            s.lerp_(p.detach(), 1 - d)


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def _lr(step: int, steps: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------------------- the loop

#: a stage's step: batch indices -> (loss, values to log besides the loss); it draws from the stage's generators
StepLoss = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Stage:
    """One training stage's loop state: what it optimises, its schedule and its checkpoint.

    The checkpoint holds the modules of ``saved`` under their keys, the optimiser (and each of ``side_opts``, a
    discriminator's, under its key), the batch generator ``gen``, the step and the seconds spent; ``step`` is the
    step being run. After every optimiser step each (average, module) pair of ``emas`` is
    updated, and ``after_step`` (if any) runs and returns more values to log. With ``clip_params`` the
    gradients are clipped to norm 1 first.
    """

    name: str
    steps: int
    lr: float
    opt: torch.optim.Optimizer
    gen: torch.Generator
    ckpt: Checkpoint
    saved: dict[str, torch.nn.Module]
    emas: tuple[tuple[EMA, torch.nn.Module], ...] = ()
    side_opts: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    clip_params: list[torch.nn.Parameter] | None = None
    after_step: Callable[[], dict[str, float]] | None = None
    warmup: int = 100
    save_every: int = 250
    log_every: int = 50
    start: int = 0
    step: int = 0
    before: float = 0.0
    t0: float = field(default_factory=time.time)
    history: list[dict[str, float]] = field(default_factory=list)

    def resume(self) -> Stage:
        """Load the last checkpoint, if there is one: modules, optimiser, generator, step, seconds spent."""
        if (state := self.ckpt.load()) is not None:
            for key, module in self.saved.items():
                module.load_state_dict(state[key])
            self.opt.load_state_dict(state["opt"])
            for key, side in self.side_opts.items():
                side.load_state_dict(state[key])
            self.gen.set_state(state["gen"])
            self.start = state["step"]
            self.before = float(state.get("elapsed", 0.0))
        return self

    def seconds(self) -> float:
        """Seconds spent on this stage, over every run of it."""
        return self.before + time.time() - self.t0

    def save(self, step: int) -> None:
        modules = {key: module.state_dict() for key, module in self.saved.items()}
        state = {"opt": self.opt.state_dict(), "gen": self.gen.get_state(), "step": step, "elapsed": self.seconds()}
        state.update({key: side.state_dict() for key, side in self.side_opts.items()})
        self.ckpt.save({**modules, **state})


def _stage(
    name: str, work: Path, seed: int, steps: int, lr: float, opt: torch.optim.Optimizer, saved: dict, **options: Any
) -> Stage:
    """The stage ``name`` (checkpoint ``work/<name>.ckpt``, batches seeded by ``seed``), resumed if it can be."""
    gen = torch.Generator().manual_seed(derive_seed(seed, f"zoo/{name}/batches"))
    return Stage(name, steps, lr, opt, gen, Checkpoint(work / f"{name}.ckpt"), saved, **options).resume()


def _train(stage: Stage, batches: Iterator[torch.Tensor], step_loss: StepLoss) -> None:
    """Run ``stage`` from its resumed step to its last: per step the learning rate of the schedule, the loss of
    the next batch, backward, gradient clipping, optimiser step, EMA updates, the log and (every
    ``save_every`` steps and at the end) the checkpoint. The log history ends up in ``stage.history``."""
    progress = Progress(stage.name, stage.steps, every=stage.log_every)
    for step in range(stage.start, stage.steps):
        idx = next(batches)
        stage.step = step
        for group in stage.opt.param_groups:
            group["lr"] = _lr(step, stage.steps, stage.lr, warmup=stage.warmup)
        loss, logged = step_loss(idx)
        stage.opt.zero_grad(set_to_none=True)
        loss.backward()
        if stage.clip_params is not None:
            torch.nn.utils.clip_grad_norm_(stage.clip_params, 1.0)
        stage.opt.step()
        for ema, module in stage.emas:
            ema.update(module, step)
        if stage.after_step is not None:
            logged = {**logged, **stage.after_step()}
        progress.log(step + 1, loss=loss.item(), **logged)
        if (step + 1) % stage.save_every == 0 or step + 1 == stage.steps:
            stage.save(step + 1)
    stage.history = progress.history


def _write_record(work: Path, stage: Stage, seed: int, batch: int, device: torch.device, **extra: Any) -> dict:
    """Write the stage's training record (``work/<name>_record.json``) and return it."""
    record = {
        "stage": stage.name,
        "seed": seed,
        "steps": stage.steps,
        "batch": batch,
        "lr": stage.lr,
        **extra,
        "seconds": round(stage.seconds(), 1),
        "resumed_from_step": stage.start,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "history": stage.history[-5:],
    }
    path = work / f"{stage.name}_record.json"
    if stage.start >= stage.steps and path.is_file():  # nothing trained in this call (an install): keep how it was
        old = json.loads(path.read_text())
        record.update({k: old[k] for k in ("resumed_from_step", "device", "threads", "history") if k in old})
    path.write_text(json.dumps(record, indent=2))
    return record


# --------------------------------------------------------------------------------------------- tiny-vae


@torch.no_grad()
def _latent_scaling(vae: Any, data: WorldData, dev: torch.device) -> float:
    """1 / std of the posterior means of the first 512 training images, as Stable Diffusion sets it."""
    x = to_float(data.images[:512]) * 2 - 1
    latents = torch.cat([vae.encode(x[i : i + 64].to(dev)).latent_dist.mean.cpu() for i in range(0, len(x), 64)])
    return float(1.0 / latents.std())


class PatchDiscriminator(torch.nn.Module):
    """The PatchGAN discriminator of pix2pix (Isola et al. 2017) that Stable Diffusion's autoencoder was trained
    against (Esser et al. 2021; Rombach et al. 2022): strided 4x4 convolutions with batch norm and leaky ReLU,
    one logit per overlapping patch. ``layers`` strided stages (SD: 3; here 2, for 64 px crops)."""

    def __init__(self, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        nn = torch.nn
        mods: list[torch.nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # DCGAN initialisation, as pix2pix
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class AutoencoderRecipe:
    """Loss weights and schedule of ``tiny-vae``: Stable Diffusion's autoencoder recipe (L1 + LPIPS
    reconstruction, a KL weight of 1e-6 against per-pixel sums, a hinge-loss PatchGAN that starts halfway with
    SD's adaptive weight times 0.5; Adam with betas 0.5, 0.9), with ST-LPIPS's VGG as the perceptual network (ImageNet features, the only real LPIPS
    weights that install offline). The adaptive weight is recomputed every ``adaptive_every`` steps and held in
    between (SD recomputes it every step; each computation costs one more backward pass through the VGG)."""

    crop: int = 64
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    disc_start: int = 3000
    disc_weight: float = 0.5
    adaptive_every: int = 20
    disc_lr: float = 2e-4


def _autoencoder_loss(
    vae: Any,
    disc: PatchDiscriminator,
    disc_opt: torch.optim.Optimizer,
    data: WorldData,
    gen: torch.Generator,
    dev: torch.device,
    recipe: AutoencoderRecipe,
    stage_step: Callable[[], int],
) -> tuple[StepLoss, Callable[[], dict[str, float]]]:
    """The generator's step loss and the discriminator's update (run after each generator step)."""
    from harness.metrics.perceptual import load_stlpips_vgg, stlpips_distance

    vgg = load_stlpips_vgg().to(dev, memory_format=torch.channels_last)
    last_layer = vae.decoder.conv_out.weight
    state: dict[str, Any] = {"adaptive": 0.0}

    def step_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = to_float(data.images[idx])
        side = x.shape[-1] - recipe.crop
        oy, ox = torch.randint(0, side + 1, (2,), generator=gen).tolist()
        x = x[:, :, oy : oy + recipe.crop, ox : ox + recipe.crop]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        x = (x * 2 - 1).to(dev).contiguous(memory_format=torch.channels_last)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        lp = stlpips_distance(vgg, (rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2).float().mean()
        nll = l1 + recipe.perceptual_weight * lp
        kl = post.kl().mean()
        # SD sums L1 and LPIPS over pixels and KL over latent elements; with pixel means here, the KL term is
        # divided by the pixels per image so that the balance between the terms is SD's
        loss = nll + recipe.kl_weight * kl / x[0].numel()
        step = stage_step()
        logged = {"l1": l1.item(), "stlpips": lp.item(), "kl": kl.item(), "psnr_db": _psnr_pm1(rec, x)}
        if step >= recipe.disc_start:
            g = -disc(rec).mean()
            if (step - recipe.disc_start) % recipe.adaptive_every == 0:
                gn = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].norm()
                gg = torch.autograd.grad(g, last_layer, retain_graph=True)[0].norm()
                state["adaptive"] = float((gn / (gg + 1e-4)).clamp(0, 1e4)) * recipe.disc_weight
            loss = loss + state["adaptive"] * g
            logged.update(g_loss=g.item(), adaptive=state["adaptive"])
        state["pair"] = (x.detach(), rec.detach())
        return loss, logged

    def disc_step() -> dict[str, float]:
        if stage_step() < recipe.disc_start or "pair" not in state:
            return {}
        x, rec = state.pop("pair")
        d_loss = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec)).mean())  # hinge loss
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_opt.step()
        return {"d_loss": d_loss.item()}

    return step_loss, disc_step


def _psnr_pm1(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = F.mse_loss(a.detach().clamp(-1, 1), b).item()
    return 10 * math.log10(4.0 / max(mse, 1e-10))


def train_autoencoder(
    work: Path,
    seed: int = 0,
    steps: int = 6000,
    batch: int = 8,
    lr: float = 2e-4,
    device: str = "cpu",
    recipe: AutoencoderRecipe | None = None,
) -> dict[str, Any]:
    """Train ``tiny-vae``, the embedded world v2's autoencoder, on random 64 px crops of 128 px images.

    Data (a general-purpose autoencoder, as SD's is): the ``train`` split of *every* artist, held-out ones
    included, and crops of the training photos (:data:`harness.data.TRAIN_PHOTOS`); never an image of the
    ``eval`` or ``posted`` split nor a held-out photo, which evaluations, mimics and edits use. Writes ``work/tiny-vae``
    and returns the training record (also ``work/tiny-vae_record.json``).
    """
    from harness.data import TRAIN_PHOTOS

    recipe = recipe or AutoencoderRecipe()
    dev = torch.device(device)
    torch.manual_seed(derive_seed(seed, "zoo/tiny-vae/init"))
    # channels-last: about 1.4x faster convolutions on CPU (oneDNN); the weights are the same tensors
    vae = arch.build_autoencoder().to(dev, memory_format=torch.channels_last)
    disc = PatchDiscriminator().to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.5, 0.9))
    disc_opt = torch.optim.Adam(disc.parameters(), lr=recipe.disc_lr, betas=(0.5, 0.9))
    stage = _stage(
        "tiny-vae",
        work,
        seed,
        steps,
        lr,
        opt,
        {"model": vae, "disc": disc},
        side_opts={"disc_opt": disc_opt},
        clip_params=list(vae.parameters()),
        save_every=100,
        log_every=25,
    )
    data = rendered_world_data(
        work, ARTISTS, per_pair=16, crops_per_photo=60, seed=seed, size=arch.RESOLUTION, photos=TRAIN_PHOTOS
    )
    stage.t0 = time.time()
    vae.train()
    disc.train()
    step_loss, disc_step = _autoencoder_loss(vae, disc, disc_opt, data, stage.gen, dev, recipe, lambda: stage.step)
    stage.after_step = disc_step
    _train(stage, _batches(len(data), batch, stage.gen), step_loss)
    vae.eval().to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
    scaling = _latent_scaling(vae, data, dev)
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(work / "tiny-vae")
    return _write_record(
        work,
        stage,
        seed,
        batch,
        dev,
        crop_px=recipe.crop,
        image_px=arch.RESOLUTION,
        train_images=len(data),
        train_photos=list(TRAIN_PHOTOS),
        scaling_factor=scaling,
        recipe=recipe.__dict__,
    )


# ------------------------------------------------------------------------------------------------- CLIP


#: the judge's colour augmentation: SimCLR's colour distortion (Chen et al. 2020) at strength 0.5 (brightness,
#: contrast and saturation factors in [0.6, 1.4], hue shifted by up to 0.1 of the circle, in random order, with
#: probability 0.8), then greyscale with probability 0.2
COLOUR_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8, "greyscale_p": 0.2}
#: CLIP training: share of artwork captions that name only the style (:func:`~harness.world.style_prompt`)
SUBJECTLESS_CAPTIONS = 0.3
#: tiny-clip's share of artwork captions that name only the subject (:func:`~harness.world.subject_prompt`).
#: Every other caption names both, so without these a subject is only ever told apart within one artist's
#: work, and the judge saw a subject in 36% of eval artworks (chance 10%); the poisoning threat model's judge
#: must tell subjects apart across styles.
STYLELESS_CAPTIONS = 0.3


def _colour_jitter(img: torch.Tensor, gen: torch.Generator, cfg: dict[str, float] = COLOUR_JITTER) -> torch.Tensor:
    """SimCLR-style colour distortion of one (1, 3, h, w) image in [0, 1], every draw from ``gen``."""
    from torchvision.transforms.v2 import functional as TF

    def u(lo: float, hi: float) -> float:
        return float(torch.empty(()).uniform_(lo, hi, generator=gen))

    if float(torch.rand((), generator=gen)) < cfg["p"]:
        ops = {
            0: lambda x: TF.adjust_brightness(x, u(1 - cfg["brightness"], 1 + cfg["brightness"])),
            1: lambda x: TF.adjust_contrast(x, u(1 - cfg["contrast"], 1 + cfg["contrast"])),
            2: lambda x: TF.adjust_saturation(x, u(1 - cfg["saturation"], 1 + cfg["saturation"])),
            3: lambda x: TF.adjust_hue(x, u(-cfg["hue"], cfg["hue"])),
        }
        for k in torch.randperm(4, generator=gen).tolist():
            img = ops[k](img).clamp(0, 1)
    if float(torch.rand((), generator=gen)) < cfg["greyscale_p"]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return img


def _clip_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.5-1), flip and colour distortion (:data:`COLOUR_JITTER`), per image; no
    noise and no blur, which would teach the judge to overlook protection artifacts. x in [0, 1]."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        s = float(torch.empty(()).uniform_(0.5, 1.0, generator=gen))
        side = max(8, int(round(h * math.sqrt(s))))
        oy = int(torch.randint(0, h - side + 1, (), generator=gen))
        ox = int(torch.randint(0, w - side + 1, (), generator=gen))
        crop = x[i : i + 1, :, oy : oy + side, ox : ox + side]
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if torch.rand((), generator=gen) < 0.5:
            crop = crop.flip(-1)
        out[i] = _colour_jitter(crop.clamp(0, 1), gen)[0]
    return out


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def caption_matches(data: WorldData, idx: list[int], texts: list[str]) -> torch.Tensor:
    """The contrastive targets of a batch: ``[i, j]`` is 1 where caption ``texts[j]`` (written for image
    ``idx[j]``) describes image ``idx[i]``: the same artist unless the caption names none (the style-free subject
    prompt), the same subject unless it names none (the subject-free style prompt); a photo's caption matches
    the photos it was written for."""
    keys: list[tuple[str | None, str | None]] = []
    for j, text in zip(idx, texts, strict=True):
        if text == style_prompt(data.who[j]):
            keys.append((data.who[j], None))
        elif data.kind[j] != "photo" and text == subject_prompt(data.what[j]):
            keys.append((None, data.what[j]))
        else:
            keys.append((data.who[j], data.what[j]))
    return torch.tensor(
        [[who in (None, data.who[i]) and what in (None, data.what[i]) for who, what in keys] for i in idx],
        dtype=torch.float32,
    )


def _clip_loss(
    model: Any,
    tokenizer: Any,
    data: WorldData,
    rng: np.random.Generator,
    gen: torch.Generator,
    dev: torch.device,
    styleless: float = 0.0,
) -> StepLoss:
    """InfoNCE over augmented images and random captions, with soft targets: image i matches text j when text
    j describes image i (the same artist if the caption names one, the same subject if the caption names one).
    ``styleless`` is the share of style-free subject captions (:func:`random_caption`)."""

    def step_loss(batch_idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        idx = batch_idx.tolist()
        x = clip_normalize(_clip_augment(to_float(data.images[idx]), gen)).to(dev)
        texts = [random_caption(data, i, rng, subjectless=SUBJECTLESS_CAPTIONS, styleless=styleless) for i in idx]
        tokens = tokenize(tokenizer, texts).to(dev)
        match = caption_matches(data, idx, texts).to(dev)
        with _autocast(dev):
            img = F.normalize(model.encode_image(x).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss = 0.5 * (
            -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            - (match.T / match.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        )
        acc = (logits.argmax(1) == torch.arange(len(idx), device=dev)).float().mean()
        return loss, {"batch_top1": acc.item()}

    return step_loss


def _clamp_logit_scale(model: Any) -> Callable[[], dict[str, float]]:
    """After each step: keep the logit scale in [1, 100] and report it."""

    def after_step() -> dict[str, float]:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return {"scale": model.logit_scale.exp().item()}

    return after_step


def train_clip(
    work: Path,
    seed: int = 0,
    steps: int = 1200,
    batch: int = 128,
    lr: float = 1e-3,
    device: str = "cpu",
    artists: tuple[str, ...] = ARTISTS,
    name: str = "clip",
    styleless: float = STYLELESS_CAPTIONS,
) -> dict[str, Any]:
    """Train ``tiny-clip``, the judge, on the ``train`` split of ``artists`` (every artist) and crops of the
    training photos (never an image that an evaluation, a mimic or an edit uses). Returns the training record
    (also saved as ``<name>_record.json``); the weights go to ``<name>_final.pt``. With other ``artists`` and
    ``name`` the same recipe trains another CLIP (:func:`train_text_tower`); ``styleless`` is the share of
    style-free subject captions (:data:`STYLELESS_CAPTIONS`)."""
    from harness.data import TRAIN_PHOTOS
    from harness.zoo.tokenizer import save_world_tokenizer

    dev = torch.device(device)
    tokenizer = save_world_tokenizer(work / f"{name}_tokenizer")
    torch.manual_seed(derive_seed(seed, f"zoo/{name}/init"))
    model = arch.build_clip(len(tokenizer)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    every = int(os.environ.get("ZOO_LOG_EVERY", "50"))
    stage = _stage(
        name, work, seed, steps, lr, opt, {"model": model}, after_step=_clamp_logit_scale(model), log_every=every
    )
    rng = np.random.default_rng(derive_seed(seed, f"zoo/{name}/captions/{stage.start}"))
    data = rendered_world_data(
        work, tuple(artists), per_pair=24, crops_per_photo=60, seed=seed, size=arch.RESOLUTION, photos=TRAIN_PHOTOS
    )
    stage.t0 = time.time()
    model.train()
    _train(
        stage, _batches(len(data), batch, stage.gen), _clip_loss(model, tokenizer, data, rng, stage.gen, dev, styleless)
    )
    torch.save(model.state_dict(), work / f"{name}_final.pt")
    extra = {
        "train_images": len(data),
        "artists": list(artists),
        "train_photos": list(TRAIN_PHOTOS),
        "captions": {"style_only": SUBJECTLESS_CAPTIONS, "subject_only": styleless},
    }
    return _write_record(work, stage, seed, batch, dev, image_px=arch.RESOLUTION, colour_jitter=COLOUR_JITTER, **extra)


# ------------------------------------------------------------------------------- UNet + text encoder

#: stage name of tiny-sd's text encoder: a CLIP trained like tiny-clip on the training artists only
TEXT_TOWER = "sd-clip"


def train_text_tower(work: Path, seed: int = 0, steps: int = 1200, batch: int = 128, device: str = "cpu") -> Any:
    """tiny-sd's text encoder, as Stable Diffusion's is: the frozen text tower of a contrastively trained CLIP.
    This CLIP trains with tiny-clip's recipe on the training artists and photos only (stage ``sd-clip``; the
    held-out artists never reach it, as they never reach the UNets), resumed or read from ``work`` when done;
    its text tower is returned as a ``transformers.CLIPTextModel`` (:func:`~harness.zoo.architectures.clip_text_encoder`),
    frozen. (A text encoder trained jointly with the UNet, as tiny-sd's first one was, carried the prompt's
    artist and all but dropped its subject: a subject swap moved it 8%, an artist swap 122%.) It has no
    style-free subject captions (``styleless=0``): the shipped tiny-sd was trained on this tower before they
    joined tiny-clip's recipe, and its subject swap already moves the tower as far as an artist swap."""
    from harness.zoo.tokenizer import save_world_tokenizer

    final = work / f"{TEXT_TOWER}_final.pt"
    if not final.is_file():
        train_clip(work, seed, steps, batch, device=device, artists=TRAIN_ARTISTS, name=TEXT_TOWER, styleless=0.0)
    clip = arch.build_clip(len(save_world_tokenizer(work / f"{TEXT_TOWER}_tokenizer")))
    clip.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
    return arch.clip_text_encoder(clip).requires_grad_(False).to(device)


#: share of empty captions (for classifier-free guidance) and the min-SNR gamma of the UNet stages
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0


def _load_vae(work: Path) -> Any:
    """The trained ``tiny-vae`` of the work folder, frozen."""
    from diffusers import AutoencoderKL

    if not (work / "tiny-vae" / "config.json").is_file():
        raise FileNotFoundError(
            f"{work / 'tiny-vae'} is missing: train tiny-vae first (python -m harness.zoo train tiny-vae)"
        )
    return AutoencoderKL.from_pretrained(work / "tiny-vae").eval().requires_grad_(False)


@torch.no_grad()
def _encode_all(vae: Any, images: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image and of its mirror image: (2N, c, h, w) each, on the CPU."""
    means, stds = [], []
    for flip in (False, True):
        for i in range(0, images.shape[0], batch):
            x = to_float(images[i : i + batch]) * 2 - 1
            if flip:
                x = x.flip(-1)
            post = vae.encode(x.to(vae.device)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def _encoded(work: Path, vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_encode_all`, kept in ``work/world_data/`` under a digest of the images and of the VAE's weights
    (as float32), so that a resumed stage, or the inpainting stage after tiny-sd's, does not encode the same
    images with the same VAE again (minutes at 128 px on a CPU)."""
    import hashlib

    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    for name, tensor in vae.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    path = work / "world_data" / f"latents-{digest.hexdigest()[:20]}.pt"

    def encode() -> dict[str, Any]:
        means, stds = _encode_all(vae, images)
        return {"means": means, "stds": stds}

    saved = _kept(path, encode)
    return saved["means"], saved["stds"]


def _snr_weight(scheduler: Any, t: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Min-SNR-gamma loss weight for epsilon prediction: min(SNR, gamma) / SNR (Hang et al. 2023)."""
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


def save_sd_pipeline(
    folder: Path, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, inpaint: bool = False
) -> None:
    """Save a Stable-Diffusion-format pipeline folder (fp16 weights, no safety checker)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = cls(
        vae=copy.deepcopy(vae),
        text_encoder=copy.deepcopy(text_encoder),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet),
        scheduler=arch.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        torch.nn.Module.to(module, dtype=torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)


@dataclass
class Denoiser:
    """What a denoising training step uses of a latent diffusion model. ``train_text``: the text encoder trains
    with the UNet (and runs under autocast with it); otherwise it is frozen and runs without gradient, in
    float32."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: torch.device
    train_text: bool


def _diffusion_stage(
    name: str, work: Path, seed: int, steps: int, lr: float, ema_decay: float, trained: dict, **options: Any
) -> Stage:
    """The setup the UNet stages share: AdamW (weight decay 0.01) on the modules of ``trained``, an EMA of
    each, gradient clipping, and the resumed checkpoint (keys: the modules', then ``ema`` for a single module
    or ``ema_<key>`` for several, as the stages have always written them)."""
    params = [p for module in trained.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    emas = {key: EMA(module, ema_decay) for key, module in trained.items()}
    ema_keys = {key: "ema" if len(trained) == 1 else f"ema_{key}" for key in trained}
    saved = {**trained, **{ema_keys[key]: ema.shadow for key, ema in emas.items()}}
    pairs = tuple((ema, trained[key]) for key, ema in emas.items())
    return _stage(name, work, seed, steps, lr, opt, saved, emas=pairs, clip_params=params, **options)


def _denoising_loss(
    m: Denoiser,
    data: WorldData,
    idx: torch.Tensor,
    z: torch.Tensor,
    rng: np.random.Generator,
    gen: torch.Generator,
    channels: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The UNet stages' step: epsilon loss with min-SNR weighting on scaled latents ``z`` of the images ``idx``
    (indices modulo ``len(data)``: flipped copies share the caption draws), with ``channels`` after the noisy
    latents (an inpainting UNet's). Draws, in this order: the captions (10% empty), the noise, the timesteps."""
    texts = ["" if rng.uniform() < CAPTION_DROPOUT else random_caption(data, int(i) % len(data), rng) for i in idx]
    tokens = tokenize(m.tokenizer, texts).to(m.device)
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(0, m.scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
    cond = None
    if not m.train_text:
        with torch.no_grad():
            cond = m.text_encoder(tokens)[0]
    with _autocast(m.device):
        if cond is None:
            cond = m.text_encoder(tokens)[0]
        dev = m.device
        pred, target, _ = denoising_prediction(
            m.unet, m.scheduler, z.to(dev), noise.to(dev), t.to(dev), cond, channels=channels
        )
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    loss = (per * _snr_weight(m.scheduler, t).to(m.device)).mean()
    return loss, {"mse": per.mean().item()}


def train_sd(
    work: Path,
    seed: int = 0,
    steps: int = 2200,
    batch: int = 64,
    lr: float = 5e-4,
    ema_decay: float = 0.998,
    device: str = "cpu",
    more_steps: int = 3000,
    more_lr: float = 3e-4,
    text_steps: int = 1200,
    text_batch: int = 128,
) -> dict[str, Any]:
    """Train the ``tiny-sd`` UNet on ``tiny-vae`` latents (frozen) of the training artists' artworks and crops
    of the training photos, at 128 px, conditioned on a frozen CLIP text tower trained on the same artists
    (:func:`train_text_tower`, ``text_steps`` steps at batch ``text_batch``; first if ``work`` does not hold it
    yet).

    Two stages: ``steps`` with a cosine schedule from ``lr``, then (``more_steps`` > 0) a warm restart: a second
    cosine schedule from ``more_lr`` with a fresh optimiser, continuing the weights and their EMA (stage
    ``sd-more``, its own checkpoint). After 2200 steps the model painted the training artists' styles in 66% of
    its samples and a LoRA on 16 artworks of a held-out artist reached 0.44; the second stage continues it
    rather than starting a longer single schedule from scratch. (Those figures are of the first tiny-sd, whose
    text encoder trained with its UNet.)"""
    from harness.data import TRAIN_PHOTOS
    from harness.zoo.tokenizer import save_world_tokenizer

    dev = torch.device(device)
    tokenizer = save_world_tokenizer(work / "sd_tokenizer")
    vae = _load_vae(work).to(dev)
    scale = vae.config.scaling_factor
    text_encoder = train_text_tower(work, seed, text_steps, text_batch, device=device)
    torch.manual_seed(derive_seed(seed, "zoo/sd/init"))
    unet = arch.build_unet().to(dev)
    stage = _diffusion_stage("sd", work, seed, steps, lr, ema_decay, {"unet": unet})
    model = Denoiser(unet, text_encoder, tokenizer, arch.build_scheduler(), dev, train_text=False)
    rng = np.random.default_rng(derive_seed(seed, f"zoo/sd/captions/{stage.start}"))
    data = rendered_world_data(work, TRAIN_ARTISTS, 40, 120, seed, size=arch.RESOLUTION, photos=TRAIN_PHOTOS)
    stage.t0 = time.time()
    means, stds = _encoded(work, vae, data.images)
    encode_s = time.time() - stage.t0
    unet.train()

    def step_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=stage.gen)) * scale
        return _denoising_loss(model, data, idx, z, rng, stage.gen)

    _train(stage, _batches(2 * len(data), batch, stage.gen), step_loss)
    first = stage
    more: dict[str, Any] = {}
    if more_steps:
        stage = _diffusion_stage("sd-more", work, seed, more_steps, more_lr, ema_decay, {"unet": unet})
        if stage.start == 0:  # a fresh second stage continues the first's average as well as its weights
            stage.saved["ema"].load_state_dict(first.saved["ema"].state_dict())
        rng = np.random.default_rng(derive_seed(seed, f"zoo/sd-more/captions/{stage.start}"))
        stage.t0 = time.time()
        _train(stage, _batches(2 * len(data), batch, stage.gen), step_loss)
        more = _write_record(work, stage, seed, batch, dev)
    save_sd_pipeline(work / "tiny-sd", vae, text_encoder, tokenizer, stage.saved["ema"])
    tower = json.loads((work / f"{TEXT_TOWER}_record.json").read_text())
    extra = {
        "text_encoder": {
            "source": f"the text tower of a CLIP trained with tiny-clip's recipe on the training artists (stage "
            f"{TEXT_TOWER}), frozen while the UNet trains",
            **{k: tower[k] for k in ("steps", "batch", "train_images", "artists", "seconds") if k in tower},
        },
        "ema_decay": ema_decay,
        "train_images": len(data),
        "latents_with_flips": 2 * len(data),
        "encode_seconds": round(encode_s, 1),
        "artists": list(TRAIN_ARTISTS),
        "train_photos": list(TRAIN_PHOTOS),
        "image_px": arch.RESOLUTION,
        "caption_dropout": CAPTION_DROPOUT,
        "min_snr_gamma": MIN_SNR_GAMMA,
    }
    if more:
        extra["second_stage"] = {
            k: more[k]
            for k in ("steps", "lr", "seconds", "resumed_from_step", "device", "threads", "history")
            if k in more
        }
    return _write_record(work, first, seed, batch, dev, **extra)


# -------------------------------------------------------------------------------------------- inpaint


def random_masks(n: int, size: int, gen: torch.Generator, full: float = 0.25) -> torch.Tensor:
    """Inpainting masks (n, 1, size, size), 1 = repaint: rectangles, ellipses, thick strokes, or (with
    probability ``full``) the whole image."""
    from PIL import Image, ImageDraw

    masks = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        r = float(torch.rand((), generator=gen))
        if r < full:
            masks[i] = 1
            continue
        img = Image.new("L", (size, size), 0)
        d = ImageDraw.Draw(img)
        u = torch.rand(8, generator=gen).tolist()
        x0, y0 = u[0] * size * 0.6, u[1] * size * 0.6
        w, h = size * (0.2 + 0.5 * u[2]), size * (0.2 + 0.5 * u[3])
        if r < full + 0.3:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=255)
        elif r < full + 0.55:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=255)
        else:
            pts = [(x0 + w * a, y0 + h * b) for a, b in zip(u[4:6] + [u[2]], u[6:8] + [u[3]], strict=False)]
            d.line([(x0, y0), *pts], fill=255, width=max(2, int(size * (0.08 + 0.1 * u[5]))), joint="curve")
        masks[i, 0] = np.asarray(img, np.float32) / 255
    return torch.from_numpy(masks)


def _inpaint_unet(base: Any, dev: torch.device) -> Any:
    """An inpainting UNet (:data:`~harness.zoo.architectures.INPAINT_IN_CHANNELS` inputs) with the weights of
    ``base``; the extra input channels (mask, masked-image latents) start at zero."""
    unet = arch.build_unet(in_channels=arch.INPAINT_IN_CHANNELS).to(dev)
    state = base.state_dict()
    w = state["conv_in.weight"]
    extra = arch.INPAINT_IN_CHANNELS - w.shape[1]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
    unet.load_state_dict(state)
    return unet


def _inpaint_inputs(
    vae: Any,
    data: WorldData,
    latents: tuple[torch.Tensor, torch.Tensor],
    idx: torch.Tensor,
    gen: torch.Generator,
    dev: torch.device,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Scaled latents of the images ``idx`` (indices into the images and their mirror images, as
    :func:`_encode_all` returns ``latents``: a posterior sample) and the UNet's extra channels for a random
    mask: the mask at latent size and the masked image's latents (posterior mean), built as the inpainting
    pipeline builds them (:mod:`harness.diffusion`). Only the masked images pass through the encoder here."""
    n = len(data)
    images = to_float(data.images[idx % n])
    flipped = idx >= n
    images[flipped] = images[flipped].flip(-1)
    mask = random_masks(len(idx), images.shape[-1], gen)
    means, stds = latents
    scale = vae.config.scaling_factor
    z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)).to(dev) * scale
    with torch.no_grad():
        masked = vae.encode(masked_image(images, mask).to(dev)).latent_dist.mean * scale
    return z, (inpaint_mask_latent(vae, mask, *images.shape[-2:]).to(dev), masked)


def train_inpaint(
    work: Path,
    seed: int = 0,
    steps: int = 1000,
    batch: int = 64,
    lr: float = 3e-4,
    ema_decay: float = 0.995,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train ``tiny-sd-inpaint`` from the ``tiny-sd`` UNet (text encoder and VAE frozen, shared), at 128 px."""
    from diffusers import StableDiffusionPipeline

    from harness.data import TRAIN_PHOTOS

    dev = torch.device(device)
    base = StableDiffusionPipeline.from_pretrained(work / "tiny-sd", dtype=torch.float32)
    vae = base.vae.eval().requires_grad_(False).to(dev)
    text_encoder = base.text_encoder.eval().requires_grad_(False).to(dev)
    unet = _inpaint_unet(base.unet, dev)
    stage = _diffusion_stage("inpaint", work, seed, steps, lr, ema_decay, {"unet": unet}, warmup=50, save_every=200)
    model = Denoiser(unet, text_encoder, base.tokenizer, arch.build_scheduler(), dev, train_text=False)
    rng = np.random.default_rng(derive_seed(seed, f"zoo/inpaint/captions/{stage.start}"))
    data = rendered_world_data(work, TRAIN_ARTISTS, 40, 120, seed, size=arch.RESOLUTION, photos=TRAIN_PHOTOS)
    stage.t0 = time.time()
    latents = _encoded(work, vae, data.images)
    unet.train()

    def step_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        z, channels = _inpaint_inputs(vae, data, latents, idx, stage.gen, dev)
        return _denoising_loss(model, data, idx, z, rng, stage.gen, channels)

    _train(stage, _batches(2 * len(data), batch, stage.gen), step_loss)
    save_sd_pipeline(work / "tiny-sd-inpaint", vae, text_encoder, base.tokenizer, stage.saved["ema"], inpaint=True)
    extra = {
        "ema_decay": ema_decay,
        "init": f"tiny-sd UNet, {arch.INPAINT_IN_CHANNELS - arch.LATENT_CHANNELS} extra input channels zero-initialised",
        "full_mask_fraction": 0.25,
        "train_images": len(data),
        "train_photos": list(TRAIN_PHOTOS),
        "image_px": arch.RESOLUTION,
    }
    return _write_record(work, stage, seed, batch, dev, **extra)
