"""External defenses: protections made by a closed tool (Glaze, Nightshade, a vendor's service, ...).

Two ways in:

- ``folder``: a folder of images the tool produced, matched to the dataset's images by id (the file name
  without extension, sub-folders included, as :class:`harness.data.ImageFolder` names them). Every dataset
  image needs exactly one protected file; each file is read with the same resize and centre crop as the
  dataset, so run the tool on the same originals (or on the harness's exported clean PNGs).
- ``command``: a command template run once per image, e.g. ``"mytool --in {input} --out {output}"``. The harness
  writes each clean image as a PNG to ``{input}`` and reads ``{output}`` (a PNG path it chooses) back. The
  command is split like a shell would (``shlex``) but run without a shell.

The realised budget is not trusted: the pipeline measures L-inf, L2, PSNR and SSIM of every protected image
against its clean image, like any other defense. The cache key includes a digest of the folder's files (or
the command), so a re-run with new files recomputes.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.data import DataError, load_image_file
from harness.protocols import ConfigError, Context, Defense, DefenseOutput, check_range
from harness.types import ImageSet

__all__ = ["ExternalDefense", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ExternalDefense(Defense):
    """Protected images from a closed tool.

    Args:
        folder: folder of protected images named like the dataset's ids (``<id>.<ext>``).
        command: command template with ``{input}`` and ``{output}`` placeholders (instead of ``folder``).
        tool: the tool's name, for tables ("glaze-2.1", "nightshade-1.0", ...).
        claimed_eps: the L-inf budget the tool claims, in [0, 1] units, or None. Only reported; the harness
            measures the realised budget.
        timeout_s: seconds allowed per command run.
    """

    name = "external"
    version = "1"

    def __init__(
        self,
        folder: str | None = None,
        command: str | None = None,
        tool: str = "external",
        claimed_eps: float | None = None,
        timeout_s: float = 600.0,
    ):
        if bool(folder) == bool(command):
            raise ConfigError("set exactly one of defense.folder (images the tool made) and defense.command")
        if command:
            if "{input}" not in command or "{output}" not in command:
                raise ConfigError(
                    f"defense.command must contain {{input}} and {{output}} placeholders, got {command!r}"
                )
            try:
                shlex.split(command)
            except ValueError as e:
                raise ConfigError(f"defense.command cannot be parsed: {e}") from None
        self.folder = str(Path(folder).expanduser()) if folder else None
        if self.folder is not None and not Path(self.folder).is_dir():
            raise ConfigError(f"defense.folder={self.folder!r} is not a folder")
        self.command = command or None
        self.tool = str(tool)
        self.claimed_eps = None if claimed_eps is None else check_range("defense.claimed_eps", claimed_eps, 0.0, 1.0)
        self.eps = None  # an external tool's budget is measured, not assumed
        self.timeout_s = check_range("defense.timeout_s", timeout_s, 1.0, 86400.0)

    def cache_token(self) -> str:
        """A digest of what the defense reads: every image file's name, size and content, or the command."""
        h = hashlib.sha256()
        if self.command:
            h.update(self.command.encode())
        else:
            root = Path(self.folder)
            for p in sorted(root.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    h.update(p.relative_to(root).as_posix().encode())
                    h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()

    def _file_for(self, image_id: str) -> Path:
        root = Path(self.folder)
        matches = [root / f"{image_id}{s}" for s in IMAGE_SUFFIXES] + [
            root / f"{image_id}{s.upper()}" for s in IMAGE_SUFFIXES
        ]
        found = sorted({m for m in matches if m.is_file()})
        if not found:
            raise DataError(
                f"{root}: no protected image for id {image_id!r} (looked for {image_id}.png, .jpg, ...); "
                "the external tool's files must be named like the originals"
            )
        if len(found) > 1:
            raise DataError(f"{root}: several files for id {image_id!r}: {', '.join(p.name for p in found)}")
        return found[0]

    def _run_command(self, image: torch.Tensor, image_id: str, size: int, work: Path) -> torch.Tensor:
        safe = hashlib.sha256(image_id.encode()).hexdigest()[:16]
        src, dst = work / f"{safe}_in.png", work / f"{safe}_out.png"
        arr = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr, mode="RGB").save(src)
        argv = [a.format(input=str(src), output=str(dst)) for a in shlex.split(self.command)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise ConfigError(f"defense.command: program {argv[0]!r} not found") from None
        except subprocess.TimeoutExpired:
            raise DataError(f"defense.command timed out after {self.timeout_s} s on image {image_id!r}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-500:]
            raise DataError(f"defense.command failed (exit {proc.returncode}) on image {image_id!r}: {tail}")
        if not dst.is_file():
            raise DataError(f"defense.command wrote no file {{output}} for image {image_id!r}")
        return load_image_file(dst, size, allow_upscale=True)

    def protect(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> DefenseOutput:
        h, w = images.size
        if h != w:
            raise DataError(f"external defense: the dataset's images must be square, got {h}x{w}")
        out = []
        if self.command:
            with tempfile.TemporaryDirectory(prefix="external-defense-") as tmp:
                for k in ctx.progress(range(len(images)), desc=self.tool, unit="img"):
                    out.append(self._run_command(images.images[k], images.ids[k], h, Path(tmp)))
        else:
            for image_id in images.ids:
                out.append(load_image_file(self._file_for(image_id), h, allow_upscale=True))
        protected = torch.stack(out) if out else images.images.clone()
        info = {"claimed_eps": float("nan") if self.claimed_eps is None else self.claimed_eps}
        return DefenseOutput(images.with_images(protected), info)
