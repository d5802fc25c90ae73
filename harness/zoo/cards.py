"""Model cards of the shipped models, generated from their training records and measured figures.

Each model folder holds ``training.json`` (written by ``python -m harness.zoo train``) and ``figures.json``
(written by ``python -m harness.zoo evaluate``); the card (``README.md``) is rebuilt from both, never by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ZOO = Path(__file__).resolve().parent

#: the embedded world's target for the VAE: mean PSNR on fresh images of the held-out artists.

_ABOUT = {
    "tiny-clip": (
        "A small image-text model (a modified ResNet image tower, 128 px) trained contrastively on the embedded "
        "world: the train split of all 13 procedural artists, held-out ones included, and crops of the training "
        "photos; never an image of the eval split, of the posted split (what mimics finetune on and defenses "
        "protect) or a held-out photo. Captions name the artist and the subject, or (30% each) only the artist "
        "or only the subject, so that it tells styles apart and subjects apart across styles. Augmentation: "
        "SimCLR's colour distortion (strength 0.5) and greyscale "
        "(p 0.2), so that it judges style by texture as well as palette; no noise or blur, which would teach it "
        "to overlook protection artifacts. It is the judge of the embedded default: "
        "zero-shot style classification (mimicry), zero-shot subject classification (poisoning), image-prompt "
        "and image-image similarity, features for FID/KID.\n\n"
        "**This is not OpenAI CLIP** and not any published CLIP: its scores describe the embedded world only "
        "and must never be compared with published CLIP numbers. Metrics computed with it carry `tiny-clip` in "
        "their name.\n\n"
        "Loads with open_clip: `open_clip.create_model_from_pretrained('local-dir:<this folder>')` (the "
        "harness does this through `harness.metrics.clip.load_clip('tiny-clip')`)."
    ),
    "tiny-sd": (
        "A text-to-image latent diffusion model in diffusers' Stable Diffusion format (AutoencoderKL, "
        "UNet2DConditionModel, CLIPTextModel + CLIPTokenizer, DDIM scheduler) at 128 x 128: its autoencoder is "
        "tiny-vae (8x downsampling, 16 latent channels, so 16 x 16 x 16 latents), frozen; the text encoder is, as "
        "in Stable Diffusion, the frozen text tower of a contrastively trained CLIP (tiny-clip's architecture "
        "and recipe, trained on the training artists and photos only), and the UNet was trained from scratch "
        "on those latents of the 10 training artists of the embedded world and crops of the training photos. "
        "The three held-out artists (halftonia, cyanora, impastel) and the held-out "
        "photos (skimage astronaut, chelsea, coffee, rocket) were never shown to the UNet or the text encoder: "
        "they are the styles a mimic must learn and the photos edits protect. To keep the shipped weights small "
        "it stores no copy of the VAE: it borrows tiny-vae's (byte-identical). In the harness: `model=tiny-sd`; "
        "with diffusers: `DiffusionPipeline.from_pretrained(<this folder>, "
        "vae=AutoencoderKL.from_pretrained(<tiny-vae>))`."
    ),
    "tiny-sd-inpaint": (
        "The inpainting variant of tiny-sd: the same VAE (tiny-vae) and text encoder, and a UNet with 33 input "
        "channels (16 noisy latents, 1 mask, 16 masked-image latents) initialised from tiny-sd's UNet (the 17 "
        "extra input channels at zero) and trained at 128 px with random rectangle, ellipse, stroke and "
        "full-image masks. It stores no copy of the VAE and text encoder: it borrows tiny-vae's and tiny-sd's "
        "(byte-identical). In the harness: `model=tiny-sd-inpaint`; with diffusers: "
        "`DiffusionPipeline.from_pretrained(<this folder>, vae=AutoencoderKL.from_pretrained(<tiny-vae>), "
        "text_encoder=CLIPTextModel.from_pretrained(<tiny-sd>/text_encoder))`."
    ),
}

_ABOUT["tiny-vae"] = (
    "The autoencoder of the embedded world v2: Stable Diffusion's design (diffusers `AutoencoderKL`, four levels, "
    "so 8x downsampling, a self-attention mid block) scaled down to 32-64-128-128 channels with 16 latent "
    "channels (as SD3's and FLUX.1's); 128 px images become 16 x 16 x 16 latents. Trained the way SD's was: L1 and a perceptual loss "
    "(ST-LPIPS's anti-aliased VGG-16, ImageNet features: the only real LPIPS weights that install offline), a "
    "KL weight of 1e-6, and a hinge-loss PatchGAN discriminator after a warm-up, with SD's adaptive weight.\n\n"
    "**Data.** It is a general-purpose component, as SD's autoencoder is: it trained on the training split of "
    "every artist (the held-out artists' too) and crops of the training photos; never on an image of the "
    "`eval` split (evaluations), of the `posted` split (the artworks mimics finetune on and defenses protect) "
    "or a held-out photo (skimage astronaut, chelsea, coffee, rocket; the edits' images). The UNets and the text encoder never see the held-out artists.\n\n"
    "It is tiny-sd's and tiny-sd-inpaint's VAE (they borrow this folder). Loads with "
    "`AutoencoderKL.from_pretrained(<this folder>)`."
)

_TRAIN_KEYS = (
    "stage",
    "seed",
    "steps",
    "batch",
    "lr",
    "ema_decay",
    "train_images",
    "latents_with_flips",
    "crop_px",
    "image_px",
    "caption_dropout",
    "min_snr_gamma",
    "init",
    "full_mask_fraction",
    "scaling_factor",
    "seconds",
    "device",
    "threads",
)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def _last_logged(record: dict[str, Any]) -> list[str]:
    if not record.get("history"):
        return []
    last = record["history"][-1]
    return ["", "Last logged step: " + ", ".join(f"{k} {v}" for k, v in last.items())]


def _weights_mb(folder: Path) -> float:
    files = list(folder.rglob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


def card(model: str) -> str:
    folder = ZOO / model
    training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else []
    figures = json.loads((folder / "figures.json").read_text()) if (folder / "figures.json").is_file() else {}
    lines = [f"# {model}", "", _ABOUT[model], ""]
    lines += [
        "## Training",
        "",
        f"Reproduce with `python -m harness.zoo train {model}` (seed 0 by default; the work folder keeps "
        "checkpoints, so an interrupted run resumes). Data: procedural artworks rendered by "
        "`harness.world` (train split) and random crops of the sample photos bundled by scikit-image, "
        "scikit-learn and matplotlib. No download of any kind.",
        "",
    ]
    for record in training:
        lines.append(f"### stage `{record.get('stage')}`")
        lines.append("")
        lines += _table([(k, record[k]) for k in _TRAIN_KEYS if k in record])
        if "artists" in record:
            lines += ["", "Artists: " + ", ".join(record["artists"])]
        lines += _last_logged(record)
        more = record.get("second_stage")
        if more:
            lines += [
                "",
                "Then a warm restart (its own checkpoint): a second cosine schedule from its own learning rate "
                "with a fresh optimiser, continuing the weights above and their average. The shipped weights are "
                "the average after both.",
                "",
                *_table([(k, more[k]) for k in _TRAIN_KEYS if k in more]),
                *_last_logged(more),
            ]
        lines.append("")
    if not training:
        lines += ["(no training record: this folder was not produced by `python -m harness.zoo train`)", ""]
    lines += ["## Measured quality", ""]
    if figures and model == "tiny-vae":
        lines += [
            "Measured by `python -m harness.zoo evaluate --models tiny-vae` on the eval split (artworks no model "
            "saw in training), the held-out photos and the training photos; the TAEF2 reference row by the same command with "
            "`--taef2 DIR`.",
            "",
        ]
    elif figures:
        lines += [
            "Measured by `python -m harness.zoo evaluate` on the eval split (images no model saw in "
            "training); style judgements by tiny-clip's zero-shot classifier over 13 artists "
            "(chance 7.7%).",
            "",
        ]
        rows: list[tuple[str, Any]] = []
        _flatten("", {k: v for k, v in figures.items() if k != "lora_recipe_trials"}, rows)
        lines += _table(rows)
        lines += _lora_trials(figures.get("lora_recipe_trials", []))
    else:
        lines.append("Not measured yet: run `python -m harness.zoo evaluate`.")
    at = lines.index("## Measured quality") + 2
    if model == "tiny-vae":
        lines[at:at] = _autoencoder_targets(figures)
    elif model in ("tiny-sd", "tiny-sd-inpaint"):
        head = ["### Targets of the embedded world v2", "", "| target | measured | |", "|---|---|---|"]
        lines[at:at] = [*head, *_unet_targets(), "", "The autoencoder's targets are on tiny-vae's card.", ""]
    lines += ["", "## Files", "", f"fp16 safetensors, {_weights_mb(folder):.1f} MB in all.", ""]
    return "\n".join(lines)


def _met(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**NOT met**")


def _autoencoder_targets(figures: dict[str, Any]) -> list[str]:
    """The world v2 autoencoder's targets (issue 16), each with its measured value and whether it is met."""
    from harness.zoo.evaluate import AUTOENCODER_PSNR_TARGET_DB as PSNR
    from harness.zoo.evaluate import NOISE_CLOSED_MAX

    ev = figures.get("evaluation", {})
    rec = ev.get("reconstruction", {})
    sus = ev.get("susceptibility", {})
    ref = figures.get("reference_taef2", {})
    rows = ["| target | measured | |", "|---|---|---|"]
    for group, what in (("held_out_artists", "artist"), ("held_out_photos", "photo")):
        key = f"psnr_db_mean_per_{what}" if what == "artist" else "psnr_db_per_photo"
        values = rec.get(group, {}).get(key, {})
        theirs = ref.get("reconstruction", {}).get(group, {})
        if values:
            worst = min(values, key=values.get)
            reference = ""
            if theirs.get(key):
                their_worst = min(theirs[key], key=theirs[key].get)
                reference = (
                    f"<br>TAEF2: worst {their_worst} {theirs[key][their_worst]} dB; mean {theirs['psnr_db_mean']} dB"
                )
            rows.append(
                f"| reconstruction >= {PSNR:g} dB per held-out {what} ({rec.get('size_px')} px) | tiny-vae: worst "
                f"{worst} {values[worst]} dB; mean {rec[group]['psnr_db_mean']} dB{reference} | "
                f"{_met(values[worst] >= PSNR)} |"
            )
        else:
            rows.append(f"| reconstruction >= {PSNR:g} dB per held-out {what} | | {_met(None)} |")
    ours = sus.get("attack_closed_squared")
    theirs = ref.get("susceptibility", {}).get("attack_closed_squared")
    ok = None if ours is None or theirs is None else ours >= theirs
    rows.append(
        "| the encoder attack closes at least TAEF2's share of the squared latent distance (held-out photos) | "
        f"tiny-vae {ours if ours is not None else '-'}; TAEF2 {theirs if theirs is not None else 'not measured (--taef2)'}"
        f" | {_met(ok)} |"
    )
    noise = sus.get("noise_closed_squared")
    rows.append(
        f"| uniform noise of the same budget closes <= {NOISE_CLOSED_MAX:.0%} | "
        f"{noise if noise is not None else '-'} | {_met(None if noise is None else noise <= NOISE_CLOSED_MAX)} |"
    )
    rows += _unet_targets()
    attack = sus.get("attack")
    notes = (
        [
            f"Attack: {attack}, on the held-out photos at {sus.get('size_px')} px; the share closed is "
            "1 - d_after^2 / d_before^2 of the latent distance d to the target, per photo, averaged."
        ]
        if attack
        else []
    )
    return ["### Targets", "", *rows, "", *notes, "", *_autoencoder_seen_and_unseen(rec, ref.get("reconstruction", {}))]


def _autoencoder_seen_and_unseen(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Mean reconstruction PSNR on images like those the autoencoder trained on and on images it never saw,
    beside TAEF2's on the same images: a gap to the reference as wide on the former as on the latter is
    underfitting, not too few or too narrow training images."""
    groups = (
        ("train_artists", "training artists, fresh artworks (eval split)"),
        ("held_out_artists", "held-out artists (eval split)"),
        ("training_photos", "training photos, whole (their crops were trained on)"),
        ("held_out_photos", "held-out photos, whole"),
    )
    rows = []
    for key, what in groups:
        mine = ours.get(key, {}).get("psnr_db_mean")
        if mine is None:
            continue
        ref = theirs.get(key, {}).get("psnr_db_mean")
        gap = f"{ref - mine:.2f}" if ref is not None else "-"
        rows.append(f"| {what} | {mine} | {ref if ref is not None else 'not measured'} | {gap} |")
    if not rows:
        return []
    from harness.zoo.reference import LATENT_CHANNELS

    config = ZOO / "tiny-vae" / "config.json"
    channels = json.loads(config.read_text()).get("latent_channels") if config.is_file() else None
    return [
        "### Seen and unseen images",
        "",
        f"Mean reconstruction PSNR (dB) at {ours.get('size_px')} px on images like those tiny-vae trained on and on "
        "images it never saw, beside TAEF2 on the same images. A gap to TAEF2 as wide on the seen images as on "
        "the unseen ones points to underfitting (training compute, recipe or capacity), not to too few training "
        f"images. Latent channels at 8x: tiny-vae {channels}, TAEF2 {LATENT_CHANNELS}.",
        "",
        "| images | tiny-vae | TAEF2 | TAEF2 - tiny-vae |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def _lora_trials(trials: list[dict[str, Any]]) -> list[str]:
    """tiny-sd's LoRA recipes measured beside the audits' (``evaluate --models lora --lora-...``): one row per
    recipe and artist, the positive control's figures with the recipe that gave them."""
    if not trials:
        return []
    from harness.zoo.evaluate import LORA_RECIPE_KEYS, control_artists

    lines = [
        "",
        "### LoRA recipes beside the audits'",
        "",
        "The target above is judged on the audits' recipe (`experiments/mimic/lora.yaml`); these rows are the "
        "same positive control (same training images, samples and judge) at other recipes, measured by "
        "`python -m harness.zoo evaluate --models lora --lora-steps N --lora-lr LR --lora-rank R`.",
        "",
        "| artist | rank | steps | lr | batch | style match, mean | per finetune seed | longest finetune | measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        recipe = " | ".join(str(t["settings"].get(k)) for k in LORA_RECIPE_KEYS)
        for a in control_artists(t):
            row = t[a]
            lines.append(
                f"| {a} | {recipe} | {row['accuracy_after']} | {row['accuracy_after_per_finetune_seed']} | "
                f"{max(row['train_seconds_per_finetune_seed'])} s on {t.get('device')} | {t.get('measured_on')} |"
            )
    return lines


def _figures(model: str) -> dict[str, Any]:
    path = ZOO / model / "figures.json"
    return json.loads(path.read_text()).get("evaluation", {}) if path.is_file() else {}


def _unet_targets() -> list[str]:
    """The rows of the world v2 targets that the 128 px UNets' figures (tiny-sd, tiny-sd-inpaint) answer."""
    from harness.zoo.evaluate import (
        INPAINT_KEEP_TARGET_DB,
        LORA_CONTROL_SECONDS,
        LORA_CONTROL_SEEDS,
        LORA_CONTROL_TARGET,
        control_artists,
        lora_control_met,
    )

    sd, inpaint = _figures("tiny-sd"), _figures("tiny-sd-inpaint")
    rows = []
    edit = sd.get("edit_response")
    if edit:
        moved = ", ".join(f"{f}: {v}" for f, v in edit["fractions"].items())
        rows.append(
            "| edit response: same-seed edit SSIM to the clean edit as the latent moves that share of the way to "
            f"the encoder attack's target (held-out photos, {edit['size_px']} px) | {moved}; seed floor "
            f"{edit['seed_floor']} | measured (no threshold: read it beside the seed floor) |"
        )
    else:
        rows.append("| edit response (same-seed edit SSIM as the latent moves 0-100% to the target) | | not measured |")
    control = sd.get("lora_positive_control", {})
    device = str(sd.get("device", "cpu"))  # where the finetunes were timed
    for a in control_artists(control) or ["(held-out artists)"]:
        row = control.get(a, {})
        value = (
            f"{a}: mean {row['accuracy_after']} (per seed {row['accuracy_after_per_finetune_seed']}), "
            f"longest finetune {max(row['train_seconds_per_finetune_seed'])} s on {device}"
            if row
            else ""
        )
        rows.append(
            f"| LoRA positive control >= {LORA_CONTROL_TARGET:g} style match over {LORA_CONTROL_SEEDS} finetune "
            f"seeds, each within {LORA_CONTROL_SECONDS // 60} CPU minutes | {value} | "
            f"{_met(lora_control_met(control, a, device) if row else None)} |"
        )
    from harness.zoo.architectures import RESOLUTION

    at_size = inpaint.get("mask", "").endswith(f"{RESOLUTION}x{RESOLUTION}")  # not the 64 px world's figure
    keep = inpaint.get("border_psnr_db") if at_size else None
    value = "" if keep is None else f"{keep} dB ({inpaint['mask']})"
    ceiling = inpaint.get("border_psnr_db_perfect_latent_copy") if at_size else None
    if ceiling is not None:
        value += (
            f"; ceiling for any model on this VAE and mask: {ceiling} dB (unmasked latents kept exactly, the hole's "
            f"replaced; VAE reconstruction alone {inpaint['border_psnr_db_vae_reconstruction']} dB)"
        )
    ok = None if keep is None else keep >= INPAINT_KEEP_TARGET_DB
    rows.append(
        f"| tiny-sd-inpaint keeps the unmasked region >= {INPAINT_KEEP_TARGET_DB:g} dB | {value} | {_met(ok)} |"
    )
    return rows


def write_all() -> None:
    for model in _ABOUT:
        folder = ZOO / model
        if folder.is_dir():
            (folder / "README.md").write_text(card(model))
