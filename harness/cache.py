"""Stage keys and the artifact store.

**Keys.** Each stage's key is a SHA-256 over the previous stage's key, the stage's own resolved config, its
component ``version`` and its derived seed: a Merkle chain, so changing a purifier re-uses cached
protections and changing a metric re-runs only the measurement. Runtime settings (device, batch size,
paths) are never hashed: :func:`stage_key` refuses a config that carries a ``runtime`` entry.

**Store.** A plain directory: ``<root>/<stage>/<key[:2]>/<key>/`` holds the artifact's files, a
``manifest.json`` with each file's SHA-256 and size, and an empty ``DONE`` marker written last. Artifacts
are written into a temporary sibling folder and renamed into place in one step, so a killed run leaves no
half-written artifact, and two workers computing the same key never corrupt each other (the first rename
wins; the loser discards its copy). Reading verifies the manifest; an artifact that fails verification is
moved aside into ``<root>/.corrupt/`` (never deleted) and reported as missing, so it is recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.types import ImageSet

__all__ = [
    "canonical_json",
    "stage_key",
    "ArtifactStore",
    "Artifact",
    "CorruptArtifactError",
    "save_imageset",
    "load_imageset",
    "atomic_write_text",
]

log = logging.getLogger(__name__)

KEY_SCHEMA = "harness-key-v1"
RUNTIME_KEYS = frozenset({"runtime"})


def _normalise(obj: Any) -> Any:
    """Turn a config into plain JSON types with a stable form (sorted keys, floats by repr)."""
    if isinstance(obj, Mapping):
        return {str(k): _normalise(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return repr(obj)
        return obj
    if isinstance(obj, np.generic):
        return _normalise(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot hash a value of type {type(obj).__name__} in a stage config: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text of a config (sorted keys, no whitespace)."""
    return json.dumps(_normalise(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def stage_key(stage: str, parents: Mapping[str, str], config: Mapping[str, Any], version: str, seed: int | None) -> str:
    """The key of one stage: hash of its parents' keys, its own config, its component version and seed.

    Args:
        stage: the stage's name ("data", "protect", ...).
        parents: name -> key of every stage this one consumes (empty for the first stage).
        config: the stage's own resolved config (plain types; no runtime settings).
        version: the component's ``version`` attribute.
        seed: the derived seed the stage draws from (None for deterministic stages).

    Returns:
        64 hex digits.
    """
    bad = RUNTIME_KEYS & set(map(str, config))
    if bad:
        raise ValueError(f"runtime settings must never be part of a stage key (got {sorted(bad)} in {stage!r})")
    payload = {
        "schema": KEY_SCHEMA,
        "stage": stage,
        "parents": dict(parents),
        "config": config,
        "version": str(version),
        "seed": seed,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class CorruptArtifactError(RuntimeError):
    """An artifact's files do not match its manifest."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class Artifact:
    """A verified artifact folder in the store."""

    stage: str
    key: str
    path: Path

    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())


class ArtifactStore:
    """A directory of finished artifacts, safe for many concurrent workers on a shared filesystem."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path_for(self, stage: str, key: str) -> Path:
        if not stage.replace("_", "").isalnum():
            raise ValueError(f"bad stage name {stage!r}")
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad key {key!r}")
        return self.root / stage / key[:2] / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The finished, verified artifact, or None. A corrupt one is moved aside and None returned."""
        path = self.path_for(stage, key)
        if not (path / "DONE").is_file():
            return None
        try:
            self.verify(path)
        except CorruptArtifactError as err:
            self._quarantine(stage, key, path, err)
            return None
        return Artifact(stage, key, path)

    def put(
        self,
        stage: str,
        key: str,
        write: Callable[[Path], None],
    ) -> Artifact:
        """Write an artifact atomically: ``write(folder)`` fills a temporary folder that is then renamed.

        If another worker finished the same key first, its artifact is kept and this copy is discarded.
        """
        final = self.path_for(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key[:16]}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            manifest = {
                name: {"sha256": _sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in sorted(_relative_files(tmp))
            }
            (tmp / "manifest.json").write_text(json.dumps({"key": key, "stage": stage, "files": manifest}, indent=1))
            _fsync_tree(tmp)
            (tmp / "DONE").write_text("")
            try:
                os.rename(tmp, final)
            except OSError:
                # The final folder exists: finished by another worker, or left by a crash before DONE.
                if (final / "DONE").is_file() and self.get(stage, key) is not None:
                    log.debug("%s %s: another worker finished first; keeping its artifact", stage, key[:12])
                    shutil.rmtree(tmp, ignore_errors=True)
                    return Artifact(stage, key, final)
                self._quarantine(stage, key, final, CorruptArtifactError("unfinished folder in the way"))
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Artifact(stage, key, final)

    @staticmethod
    def verify(path: Path) -> None:
        """Raise CorruptArtifactError unless every file listed in the manifest is intact (and no file is missing)."""
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError) as err:
            raise CorruptArtifactError(f"{path}: unreadable manifest ({err})") from err
        for name, entry in files.items():
            f = path / name
            if not f.is_file():
                raise CorruptArtifactError(f"{f}: missing")
            if f.stat().st_size != entry["bytes"] or _sha256_file(f) != entry["sha256"]:
                raise CorruptArtifactError(f"{f}: content does not match the manifest")

    def _quarantine(self, stage: str, key: str, path: Path, err: Exception) -> None:
        dest = self.root / ".corrupt" / f"{stage}-{key[:16]}-{uuid.uuid4().hex[:8]}"
        log.warning("%s artifact %s failed verification (%s); moved to %s and recomputing", stage, key[:12], err, dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            pass  # another worker moved it already


def _relative_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------
# ImageSet codec: PNG per image (8-bit, as artists post them) + meta.json with ids, captions and extras.


def save_imageset(folder: Path, images: ImageSet, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``images`` as ``images/00000.png ...`` and ``meta.json`` (ids, captions, ``extra``)."""
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    arr = images.to_uint8()
    for i in range(len(images)):
        buf = io.BytesIO()
        Image.fromarray(arr[i], mode="RGB").save(buf, format="PNG", compress_level=6)
        (img_dir / f"{i:05d}.png").write_bytes(buf.getvalue())
    meta = {"ids": list(images.ids), "captions": list(images.captions), "extra": dict(extra or {})}
    (folder / "meta.json").write_text(json.dumps(_normalise(meta), indent=1))


def load_imageset(folder: Path) -> tuple[ImageSet, dict[str, Any]]:
    """Inverse of :func:`save_imageset`: the ImageSet (exactly the stored 8-bit values) and ``extra``."""
    meta = json.loads((folder / "meta.json").read_text())
    n = len(meta["ids"])
    if n == 0:
        arr = np.zeros((0, 1, 1, 3), np.uint8)
    else:
        arr = np.stack([np.asarray(Image.open(folder / "images" / f"{i:05d}.png").convert("RGB")) for i in range(n)])
    return ImageSet.from_uint8(arr, meta["ids"], meta["captions"]), meta.get("extra", {})
