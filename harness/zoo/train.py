"""Training of the shipped tiny models on the embedded world, reproducible from a seed.

Stages (each resumes from its last checkpoint in the work folder when re-run after an interruption):

1. ``vae``: the ``tiny-sd`` autoencoder, on random 32 px crops of 64 px images of the training artists and
   photo crops (it is fully convolutional, so it then runs at any multiple of 4). Loss: MSE + 0.1 L1 on
   pixels plus a small KL term, on a latent sample. The scaling factor is set afterwards to 1 / std of the
   training latents, as for Stable Diffusion.
2. ``clip``: ``tiny-clip``, contrastively (InfoNCE, Radford et al. 2021) on artworks of *all* artists and photo
   crops, with soft targets where several captions in a batch describe the same image content.
3. ``sd``: the ``tiny-sd`` UNet and text encoder, jointly from scratch, on latents of the training artists'
   artworks and photo crops (flipped copies included); epsilon loss with min-SNR-5 weighting (Hang et al.
   2023), 10% empty captions for classifier-free guidance, EMA of the weights.
4. ``inpaint``: ``tiny-sd-inpaint``, initialised from the ``tiny-sd`` UNet (the extra 5 input channels start at
   zero), trained with random rectangles, ellipses, brush strokes and full masks as in SD's inpainting model.

Held-out artists (:data:`harness.world.HELD_OUT_ARTISTS`) never reach the VAE, the UNet or the text encoder.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.seeding import derive_seed
from harness.world import (
    ARTISTS,
    CAPTION_TEMPLATES,
    TRAIN_ARTISTS,
    ProceduralArt,
    WorldPhotos,
    artwork_caption,
    style_prompt,
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
    artists: tuple[str, ...], per_pair: int, crops_per_photo: int, seed: int, split: str = "train"
) -> WorldData:
    """Render the artworks of ``artists`` (``per_pair`` per subject) and ``crops_per_photo`` crops per photo."""
    art = ProceduralArt(artists=artists, per_pair=per_pair, seed=seed, split=split).load()
    photos = WorldPhotos(crops_per_photo=crops_per_photo, seed=seed, split=split).load()
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


def random_caption(data: WorldData, i: int, rng: np.random.Generator, subjectless: float = 0.0) -> str:
    """A caption for image ``i``: a random template for artworks (or, with probability ``subjectless``, the
    subject-free style prompt), the photo's caption for photos."""
    if data.kind[i] == "photo":
        return data.what[i]
    if rng.uniform() < subjectless:
        return style_prompt(data.who[i])
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
    return torch.autocast(device.type, dtype=torch.bfloat16)


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


# -------------------------------------------------------------------------------------------------- VAE


def train_vae(
    work: Path, seed: int = 0, steps: int = 2500, batch: int = 32, lr: float = 1e-3, device: str = "cpu"
) -> dict[str, Any]:
    """Train the ``tiny-sd`` autoencoder. Returns the training record (also saved as ``vae_record.json``)."""
    dev = torch.device(device)
    torch.manual_seed(derive_seed(seed, "zoo/vae/init"))
    vae = arch.build_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ckpt = Checkpoint(work / "vae.ckpt")
    gen = torch.Generator().manual_seed(derive_seed(seed, "zoo/vae/batches"))
    start = 0
    if (state := ckpt.load()) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
    before = float(state.get("elapsed", 0.0)) if state is not None else 0.0
    data = world_data(TRAIN_ARTISTS, per_pair=30, crops_per_photo=100, seed=seed)
    progress = Progress("vae", steps)
    t0 = time.time()
    vae.train()
    batches = _batches(len(data), batch, gen)
    for step in range(start, steps):
        idx = next(batches)
        x = to_float(data.images[idx])
        # random 32 px crops, random flips
        oy, ox = torch.randint(0, 33, (2,), generator=gen).tolist()
        x = x[:, :, oy : oy + 32, ox : ox + 32]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        x = (x * 2 - 1).to(dev)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        with _autocast(dev):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
            rec = vae.decode(z).sample.float()
        mse = F.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / z[0].numel()
        loss = mse + 0.1 * l1 + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))  # [-1, 1] range: peak-to-peak 2
        progress.log(step + 1, loss=loss.item(), psnr_db=psnr, kl=kl.item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            ckpt.save(
                {
                    "model": vae.state_dict(),
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                    "step": step + 1,
                    "elapsed": before + time.time() - t0,
                }
            )
    vae.eval()
    with torch.no_grad():
        x = to_float(data.images[:512]) * 2 - 1
        latents = torch.cat([vae.encode(x[i : i + 64].to(dev)).latent_dist.mean.cpu() for i in range(0, 512, 64)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(work / "vae")
    record = {
        "stage": "vae",
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "crop_px": 32,
        "train_images": len(data),
        "scaling_factor": scaling,
        "seconds": round(before + time.time() - t0, 1),
        "resumed_from_step": start,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "history": progress.history[-5:],
    }
    (work / "vae_record.json").write_text(json.dumps(record, indent=2))
    return record


# ------------------------------------------------------------------------------------------------- CLIP


def _clip_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.5-1), flip, and sometimes blur or noise, per image. x in [0, 1]."""
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
        r = float(torch.rand((), generator=gen))
        if r < 0.2:
            k = torch.tensor([1.0, 2.0, 1.0])
            k = (k[:, None] * k[None]) / 16
            crop = F.conv2d(F.pad(crop, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        elif r < 0.4:
            crop = crop + 0.05 * torch.randn(crop.shape, generator=gen)
        out[i] = crop[0].clamp(0, 1)
    return out


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def train_clip(
    work: Path, seed: int = 0, steps: int = 1200, batch: int = 128, lr: float = 1e-3, device: str = "cpu"
) -> dict[str, Any]:
    """Train ``tiny-clip``. Returns the training record (also saved as ``clip_record.json``)."""
    from harness.zoo.tokenizer import save_world_tokenizer

    dev = torch.device(device)
    tokenizer = save_world_tokenizer(work / "clip_tokenizer")
    torch.manual_seed(derive_seed(seed, "zoo/clip/init"))
    model = arch.build_clip(len(tokenizer)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    ckpt = Checkpoint(work / "clip.ckpt")
    gen = torch.Generator().manual_seed(derive_seed(seed, "zoo/clip/batches"))
    start = 0
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
    rng = np.random.default_rng(derive_seed(seed, f"zoo/clip/captions/{start}"))
    data = world_data(ARTISTS, per_pair=24, crops_per_photo=60, seed=seed)
    progress = Progress("clip", steps, every=int(os.environ.get("ZOO_LOG_EVERY", "50")))
    t0 = time.time()
    model.train()
    batches = _batches(len(data), batch, gen)
    for step in range(start, steps):
        idx = next(batches).tolist()
        x = clip_normalize(_clip_augment(to_float(data.images[idx]), gen)).to(dev)
        texts, keys = [], []
        for i in idx:
            text = random_caption(data, i, rng, subjectless=0.3)
            texts.append(text)
            keys.append((data.who[i], None if text == style_prompt(data.who[i]) else data.what[i]))
        tokens = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(dev)
        # image i matches text j when text j describes image i (same artist and, if named, the same subject)
        match = torch.tensor(
            [[kj[0] == data.who[i] and kj[1] in (None, data.what[i]) for kj in keys] for i in idx],
            dtype=torch.float32,
            device=dev,
        )
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        with _autocast(dev):
            img = F.normalize(model.encode_image(x).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss = 0.5 * (
            -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            - (match.T / match.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        acc = (logits.argmax(1) == torch.arange(len(idx), device=dev)).float().mean()
        progress.log(step + 1, loss=loss.item(), batch_top1=acc.item(), scale=model.logit_scale.exp().item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            ckpt.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step + 1})
    torch.save(model.state_dict(), work / "clip_final.pt")
    record = {
        "stage": "clip",
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "train_images": len(data),
        "artists": list(ARTISTS),
        "seconds": round(time.time() - t0, 1),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "history": progress.history[-5:],
    }
    (work / "clip_record.json").write_text(json.dumps(record, indent=2))
    return record


# ------------------------------------------------------------------------------- UNet + text encoder


def _load_vae(work: Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)


@torch.no_grad()
def _encode_all(vae: Any, images: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image and of its mirror image: (2N, 4, h, w) each."""
    means, stds = [], []
    for flip in (False, True):
        for i in range(0, images.shape[0], batch):
            x = to_float(images[i : i + batch]) * 2 - 1
            if flip:
                x = x.flip(-1)
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def _snr_weight(scheduler: Any, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weight for epsilon prediction: min(SNR, gamma) / SNR (Hang et al. 2023)."""
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


def _tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


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


def train_sd(
    work: Path,
    seed: int = 0,
    steps: int = 2200,
    batch: int = 64,
    lr: float = 5e-4,
    ema_decay: float = 0.998,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the ``tiny-sd`` UNet and text encoder on the training artists and photos (VAE frozen)."""
    from harness.zoo.tokenizer import save_world_tokenizer

    dev = torch.device(device)
    tokenizer = save_world_tokenizer(work / "sd_tokenizer")
    vae = _load_vae(work).to(dev)
    scale = vae.config.scaling_factor
    torch.manual_seed(derive_seed(seed, "zoo/sd/init"))
    unet = arch.build_unet().to(dev)
    text_encoder = arch.build_text_encoder(len(tokenizer)).to(dev)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, ema_decay), EMA(text_encoder, ema_decay)
    scheduler = arch.build_scheduler()
    ckpt = Checkpoint(work / "sd.ckpt")
    gen = torch.Generator().manual_seed(derive_seed(seed, "zoo/sd/batches"))
    start = 0
    if (state := ckpt.load()) is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        ema_unet.shadow.load_state_dict(state["ema_unet"])
        ema_text.shadow.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
    before = float(state.get("elapsed", 0.0)) if state is not None else 0.0
    rng = np.random.default_rng(derive_seed(seed, f"zoo/sd/captions/{start}"))
    data = world_data(TRAIN_ARTISTS, per_pair=40, crops_per_photo=120, seed=seed)
    t0 = time.time()
    means, stds = _encode_all(vae, data.images)
    encode_s = time.time() - t0
    n = len(data)
    progress = Progress("sd", steps)
    unet.train()
    text_encoder.train()
    batches = _batches(2 * n, batch, gen)
    for step in range(start, steps):
        idx = next(batches)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        texts = ["" if rng.uniform() < 0.1 else random_caption(data, int(i) % n, rng) for i in idx]
        tokens = _tokenize(tokenizer, texts).to(dev)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(z, noise, t)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        with _autocast(dev):
            cond = text_encoder(tokens)[0]
            pred = unet(noisy.to(dev), t.to(dev), cond).sample.float()
        per = ((pred - noise.to(dev)) ** 2).mean(dim=(1, 2, 3))
        loss = (per * _snr_weight(scheduler, t).to(dev)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        progress.log(step + 1, loss=loss.item(), mse=per.mean().item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            ckpt.save(
                {
                    "unet": unet.state_dict(),
                    "text": text_encoder.state_dict(),
                    "ema_unet": ema_unet.shadow.state_dict(),
                    "ema_text": ema_text.shadow.state_dict(),
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                    "step": step + 1,
                    "elapsed": before + time.time() - t0,
                }
            )
    save_sd_pipeline(work / "tiny-sd", vae, ema_text.shadow, tokenizer, ema_unet.shadow)
    record = {
        "stage": "sd",
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "ema_decay": ema_decay,
        "train_images": n,
        "latents_with_flips": 2 * n,
        "encode_seconds": round(encode_s, 1),
        "artists": list(TRAIN_ARTISTS),
        "caption_dropout": 0.1,
        "min_snr_gamma": 5.0,
        "seconds": round(before + time.time() - t0, 1),
        "resumed_from_step": start,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "history": progress.history[-5:],
    }
    (work / "sd_record.json").write_text(json.dumps(record, indent=2))
    return record


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


def train_inpaint(
    work: Path,
    seed: int = 0,
    steps: int = 800,
    batch: int = 64,
    lr: float = 3e-4,
    ema_decay: float = 0.995,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train ``tiny-sd-inpaint`` from the ``tiny-sd`` UNet (text encoder and VAE frozen, shared)."""
    from diffusers import StableDiffusionPipeline

    dev = torch.device(device)
    base = StableDiffusionPipeline.from_pretrained(work / "tiny-sd", dtype=torch.float32)
    vae = base.vae.eval().requires_grad_(False).to(dev)
    text_encoder = base.text_encoder.eval().requires_grad_(False).to(dev)
    tokenizer = base.tokenizer
    scale = vae.config.scaling_factor
    unet = arch.build_unet(in_channels=9).to(dev)
    state = base.unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:])], dim=1)
    unet.load_state_dict(state)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    ema = EMA(unet, ema_decay)
    scheduler = arch.build_scheduler()
    ckpt = Checkpoint(work / "inpaint.ckpt")
    gen = torch.Generator().manual_seed(derive_seed(seed, "zoo/inpaint/batches"))
    start = 0
    if (saved := ckpt.load()) is not None:
        unet.load_state_dict(saved["unet"])
        ema.shadow.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        start = saved["step"]
    before = float(saved.get("elapsed", 0.0)) if saved is not None else 0.0
    rng = np.random.default_rng(derive_seed(seed, f"zoo/inpaint/captions/{start}"))
    data = world_data(TRAIN_ARTISTS, per_pair=40, crops_per_photo=120, seed=seed)
    progress = Progress("inpaint", steps)
    t0 = time.time()
    unet.train()
    batches = _batches(len(data), batch, gen)
    for step in range(start, steps):
        idx = next(batches)
        x = to_float(data.images[idx]) * 2 - 1
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        mask = random_masks(len(idx), x.shape[-1], gen)
        with torch.no_grad():
            both = vae.encode(torch.cat([x, x * (mask < 0.5)]).to(dev)).latent_dist
            z_all = both.mean + both.std * torch.randn(both.mean.shape, generator=gen).to(dev)
        z, masked = z_all[: len(idx)] * scale, both.mean[len(idx) :] * scale
        small_mask = F.interpolate(mask, size=z.shape[-2:]).to(dev)
        texts = ["" if rng.uniform() < 0.1 else random_caption(data, int(i), rng) for i in idx]
        tokens = _tokenize(tokenizer, texts).to(dev)
        noise = torch.randn(z.shape, generator=gen).to(dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(z, noise, t.to(dev))
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=50)
        with torch.no_grad():
            cond = text_encoder(tokens)[0]
        with _autocast(dev):
            pred = unet(torch.cat([noisy, small_mask, masked], 1), t.to(dev), cond).sample.float()
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * _snr_weight(scheduler, t).to(dev)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet, step)
        progress.log(step + 1, loss=loss.item(), mse=per.mean().item())
        if (step + 1) % 200 == 0 or step + 1 == steps:
            ckpt.save(
                {
                    "unet": unet.state_dict(),
                    "ema": ema.shadow.state_dict(),
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                    "step": step + 1,
                    "elapsed": before + time.time() - t0,
                }
            )
    save_sd_pipeline(work / "tiny-sd-inpaint", vae, text_encoder, tokenizer, ema.shadow, inpaint=True)
    record = {
        "stage": "inpaint",
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "ema_decay": ema_decay,
        "init": "tiny-sd UNet, 5 extra input channels zero-initialised",
        "full_mask_fraction": 0.25,
        "train_images": len(data),
        "seconds": round(before + time.time() - t0, 1),
        "resumed_from_step": start,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "history": progress.history[-5:],
    }
    (work / "inpaint_record.json").write_text(json.dumps(record, indent=2))
    return record
