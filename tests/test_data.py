"""Tests for harness.data: image folders, pixel conversions, resizing and the bundled sample photos."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import (
    SAMPLE_PHOTOS,
    DataError,
    ImageFolder,
    SamplePhotos,
    load_image_file,
)
from harness.protocols import ConfigError


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _solid(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


@pytest.fixture
def rgb_folder(tmp_path: Path) -> Path:
    _save(tmp_path / "b.png", _solid(16, 16, (0, 0, 255)))
    _save(tmp_path / "a.png", _solid(16, 16, (255, 0, 0)))
    _save(tmp_path / "c.jpg", _solid(24, 24, (0, 255, 0)), quality=95)
    (tmp_path / ".DS_Store").write_bytes(b"\x00junk")
    return tmp_path


# ------------------------------------------------------------------------------------------- image folder


def test_rgb_folder_loads_sorted(rgb_folder: Path) -> None:
    ds = ImageFolder(str(rgb_folder), size=16)
    assert ds.name == "image_folder" and ds.version == "1"
    s = ds.load()
    assert s.ids == ("a", "b", "c")
    assert s.captions == ("", "", "")
    assert s.images.shape == (3, 3, 16, 16) and s.images.dtype == torch.float32
    assert 0.0 <= float(s.images.min()) and float(s.images.max()) <= 1.0
    assert torch.equal(s.images[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(s.images[1, :, 5, 7], torch.tensor([0.0, 0.0, 1.0]))
    g = s.images[2].mean(dim=(1, 2))  # JPEG, downscaled 24 -> 16
    assert g[1] > 0.95 and g[0] < 0.05 and g[2] < 0.05


def test_default_caption_and_limit(rgb_folder: Path) -> None:
    s = ImageFolder(str(rgb_folder), size=16, default_caption="a painting", limit=2).load()
    assert s.ids == ("a", "b") and s.captions == ("a painting", "a painting")


def test_recursive_ids(tmp_path: Path) -> None:
    _save(tmp_path / "top.png", _solid(16, 16, (1, 2, 3)))
    _save(tmp_path / "sub" / "cat_01.png", _solid(16, 16, (1, 2, 3)))
    _save(tmp_path / ".hidden" / "x.png", _solid(16, 16, (1, 2, 3)))
    assert ImageFolder(str(tmp_path), size=16).load().ids == ("top",)
    assert ImageFolder(str(tmp_path), size=16, recursive=True).load().ids == ("sub/cat_01", "top")


def test_metadata_csv_captions(rgb_folder: Path) -> None:
    (rgb_folder / "metadata.csv").write_text('file_name,text\na.png,"a red square, flat"\nc.jpg,green\n')
    s = ImageFolder(str(rgb_folder), size=16, default_caption="dflt").load()
    assert s.captions == ("a red square, flat", "dflt", "green")


def test_captions_jsonl(rgb_folder: Path) -> None:
    lines = [
        json.dumps({"file_name": "b.png", "text": "blue"}),
        "",
        json.dumps({"file_name": "a.png", "text": "red"}),
    ]
    (rgb_folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    assert ImageFolder(str(rgb_folder), size=16).load().captions == ("red", "blue", "")


def test_both_sidecars_error(rgb_folder: Path) -> None:
    (rgb_folder / "metadata.csv").write_text("file_name,text\n")
    (rgb_folder / "captions.jsonl").write_text("")
    with pytest.raises(DataError, match="keep only one"):
        ImageFolder(str(rgb_folder), size=16).load()


def test_caption_for_missing_file(rgb_folder: Path) -> None:
    (rgb_folder / "metadata.csv").write_text("file_name,text\na.png,red\nghost.png,boo\n")
    with pytest.raises(DataError, match="ghost.png") as e:
        ImageFolder(str(rgb_folder), size=16).load()
    assert "metadata.csv line 3" in str(e.value)


def test_malformed_sidecars(rgb_folder: Path) -> None:
    (rgb_folder / "metadata.csv").write_text("name,caption\na.png,red\n")
    with pytest.raises(DataError, match="metadata.csv line 1"):
        ImageFolder(str(rgb_folder), size=16).load()
    (rgb_folder / "metadata.csv").unlink()
    (rgb_folder / "captions.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n{oops\n')
    with pytest.raises(DataError, match="captions.jsonl line 2"):
        ImageFolder(str(rgb_folder), size=16).load()


def test_corrupt_png(rgb_folder: Path) -> None:
    bad = rgb_folder / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="is not a readable image") as e:
        ImageFolder(str(rgb_folder), size=16).load()
    assert str(bad) in str(e.value)


def test_text_file_named(rgb_folder: Path) -> None:
    (rgb_folder / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        ImageFolder(str(rgb_folder), size=16).load()


def test_truncated_png(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = _save(tmp_path / "t.png", noise)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.png is not a readable image"):
        load_image_file(path, 16)


def test_empty_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / ".gitkeep").write_text("")
    with pytest.raises(DataError, match="no image files"):
        ImageFolder(str(tmp_path), size=16).load()
    with pytest.raises(DataError, match="no such folder") as e:
        ImageFolder(str(tmp_path / "nope"), size=16).load()
    assert str(tmp_path / "nope") in str(e.value)


def test_duplicate_stem(rgb_folder: Path) -> None:
    _save(rgb_folder / "a.jpg", _solid(16, 16, (9, 9, 9)))
    with pytest.raises(DataError, match="same id 'a'") as e:
        ImageFolder(str(rgb_folder), size=16).load()
    assert "a.jpg" in str(e.value) and "a.png" in str(e.value)


def test_invalid_options(tmp_path: Path) -> None:
    for size in (4, 5000, 16.0, True, "64"):
        with pytest.raises(ConfigError, match="dataset.size"):
            ImageFolder(str(tmp_path), size=size)
    with pytest.raises(ConfigError, match="dataset.limit"):
        ImageFolder(str(tmp_path), limit=0)
    with pytest.raises(ConfigError, match="dataset.path"):
        ImageFolder("")
    with pytest.raises(ConfigError, match="dataset.size"):
        SamplePhotos(size=7)


# ------------------------------------------------------------------------------------------- conversions


def test_grayscale_8_16_bit_and_bilevel(tmp_path: Path) -> None:
    gray = np.full((16, 16), 51, dtype=np.uint8)
    out = load_image_file(_save(tmp_path / "g.png", gray), 16)
    assert torch.allclose(out, torch.full((3, 16, 16), 0.2))

    g16 = np.zeros((16, 16), dtype=np.uint16)
    g16[:, :8], g16[:, 8:] = 65535, 32768
    path = _save(tmp_path / "g16.png", g16)
    assert Image.open(path).mode.startswith("I")
    out = load_image_file(path, 16)
    assert out.shape == (3, 16, 16)
    assert torch.equal(out[:, :, 0], torch.ones(3, 16))
    assert torch.allclose(out[:, :, 15], torch.full((3, 16), 32768 / 65535))

    Image.new("1", (16, 16), 1).save(tmp_path / "bw.png")
    assert torch.equal(load_image_file(tmp_path / "bw.png", 16), torch.ones(3, 16, 16))


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent -> white
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black -> gray 1 - 128/255
    rgba[0, 2] = (0, 0, 255, 255)  # opaque blue
    out = load_image_file(_save(tmp_path / "a.png", rgba), 16)
    assert torch.equal(out[:, 0, 0], torch.ones(3))
    assert torch.allclose(out[:, 0, 1], torch.full((3,), 1 - 128 / 255))
    assert torch.equal(out[:, 0, 2], torch.tensor([0.0, 0.0, 1.0]))

    la = np.zeros((16, 16, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 0, 0  # transparent black
    out = load_image_file(_save(tmp_path / "la.png", la), 16)
    assert torch.equal(out, torch.ones(3, 16, 16))


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([200, 100, 50, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (8, 0, 16, 16))  # right half: index 1
    img.save(tmp_path / "p.png")
    out = load_image_file(tmp_path / "p.png", 16)
    assert torch.allclose(out[:, 3, 2], torch.tensor([200, 100, 50]) / 255.0)
    assert torch.equal(out[:, 3, 12], torch.tensor([0.0, 0.0, 1.0]))

    img.save(tmp_path / "pt.png", transparency=1)  # index 1 transparent -> white
    out = load_image_file(tmp_path / "pt.png", 16)
    assert torch.allclose(out[:, 3, 2], torch.tensor([200, 100, 50]) / 255.0)
    assert torch.equal(out[:, 3, 12], torch.ones(3))


def test_cmyk(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    out = load_image_file(tmp_path / "c.tif", 16)
    assert torch.equal(out[:, 4, 4], torch.tensor([1.0, 0.0, 0.0]))


def test_exif_orientation(tmp_path: Path) -> None:
    arr = np.zeros((16, 32, 3), dtype=np.uint8)  # wide: left half red, right half blue
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: left half ends up on top
    path = _save(tmp_path / "o.png", arr, exif=exif)
    out = load_image_file(path, 16)  # upright 16 wide x 32 tall; centre crop rows 8..24
    assert torch.equal(out[:, 0, 5], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(out[:, 15, 5], torch.tensor([0.0, 0.0, 1.0]))


def test_too_small_needs_allow_upscale(tmp_path: Path) -> None:
    _save(tmp_path / "small.png", _solid(12, 20, (10, 20, 30)))
    with pytest.raises(DataError, match="allow_upscale") as e:
        ImageFolder(str(tmp_path), size=16).load()
    assert "small.png is 20x12" in str(e.value)
    s = ImageFolder(str(tmp_path), size=16, allow_upscale=True).load()
    assert s.images.shape == (1, 3, 16, 16)
    assert torch.allclose(s.images[0, :, 8, 8], torch.tensor([10, 20, 30]) / 255.0, atol=1e-5)


def test_center_crop_keeps_middle(tmp_path: Path) -> None:
    arr = np.zeros((16, 48, 3), dtype=np.uint8)  # three vertical bands; only the middle one survives
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:32] = (0, 255, 0)
    arr[:, 32:] = (0, 0, 255)
    out = load_image_file(_save(tmp_path / "wide.png", arr), 16)
    assert torch.equal(out, torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 16, 16))

    tall = np.zeros((64, 32, 3), dtype=np.uint8)  # top/bottom quarters white, middle half black
    tall[:16], tall[48:] = 255, 255
    out = load_image_file(_save(tmp_path / "tall.png", tall), 16)  # as: resize to 16x32, keep rows 8..24
    assert float(out[:, 3:13].max()) < 1e-6  # the black middle survives
    assert float(out.max()) < 0.1  # only the Lanczos tails of the white quarters reach the edge rows
    ref = Image.fromarray(tall).resize((16, 32), Image.Resampling.LANCZOS).crop((0, 8, 16, 24))
    ours = (out.permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(ours - np.asarray(ref, dtype=np.float32)).max() <= 1


def test_downscale_is_antialiased(tmp_path: Path) -> None:
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    out = load_image_file(_save(tmp_path / "checker.png", checker), 16)
    assert torch.allclose(out[:, 4:12, 4:12], torch.full((3, 8, 8), 0.5), atol=0.02)


# ----------------------------------------------------------------------------------------- sample photos


def test_sample_photos_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("sample photos must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    ds = SamplePhotos(size=32)
    assert ds.name == "sample_photos" and ds.version == "1"
    s = ds.load()
    assert s.ids == tuple(SAMPLE_PHOTOS)
    assert s.images.shape == (len(SAMPLE_PHOTOS), 3, 32, 32) and s.images.dtype == torch.float32
    assert all(c.startswith("a ") for c in s.captions)
    assert all(float(img.std()) > 0.01 for img in s.images)  # real content, not blank
    assert {"skimage/astronaut", "sklearn/china", "matplotlib/grace_hopper"} <= set(s.ids)


def test_sample_photos_names_order_and_errors() -> None:
    s = SamplePhotos(names=["skimage/coins", "skimage/astronaut"], size=16).load()
    assert s.ids == ("skimage/coins", "skimage/astronaut")
    assert s.captions[1] == "a photo of an astronaut"
    coins = s.images[0]
    assert torch.equal(coins[0], coins[1]) and torch.equal(coins[1], coins[2])  # grayscale replicated
    assert SamplePhotos(limit=2).names == tuple(SAMPLE_PHOTOS)[:2]
    with pytest.raises(ConfigError, match="skimage/astronaut"):
        SamplePhotos(names=["skimage/nope"])
    with pytest.raises(ConfigError, match="dataset.names"):
        SamplePhotos(names="skimage/astronaut")


def test_combined_images_concatenate_parts_and_refuse_mixed_sizes():
    from harness.data import CombinedImages, SamplePhotos
    from harness.world import ProceduralArt

    photos = SamplePhotos(names=["skimage/camera", "skimage/coins"], size=32)
    art = ProceduralArt(artists="held_out", subjects=["house"], per_pair=1, size=32, split="eval")
    both = CombinedImages([photos, art]).load()
    assert both.ids == photos.load().ids + art.load().ids and both.size == (32, 32)
    with pytest.raises(ConfigError, match="different sizes"):
        CombinedImages([photos, SamplePhotos(names=["skimage/camera"], size=48)]).load()
    with pytest.raises(ConfigError, match="share image ids"):
        CombinedImages([photos, photos]).load()
    with pytest.raises(ConfigError, match="dataset.parts"):
        CombinedImages([])
