"""The embedded world: procedural artists and bundled sample photos, generated offline and deterministically.

The harness must show real results on a machine that cannot download models or data sets. This module is the
data half of that embedded default (``harness.zoo`` holds the models trained on it):

- **Procedural artists.** Thirteen invented artists, each a style renderer: a palette family, a stroke or
  texture, and composition rules (pointillist dots, triangular tiling, ink hatching, watercolour washes,
  stained glass, pixel art, op-art stripes, neon outlines, mosaic tiles, charcoal, halftone, cyanotype and
  impasto brush strokes). Each renders any of ten subjects (a house, a tree, a boat, ...) laid out at random.
  The names are invented words so that no score is mistaken for one about a real artist.
- **Held-out artists.** :data:`HELD_OUT_ARTISTS` (three styles) are never shown to ``tiny-sd`` in training:
  they are the artists whose style a mimic has to learn from a handful of images, as in the published
  style-mimicry studies (Shan et al. 2023, Hönig et al. 2024). ``tiny-clip`` sees every artist, since it is
  the judge.
- **Photos.** The sample photos that scikit-image, scikit-learn and matplotlib bundle
  (:data:`harness.data.SAMPLE_PHOTOS`), as random crops with flips and mild colour jitter, captioned
  (``"a photo of a cat"``), for the editing threat model.

Everything is a pure function of a seed: :func:`render_artwork` draws from a NumPy generator seeded with
:func:`harness.seeding.derive_seed` over (seed, split, artist, subject, index), so an image never depends
on what else was generated, and the splits never share an image: ``"train"`` (what the shipped models train on),
``"eval"`` (fresh images for the models' evaluations) and ``"posted"`` (the artworks an artist posts, which
mimics finetune on and defenses protect: no shipped model, the autoencoder and the judge included, ever saw one).

Images are rendered at twice the requested side and box-downsampled (anti-aliased), then quantized to 8 bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from harness.protocols import ConfigError
from harness.seeding import derive_seed
from harness.types import ImageSet

__all__ = [
    "ARTISTS",
    "CAPTION_TEMPLATES",
    "HELD_OUT_ARTISTS",
    "STYLES",
    "SUBJECTS",
    "TRAIN_ARTISTS",
    "ProceduralArt",
    "Style",
    "WorldPhotos",
    "artwork_caption",
    "render_artwork",
    "style_prompt",
    "subject_prompt",
]

Array = np.ndarray
Rng = np.random.Generator

# ------------------------------------------------------------------------------------------------ subjects
# A subject draws itself into a label map: 0 sky, 1 ground (both already painted), 2 the subject's main body,
# 3 its details. Coordinates are in pixels of the render canvas of side ``s``.

SKY, GROUND, BODY, DETAIL = 0, 1, 2, 3


def _house(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    w, h = k * s * rng.uniform(0.45, 0.6), k * s * rng.uniform(0.3, 0.42)
    x0, x1, y1 = cx - w / 2, cx + w / 2, base
    d.rectangle([x0, y1 - h, x1, y1], fill=BODY)
    d.polygon([(x0 - 0.08 * w, y1 - h), (cx, y1 - h - 0.7 * h), (x1 + 0.08 * w, y1 - h)], fill=DETAIL)
    dw = 0.2 * w
    d.rectangle([cx - dw / 2, y1 - 0.55 * h, cx + dw / 2, y1], fill=DETAIL)
    d.rectangle([x0 + 0.1 * w, y1 - 0.8 * h, x0 + 0.3 * w, y1 - 0.55 * h], fill=DETAIL)
    d.rectangle([x1 - 0.3 * w, y1 - 0.8 * h, x1 - 0.1 * w, y1 - 0.55 * h], fill=DETAIL)


def _tree(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    th, tw = k * s * rng.uniform(0.25, 0.35), k * s * 0.09
    d.rectangle([cx - tw / 2, base - th, cx + tw / 2, base], fill=DETAIL)
    r = k * s * rng.uniform(0.2, 0.27)
    for dx, dy in ((0, -0.9), (-0.7, -0.3), (0.7, -0.3), (0, -0.2)):
        x, y = cx + dx * r, base - th + dy * r
        d.ellipse([x - r, y - r, x + r, y + r], fill=BODY)


def _boat(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    w = k * s * rng.uniform(0.55, 0.7)
    hull = k * s * 0.14
    d.polygon(
        [(cx - w / 2, base - hull), (cx + w / 2, base - hull), (cx + 0.35 * w, base), (cx - 0.35 * w, base)], fill=BODY
    )
    mast = k * s * rng.uniform(0.45, 0.55)
    d.rectangle([cx - 0.015 * s, base - hull - mast, cx + 0.015 * s, base - hull], fill=BODY)
    d.polygon(
        [
            (cx + 0.02 * s, base - hull - mast),
            (cx + 0.02 * s, base - hull - 0.05 * s),
            (cx + 0.4 * w, base - hull - 0.05 * s),
        ],
        fill=DETAIL,
    )
    d.polygon(
        [
            (cx - 0.02 * s, base - hull - 0.85 * mast),
            (cx - 0.02 * s, base - hull - 0.05 * s),
            (cx - 0.3 * w, base - hull - 0.05 * s),
        ],
        fill=DETAIL,
    )


def _mountain(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    w, h = k * s * rng.uniform(0.8, 1.0), k * s * rng.uniform(0.5, 0.65)
    peak = (cx + rng.uniform(-0.1, 0.1) * w, base - h)
    d.polygon([(cx - w / 2, base), peak, (cx + w / 2, base)], fill=BODY)
    f = 0.3
    d.polygon(
        [
            (peak[0] - f * w / 2, peak[1] + f * h),
            peak,
            (peak[0] + f * w / 2, peak[1] + f * h),
            (peak[0], peak[1] + 0.8 * f * h),
        ],
        fill=DETAIL,
    )


def _flower(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    stem = k * s * rng.uniform(0.3, 0.4)
    d.rectangle([cx - 0.015 * s, base - stem, cx + 0.015 * s, base], fill=DETAIL)
    cy, r, n = base - stem, k * s * rng.uniform(0.09, 0.12), int(rng.integers(5, 8))
    for i in range(n):
        a = 2 * math.pi * i / n
        x, y = cx + 1.4 * r * math.cos(a), cy + 1.4 * r * math.sin(a)
        d.ellipse([x - r, y - r, x + r, y + r], fill=BODY)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=DETAIL)


def _fish(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    w, h = k * s * rng.uniform(0.5, 0.65), k * s * rng.uniform(0.25, 0.32)
    cy = base - 0.35 * s * k
    d.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=BODY)
    d.polygon([(cx + 0.4 * w, cy), (cx + 0.75 * w, cy - 0.45 * h), (cx + 0.75 * w, cy + 0.45 * h)], fill=DETAIL)
    e = 0.06 * w
    d.ellipse([cx - 0.3 * w - e, cy - 0.1 * h - e, cx - 0.3 * w + e, cy - 0.1 * h + e], fill=DETAIL)


def _sun(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    cy, r = base - 0.4 * s * k, k * s * rng.uniform(0.16, 0.2)
    for i in range(12):
        a = 2 * math.pi * i / 12 + rng.uniform(0, 0.2)
        d.line(
            [
                (cx + 1.2 * r * math.cos(a), cy + 1.2 * r * math.sin(a)),
                (cx + 1.8 * r * math.cos(a), cy + 1.8 * r * math.sin(a)),
            ],
            fill=DETAIL,
            width=max(2, s // 40),
        )
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=BODY)


def _star(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    cy, r = base - 0.38 * s * k, k * s * rng.uniform(0.28, 0.34)
    rot = rng.uniform(0, 2 * math.pi / 5)
    pts = [
        (
            cx + (r if i % 2 == 0 else 0.42 * r) * math.cos(rot + math.pi * i / 5),
            cy + (r if i % 2 == 0 else 0.42 * r) * math.sin(rot + math.pi * i / 5),
        )
        for i in range(10)
    ]
    d.polygon(pts, fill=BODY)
    d.ellipse([cx - 0.2 * r, cy - 0.2 * r, cx + 0.2 * r, cy + 0.2 * r], fill=DETAIL)


def _moon(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    cy, r = base - 0.4 * s * k, k * s * rng.uniform(0.22, 0.28)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=BODY)
    off = rng.uniform(0.35, 0.55) * r
    d.ellipse([cx - r + off, cy - r - 0.1 * r, cx + r + off, cy + r - 0.1 * r], fill=SKY)
    for _ in range(3):
        x, y, q = cx + rng.uniform(0.6, 1.6) * r, cy + rng.uniform(-1.2, 1.2) * r, 0.05 * s
        d.ellipse([x - q / 2, y - q / 2, x + q / 2, y + q / 2], fill=DETAIL)


def _heart(d: ImageDraw.ImageDraw, rng: Rng, s: int, cx: float, base: float, k: float) -> None:
    r = k * s * rng.uniform(0.13, 0.16)
    cy = base - 0.45 * s * k
    d.ellipse([cx - 2 * r, cy - r, cx, cy + r], fill=BODY)
    d.ellipse([cx, cy - r, cx + 2 * r, cy + r], fill=BODY)
    d.polygon([(cx - 1.95 * r, cy + 0.3 * r), (cx + 1.95 * r, cy + 0.3 * r), (cx, cy + 2.4 * r)], fill=BODY)
    d.ellipse([cx - 1.4 * r, cy - 0.5 * r, cx - 0.9 * r, cy], fill=DETAIL)


_SUBJECT_DRAW: dict[str, Callable[[ImageDraw.ImageDraw, Rng, int, float, float, float], None]] = {
    "house": _house,
    "tree": _tree,
    "boat": _boat,
    "mountain": _mountain,
    "flower": _flower,
    "fish": _fish,
    "sun": _sun,
    "star": _star,
    "moon": _moon,
    "heart": _heart,
}
#: the subjects every artist paints.
SUBJECTS: tuple[str, ...] = tuple(_SUBJECT_DRAW)


def _label_map(subject: str, rng: Rng, s: int) -> Array:
    """A random composition of ``subject``: an (s, s) uint8 map of SKY / GROUND / BODY / DETAIL labels."""
    img = Image.new("L", (s, s), SKY)
    d = ImageDraw.Draw(img)
    horizon = s * rng.uniform(0.6, 0.82)
    tilt = s * rng.uniform(-0.08, 0.08)
    d.polygon([(0, horizon - tilt), (s, horizon + tilt), (s, s), (0, s)], fill=GROUND)
    k = rng.uniform(0.8, 1.05)
    cx = s * rng.uniform(0.38, 0.62)
    base = min(horizon + rng.uniform(-0.02, 0.1) * s, 0.95 * s)
    _SUBJECT_DRAW[subject](d, rng, s, cx, base, k)
    return np.asarray(img, dtype=np.uint8)


# -------------------------------------------------------------------------------------------------- colour


def _hsv(h: Array | float, s: Array | float, v: Array | float) -> Array:
    """HSV (each in [0, 1], broadcastable) to RGB, last axis 3."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float) % 1.0, np.asarray(s, float), np.asarray(v, float))
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _palette(rng: Rng, hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]) -> Array:
    """Four colours (sky, ground, body, detail) with hues spread around a random start inside the ranges."""
    h0 = rng.uniform(*hue)
    hues = h0 + np.array([0.0, 0.28, 0.55, 0.8]) * rng.uniform(0.6, 1.0) + rng.uniform(-0.04, 0.04, 4)
    return _hsv(hues, rng.uniform(*sat, 4), rng.uniform(*val, 4))


def _luma(rgb: Array) -> Array:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _tones(labels: Array, rng: Rng, lo: float, hi: float) -> Array:
    """A distinct random tone per label, contrasting body and detail with the background."""
    t = rng.uniform(lo, hi, 4)
    t[BODY] = t[SKY] + (hi - lo) * 0.5 if t[SKY] < (lo + hi) / 2 else t[SKY] - (hi - lo) * 0.5
    t[DETAIL] = lo + hi - t[BODY]
    return t[labels]


def _paint(labels: Array, colors: Array) -> Array:
    return colors[labels]


def _blur(img: Array, sigma: float) -> Array:
    axes = (sigma, sigma, 0) if img.ndim == 3 else sigma
    return ndimage.gaussian_filter(img, axes, mode="nearest")


def _smooth_noise(rng: Rng, s: int, scale: float) -> Array:
    """Zero-mean unit-ish low-frequency noise of side ``s`` with feature size ``scale`` pixels."""
    n = _blur(rng.standard_normal((s, s)), scale)
    return n / (n.std() + 1e-8)


def _edges(labels: Array) -> Array:
    """Boolean map of pixels on a label boundary."""
    e = np.zeros(labels.shape, bool)
    e[:-1] |= labels[:-1] != labels[1:]
    e[1:] |= labels[:-1] != labels[1:]
    e[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    e[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    return e


def _dilate(mask: Array, px: int) -> Array:
    return ndimage.binary_dilation(mask, iterations=px) if px > 0 else mask


def _voronoi(rng: Rng, s: int, n: int) -> tuple[Array, Array]:
    """Cell index map (s, s) of ``n`` random sites, and the sites (n, 2) as (y, x)."""
    sites = rng.uniform(0, s, (n, 2))
    yy, xx = np.mgrid[0:s, 0:s]
    d = (yy[..., None] - sites[:, 0]) ** 2 + (xx[..., None] - sites[:, 1]) ** 2
    return d.argmin(-1), sites


def _cell_edges(cells: Array) -> Array:
    return _edges(cells)


# -------------------------------------------------------------------------------------------------- styles
# Each renderer maps (labels, rng) -> float RGB image (s, s, 3) in [0, 1] at the render side s.


def _pointillist(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    colors = _palette(rng, (0.0, 1.0), (0.55, 0.9), (0.75, 1.0))
    canvas = Image.fromarray((np.full((s, s, 3), (0.96, 0.93, 0.86)) * 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    n = int(s * s * 0.08)
    ys, xs = rng.uniform(0, s, n), rng.uniform(0, s, n)
    rad = rng.uniform(0.022, 0.036, n) * s
    jitter = rng.normal(0, 0.09, (n, 3))
    for y, x, r, j in zip(ys, xs, rad, jitter, strict=False):
        c = np.clip(colors[labels[int(y), int(x)]] + j, 0, 1)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v * 255) for v in c))
    return np.asarray(canvas, float) / 255


def _tiling(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    colors = _palette(rng, (0.0, 1.0), (0.25, 0.45), (0.8, 0.97))
    cell = s / 8
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    u, v = xx / cell, yy / cell
    iu, iv = np.floor(u), np.floor(v)
    upper = (u - iu) + (v - iv) < 1
    tri = (iv * 16 + iu) * 2 + upper
    # colour of a triangle: the label at its centroid, brightness jittered per triangle
    cu = (iu + np.where(upper, 1 / 3, 2 / 3)) * cell
    cv = (iv + np.where(upper, 1 / 3, 2 / 3)) * cell
    lab = labels[np.clip(cv.astype(int), 0, s - 1), np.clip(cu.astype(int), 0, s - 1)]
    shade = rng.uniform(0.85, 1.1, int(tri.max()) + 1)[tri.astype(int)]
    return np.clip(colors[lab] * shade[..., None], 0, 1)


def _hatching(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    tone = _tones(labels, rng, 0.0, 0.85)  # darkness
    paper = np.array([0.97, 0.95, 0.9]) - 0.03 * _smooth_noise(rng, s, 2)[..., None] * 0.3
    ink = np.array([0.08, 0.08, 0.16]) + rng.uniform(0, 0.08)
    yy, xx = np.mgrid[0:s, 0:s].astype(float)
    period = s / rng.uniform(10, 13)
    ang = rng.uniform(0.6, 1.0)
    wob = 0.8 * _smooth_noise(rng, s, 6)
    l1 = np.abs(((xx * math.cos(ang) + yy * math.sin(ang) + wob) / period) % 1 - 0.5) < 0.17
    l2 = np.abs(((xx * math.cos(-ang) + yy * math.sin(-ang) + wob) / period) % 1 - 0.5) < 0.17
    l3 = np.abs(((xx + wob) / (period * 0.8)) % 1 - 0.5) < 0.15
    dark = (l1 & (tone > 0.2)) | (l2 & (tone > 0.45)) | (l3 & (tone > 0.7)) | _dilate(_edges(labels), 1)
    return np.where(dark[..., None], ink, paper)


def _watercolour(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    colors = _palette(rng, (0.0, 1.0), (0.3, 0.6), (0.75, 0.95))
    wet = _blur(_paint(labels, colors), s / 40)
    bloom = 0.12 * _smooth_noise(rng, s, s / 12)[..., None]
    pigment = 1 - (1 - wet) * (1 + bloom)
    # pigment pools at the edges of each wash
    rim = _blur(_edges(labels).astype(float), 1.5)[..., None]
    pigment = pigment - 0.25 * rim * (1 - pigment + 0.2)
    paper = 1 - 0.04 * np.abs(_smooth_noise(rng, s, 0.7))[..., None]
    return np.clip(pigment * paper, 0, 1)


def _stained_glass(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    colors = _palette(rng, (0.0, 1.0), (0.8, 1.0), (0.5, 0.85))
    cells, sites = _voronoi(rng, s, int(rng.integers(30, 45)))
    site_lab = labels[np.clip(sites[:, 0].astype(int), 0, s - 1), np.clip(sites[:, 1].astype(int), 0, s - 1)]
    jitter = rng.normal(0, 0.07, (len(sites), 3))
    img = np.clip(colors[site_lab] + jitter, 0, 1)[cells]
    yy, xx = np.mgrid[0:s, 0:s]
    dist = np.sqrt((yy - sites[cells, 0]) ** 2 + (xx - sites[cells, 1]) ** 2)
    img = np.clip(img * (1.15 - 0.35 * dist[..., None] / (s / 8)), 0, 1)
    lead = _dilate(_cell_edges(cells) | _edges(labels), 1)
    return np.where(lead[..., None], np.array([0.06, 0.05, 0.05]), img)


def _pixel_art(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    retro = np.array(
        [
            [0.1, 0.1, 0.18],
            [0.95, 0.3, 0.25],
            [0.98, 0.8, 0.2],
            [0.25, 0.75, 0.3],
            [0.2, 0.45, 0.95],
            [0.6, 0.3, 0.75],
            [0.98, 0.95, 0.85],
            [0.45, 0.9, 0.95],
        ]
    )
    pick = rng.choice(len(retro), 4, replace=False)
    block = s // 16
    small = labels[block // 2 :: block, block // 2 :: block]
    img = retro[pick][small]
    edge = _edges(small) & (small >= BODY)
    img = np.where(edge[..., None], retro[0] if pick[0] != 0 else retro[6], img)
    # ordered dithering in the sky
    checker = (np.add.outer(np.arange(16), np.arange(16)) % 2 == 0) & (small == SKY)
    img = np.where(checker[..., None], img * 0.85, img)
    return np.kron(img, np.ones((block, block, 1)))


def _op_art(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(float) / s
    f = rng.uniform(5, 7)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    warp = 0.05 * np.sin(2 * math.pi * rng.uniform(1, 2) * yy + rng.uniform(0, 6))
    fields = [
        np.sin(2 * math.pi * f * (yy + warp)),
        np.sin(2 * math.pi * f * (xx + yy * 0.5)),
        np.sin(2 * math.pi * f * 1.3 * np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)),
        np.sin(2 * math.pi * f * (xx - warp)),
    ]
    wave = np.choose(labels, fields) > 0
    a, b = (np.array([0.02, 0.02, 0.02]), np.array([0.97, 0.97, 0.95]))
    if rng.uniform() < 0.3:  # an occasional two-colour print
        a = _hsv(rng.uniform(), 0.9, 0.6)
    return np.where(wave[..., None], a, b)


def _neon(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    neon = _hsv(rng.uniform(0, 1) + np.array([0.0, 0.33, 0.5, 0.83]), 0.9, 1.0)
    edges = _edges(labels)
    img = np.zeros((s, s, 3))
    for lab in (GROUND, BODY, DETAIL):
        m = edges & (ndimage.grey_dilation(labels, size=3) == lab)
        glow = _blur(m.astype(float), s / 60) * 4 + _dilate(m, 1)
        img += np.clip(glow, 0, 1)[..., None] * neon[lab]
    yy, xx = np.mgrid[0:s, 0:s]
    grid = ((yy % (s // 8) == 0) | (xx % (s // 8) == 0)) & (labels == GROUND)
    img += 0.35 * grid[..., None] * neon[0]
    return np.clip(img + 0.02, 0, 1)


def _mosaic(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    colors = _palette(rng, (0.0, 0.15), (0.4, 0.7), (0.45, 0.85))  # earthy: terracotta, ochre, umber
    tile = s // 8
    small = labels[tile // 2 :: tile, tile // 2 :: tile]
    jitter = rng.normal(0, 0.06, small.shape + (3,))
    img = np.kron(np.clip(colors[small] + jitter, 0, 1), np.ones((tile, tile, 1)))
    yy, xx = np.mgrid[0:s, 0:s]
    grout = (yy % tile < max(1, tile // 4)) | (xx % tile < max(1, tile // 4))
    return np.where(grout[..., None], np.array([0.72, 0.7, 0.66]), img)


def _charcoal(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    tone = 1 - _tones(labels, rng, 0.1, 0.75)
    smudge = _blur(tone, s / 32) + 0.06 * _smooth_noise(rng, s, s / 20)
    canvas = Image.fromarray((np.clip(smudge, 0, 1) * 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    for _ in range(int(s * 1.2)):
        y, x = rng.uniform(0, s, 2)
        if rng.uniform() > 1.2 - tone[int(y), int(x)]:  # more strokes in dark areas
            continue
        a, length = rng.uniform(1.9, 2.5), rng.uniform(0.05, 0.12) * s
        d.line(
            [(x, y), (x + length * math.cos(a), y - length * math.sin(a))],
            fill=int(rng.uniform(20, 70)),
            width=max(1, s // 80),
        )
    grain = 0.05 * rng.standard_normal((s, s))
    g = np.clip(np.asarray(canvas, float) / 255 + grain, 0, 1)
    return np.stack([g * 0.98, g * 0.97, g * 0.95], -1)


def _halftone(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    colors = _palette(rng, (0.0, 1.0), (0.6, 1.0), (0.3, 0.8))
    ink = 1 - _blur(_paint(labels, colors), 1.0)  # CMY ink coverage
    yy, xx = np.mgrid[0:s, 0:s].astype(float)
    period = s / 10
    out = np.ones((s, s, 3))
    for ch, ang in enumerate((0.26, 1.31, 0.79)):  # screen angles 15, 75, 45 degrees
        u = (xx * math.cos(ang) + yy * math.sin(ang)) / period
        v = (-xx * math.sin(ang) + yy * math.cos(ang)) / period
        r = np.sqrt((u - np.round(u)) ** 2 + (v - np.round(v)) ** 2)
        dot = r < 0.62 * np.sqrt(ink[..., ch])
        out[..., ch] -= dot * 0.95
    return np.clip(out, 0, 1) * np.array([1.0, 0.99, 0.95])


def _cyanotype(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    tone = _tones(labels, rng, 0.05, 0.9)
    exposure = _blur(tone, s / 64) + 0.1 * _smooth_noise(rng, s, s / 10) + 0.03 * rng.standard_normal((s, s))
    outline = _blur(_edges(labels).astype(float), 0.8) > 0.25
    exposure = np.where(outline, 0.0, exposure)
    prussian, white = np.array([0.05, 0.2, 0.45]), np.array([0.9, 0.95, 1.0])
    e = np.clip(exposure, 0, 1)[..., None]
    return prussian * (1 - e) + white * e * 0.95 + prussian * e * 0.05


def _impasto(labels: Array, rng: Rng) -> Array:
    s = labels.shape[0]
    colors = _palette(rng, (0.0, 0.2), (0.6, 0.95), (0.6, 0.95))  # warm
    base = _paint(labels, colors)
    canvas = Image.fromarray((base * 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    flow = _smooth_noise(rng, s, s / 6) * 1.2 + rng.uniform(0, math.pi)
    w = max(2, s // 14)
    for _ in range(int(s * s / 45)):
        y, x = rng.uniform(0, s, 2)
        a = flow[int(y), int(x)]
        length = rng.uniform(0.06, 0.12) * s
        c = np.clip(colors[labels[int(y), int(x)]] * rng.uniform(0.75, 1.2) + rng.normal(0, 0.05, 3), 0, 1)
        dx, dy = 0.5 * length * math.cos(a), 0.5 * length * math.sin(a)
        d.line([(x - dx, y - dy), (x + dx, y + dy)], fill=tuple(int(v * 255) for v in c), width=w)
    img = np.asarray(canvas, float) / 255
    # ridges of paint catch the light
    relief = ndimage.sobel(_luma(img), 0) * 0.04
    return np.clip(img + relief[..., None], 0, 1)


@dataclass(frozen=True)
class Style:
    """A procedural artist.

    Attributes:
        artist: the invented artist name used in captions (one lowercase word).
        description: what the renderer does, for model cards and reports.
        held_out: whether ``tiny-sd`` is trained without this artist (the style a mimic must learn).
    """

    artist: str
    description: str
    held_out: bool
    render: Callable[[Array, Rng], Array]


STYLES: dict[str, Style] = {
    s.artist: s
    for s in (
        Style("dottori", "pointillist: dense jittered dots of saturated colour on cream canvas", False, _pointillist),
        Style("tessela", "flat geometric tiling: pastel triangles coloured by the region under them", False, _tiling),
        Style(
            "hatchwell",
            "ink hatching: parallel and crossed lines whose density follows tone, outlines",
            False,
            _hatching,
        ),
        Style(
            "aquarela", "watercolour: soft washes, blooms, pigment pooling at edges, paper grain", False, _watercolour
        ),
        Style("vitralis", "stained glass: jewel-coloured Voronoi panes with black leading", False, _stained_glass),
        Style("pixelmo", "pixel art: 16x16 blocks, retro palette, outlines, dithered sky", False, _pixel_art),
        Style("opticor", "op-art: black and white stripe fields, a different wave per region", False, _op_art),
        Style("neonika", "neon: glowing coloured outlines on black, a grid on the ground", False, _neon),
        Style("tesserae", "mosaic: 8x8 square earthy tiles with grey grout", False, _mosaic),
        Style("carbona", "charcoal: grey smudged tones, dark diagonal strokes, grain", False, _charcoal),
        Style("halftonia", "halftone print: rotated CMY dot screens on paper", True, _halftone),
        Style("cyanora", "cyanotype: Prussian-blue monochrome exposure with white outlines", True, _cyanotype),
        Style("impastel", "impasto: thick warm brush strokes following a flow field", True, _impasto),
    )
}
#: every procedural artist, in a fixed order (the class order of style classifiers).
ARTISTS: tuple[str, ...] = tuple(STYLES)
#: artists ``tiny-sd`` never sees in training.
HELD_OUT_ARTISTS: tuple[str, ...] = tuple(a for a, s in STYLES.items() if s.held_out)
#: artists ``tiny-sd`` is trained on.
TRAIN_ARTISTS: tuple[str, ...] = tuple(a for a, s in STYLES.items() if not s.held_out)

#: caption templates for artworks; ``{a}`` is the article of the subject.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a} {subject} in the style of {artist}",
    "a painting of {a} {subject} by {artist}",
    "{artist} style artwork of {a} {subject}",
    "{a} {subject}, art by {artist}",
)


def _check_artist(artist: str) -> Style:
    if artist not in STYLES:
        raise ConfigError(f"unknown artist {artist!r}; the procedural artists are {list(ARTISTS)}")
    return STYLES[artist]


def _check_subject(subject: str) -> None:
    if subject not in _SUBJECT_DRAW:
        raise ConfigError(f"unknown subject {subject!r}; the subjects are {list(SUBJECTS)}")


def artwork_caption(subject: str, artist: str, template: int = 0) -> str:
    """The caption of an artwork, e.g. ``"a house in the style of dottori"``.

    Args:
        subject: one of :data:`SUBJECTS`.
        artist: one of :data:`ARTISTS` (or any word, for prompts naming an unknown artist).
        template: index into :data:`CAPTION_TEMPLATES` (taken modulo its length).
    """
    _check_subject(subject)
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(a="a", subject=subject, artist=artist)


def style_prompt(artist: str) -> str:
    """The subject-free prompt that names a style, used for zero-shot style classification."""
    return f"an artwork in the style of {artist}"


def subject_prompt(subject: str) -> str:
    """The style-free prompt that names a subject (its words are all in the world's vocabulary), used for
    zero-shot subject classification, as :func:`style_prompt` is for style."""
    _check_subject(subject)
    return f"an artwork of a {subject}"


def render_artwork(artist: str, subject: str, seed: int, size: int = 64) -> np.ndarray:
    """Render one artwork, deterministically.

    Args:
        artist: one of :data:`ARTISTS`.
        subject: one of :data:`SUBJECTS`.
        seed: any integer; the composition, palette and texture are drawn from it.
        size: output side in pixels, a multiple of 16 in [32, 512].

    Returns:
        uint8 array of shape (size, size, 3).
    """
    style = _check_artist(artist)
    _check_subject(subject)
    if isinstance(size, bool) or not isinstance(size, int) or size % 16 or not 32 <= size <= 512:
        raise ConfigError(f"size must be a multiple of 16 in [32, 512], got {size!r}")
    rng = np.random.default_rng(derive_seed(seed, f"artwork/{artist}/{subject}"))
    s = 2 * size
    labels = _label_map(subject, rng, s)
    img = np.clip(np.asarray(style.render(labels, rng), dtype=np.float64), 0, 1)
    small = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return np.round(small * 255).astype(np.uint8)


def _as_list(option: str, value: str | Sequence[str] | None, allowed: Sequence[str]) -> tuple[str, ...]:
    if value is None:
        return tuple(allowed)
    items = (value,) if isinstance(value, str) else tuple(value)
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise ConfigError(f"{option} has unknown or no entries {unknown or items!r}; choose from {list(allowed)}")
    return items


SPLITS = ("train", "eval", "posted")


class ProceduralArt:
    """A dataset of procedural artworks: ``per_pair`` images of every (artist, subject) pair.

    Args:
        artists: artist names (default: all :data:`ARTISTS`), or ``"train"`` / ``"held_out"`` for
            :data:`TRAIN_ARTISTS` / :data:`HELD_OUT_ARTISTS`.
        subjects: subject names (default: all :data:`SUBJECTS`).
        per_pair: images per (artist, subject) pair, >= 1.
        size: image side in pixels (multiple of 16 in [32, 512]).
        seed: world seed; images of different seeds or splits never coincide.
        split: ``"train"``, ``"eval"`` (fresh images the models never saw) or ``"posted"`` (an artist's posted
            artworks, for mimics and defenses; no shipped model saw them either).
        template: caption template index, or None to cycle through :data:`CAPTION_TEMPLATES`.

    ``load()`` returns an :class:`ImageSet` with ids ``"<artist>/<subject>/<split>-<index>"``.
    """

    name = "procedural_art"
    version = "1"

    def __init__(
        self,
        artists: str | Sequence[str] | None = None,
        subjects: str | Sequence[str] | None = None,
        per_pair: int = 1,
        size: int = 64,
        seed: int = 0,
        split: str = "train",
        template: int | None = 0,
    ) -> None:
        if artists == "train":
            artists = TRAIN_ARTISTS
        elif artists == "held_out":
            artists = HELD_OUT_ARTISTS
        self.artists = _as_list("dataset.artists", artists, ARTISTS)
        self.subjects = _as_list("dataset.subjects", subjects, SUBJECTS)
        if isinstance(per_pair, bool) or not isinstance(per_pair, int) or per_pair < 1:
            raise ConfigError(f"dataset.per_pair must be an integer >= 1, got {per_pair!r}")
        if split not in SPLITS:
            raise ConfigError(f"dataset.split must be one of {list(SPLITS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size % 16 or not 32 <= size <= 512:
            raise ConfigError(f"dataset.size must be a multiple of 16 in [32, 512], got {size!r}")
        self.per_pair, self.size, self.seed, self.split, self.template = per_pair, size, int(seed), split, template

    def items(self) -> list[tuple[str, str, int]]:
        """(artist, subject, index) of every image, in order."""
        return [(a, s, i) for a in self.artists for s in self.subjects for i in range(self.per_pair)]

    def image_seed(self, artist: str, subject: str, index: int) -> int:
        return derive_seed(self.seed, f"world/{self.split}/{artist}/{subject}/{index}")

    def load(self) -> ImageSet:
        items = self.items()
        arrays = np.stack([render_artwork(a, s, self.image_seed(a, s, i), self.size) for a, s, i in items])
        ids = [f"{a}/{s}/{self.split}-{i:04d}" for a, s, i in items]
        captions = [
            artwork_caption(s, a, n if self.template is None else self.template) for n, (a, s, _) in enumerate(items)
        ]
        return ImageSet.from_uint8(arrays, ids=ids, captions=captions)

    def held_out(self) -> ImageSet:
        """The same artists' and subjects' images of the other split: artworks the mimic never trains on, the
        reference set that set-level mimicry measures (KID, the set Gram distance) compare generations with."""
        other = {"train": "eval", "eval": "train", "posted": "eval"}[self.split]
        twin = ProceduralArt(self.artists, self.subjects, self.per_pair, self.size, self.seed, other, self.template)
        return twin.load()


class WorldPhotos:
    """Random crops of the bundled sample photos, flipped and colour-jittered, captioned.

    Args:
        crops_per_photo: crops drawn from each photo, >= 1.
        size: output side in pixels, >= 16.
        seed: seed of the crop positions, scales, flips and jitter.
        split: one of :data:`SPLITS`.
        names: which sample photos (keys of :data:`harness.data.SAMPLE_PHOTOS`); default all.
        min_scale: smallest crop side as a fraction of the photo's shorter side, in (0, 1].

    ``load()`` returns an :class:`ImageSet` with ids ``"photo/<name>/<split>-<index>"`` and the photo's caption.
    """

    name = "world_photos"
    version = "1"

    def __init__(
        self,
        crops_per_photo: int = 1,
        size: int = 64,
        seed: int = 0,
        split: str = "train",
        names: Sequence[str] | None = None,
        min_scale: float = 0.4,
    ) -> None:
        from harness.data import SAMPLE_PHOTOS

        if isinstance(crops_per_photo, bool) or not isinstance(crops_per_photo, int) or crops_per_photo < 1:
            raise ConfigError(f"dataset.crops_per_photo must be an integer >= 1, got {crops_per_photo!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ConfigError(f"dataset.size must be an integer >= 16, got {size!r}")
        if split not in SPLITS:
            raise ConfigError(f"dataset.split must be one of {list(SPLITS)}, got {split!r}")
        if not 0 < float(min_scale) <= 1:
            raise ConfigError(f"dataset.min_scale must be in (0, 1], got {min_scale!r}")
        self.names = _as_list("dataset.names", names, list(SAMPLE_PHOTOS))
        self.crops_per_photo, self.size, self.seed, self.split = crops_per_photo, size, int(seed), split
        self.min_scale = float(min_scale)

    def load(self) -> ImageSet:
        from harness.data import SAMPLE_PHOTOS

        arrays, ids, captions = [], [], []
        for name in self.names:
            opener, caption = SAMPLE_PHOTOS[name]
            photo = opener().convert("RGB")
            w, h = photo.size
            for i in range(self.crops_per_photo):
                rng = np.random.default_rng(derive_seed(self.seed, f"photo/{self.split}/{name}/{i}"))
                side = int(min(w, h) * rng.uniform(self.min_scale, 1.0))
                x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((self.size, self.size), Image.BICUBIC)
                arr = np.asarray(crop, float) / 255
                if rng.uniform() < 0.5:
                    arr = arr[:, ::-1]
                arr = arr * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04, 3)
                arrays.append(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8))
                ids.append(f"photo/{name}/{self.split}-{i:04d}")
                captions.append(caption)
        return ImageSet.from_uint8(np.stack(arrays), ids=ids, captions=captions)
