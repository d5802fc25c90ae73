"""Where a result came from: git commit, package versions, hardware. Stored in every result row."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "peft",
    "kornia",
    "scikit-image",
    "open_clip_torch",
    "piq",
    "pandas",
    "numpy",
    "hydra-core",
    "omegaconf",
    "pillow",
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """The project's git commit and whether the work tree had uncommitted changes (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name: the first ``model name`` line of ``/proc/cpuinfo`` on Linux, else what
    ``platform.processor()`` says (empty on most Linux systems), else None."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware(device: str = "cpu") -> dict[str, Any]:
    """The machine a row was computed on. Floating-point results on CPU depend on the CPU and on the vector
    instruction set PyTorch dispatches to (``torch_cpu_capability``: AVX2, AVX512, ...): on another CPU the
    same code and seeds give values that differ in the last digits, and iterated sign-gradient attacks can
    amplify that to about 1e-3 in a metric."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def provenance(device: str = "cpu") -> dict[str, Any]:
    return {"git": git_state(), "packages": package_versions(), "hardware": hardware(device)}
