"""The embedded world: procedural artists, photo crops and the world tokenizer (CPU, no models)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from harness.protocols import ConfigError
from harness.world import (
    ARTISTS,
    HELD_OUT_ARTISTS,
    STYLES,
    SUBJECTS,
    TRAIN_ARTISTS,
    ProceduralArt,
    WorldPhotos,
    artwork_caption,
    render_artwork,
)


def test_catalogue_has_ten_plus_styles_and_three_held_out():
    assert len(ARTISTS) >= 10 and len(set(ARTISTS)) == len(ARTISTS)
    assert len(HELD_OUT_ARTISTS) >= 3
    assert set(TRAIN_ARTISTS) | set(HELD_OUT_ARTISTS) == set(ARTISTS)
    assert not set(TRAIN_ARTISTS) & set(HELD_OUT_ARTISTS)
    assert len(SUBJECTS) >= 5


@pytest.mark.parametrize("artist", ARTISTS)
def test_render_is_deterministic_and_seed_dependent(artist):
    a = render_artwork(artist, "house", seed=7, size=64)
    b = render_artwork(artist, "house", seed=7, size=64)
    c = render_artwork(artist, "house", seed=8, size=64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 10, f"{artist} rendered a nearly flat image"


def test_render_is_identical_in_a_fresh_process():
    code = (
        "import hashlib; from harness.world import render_artwork, ARTISTS;"
        "print(hashlib.sha256(b''.join(render_artwork(a, 'boat', 3, 32).tobytes() for a in ARTISTS)).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    here = hashlib.sha256(b"".join(render_artwork(a, "boat", 3, 32).tobytes() for a in ARTISTS)).hexdigest()
    assert out == here


def test_styles_differ_in_colour_statistics():
    """Each artist's images sit closer to its own mean colour histogram than to any other artist's."""

    def feature(img: np.ndarray) -> np.ndarray:
        q = (img // 64).reshape(-1, 3)
        hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(float)
        return hist / hist.sum()

    feats = {a: np.stack([feature(render_artwork(a, s, i, 64)) for i, s in enumerate(SUBJECTS)]) for a in ARTISTS}
    centroids = {a: f[: len(SUBJECTS) // 2].mean(0) for a, f in feats.items()}
    correct = total = 0
    for a, f in feats.items():
        for x in f[len(SUBJECTS) // 2 :]:
            pred = min(centroids, key=lambda b: np.abs(x - centroids[b]).sum())
            correct += pred == a
            total += 1
    assert correct / total >= 0.6  # colour alone separates most styles; texture does the rest


def test_procedural_art_dataset():
    ds = ProceduralArt(artists=["dottori", "cyanora"], subjects=["house", "fish"], per_pair=2, size=32)
    images = ds.load()
    assert len(images) == 8 and images.images.shape == (8, 3, 32, 32)
    assert images.ids[0] == "dottori/house/train-0000"
    assert images.captions[0] == "a house in the style of dottori"
    assert len(set(images.ids)) == 8
    again = ProceduralArt(artists=["dottori", "cyanora"], subjects=["house", "fish"], per_pair=2, size=32).load()
    assert np.array_equal(images.to_uint8(), again.to_uint8())
    other = ProceduralArt(
        artists=["dottori", "cyanora"], subjects=["house", "fish"], per_pair=2, size=32, split="eval"
    ).load()
    assert not np.array_equal(images.to_uint8(), other.to_uint8())
    held = ProceduralArt(artists="held_out", subjects=["sun"], size=32).load()
    assert [i.split("/")[0] for i in held.ids] == list(HELD_OUT_ARTISTS)
    cycled = ProceduralArt(artists=["dottori"], subjects=["sun"], per_pair=4, size=32, template=None).load()
    assert len(set(cycled.captions)) == 4


def test_caption_templates_name_subject_and_artist():
    for t in range(4):
        text = artwork_caption("tree", "tessela", t)
        assert "tree" in text and "tessela" in text


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"artists": ["nobody"]}, "dataset.artists"),
        ({"subjects": ["dragon"]}, "dataset.subjects"),
        ({"per_pair": 0}, "dataset.per_pair"),
        ({"size": 40}, "dataset.size"),
        ({"split": "test"}, "dataset.split"),
    ],
)
def test_procedural_art_rejects_bad_options(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        ProceduralArt(**kwargs)


def test_render_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown artist"):
        render_artwork("picasso", "house", 0)
    with pytest.raises(ConfigError, match="unknown subject"):
        render_artwork("dottori", "dragon", 0)


def test_world_photos():
    photos = WorldPhotos(crops_per_photo=2, size=32, names=["skimage/chelsea", "sklearn/china"]).load()
    assert len(photos) == 4 and photos.images.shape == (4, 3, 32, 32)
    assert photos.captions[0] == "a photo of a cat"
    assert photos.ids[0] == "photo/skimage/chelsea/train-0000"
    assert not np.array_equal(photos.to_uint8()[0], photos.to_uint8()[1])
    again = WorldPhotos(crops_per_photo=2, size=32, names=["skimage/chelsea", "sklearn/china"]).load()
    assert np.array_equal(photos.to_uint8(), again.to_uint8())
    with pytest.raises(ConfigError, match="dataset.names"):
        WorldPhotos(names=["skimage/nothing"])


def test_world_tokenizer_makes_every_world_word_one_token(tmp_path):
    from harness.zoo.tokenizer import save_world_tokenizer, world_words

    tok = save_world_tokenizer(tmp_path)
    for word in world_words():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    ids = tok("a house in the style of halftonia").input_ids
    assert len(ids) == 9 and ids[-1] == len(tok) - 1  # end of text has the largest id (open_clip pools there)
    assert len(tok("zqxj").input_ids) > 3  # unknown words still tokenize, byte by byte
    assert set(STYLES) <= set(world_words())
