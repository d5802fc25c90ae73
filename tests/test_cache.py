import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch

from harness.cache import ArtifactStore, load_imageset, save_imageset, stage_key
from tests import cache_worker
from tests.conftest import random_imageset


def test_stage_key_depends_on_parents_config_version_and_seed():
    base = stage_key("purify", {"protect": "a" * 64}, {"purifier": {"quality": 75}}, "1", 3)
    assert len(base) == 64
    assert base == stage_key("purify", {"protect": "a" * 64}, {"purifier": {"quality": 75}}, "1", 3)
    assert base != stage_key("purify", {"protect": "b" * 64}, {"purifier": {"quality": 75}}, "1", 3)
    assert base != stage_key("purify", {"protect": "a" * 64}, {"purifier": {"quality": 70}}, "1", 3)
    assert base != stage_key("purify", {"protect": "a" * 64}, {"purifier": {"quality": 75}}, "2", 3)
    assert base != stage_key("purify", {"protect": "a" * 64}, {"purifier": {"quality": 75}}, "1", 4)
    # key order in a config does not matter
    a = stage_key("x", {}, {"p": {"a": 1, "b": 2.5}}, "1", None)
    assert a == stage_key("x", {}, {"p": {"b": 2.5, "a": 1}}, "1", None)


def test_runtime_settings_are_refused_in_keys():
    with pytest.raises(ValueError, match="runtime"):
        stage_key("x", {}, {"runtime": {"device": "cpu"}}, "1", None)


def _write(images):
    return lambda folder: save_imageset(folder, images, {"note": 1})


def test_put_get_round_trip(tmp_path):
    store = ArtifactStore(tmp_path)
    imgs = random_imageset()
    key = "ab" * 32
    assert store.get("purify", key) is None
    art = store.put("purify", key, _write(imgs))
    assert (art.path / "DONE").exists() and (art.path / "manifest.json").exists()
    got = store.get("purify", key)
    loaded, extra = load_imageset(got.path)
    assert torch.equal(loaded.images, imgs.images) and loaded.ids == imgs.ids and extra == {"note": 1}
    # no temporary folders are left behind
    assert not [p for p in (tmp_path / "purify").rglob(".tmp-*")]


def test_failed_write_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    key = "cd" * 32

    def crash(folder: Path):
        (folder / "half.bin").write_bytes(b"xx")
        raise KeyboardInterrupt  # a killed run

    with pytest.raises(KeyboardInterrupt):
        store.put("protect", key, crash)
    assert store.get("protect", key) is None
    assert not list((tmp_path / "protect").rglob("*.bin"))


def test_folder_without_done_marker_is_not_an_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    key = "ef" * 32
    art = store.put("protect", key, _write(random_imageset()))
    (art.path / "DONE").unlink()
    assert store.get("protect", key) is None
    # a fresh put replaces the unfinished folder
    store.put("protect", key, _write(random_imageset()))
    assert store.get("protect", key) is not None


@pytest.mark.parametrize("damage", ["flip_byte", "delete_file", "bad_manifest"])
def test_corrupt_artifact_is_detected_quarantined_and_recomputable(tmp_path, damage):
    store = ArtifactStore(tmp_path)
    key = "12" * 32
    imgs = random_imageset()
    art = store.put("purify", key, _write(imgs))
    png = art.path / "images" / "00001.png"
    if damage == "flip_byte":
        data = bytearray(png.read_bytes())
        data[len(data) // 2] ^= 0xFF
        png.write_bytes(bytes(data))
    elif damage == "delete_file":
        png.unlink()
    else:
        (art.path / "manifest.json").write_text("{not json")
    assert store.get("purify", key) is None
    assert not art.path.exists()
    assert list((tmp_path / ".corrupt").iterdir())  # kept aside, never deleted
    store.put("purify", key, _write(imgs))
    loaded, _ = load_imageset(store.get("purify", key).path)
    assert torch.equal(loaded.images, imgs.images)


def test_concurrent_workers_never_corrupt_each_other(tmp_path):
    """Several processes finish the same key at the same moment: one artifact wins, nothing is torn."""
    key = "77" * 32
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    start_at = time.time() + 6.0  # after every worker has imported
    with ctx.Pool(3) as pool:
        paths = pool.starmap(cache_worker.put_same_key, [(str(tmp_path), key, s, start_at) for s in range(3)])
    assert len(set(paths)) == 1
    store = ArtifactStore(tmp_path)
    art = store.get("mimic", key)
    assert art is not None
    meta = json.loads((art.path / "meta.json").read_text())
    assert meta["extra"]["worker"] in range(3)
    assert os.listdir(tmp_path / "mimic" / key[:2]) == [key]  # no temporary folders left behind
