"""The experiment's diffusion model: spec, loader and memo.

A :class:`ModelSpec` names the weights (Hydra builds it from YAML with ``_target_: harness.models.ModelSpec``);
:func:`load_pipeline` turns it into a diffusers pipeline for one task ("text2img", "img2img", "inpaint").
The base components are loaded once per (spec, device) and shared by every task pipeline, so asking for
img2img after text2img costs no memory.

``source`` is one of:

* ``"tiny-random"`` / ``"tiny-random-inpaint"``: a randomly initialised, Stable-Diffusion-shaped pipeline of
  about 1.7 M parameters built in memory by :func:`harness.tiny_random.build_tiny_random` (no files, no
  network). Its native resolution is 32 px (``ModelSpec(source="tiny-random", resolution=32)``): the VAE
  downsamples 2x, so 32 px images become 16x16 latents. Its outputs are meaningless pictures; it exists so that
  every code path runs in tests and smoke runs. The inpaint variant has a 9-channel UNet and serves only
  ``task="inpaint"``.
* ``"tiny-sd"`` / ``"tiny-sd-inpaint"``: the embedded world's latent diffusion models, trained by the project
  (``python -m harness.zoo train``) and shipped inside the package (``harness/zoo/<name>/``, fp16 weights, 64 px).
  They load through the same ``DiffusionPipeline.from_pretrained`` path as a local folder.
* a local folder written by diffusers' ``save_pretrained`` (contains ``model_index.json``); a source that
  starts with ``/``, ``./``, ``../`` or ``~``, or that exists on disk, is taken as such a path.
* a Hugging Face hub id such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``, read from the local
  Hugging Face cache (and downloaded only when the user runs online with such a config).

:func:`from_pretrained` is the harness's one loader of diffusers checkpoints (local folder, shipped model or hub
id); :func:`load_pipeline` and the ``noisy_upscale`` purifier's SD x4 upscaler both read weights through it. A
missing checkpoint raises :class:`ModelNotFoundError`, whose message names the option that set the source, says
where the harness looked and how to point it at local weights. Images never cross this module: pipelines take
and return whatever diffusers does; model wrappers convert from and to the harness's (N, 3, H, W) float32
[0, 1] convention.

This module imports diffusers and transformers lazily, so importing :class:`ModelSpec` (for configs) is cheap.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import inspect
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from harness.errors import ConfigError, ModelNotFoundError
from harness.tiny_random import TINY_RANDOM_RESOLUTION, build_tiny_random

__all__ = [
    "ModelSpec",
    "ModelNotFoundError",
    "TASKS",
    "TINY_RANDOM_SOURCES",
    "TINY_RANDOM_RESOLUTION",
    "SHIPPED_MODELS",
    "DTYPES",
    "shipped_model_path",
    "from_pretrained",
    "load_pipeline",
    "clear_model_cache",
]

logger = logging.getLogger(__name__)

#: the tasks :func:`load_pipeline` serves.
TASKS: tuple[str, ...] = ("text2img", "img2img", "inpaint")
#: the sources built in memory by :func:`harness.tiny_random.build_tiny_random` (the second with a 9-channel
#: inpainting UNet); their native image side is :data:`TINY_RANDOM_RESOLUTION` (32 px, defined there).
TINY_RANDOM_SOURCES: tuple[str, ...] = ("tiny-random", "tiny-random-inpaint")
#: diffusion models shipped inside the package (``harness/zoo/<name>``), trained on the embedded world.
SHIPPED_MODELS: tuple[str, ...] = ("tiny-sd", "tiny-sd-inpaint")
#: components a shipped pipeline borrows from another shipped folder instead of storing a copy (the shipped
#: weights must stay within 40 MB): pipeline -> {component: (shipped folder, subfolder)}. The borrowed
#: weights count in the borrowing pipeline's digest under the component's name, as if they were its own.
SHIPPED_BORROWED: dict[str, dict[str, tuple[str, str]]] = {
    "tiny-sd": {"vae": ("tiny-vae", ".")},
    "tiny-sd-inpaint": {"vae": ("tiny-vae", "."), "text_encoder": ("tiny-sd", "text_encoder")},
}


def shipped_model_path(name: str) -> Path:
    """The folder of a shipped model (``harness/zoo/<name>``); it may be missing in a partial checkout."""
    return Path(__file__).resolve().parent / "zoo" / name


def shipped_weight_files(name: str) -> dict[str, Path]:
    """The weight files of shipped pipeline ``name`` by their path inside the pipeline, borrowed ones included
    (:data:`SHIPPED_BORROWED`)."""
    folder = shipped_model_path(name)
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*.safetensors")}
    for component, (owner, sub) in SHIPPED_BORROWED.get(name, {}).items():
        source = shipped_model_path(owner) / sub
        for p in source.rglob("*.safetensors"):
            files.setdefault(str(Path(component) / p.relative_to(source)), p)
    return dict(sorted(files.items()))


@lru_cache(maxsize=8)
def _files_digest(files: tuple[tuple[str, str], ...], mtimes: tuple[float, ...]) -> str:
    """SHA-256 over weight files (their names inside the pipeline and their bytes), memoized by their mtimes."""
    import hashlib

    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


#: the weight dtypes a config may name (``model.dtype``, ``purifier.dtype``), as torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_PATH_PREFIXES = ("/", "./", "../", "~")


def _is_path(source: str) -> bool:
    """Whether ``source`` is read as a local folder: it starts with ``/``, ``./``, ``../`` or ``~``, or exists."""
    return source.startswith(_PATH_PREFIXES) or os.path.exists(os.path.expanduser(source))


def _is_local_source(source: str) -> bool:
    """Whether ``source`` names a local folder rather than a hub id (tiny-random and shipped sources are neither)."""
    if source in TINY_RANDOM_SOURCES or source in SHIPPED_MODELS:
        return False
    return _is_path(source)


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
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
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
        return DTYPES[self.dtype]

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
            files = shipped_weight_files(self.source)
            key["weights_sha256"] = (
                _files_digest(
                    tuple((k, str(p)) for k, p in files.items()), tuple(p.stat().st_mtime for p in files.values())
                )
                if files
                else None
            )
        if self.inpaint_source:
            key["inpaint"] = self.for_task("inpaint").key_dict()
        return key


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


def _not_found_message(
    source: str,
    kind: str,
    problem: str,
    error: BaseException | None,
    *,
    option: str,
    what: str,
    writer: str,
    revision: str | None,
    variant: str | None,
) -> str:
    """What :func:`from_pretrained` says when ``source`` (a ``kind`` checkpoint set by ``option``) is missing."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    offline = constants.is_offline_mode()
    lines = [f"{what} checkpoint not found for {option}={source!r}: {problem}.", "Where the harness looked:"]
    if kind == "local":
        lines.append(f"  - the local folder {_resolved_path(source)} (a diffusers folder with model_index.json)")
    elif kind == "shipped":
        lines.append(f"  - the shipped model folder {shipped_model_path(source)}")
        lines.append(
            f"How to fix: reinstall the package from a complete checkout, or retrain the weights with "
            f"`python -m harness.zoo train {source}`."
        )
        if error is not None:
            lines.append(f"Original error: {type(error).__name__}: {error}")
        return "\n".join(lines)
    else:
        rev = f", revision={revision!r}" if revision else ""
        var = f", variant={variant!r}" if variant else ""
        lines.append(f"  - the Hugging Face hub cache {constants.HF_HUB_CACHE} for hub id {source!r}{rev}{var}")
        lines.append(
            f"  - HF_HUB_OFFLINE is {'set' if env else 'not set'} ({env!r}); offline mode is "
            f"{'on: nothing is downloaded' if offline else 'off: the hub was asked too'}"
        )
    lines += [
        f"How to fix: point the harness at local weights with {option}=/path/to/folder "
        f"(a diffusers folder written by {writer} save_pretrained, containing model_index.json),",
    ]
    if kind == "hub":
        lines.append(
            "or pre-download the model into the Hugging Face cache on a machine with network access "
            f"(`hf download {source}`, then copy {constants.HF_HUB_CACHE} here or set HF_HUB_CACHE)."
        )
    else:
        lines.append(f"or name a Hugging Face hub id already in the cache, e.g. {option}=org/model-name.")
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


def from_pretrained(
    source: str,
    torch_dtype: torch.dtype,
    *,
    pipeline_class: Any = None,
    option: str = "model.source",
    what: str = "model",
    revision: str | None = None,
    variant: str | None = None,
    shipped: bool = False,
    also_catch: tuple[type[BaseException], ...] = (),
) -> Any:
    """Load a diffusers pipeline from a local folder, a shipped model or a hub id: the harness's one checkpoint loader.

    ``source`` is read as a local folder when it starts with ``/``, ``./``, ``../`` or ``~`` or exists on disk
    (it must hold ``model_index.json``), else as a hub id, read from the local Hugging Face cache only when
    offline mode is on. An SD-style pipeline is loaded without its safety checker (the harness never uses it).

    Args:
        source: the folder or hub id (for ``shipped``, a name of :data:`SHIPPED_MODELS`).
        torch_dtype: the weights' dtype.
        pipeline_class: the diffusers pipeline class to load with (default ``DiffusionPipeline``, which takes the
            class named in ``model_index.json``), e.g. ``StableDiffusionUpscalePipeline``.
        option: the config option that set ``source``, named in errors (``"model.source"``,
            ``"purifier.upscaler_source"``).
        what: what the checkpoint is, for errors (``"model"`` gives "model checkpoint not found ...").
        revision: hub revision (branch, tag or commit); not used for folders.
        variant: weight-file variant such as ``"fp16"``, or None.
        shipped: ``source`` is a model shipped inside the package, read from :func:`shipped_model_path`.
        also_catch: further exception types that mean a missing or unusable checkpoint for this caller.

    Returns:
        The pipeline, on CPU.

    Raises:
        ModelNotFoundError: the folder is missing or not a diffusers folder, or loading failed; the message
            names ``option`` and ``source``, says where the harness looked and how to fix it.
    """
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    cls = pipeline_class or DiffusionPipeline
    kind = "shipped" if shipped else "local" if _is_path(source) else "hub"
    writer = "a pipeline's" if cls is DiffusionPipeline else f"a {cls.__name__}'s"

    def not_found(problem: str, error: BaseException | None = None) -> ModelNotFoundError:
        message = _not_found_message(
            source, kind, problem, error, option=option, what=what, writer=writer, revision=revision, variant=variant
        )
        return ModelNotFoundError(message)

    if kind in ("local", "shipped"):
        folder = shipped_model_path(source) if kind == "shipped" else _resolved_path(source)
        if not folder.is_dir():
            problem = "is a file, not a folder" if folder.exists() else "does not exist"
            raise not_found(f"the folder {folder} {problem}")
        if not (folder / "model_index.json").is_file():
            raise not_found(f"the folder {folder} has no model_index.json (not a diffusers folder)")
        location = str(folder)
        load_kwargs: dict[str, Any] = {}
    else:
        location = source
        load_kwargs = {"revision": revision}
        if constants.is_offline_mode():
            load_kwargs["local_files_only"] = True
    try:
        with warnings.catch_warnings():
            # diffusers 0.42's load_config passes a deprecated argument to hf_hub_download.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            config = cls.load_config(location, **load_kwargs)
            # diffusers 0.42 deprecates from_pretrained's torch_dtype in favour of dtype.
            kwargs: dict[str, Any] = {**load_kwargs, "dtype": torch_dtype, "variant": variant}
            if "safety_checker" in config:  # SD-style pipelines: drop the NSFW filter, it is not audited here
                kwargs["safety_checker"] = None
                if cls is DiffusionPipeline or "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
                    kwargs["requires_safety_checker"] = False
            if kind == "shipped":
                kwargs.update(_borrowed_components(source, config, torch_dtype))
            pipe = cls.from_pretrained(location, **kwargs)
    except (*_hub_errors(), *also_catch) as error:
        raise not_found("loading failed", error) from error
    return pipe


def _borrowed_components(name: str, config: dict[str, Any], torch_dtype: torch.dtype) -> dict[str, Any]:
    """The components shipped pipeline ``name`` borrows (:data:`SHIPPED_BORROWED`), loaded with the classes its
    ``model_index.json`` names, for ``from_pretrained`` to take instead of reading its own subfolders."""
    out = {}
    for component, (owner, sub) in SHIPPED_BORROWED.get(name, {}).items():
        library, class_name = config[component]
        cls = getattr(importlib.import_module(library), class_name)
        out[component] = cls.from_pretrained(shipped_model_path(owner) / sub, dtype=torch_dtype)
    return out


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
        pipe = from_pretrained(
            spec.source, dtype, revision=spec.revision, variant=spec.variant, shipped=spec.kind == "shipped"
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_TASK_CLASS_HINT = {"text2img": "Text2Image", "img2img": "Image2Image", "inpaint": "Inpainting"}


def _task_pipeline(base: Any, task: str, spec: ModelSpec) -> Any:
    """The pipeline for ``task`` over ``base``'s components (shared, not copied) with its own scheduler."""
    import diffusers

    from harness.inpainting import is_inpainting_unet, latent_inpaint_pipeline

    unet, vae = getattr(base, "unet", None), getattr(base, "vae", None)
    inpainting = unet is not None and vae is not None and is_inpainting_unet(unet, vae)
    if task != "inpaint" and inpainting:
        raise ConfigError(
            f"task={task!r} needs a text-to-image model, but model.source={spec.source!r} is an inpainting "
            f"checkpoint (UNet with {unet.config.in_channels} input channels); it serves only task='inpaint'"
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
    if task == "inpaint" and inpainting and unet.config.in_channels != 9:
        pipe = latent_inpaint_pipeline(pipe)  # diffusers' inpainting pipeline takes 4- or 9-channel UNets only
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
