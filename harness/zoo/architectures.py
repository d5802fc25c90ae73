"""Architectures of the shipped tiny models, built from configs (diffusers, transformers, open_clip).

All are scaled-down versions of the real thing, so the same loaders and pipelines serve both. The embedded
world v2 (issue 16) works at 128 px, as Stable Diffusion does at 512 px, through an 8x autoencoder:

- ``tiny-vae``: Stable Diffusion's autoencoder design (AutoencoderKL, four levels so 8x downsampling, a
  self-attention mid block) scaled down; 16 latent channels. 128 px images become 16 x 16 x 16 latents.
- ``tiny-sd``: a latent diffusion model with Stable Diffusion's component types on ``tiny-vae``'s latents. The
  UNet has three levels (64, 96, 128 channels; cross-attention in the two lower ones) conditioned, as SD is, on
  the frozen text tower of a CLIP (tiny-clip's architecture, 3 layers of width 128, the world's tokenizer,
  context 32 tokens) trained on the training artists only (:func:`clip_text_encoder` converts it to
  transformers' ``CLIPTextModel``). Scheduler: Stable Diffusion's
  (scaled-linear betas 0.00085 to 0.012 over 1000 steps, epsilon prediction). 16 x 16 latents, so the UNet
  costs what the 64 px world's did.
- ``tiny-sd-inpaint``: the same with a 33-channel UNet input (16 noisy latents, 1 mask, 16 masked-image
  latents), as SD's inpainting UNet has 4 + 1 + 4.
- ``tiny-clip``: an open_clip ``CLIP`` with a ModifiedResNet image tower (width 16, one block per stage,
  attention pooling) and a 3-layer text transformer of width 128; joint embedding 128.

These configs are what ``python -m harness.zoo train`` builds. A shipped model's own config sits beside its
weights and is what loads. (The first tiny-sd had its own text encoder, 2 layers of width 64, trained jointly
with the UNet; it carried the prompt's artist and all but dropped its subject, so it was retrained on the CLIP
text tower.)
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
    # the width of the text tower's token states (tiny-sd conditions on a CLIP text tower, as SD does)
    "cross_attention_dim": 128,
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


def build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_clip(vocab_size: int) -> Any:
    from open_clip.model import CLIP

    cfg = clip_config(vocab_size)
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])


def clip_text_encoder_config(vocab_size: int) -> dict[str, Any]:
    """``transformers.CLIPTextConfig`` of tiny-clip's text tower (:func:`clip_config`), so that a diffusion
    model can condition on it as Stable Diffusion conditions on CLIP's: open_clip's text transformer (pre-norm
    blocks, exact GELU, causal attention, a final layer norm) is the same network as transformers'
    ``CLIPTextModel``; only the names of the weights differ (:func:`clip_text_encoder`)."""
    cfg = clip_config(vocab_size)
    text = cfg["text_cfg"]
    return {
        "vocab_size": vocab_size,
        "hidden_size": text["width"],
        "intermediate_size": 4 * text["width"],
        "num_hidden_layers": text["layers"],
        "num_attention_heads": text["heads"],
        "max_position_embeddings": text["context_length"],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": cfg["embed_dim"],
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def clip_text_encoder(clip: Any) -> Any:
    """tiny-clip's text tower (an open_clip ``CLIP``) as a ``transformers.CLIPTextModel`` with the same weights:
    its ``last_hidden_state`` equals the tower's token states after the final layer norm (what Stable
    Diffusion's UNet attends to) and its pooled output the end-of-text token's state, before the projection."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size, width = clip.token_embedding.weight.shape
    model = CLIPTextModel(CLIPTextConfig(**clip_text_encoder_config(vocab_size)))
    src = {k: v.detach().float() for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    state = {
        "embeddings.token_embedding.weight": src["token_embedding.weight"],
        "embeddings.position_embedding.weight": src["positional_embedding"],
        "final_layer_norm.weight": src["ln_final.weight"],
        "final_layer_norm.bias": src["ln_final.bias"],
    }
    for i in range(model.config.num_hidden_layers):
        block, layer = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = src[block + "attn.in_proj_weight"].split(width)
        qb, kb, vb = src[block + "attn.in_proj_bias"].split(width)
        for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            state[layer + f"self_attn.{name}_proj.weight"] = w
            state[layer + f"self_attn.{name}_proj.bias"] = b
        pairs = {
            "self_attn.out_proj": "attn.out_proj",
            "layer_norm1": "ln_1",
            "layer_norm2": "ln_2",
            "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj",
        }
        for ours, theirs in pairs.items():
            state[layer + ours + ".weight"] = src[block + theirs + ".weight"]
            state[layer + ours + ".bias"] = src[block + theirs + ".bias"]
    # transformers 4 names the weights under ``text_model.``, transformers 5 without it
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    model.load_state_dict({prefix + k: v for k, v in state.items()}, strict=True)
    return model.eval().to(torch.float32)
