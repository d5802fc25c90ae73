"""Architectures of the shipped tiny models, built from configs (diffusers, transformers, open_clip).

All are scaled-down versions of the real thing, so the same loaders and pipelines serve both. The embedded
world v2 (issue 16) works at 128 px, as Stable Diffusion does at 512 px, through an 8x autoencoder:

- ``tiny-vae``: Stable Diffusion's autoencoder design (AutoencoderKL, four levels so 8x downsampling, a
  self-attention mid block) scaled down; 16 latent channels. 128 px images become 16 x 16 x 16 latents.
- ``tiny-sd``: a latent diffusion model with Stable Diffusion's component types on ``tiny-vae``'s latents. The
  UNet has three levels (64, 96, 128 channels; cross-attention in the two lower ones) conditioned on a 2-layer
  CLIP text encoder of width 64 over the world's tokenizer (context 32 tokens). Scheduler: Stable Diffusion's
  (scaled-linear betas 0.00085 to 0.012 over 1000 steps, epsilon prediction). 16 x 16 latents, so the UNet
  costs what the 64 px world's did.
- ``tiny-sd-inpaint``: the same with a 33-channel UNet input (16 noisy latents, 1 mask, 16 masked-image
  latents), as SD's inpainting UNet has 4 + 1 + 4.
- ``tiny-clip``: an open_clip ``CLIP`` with a ModifiedResNet image tower (width 16, one block per stage,
  attention pooling) and a 3-layer text transformer of width 128; joint embedding 128.

Until issue 16 lands its regenerated results, the shipped ``tiny-sd``, ``tiny-sd-inpaint`` and ``tiny-clip``
folders hold the 64 px world's models (their own configs sit beside their weights); these configs are the
world v2's, which ``python -m harness.zoo train`` builds.
"""

from __future__ import annotations

from typing import Any

#: native image side of the shipped models (the embedded world v2), in pixels.
RESOLUTION = 128
#: spatial downsampling of ``tiny-vae``, Stable Diffusion's
VAE_FACTOR = 8
#: latent channels of ``tiny-vae``
LATENT_CHANNELS = 16

#: ``tiny-vae``: Stable Diffusion's autoencoder design (AutoencoderKL, four levels so 8x downsampling, a
#: self-attention mid block) scaled down: 32-64-128-128 channels, one ResNet block per level; 16 latent
#: channels, as SD3's and FLUX.1's (SD 1.x has 4: too few for the world's fine textures, which even TAEF2's 32
#: channels reconstruct at only 14 dB for halftonia). 128 px images become 16 x 16 x 16 latents.
AUTOENCODER_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 16,
    "sample_size": RESOLUTION,
    "mid_block_add_attention": True,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION // VAE_FACTOR,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [64, 96, 128],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

#: input channels of the inpainting UNet: noisy latents, the mask, the masked image's latents
INPAINT_IN_CHANNELS = 2 * LATENT_CHANNELS + 1

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def text_encoder_config(vocab_size: int) -> dict[str, Any]:
    from harness.zoo.tokenizer import CONTEXT_LENGTH

    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": CONTEXT_LENGTH,
        "projection_dim": 64,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def clip_config(vocab_size: int) -> dict[str, Any]:
    """open_clip model config of tiny-clip (the tokenizer is the world's, stored beside the weights)."""
    from harness.zoo.tokenizer import CONTEXT_LENGTH

    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": RESOLUTION, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 128, "heads": 4, "layers": 3},
    }


def build_autoencoder() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**AUTOENCODER_CONFIG)


def build_unet(in_channels: int = LATENT_CHANNELS) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": in_channels})


def build_text_encoder(vocab_size: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_encoder_config(vocab_size)))


def build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_clip(vocab_size: int) -> Any:
    from open_clip.model import CLIP

    cfg = clip_config(vocab_size)
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
