"""Data loading for the pipeline's "data" stage: image folders and the photos that installed packages bundle.

Every loader returns an :class:`~harness.types.ImageSet`: float32, shape ``(N, 3, size, size)``, values in
``[0, 1]``, on the CPU, with stable ids and captions.

Pixel conversions (:func:`pil_to_tensor`), applied to the first frame of a file:

* EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``), so a phone photo is upright.
* Grayscale (``"1"``, ``"L"``, ``"I;16*"``, ``"I"``, ``"F"``) is replicated to the three RGB channels.
  ``"1"`` and ``"L"`` are divided by 255; 16-bit (``"I;16"``, ``"I;16B"``, ...) and ``"I"`` by 65535 (``"I"``
  is how Pillow may open a 16-bit PNG); ``"F"`` is taken to be in ``[0, 1]`` when all its values are, else in
  ``[0, 255]`` (Pillow's own convention for ``F -> L``). Values are clipped to ``[0, 1]``.
* Palette (``"P"``, ``"PA"``) is expanded through the palette to RGBA; a transparent palette entry (PNG
  ``tRNS``) becomes alpha 0. ``"L"``/``"RGB"`` with a transparent colour key are handled the same way.
* Alpha (``"RGBA"``, ``"LA"``, ``"PA"``, premultiplied ``"RGBa"``/``"La"``) is composited over white:
  ``rgb * a + (1 - a)``, so a fully transparent pixel becomes 1.0 (white) in every channel.
* CMYK, YCbCr, LAB, HSV and other modes go through Pillow's ``convert("RGB")`` (CMYK naively, no ICC).
  Embedded ICC profiles are not applied: values are taken as sRGB.

Resizing (:func:`resize_center_crop`): the image is resized so its shorter side equals ``size`` and centre
cropped to ``size x size``. This is done in one step, in float32 per channel, as a Lanczos (``PIL LANCZOS``,
antialiased when downscaling, no reducing gap) resize of the centred square of side ``min(W, H)`` (offset
rounded down) to ``size x size``: the same as resizing the whole image and cropping (the filter still reads
the pixels just outside the square), without an intermediate rounding of the longer side.
A square image already at ``size`` is returned exactly. Results are clipped to ``[0, 1]`` (Lanczos overshoots
slightly at sharp edges). Upscaling (shorter side below ``size``) is refused unless ``allow_upscale``.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps

from harness.errors import ConfigError, DataError
from harness.types import ImageSet

__all__ = [
    "CombinedImages",
    "HELD_OUT_PHOTOS",
    "SAMPLE_PHOTOS",
    "TRAIN_PHOTOS",
    "DataError",
    "ImageFolder",
    "SamplePhotos",
    "load_image_file",
    "native_side",
    "load_images_as_set",
    "pil_to_tensor",
    "resize_center_crop",
]

#: caption sidecar files of an :class:`ImageFolder` (never loaded as images).
SIDECARS: tuple[str, ...] = ("metadata.csv", "captions.jsonl")

MIN_SIZE, MAX_SIZE = 8, 4096
#: ``dataset.size`` value that keeps the images' own resolution (see :class:`ImageFolder`)
NATIVE = "native"


# --------------------------------------------------------------------------------------------- validation


def _check_int(option: str, value: Any, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]``, else raise a ConfigError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{option} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{option} must be {bound}, got {value!r}")
    return int(value)


def _check_size(value: Any) -> int:
    return _check_int("dataset.size", value, MIN_SIZE, MAX_SIZE)


def _check_limit(value: Any) -> int | None:
    return None if value is None else _check_int("dataset.limit", value, 1)


def _check_bool(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{option} must be true or false, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ pixels


def _alpha_over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, C+1) float in [0, 1] with alpha last -> (H, W, C) composited over white."""
    color, alpha = rgba[..., :-1], rgba[..., -1:]
    return color * alpha + (1.0 - alpha)


def _to_float_rgb(img: Image.Image) -> np.ndarray:
    """A Pillow image as a (H, W, 3) float32 array in [0, 1] (conversions in the module docstring)."""
    if "transparency" in img.info and img.mode in ("1", "L", "RGB", "P"):
        img = img.convert("LA" if img.mode in ("1", "L") else "RGBA")
    elif img.mode in ("P", "PA", "RGBa"):
        img = img.convert("RGBA")
    elif img.mode == "La":
        img = img.convert("LA")
    mode = img.mode

    if mode == "1":
        gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    elif mode == "L":
        gray = np.asarray(img, dtype=np.float32) / 255.0
    elif mode.startswith("I;16") or mode == "I":
        gray = (np.asarray(img).astype(np.float64) / 65535.0).astype(np.float32)
    elif mode == "F":
        gray = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        if gray.size and (gray.min() < 0.0 or gray.max() > 1.0):
            gray = gray / 255.0
    elif mode == "LA":
        gray = _alpha_over_white(np.asarray(img, dtype=np.float32) / 255.0)[..., 0]
    elif mode == "RGBA":
        return np.clip(_alpha_over_white(np.asarray(img, dtype=np.float32) / 255.0), 0.0, 1.0)
    else:
        rgb = img if mode == "RGB" else img.convert("RGB")
        return np.asarray(rgb, dtype=np.float32) / 255.0
    gray = np.clip(gray, 0.0, 1.0)
    return np.repeat(gray[..., None], 3, axis=-1)


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side of ``rgb`` to ``size`` and centre crop (see the module docstring).

    Args:
        rgb: (H, W, 3) float32 in [0, 1], H and W >= 1.
        size: output side in pixels.

    Returns:
        (size, size, 3) float32 in [0, 1].
    """
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    if side == size:
        return np.ascontiguousarray(rgb[top : top + size, left : left + size], dtype=np.float32)
    box = (left, top, left + side, top + side)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(rgb[..., c], dtype=np.float32)).resize(
                (size, size), Image.Resampling.LANCZOS, box=box
            ),
            dtype=np.float32,
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def pil_to_tensor(img: Image.Image, size: int, *, allow_upscale: bool = False, source: str = "image") -> torch.Tensor:
    """Convert a decoded Pillow image to RGB and resize/centre-crop it.

    Args:
        img: any Pillow image (already loaded); EXIF orientation is applied here.
        size: output side in pixels.
        allow_upscale: accept an image whose shorter side is below ``size`` (else DataError).
        source: how error messages name the image (a full file path, a sample-photo id).

    Returns:
        float32 tensor, shape (3, size, size), values in [0, 1].
    """
    img = ImageOps.exif_transpose(img)
    w, h = img.size
    if w == 0 or h == 0:
        raise DataError(f"{source} has a side of 0 pixels ({w}x{h}); remove it from the dataset")
    if min(w, h) < size and not allow_upscale:
        raise DataError(
            f"{source} is {w}x{h} pixels (width x height), smaller than dataset.size={size} on its shorter "
            "side; set dataset.allow_upscale=true to upscale it, or use a smaller dataset.size"
        )
    out = resize_center_crop(_to_float_rgb(img), size)
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def load_image_file(path: str | os.PathLike[str], size: int, *, allow_upscale: bool = False) -> torch.Tensor:
    """Read one image file as a float32 tensor, shape (3, size, size), values in [0, 1].

    Raises:
        DataError: the file is not a readable image (undecodable, truncated, not an image), has a side of
            0, or is smaller than ``size`` on its shorter side and ``allow_upscale`` is false. The message
            names the file by its full path.
    """
    size = _check_int("size", size, 1)
    full = str(Path(path).expanduser().absolute())
    try:
        with Image.open(full) as img:
            img.load()
            return pil_to_tensor(img, size, allow_upscale=allow_upscale, source=full)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{full}: no such file") from None
    except Exception as e:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise DataError(
            f"{full} is not a readable image: {e}. Remove it from the folder or replace it with a valid image"
        ) from e


def load_images_as_set(
    paths: Sequence[str | os.PathLike[str]],
    ids: Sequence[str],
    captions: Sequence[str],
    size: int,
    allow_upscale: bool = False,
) -> ImageSet:
    """Load image files into an ImageSet: images float32 (N, 3, size, size) in [0, 1], in the given order."""
    if not paths:
        return ImageSet(torch.zeros(0, 3, size, size), tuple(ids), tuple(captions))
    images = torch.stack([load_image_file(p, size, allow_upscale=allow_upscale) for p in paths])
    return ImageSet(images, tuple(ids), tuple(captions))


# ------------------------------------------------------------------------------------------- image folder


def _read_metadata_csv(path: Path) -> list[tuple[str, str, int]]:
    """(file_name, text, line) rows of a Hugging Face imagefolder ``metadata.csv``."""
    rows: list[tuple[str, str, int]] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"file_name", "text"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(
                f"{path} line 1: the header must have the columns file_name and text; missing "
                f"{sorted(missing)} (header: {reader.fieldnames})"
            )
        for row in reader:
            name, text = row.get("file_name"), row.get("text")
            if not name or text is None or None in row:
                raise DataError(
                    f"{path} line {reader.line_num}: expected a file_name and a text column, got {row}; "
                    "fix the row (quote texts that contain commas)"
                )
            rows.append((name, text, reader.line_num))
    return rows


def _read_captions_jsonl(path: Path) -> list[tuple[str, str, int]]:
    """(file_name, text, line) rows of a ``captions.jsonl`` (one JSON object per line)."""
    rows: list[tuple[str, str, int]] = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: not valid JSON ({e}); fix or remove the line") from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("file_name"), str)
                or not obj["file_name"]
                or not isinstance(obj.get("text"), str)
            ):
                raise DataError(
                    f"{path} line {line_no}: expected an object with string fields file_name and text, "
                    f"got {line.strip()[:200]}"
                )
            rows.append((obj["file_name"], obj["text"], line_no))
    return rows


class ImageFolder:
    """Every image in a folder, sorted by relative path, with optional captions.

    Files starting with '.' (and, when recursive, folders starting with '.') are ignored, as are the
    caption sidecars ``metadata.csv`` (columns ``file_name``, ``text``: the Hugging Face imagefolder
    convention) and ``captions.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line) at the top level.
    Every other file must be a readable image. ``file_name`` is the path relative to the folder, with '/'.

    Ids are the relative path without extension, with '/' separators ("cat_01", "sub/cat_01").

    Args:
        path: the folder.
        size: output side in pixels, in [8, 4096]; images are resized and centre cropped to it. ``"native"``:
            the images keep their own resolution: the side is the smallest shorter side among the files (read
            from their headers), so no image is upscaled and a folder of equal-sized images is only centre
            cropped. Model-based stages then resize to their model's resolution (see :mod:`harness.pipeline`).
        allow_upscale: accept images whose shorter side is below ``size``.
        default_caption: caption of images that the sidecar does not list (or all, without a sidecar).
        limit: keep only the first ``limit`` images after sorting (only those are decoded).
        recursive: include images in subfolders.
    """

    name: ClassVar[str] = "image_folder"
    version: ClassVar[str] = "1"

    def __init__(
        self,
        path: str,
        size: int = 64,
        allow_upscale: bool = False,
        default_caption: str = "",
        limit: int | None = None,
        recursive: bool = False,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ConfigError(f"dataset.path must be a non-empty folder path, got {path!r}")
        if not isinstance(default_caption, str):
            raise ConfigError(f"dataset.default_caption must be a string, got {default_caption!r}")
        self.path = str(path)
        if isinstance(size, str) and size != NATIVE:
            raise ConfigError(
                f"dataset.size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] or {NATIVE!r}, got {size!r}"
            )
        self.size: int | str = NATIVE if size == NATIVE else _check_size(size)
        self.allow_upscale = _check_bool("dataset.allow_upscale", allow_upscale)
        self.default_caption = default_caption
        self.limit = _check_limit(limit)
        self.recursive = _check_bool("dataset.recursive", recursive)

    def __repr__(self) -> str:
        return f"ImageFolder(path={self.path!r}, size={self.size}, limit={self.limit}, recursive={self.recursive})"

    def _root(self) -> Path:
        root = Path(self.path).expanduser().absolute()
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "no such folder"
            raise DataError(f"{root}: {what}; set dataset.path to a folder of images")
        return root

    def _files(self, root: Path) -> list[str]:
        """Relative posix paths of the candidate image files, sorted."""
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if self.recursive else []
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for fname in filenames:
                if fname.startswith("."):
                    continue
                if fname in SIDECARS:
                    if rel_dir != ".":
                        raise DataError(
                            f"{Path(dirpath) / fname}: caption files are read only at the top of {root}; "
                            f"move its entries there (with file_name relative to {root}, e.g. "
                            f"'{rel_dir}/image.png')"
                        )
                    continue
                found.append(fname if rel_dir == "." else f"{rel_dir}/{fname}")
        return sorted(found)

    def _captions(self, root: Path, files: Sequence[str]) -> dict[str, str]:
        sidecars = [root / s for s in SIDECARS if (root / s).is_file()]
        if not sidecars:
            return {}
        if len(sidecars) > 1:
            raise DataError(f"{sidecars[0]} and {sidecars[1]} both exist; keep only one caption file")
        sidecar = sidecars[0]
        rows = _read_metadata_csv(sidecar) if sidecar.name == "metadata.csv" else _read_captions_jsonl(sidecar)
        known = set(files)
        captions: dict[str, str] = {}
        for name, text, line in rows:
            key = posixpath.normpath(name.replace("\\", "/"))
            if key not in known:
                raise DataError(
                    f"{sidecar} line {line}: caption for {name!r}, but {root / key} is not an image file "
                    "in the folder; fix the file_name or remove the entry"
                )
            if key in captions:
                raise DataError(f"{sidecar} line {line}: a second caption for {name!r}; keep only one")
            captions[key] = text
        return captions

    def load(self) -> ImageSet:
        """The folder's images: float32 (N, 3, size, size) in [0, 1], ids sorted, with captions."""
        root = self._root()
        files = self._files(root)
        if not files:
            raise DataError(f"{root} contains no image files; put images in it or set dataset.path")
        by_id: dict[str, str] = {}
        for rel in files:
            stem = posixpath.splitext(rel)[0]
            if stem in by_id:
                raise DataError(
                    f"{root / by_id[stem]} and {root / rel} have the same id {stem!r}; rename or remove one"
                )
            by_id[stem] = rel
        captions = self._captions(root, files)
        if self.limit is not None:
            files = files[: self.limit]
        paths = [root / rel for rel in files]
        size = native_side(paths) if self.size == NATIVE else self.size
        return load_images_as_set(
            paths,
            [posixpath.splitext(rel)[0] for rel in files],
            [captions.get(rel, self.default_caption) for rel in files],
            size,
            self.allow_upscale,
        )


def native_side(paths: Sequence[str | os.PathLike[str]]) -> int:
    """The side at which ``dataset.size=native`` loads ``paths``: the smallest shorter side among the images
    (from their headers, after EXIF orientation, which does not change the shorter side), at most 4096 px.

    Raises:
        DataError: a file is not a readable image (the message names it), or an image is under 8 px.
    """
    sides = []
    for path in paths:
        try:
            with Image.open(path) as img:
                sides.append((min(img.size), str(path)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: not a readable image ({e}); remove it or convert it") from e
    side, smallest = min(sides)
    if side < MIN_SIZE:
        raise DataError(f"{smallest} is {side} px on its shorter side, below the {MIN_SIZE} px dataset.size allows")
    return min(side, MAX_SIZE)


# ------------------------------------------------------------------------------------------ sample photos


def _skimage(fn_name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        array = getattr(skimage.data, fn_name)()
        if fn_name == "stereo_motorcycle":
            array = array[0]  # left view
        return Image.fromarray(np.ascontiguousarray(array))

    return load


def _sklearn(file_name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(file_name))

    return load


def _matplotlib(file_name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from matplotlib.cbook import get_sample_data

        img = Image.open(get_sample_data(file_name, asfileobj=False))
        img.load()  # decodes the pixels and closes the file
        return img

    return load


#: id -> (loader returning a Pillow image, caption). Photos bundled with installed packages; all load from
#: the package's own files (no download). Insertion order is the default order of :class:`SamplePhotos`.
SAMPLE_PHOTOS: dict[str, tuple[Callable[[], Image.Image], str]] = {
    "skimage/astronaut": (_skimage("astronaut"), "a photo of an astronaut"),
    "skimage/camera": (_skimage("camera"), "a black and white photo of a cameraman with a camera"),
    "skimage/chelsea": (_skimage("chelsea"), "a photo of a cat"),
    "skimage/coffee": (_skimage("coffee"), "a photo of a cup of coffee"),
    "skimage/coins": (_skimage("coins"), "a black and white photo of old coins"),
    "skimage/hubble_deep_field": (_skimage("hubble_deep_field"), "a photo of galaxies in deep space"),
    "skimage/immunohistochemistry": (
        _skimage("immunohistochemistry"),
        "a microscope photo of stained tissue",
    ),
    "skimage/motorcycle": (_skimage("stereo_motorcycle"), "a photo of a motorcycle"),
    "skimage/retina": (_skimage("retina"), "a photo of the retina of a human eye"),
    "skimage/rocket": (_skimage("rocket"), "a photo of a rocket on a launch pad"),
    "skimage/moon": (_skimage("moon"), "a black and white photo of the surface of the moon"),
    "skimage/brick": (_skimage("brick"), "a black and white photo of a brick wall"),
    "skimage/grass": (_skimage("grass"), "a black and white photo of grass"),
    "skimage/gravel": (_skimage("gravel"), "a black and white photo of gravel"),
    "sklearn/china": (_sklearn("china.jpg"), "a photo of a Chinese temple"),
    "sklearn/flower": (_sklearn("flower.jpg"), "a photo of a flower"),
    "matplotlib/grace_hopper": (_matplotlib("grace_hopper.jpg"), "a portrait photo of Grace Hopper"),
}


#: whole photos no model of the embedded world is trained on: the editing threat model edits them, so an edit
#: is measured on images the autoencoder, the UNets and the judge never saw (not on new crops of seen photos).
HELD_OUT_PHOTOS: tuple[str, ...] = ("skimage/astronaut", "skimage/chelsea", "skimage/coffee", "skimage/rocket")
#: the sample photos the embedded world's models may train on (random crops of them).
TRAIN_PHOTOS: tuple[str, ...] = tuple(p for p in SAMPLE_PHOTOS if p not in HELD_OUT_PHOTOS)


class SamplePhotos:
    """Real photos bundled with installed packages (scikit-image, scikit-learn, matplotlib).

    For the editing threat model, where any natural photo will do. Nothing touches the network.

    Args:
        names: ids from :data:`SAMPLE_PHOTOS`, loaded in this order; None for the whole catalogue.
        size: output side in pixels, in [8, 4096] (resized and centre cropped; upscaling is allowed).
        limit: keep only the first ``limit`` photos.
    """

    name: ClassVar[str] = "sample_photos"
    version: ClassVar[str] = "1"

    def __init__(self, names: list[str] | None = None, size: int = 64, limit: int | None = None) -> None:
        if names is None:
            chosen = tuple(SAMPLE_PHOTOS)
        else:
            try:  # a list, or an OmegaConf ListConfig from Hydra
                chosen = () if isinstance(names, (str, bytes)) else tuple(names)
            except TypeError:
                chosen = ()
            if not chosen or not all(isinstance(n, str) for n in chosen):
                raise ConfigError(
                    f"dataset.names must be a non-empty list of sample-photo ids (or null for all), got {names!r}"
                )
            unknown = [n for n in chosen if n not in SAMPLE_PHOTOS]
            if unknown:
                raise ConfigError(f"dataset.names: unknown sample photo(s) {unknown}; available: {list(SAMPLE_PHOTOS)}")
            if len(set(chosen)) != len(chosen):
                raise ConfigError(f"dataset.names must not repeat a photo, got {list(chosen)}")
        self.size = _check_size(size)
        self.limit = _check_limit(limit)
        self.names: tuple[str, ...] = chosen[: self.limit] if self.limit is not None else chosen

    def __repr__(self) -> str:
        return f"SamplePhotos(names={list(self.names)}, size={self.size})"

    def load(self) -> ImageSet:
        """The photos: float32 (N, 3, size, size) in [0, 1], in the order of ``names``."""
        images = []
        for photo_id in self.names:
            loader, _ = SAMPLE_PHOTOS[photo_id]
            try:
                img = loader()
            except Exception as e:  # a package version without the file, a missing optional dependency
                raise DataError(
                    f"sample photo {photo_id!r} could not be loaded from its installed package: {e}; "
                    "drop it from dataset.names"
                ) from e
            images.append(pil_to_tensor(img, self.size, allow_upscale=True, source=photo_id))
        return ImageSet(
            torch.stack(images),
            self.names,
            tuple(SAMPLE_PHOTOS[n][1] for n in self.names),
        )


class CombinedImages:
    """Several datasets as one set (their images in order; every part at the same size, ids unique).

    Args:
        parts: dataset objects (anything with ``load() -> ImageSet``; in a config, a list of ``_target_`` nodes).
    """

    name: ClassVar[str] = "combined"
    version: ClassVar[str] = "1"

    def __init__(self, parts: list[Any]) -> None:
        parts = list(parts) if parts is not None and not isinstance(parts, (str, bytes)) else []
        if not parts or not all(callable(getattr(p, "load", None)) for p in parts):
            raise ConfigError(f"dataset.parts must be a non-empty list of dataset configs (_target_), got {parts!r}")
        self.parts = parts

    def __repr__(self) -> str:
        return f"CombinedImages(parts={self.parts!r})"

    def load(self) -> ImageSet:
        sets = [p.load() for p in self.parts]
        sizes = {s.size for s in sets if len(s)}
        if len(sizes) > 1:
            raise ConfigError(f"dataset.parts: the parts load at different sizes {sorted(sizes)}; set one size")
        ids = [i for s in sets for i in s.ids]
        if len(set(ids)) != len(ids):
            raise ConfigError("dataset.parts: two parts share image ids")
        return ImageSet.concat(sets)
