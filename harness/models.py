"""The experiment's diffusion model: spec, loader, memo, and a tiny random stand-in for tests.

A :class:`ModelSpec` names the weights (Hydra builds it from YAML with ``_target_: harness.models.ModelSpec``);
:func:`load_pipeline` turns it into a diffusers pipeline for one task ("text2img", "img2img", "inpaint").
The base components are loaded once per (spec, device) and shared by every task pipeline, so asking for
img2img after text2img costs no memory.

``source`` is one of:

* ``"tiny-random"`` / ``"tiny-random-inpaint"``: a randomly initialised, Stable-Diffusion-shaped pipeline of
  about 1.7 M parameters built in memory by :func:`build_tiny_random` (no files, no network). Its native
  resolution is 32 px (``ModelSpec(source="tiny-random", resolution=32)``): the VAE downsamples 2x, so 32 px
  images become 16x16 latents. Its outputs are meaningless pictures; it exists so that every code path runs
  in tests and smoke runs. The inpaint variant has a 9-channel UNet and serves only ``task="inpaint"``.
* ``"tiny-sd"`` / ``"tiny-sd-inpaint"``: the embedded world's latent diffusion models, trained by the project
  (``python -m harness.zoo train``) and shipped inside the package (``harness/zoo/<name>/``, fp16 weights, 64 px).
  They load through the same ``DiffusionPipeline.from_pretrained`` path as a local folder.
* a local folder written by diffusers' ``save_pretrained`` (contains ``model_index.json``); a source that
  starts with ``/``, ``./``, ``../`` or ``~``, or that exists on disk, is taken as such a path.
* a Hugging Face hub id such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``, read from the local
  Hugging Face cache (and downloaded only when the user runs online with such a config).

A missing checkpoint raises :class:`ModelNotFoundError`, whose message says where the harness looked and how
to point it at local weights. Images never cross this module: pipelines take and return whatever diffusers
does; model wrappers convert from and to the harness's (N, 3, H, W) float32 [0, 1] convention.

This module imports diffusers and transformers lazily, so importing :class:`ModelSpec` (for configs) is cheap.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from harness.errors import ConfigError, ModelNotFoundError
from harness.seeding import isolated_torch_rng

__all__ = [
    "ModelSpec",
    "ModelNotFoundError",
    "TASKS",
    "TINY_RANDOM_SOURCES",
    "TINY_RANDOM_RESOLUTION",
    "SHIPPED_MODELS",
    "shipped_model_path",
    "build_tiny_random",
    "save_tiny_random",
    "build_tiny_random_upscaler",
    "save_tiny_random_upscaler",
    "tiny_clip_tokenizer",
    "write_tiny_tokenizer_files",
    "load_pipeline",
    "clear_model_cache",
]

logger = logging.getLogger(__name__)

#: the tasks :func:`load_pipeline` serves.
TASKS: tuple[str, ...] = ("text2img", "img2img", "inpaint")
#: the sources built in memory by :func:`build_tiny_random` (the second with a 9-channel inpainting UNet).
TINY_RANDOM_SOURCES: tuple[str, ...] = ("tiny-random", "tiny-random-inpaint")
#: the native image side of the tiny-random pipelines, in pixels.
TINY_RANDOM_RESOLUTION = 32
#: diffusion models shipped inside the package (``harness/zoo/<name>``), trained on the embedded world.
SHIPPED_MODELS: tuple[str, ...] = ("tiny-sd", "tiny-sd-inpaint")


def shipped_model_path(name: str) -> Path:
    """The folder of a shipped model (``harness/zoo/<name>``); it may be missing in a partial checkout."""
    return Path(__file__).resolve().parent / "zoo" / name


@lru_cache(maxsize=8)
def _folder_digest(folder: str, mtimes: tuple[float, ...]) -> str:
    """SHA-256 over the weight files of a model folder (names and bytes), memoized by their mtimes."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_PATH_PREFIXES = ("/", "./", "../", "~")


def _is_local_source(source: str) -> bool:
    """Whether ``source`` names a local folder rather than a hub id (tiny-random sources are neither)."""
    if source in TINY_RANDOM_SOURCES or source in SHIPPED_MODELS:
        return False
    return source.startswith(_PATH_PREFIXES) or os.path.exists(os.path.expanduser(source))


def _resolved_path(source: str) -> Path:
    return Path(os.path.expanduser(source)).resolve()


@dataclass(frozen=True)
class ModelSpec:
    """Which diffusion model an experiment uses. Plain constructor types, validated at once.

    Attributes:
        source: ``"tiny-random"``, ``"tiny-random-inpaint"``, a Hugging Face hub id (e.g.
            ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``) or a local diffusers folder saved with
            ``save_pretrained`` (must contain ``model_index.json``).
        dtype: weight dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``. On CPU, float16 is loaded as
            float32 (with a warning); the cache key keeps the configured value.
        revision: hub revision (branch, tag or commit); ignored for local folders and tiny-random.
        variant: weight-file variant such as ``"fp16"`` (``*.fp16.safetensors``), or None.
        resolution: native image side in pixels the model works at (512 for SD 1.x, 32 for tiny-random);
            a positive multiple of 8.
        name: display label for tables and logs; defaults to ``source``. Not part of the cache key.
        inpaint_source: the same family's dedicated inpainting checkpoint (9-channel UNet), loaded for
            ``task="inpaint"`` so that one ``model=`` choice serves img2img and inpainting edits alike
            (``tiny-sd`` -> ``tiny-sd-inpaint``, SD 1.5 -> ``stable-diffusion-inpainting``). None: inpaint with
            ``source`` itself (an inpainting checkpoint, or diffusers' mask blending for a 4-channel UNet).

    Raises:
        ConfigError: naming ``model.source``, ``model.dtype``, ``model.revision``, ``model.variant`` or
            ``model.resolution`` or ``model.inpaint_source`` when that value is invalid.
    """

    source: str
    dtype: str = "float32"
    revision: str | None = None
    variant: str | None = None
    resolution: int = 512
    name: str = ""
    inpaint_source: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"model.source must be a non-empty string, got {self.source!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for option in ("revision", "variant"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"model.{option} must be a non-empty string or null, got {value!r}")
        res = self.resolution
        if isinstance(res, bool) or not isinstance(res, int) or res <= 0 or res % 8:
            raise ConfigError(f"model.resolution must be a positive multiple of 8 (pixels), got {res!r}")
        if not isinstance(self.name, str):
            raise ConfigError(f"model.name must be a string, got {self.name!r}")
        if self.inpaint_source is not None and (not isinstance(self.inpaint_source, str) or not self.inpaint_source):
            raise ConfigError(f"model.inpaint_source must be a non-empty string or null, got {self.inpaint_source!r}")
        if not self.name:
            object.__setattr__(self, "name", self.source)

    @property
    def kind(self) -> str:
        """``"tiny-random"``, ``"shipped"``, ``"local"`` or ``"hub"``: how :func:`load_pipeline` reads it."""
        if self.source in TINY_RANDOM_SOURCES:
            return "tiny-random"
        if self.source in SHIPPED_MODELS:
            return "shipped"
        return "local" if _is_local_source(self.source) else "hub"

    def for_task(self, task: str) -> ModelSpec:
        """The spec that serves ``task``: the family's inpainting checkpoint for ``"inpaint"`` when
        ``inpaint_source`` is set, else this spec."""
        if task == "inpaint" and self.inpaint_source:
            return dataclasses.replace(self, source=self.inpaint_source, inpaint_source=None, name=self.inpaint_source)
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        """The configured dtype as a ``torch.dtype``."""
        return _DTYPES[self.dtype]

    def key_dict(self) -> dict[str, Any]:
        """What identifies the weights, for cache keys: JSON-serialisable, without ``name``.

        Returns:
            ``{"source", "dtype", "revision", "variant", "resolution"}``, plus ``"path"`` (the resolved
            absolute folder) for a local source, or ``"weights_sha256"`` (a digest of the weight files) for a
            shipped model, so retrained shipped weights invalidate cached results. Other weights are not hashed.
        """
        key: dict[str, Any] = {
            "source": self.source,
            "dtype": self.dtype,
            "revision": self.revision,
            "variant": self.variant,
            "resolution": self.resolution,
        }
        if self.kind == "local":
            key["path"] = str(_resolved_path(self.source))
        elif self.kind == "shipped":
            folder = shipped_model_path(self.source)
            files = sorted(folder.rglob("*.safetensors"))
            key["weights_sha256"] = (
                _folder_digest(str(folder), tuple(f.stat().st_mtime for f in files)) if files else None
            )
        if self.inpaint_source:
            key["inpaint"] = self.for_task("inpaint").key_dict()
        return key


# --------------------------------------------------------------------------------------------------------
# Tiny random pipeline
# --------------------------------------------------------------------------------------------------------

#: Merges of the generated tokenizer, in priority order: common English letter pairs and a few whole
#: short words, so that prompts give a mix of merged and single-byte tokens (as with real CLIP BPE).
_TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("r", "e"),
    ("o", "n"),
    ("e", "n"),
    ("o", "r"),
    ("a", "r"),
    ("a", "l"),
    ("s", "t"),
    ("i", "t"),
    ("o", "u"),
    ("e", "s"),
    ("i", "s"),
    ("p", "h"),
    ("o", "t"),
    ("ph", "ot"),
    ("phot", "o</w>"),
    ("th", "e</w>"),
    ("o", "f</w>"),
    ("a", "t</w>"),
    ("in", "g</w>"),
    ("an", "d</w>"),
    ("i", "n</w>"),
    ("o", "n</w>"),
    ("t", "o</w>"),
    ("i", "s</w>"),
    ("e", "d</w>"),
    ("e", "r</w>"),
    ("l", "e</w>"),
    ("c", "at</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("st", "y"),
    ("sty", "le</w>"),
    ("p", "a"),
    ("pa", "in"),
    ("t", "ing</w>"),
    ("pain", "ting</w>"),
)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: a printable unicode character for each of the 256 byte values.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) map to
    consecutive code points from 256 upwards, so every byte string has a whitespace-free spelling.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


@lru_cache(maxsize=1)
def _tiny_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The generated CLIP-style vocabulary (in id order) and its merges.

    Layout, as in CLIP's own files: the 256 byte characters (ids 0..255), their ``"</w>"`` end-of-word
    variants (256..511), one token per merge in merge order, then ``"<|startoftext|>"`` and
    ``"<|endoftext|>"`` (the last two ids). Duplicate merges are skipped.
    """
    chars = list(_bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars)]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for left, right in _TINY_MERGES:
        if left + right in known:
            continue
        if left not in known or right not in known:
            raise AssertionError(f"tiny tokenizer merge {left!r} {right!r} uses an unknown token")
        merges.append((left, right))
        vocab.append(left + right)
        known.add(left + right)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return tuple(vocab), tuple(merges)


def write_tiny_tokenizer_files(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the generated byte-level BPE ``vocab.json`` and ``merges.txt`` into ``folder``.

    Args:
        folder: an existing directory.

    Returns:
        The paths of ``vocab.json`` (token -> id, 554 entries) and ``merges.txt`` (``#version: 0.2``
        header, then one ``"left right"`` merge per line).
    """
    vocab, merges = _tiny_vocab_and_merges()
    folder = Path(folder)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return vocab_file, merges_file


def tiny_clip_tokenizer() -> Any:
    """A ``transformers.CLIPTokenizer`` over a generated byte-level BPE vocabulary (no download).

    The vocabulary has the 256 byte-to-unicode characters, their ``"</w>"`` end-of-word variants, one token
    per merge of a short list of common English pairs and words, and the ``<|startoftext|>`` /
    ``<|endoftext|>`` specials (the latter also pads and stands for unknown text). Any text tokenizes (every
    byte has a token). ``model_max_length`` is 77, as for Stable Diffusion's CLIP.

    The files are written into a temporary folder and loaded with ``CLIPTokenizer.from_pretrained``: in
    transformers 5 ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores the files and builds
    a three-token vocabulary, whereas ``from_pretrained`` on a folder converts them.

    Returns:
        The tokenizer; ``len(tokenizer)`` is the vocabulary size.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
        write_tiny_tokenizer_files(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    expected = len(_tiny_vocab_and_merges()[0])
    if len(tokenizer) != expected:  # guards against a transformers change in how the files are read
        raise RuntimeError(f"tiny CLIP tokenizer has {len(tokenizer)} tokens, expected {expected}")
    return tokenizer


def _tiny_text_encoder(tokenizer: Any) -> Any:
    """A randomly initialised 2-layer ``CLIPTextModel`` of width 32 over ``tokenizer`` (draws from the global RNG).

    Call it inside :func:`harness.seeding.isolated_torch_rng` for reproducible weights.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_tiny_random(seed: int = 0, inpaint: bool = False) -> Any:
    """Build a tiny, randomly initialised Stable-Diffusion-shaped pipeline, deterministically, offline.

    Components: an ``AutoencoderKL`` with two levels (32, 64 channels; 4 latent channels; downsamples 2x,
    which is what the pipeline's ``vae_scale_factor`` computes), a ``UNet2DConditionModel`` (32, 64
    channels, one layer per block, cross-attention dim 32, ``sample_size`` 16 latents = 32 px), a 2-layer
    ``CLIPTextModel`` of width 32 over :func:`tiny_clip_tokenizer`, and a ``DDIMScheduler`` with Stable
    Diffusion's beta schedule (scaled_linear, 0.00085..0.012, 1000 steps). No safety checker.

    Weights are drawn inside :func:`harness.seeding.isolated_torch_rng`, so the same ``seed`` gives the same
    weights and the caller's global RNG is untouched.

    Args:
        seed: seed of the weight initialisation.
        inpaint: build a ``StableDiffusionInpaintPipeline`` whose UNet takes 9 input channels (4 noisy
            latents + 1 mask + 4 masked-image latents) instead of a ``StableDiffusionPipeline``.

    Returns:
        The pipeline, float32 on CPU, progress bar disabled. Native resolution 32 px (any multiple of 4
        works). Outputs are in the pipeline's usual ranges (``output_type="pt"``: (N, 3, H, W) in [0, 1]).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tokenizer = tiny_clip_tokenizer()
    with isolated_torch_rng(seed):
        unet = UNet2DConditionModel(
            sample_size=TINY_RANDOM_RESOLUTION // 2,
            in_channels=9 if inpaint else 4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            # diffusers' legacy naming: for this UNet "attention_head_dim" is the number of heads.
            attention_head_dim=(2, 4),
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=TINY_RANDOM_RESOLUTION,
        )
        text_encoder = _tiny_text_encoder(tokenizer)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = cls(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_random(path: str | os.PathLike[str], inpaint: bool = False, seed: int = 0) -> Path:
    """Write :func:`build_tiny_random` ``(seed, inpaint)`` as a diffusers folder (safetensors weights).

    Args:
        path: target folder (created if needed).
        inpaint: save the inpainting variant.
        seed: weight seed.

    Returns:
        The folder, which contains ``model_index.json``; ``ModelSpec(source=str(path))`` loads it and gives
        the same outputs as the in-memory pipeline.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_random(seed=seed, inpaint=inpaint).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_random_upscaler(seed: int = 0) -> Any:
    """A tiny, randomly initialised pipeline shaped like the SD x4 upscaler, built offline and deterministically.

    Like ``stabilityai/stable-diffusion-x4-upscaler`` it is a ``StableDiffusionUpscalePipeline`` whose UNet takes
    7 input channels (4 noisy latents + the 3-channel low-resolution image, concatenated at latent size) and
    embeds the image's noise level through a class embedding (``num_class_embeds=1000``, passed as
    ``class_labels``), whose VAE has three levels (it upsamples latents 4x) with ``scaling_factor`` 0.08333, a
    ``DDPMScheduler`` that noises the low-resolution image and a v-prediction ``DDIMScheduler``;
    ``max_noise_level`` is 350. The sizes are tiny (UNet 32/64 channels, VAE 32/64/64, the 2-layer text
    encoder and generated tokenizer of :func:`build_tiny_random`). Outputs are meaningless pictures.

    Args:
        seed: seed of the weight initialisation (drawn inside :func:`harness.seeding.isolated_torch_rng`).

    Returns:
        The pipeline, float32 on CPU, progress bar disabled. An (N, 3, h, w) image in [0, 1] (h, w multiples of
        4) gives (N, 3, 4h, 4w) outputs.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    tokenizer = tiny_clip_tokenizer()
    with isolated_torch_rng(seed):
        unet = UNet2DConditionModel(
            sample_size=TINY_RANDOM_RESOLUTION // 4,
            in_channels=7,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=32,
            num_class_embeds=1000,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=TINY_RANDOM_RESOLUTION,
            scaling_factor=0.08333,
        )
        text_encoder = _tiny_text_encoder(tokenizer)
    low_res_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_random_upscaler(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write :func:`build_tiny_random_upscaler` ``(seed)`` as a diffusers folder (safetensors weights).

    Returns:
        The folder (it contains ``model_index.json``); ``StableDiffusionUpscalePipeline.from_pretrained`` or the
        ``noisy_upscale`` purifier's ``upscaler_source`` loads it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_random_upscaler(seed=seed).save_pretrained(path, safe_serialization=True)
    return path


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_BASE: dict[tuple[str, str], Any] = {}
_TASK: dict[tuple[str, str, str], Any] = {}
_warned_cpu_fp16 = False


def clear_model_cache() -> None:
    """Forget every memoized pipeline (and free CUDA memory they held, once nothing else refers to them)."""
    with _LOCK:
        _BASE.clear()
        _TASK.clear()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _not_found_message(spec: ModelSpec, problem: str, error: BaseException | None = None) -> str:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    offline = constants.is_offline_mode()
    lines = [f"model checkpoint not found for model.source={spec.source!r}: {problem}.", "Where the harness looked:"]
    if spec.kind == "local":
        lines.append(f"  - the local folder {_resolved_path(spec.source)} (a diffusers folder with model_index.json)")
    elif spec.kind == "shipped":
        lines.append(f"  - the shipped model folder {shipped_model_path(spec.source)}")
        lines.append(
            f"How to fix: reinstall the package from a complete checkout, or retrain the weights with "
            f"`python -m harness.zoo train {spec.source}`."
        )
        if error is not None:
            lines.append(f"Original error: {type(error).__name__}: {error}")
        return "\n".join(lines)
    else:
        rev = f", revision={spec.revision!r}" if spec.revision else ""
        var = f", variant={spec.variant!r}" if spec.variant else ""
        lines.append(f"  - the Hugging Face hub cache {constants.HF_HUB_CACHE} for hub id {spec.source!r}{rev}{var}")
        lines.append(
            f"  - HF_HUB_OFFLINE is {'set' if env else 'not set'} ({env!r}); offline mode is "
            f"{'on: nothing is downloaded' if offline else 'off: the hub was asked too'}"
        )
    lines += [
        "How to fix: point the harness at local weights with model.source=/path/to/diffusers/folder "
        "(a folder written by a pipeline's save_pretrained, containing model_index.json),",
    ]
    if spec.kind == "hub":
        lines.append(
            "or pre-download the model into the Hugging Face cache on a machine with network access "
            f"(`hf download {spec.source}`, then copy {constants.HF_HUB_CACHE} here or set HF_HUB_CACHE)."
        )
    else:
        lines.append("or name a Hugging Face hub id already in the cache, e.g. model.source=org/model-name.")
    if error is not None:
        lines.append(f"Original error: {type(error).__name__}: {error}")
    return "\n".join(lines)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types from_pretrained raises for missing or unreachable weights."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub import errors as hf_errors

        errors += [hf_errors.EntryNotFoundError, hf_errors.HFValidationError]
    except (ImportError, AttributeError):  # pragma: no cover - older huggingface_hub
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _from_pretrained(spec: ModelSpec, torch_dtype: torch.dtype) -> Any:
    """Load a local diffusers folder or a hub id with ``DiffusionPipeline.from_pretrained``."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    if spec.kind in ("local", "shipped"):
        folder = shipped_model_path(spec.source) if spec.kind == "shipped" else _resolved_path(spec.source)
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise ModelNotFoundError(_not_found_message(spec, f"the folder {folder} {what}"))
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(
                _not_found_message(spec, f"the folder {folder} has no model_index.json (not a diffusers folder)")
            )
        location = str(folder)
        load_kwargs: dict[str, Any] = {}
    else:
        location = spec.source
        load_kwargs = {"revision": spec.revision}
        if constants.is_offline_mode():
            load_kwargs["local_files_only"] = True
    try:
        with warnings.catch_warnings():
            # diffusers 0.42's load_config passes a deprecated argument to hf_hub_download.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            config = DiffusionPipeline.load_config(location, **load_kwargs)
            # diffusers 0.42 deprecates from_pretrained's torch_dtype in favour of dtype.
            kwargs: dict[str, Any] = {**load_kwargs, "dtype": torch_dtype, "variant": spec.variant}
            if "safety_checker" in config:  # SD-style pipelines: drop the NSFW filter, it is not audited here
                kwargs["safety_checker"] = None
                kwargs["requires_safety_checker"] = False
            pipe = DiffusionPipeline.from_pretrained(location, **kwargs)
    except _hub_errors() as error:
        raise ModelNotFoundError(_not_found_message(spec, "loading failed", error)) from error
    return pipe


def _effective_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    global _warned_cpu_fp16
    dtype = spec.torch_dtype
    if device.type == "cpu" and dtype == torch.float16:
        if not _warned_cpu_fp16:
            logger.warning("model.dtype=float16 is not usable on CPU; loading %s in float32", spec.name)
            _warned_cpu_fp16 = True
        dtype = torch.float32
    return dtype


def _load_base(spec: ModelSpec, device: torch.device) -> Any:
    dtype = _effective_dtype(spec, device)
    logger.info("loading model %s (%s) as %s on %s", spec.name, spec.source, dtype, device)
    if spec.kind == "tiny-random":
        pipe = build_tiny_random(seed=0, inpaint=spec.source == "tiny-random-inpaint")
        if dtype != torch.float32:
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    # torch's own .to: diffusers 0.42's ModelMixin.to warns on every dtype cast.
                    torch.nn.Module.to(module, dtype=dtype)
    else:
        pipe = _from_pretrained(spec, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_TASK_CLASS_HINT = {"text2img": "Text2Image", "img2img": "Image2Image", "inpaint": "Inpainting"}


def _task_pipeline(base: Any, task: str, spec: ModelSpec) -> Any:
    """The pipeline for ``task`` over ``base``'s components (shared, not copied) with its own scheduler."""
    import diffusers

    unet = getattr(base, "unet", None)
    in_channels = getattr(getattr(unet, "config", None), "in_channels", None)
    if task != "inpaint" and in_channels == 9:
        raise ConfigError(
            f"task={task!r} needs a text-to-image model, but model.source={spec.source!r} is an inpainting "
            "checkpoint (UNet with 9 input channels); it serves only task='inpaint'"
        )
    auto = getattr(diffusers, f"AutoPipelineFor{_TASK_CLASS_HINT[task]}")
    # A fresh scheduler per task pipeline: schedulers keep state (timesteps, begin index) between calls.
    scheduler = type(base.scheduler).from_config(base.scheduler.config)
    try:
        pipe = auto.from_pipe(base, scheduler=scheduler)
    except ValueError as error:  # no pipeline of that task for this model family
        raise ConfigError(
            f"task={task!r} is not available for model.source={spec.source!r} ({type(base).__name__}): {error}"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(spec: ModelSpec, task: str = "img2img", device: str = "cpu") -> Any:
    """The memoized diffusers pipeline for ``task`` of the model ``spec`` on ``device``.

    The base components are loaded once per (spec, device) (``name`` does not count) and shared by all task
    pipelines: ``load_pipeline(s, "img2img").unet is load_pipeline(s, "text2img").unet``. Repeated calls
    return the same pipeline object. Progress bars are disabled (the harness draws its own).

    Args:
        spec: the model.
        task: ``"text2img"``, ``"img2img"`` or ``"inpaint"``.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns:
        A diffusers pipeline (e.g. ``StableDiffusionImg2ImgPipeline``) whose modules are on ``device`` in
        ``spec.dtype`` (float32 instead of float16 on CPU). Called with ``output_type="pt"`` it returns
        images of shape (N, 3, H, W) in [0, 1].

    Raises:
        ConfigError: unknown ``task``, or a task the model cannot serve.
        ModelNotFoundError: the checkpoint is missing.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"model must be a harness.models.ModelSpec, got {type(spec).__name__}")
    spec = spec.for_task(task)
    dev = torch.device(device)
    model_key = (json.dumps(spec.key_dict(), sort_keys=True), str(dev))
    task_key = (*model_key, task)
    with _LOCK:
        if task_key in _TASK:
            return _TASK[task_key]
        base = _BASE.get(model_key)
        if base is None:
            base = _load_base(spec, dev)
            _BASE[model_key] = base
        pipe = _task_pipeline(base, task, spec)
        _TASK[task_key] = pipe
        return pipe
