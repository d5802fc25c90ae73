"""Privacy (InstaHide's threat model): the attacker holds a defender's instance encodings of private images and
tries to reconstruct the private images from them.

Success: each reconstruction looks like a private image. The attacker does not know which encoding came from
which image, so its reconstructions are unordered: they are matched one to one with the private images (the
assignment that maximises the total SSIM, Hungarian algorithm), and every measure compares a reconstruction
with the private image it was matched to. A private image that no reconstruction is matched with is compared
with an all-zero image.

What is compared is what the encoding can reveal: InstaHide flips the sign of every pixel of ``2 p - 1`` at
random, and the published attack works on absolute values, so it recovers ``|2 p - 1|`` per pixel (whether the
pixel was darker or lighter than mid-grey is gone). The references are the private images mapped the same way
(:func:`recoverable`), as Carlini et al. compare before their learned colour correction.

The floor is the attacker's own public images (as many as there are private images, matched the same way): a
"reconstruction" that uses nothing of the encodings. The positive control is the absolute value of each private
image on its own: an encoding with k = 1, which the audit's clean control is (the attack given the private
images themselves). There is no noise baseline of a budget: an encoding is not a perturbation within a norm ball.
The baseline a protection is compared with is the positive control, so the verdict's scale reads 0 = as
recoverable as an image encoded alone, 1 = no more than the public images give.

The defender publishes the scheme's parameters with the encodings (Kerckhoffs; the InstaHide Challenge stated
the number of private images, k and how many were private): every encoding's caption is
:func:`describe_encodings`, which the attack reads with :func:`read_encodings_caption`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch

from harness.threat_models import ThreatModel
from harness.types import ImageSet

__all__ = ["THREAT_MODEL", "recoverable", "match_to_references", "describe_encodings", "read_encodings_caption"]

_CAPTION = "instance encodings"
_KEYS = ("private_images", "k", "private_per_encoding", "encodings_per_image")


def recoverable(images: ImageSet) -> ImageSet:
    """What the absolute value of an encoding keeps of each image in [0, 1]: ``|2 p - 1|`` per pixel."""
    return images.with_images((2 * images.images - 1).abs())


def describe_encodings(**params: int) -> str:
    """The caption every encoding carries: the scheme's public parameters, the same for every encoding (nothing
    in it tells one encoding's private image from another's)."""
    missing = [k for k in _KEYS if k not in params]
    if missing:
        raise ValueError(f"describe_encodings: missing {missing}")
    return f"{_CAPTION}: " + " ".join(f"{k}={int(params[k])}" for k in _KEYS)


def read_encodings_caption(caption: str) -> dict[str, int] | None:
    """The public parameters in a caption written by :func:`describe_encodings`, or None for any other caption
    (images that are not encodings: each is then its own private image, k = 1)."""
    if not caption.startswith(f"{_CAPTION}:"):
        return None
    found = dict(re.findall(r"(\w+)=(\d+)", caption))
    if any(k not in found for k in _KEYS):
        return None
    return {k: int(found[k]) for k in _KEYS}


def _ssim_matrix(outputs: torch.Tensor, references: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """(len(outputs), len(references)) SSIM of every pair, with :class:`harness.metrics.SSIM`'s settings but in
    float32 (ten times faster than its float64 on CPU; the matching only ranks pairs, the measures that follow
    are computed by the metrics themselves)."""
    import piq

    n = len(references)
    pairs = [(i, j) for i in range(len(outputs)) for j in range(n)]
    values = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        a = outputs[[i for i, _ in part]].float()
        b = references[[j for _, j in part]].float()
        ssim = piq.ssim(a, b, kernel_size=11, kernel_sigma=1.5, data_range=1.0, reduction="none", downsample=False)
        values.append(ssim.double().numpy())
    return np.concatenate(values).reshape(len(outputs), n) if values else np.zeros((len(outputs), n))


def match_to_references(outputs: ImageSet, references: ImageSet) -> ImageSet:
    """The reconstructions ``outputs`` matched one to one with ``references`` (maximal total SSIM), returned in
    the references' order under their ids and captions; a reference left without a reconstruction (fewer
    outputs than references) gets an all-zero image; reconstructions beyond the references' number that no
    matching uses are dropped (the attacker is given its best ``len(references)``)."""
    from scipy.optimize import linear_sum_assignment

    if outputs.size != references.size:
        outputs = outputs.resized(references.size[0])
    if len(outputs) == 0:
        return references.with_images(torch.zeros_like(references.images))
    sim = _ssim_matrix(outputs.images, references.images)
    rows, cols = linear_sum_assignment(-sim)
    matched = torch.zeros_like(references.images)
    for r, c in zip(rows, cols, strict=True):
        matched[c] = outputs.images[r]
    return ImageSet(matched, references.ids, references.captions)


def _prepare(outputs: ImageSet, references: ImageSet, _: Mapping[str, object] | None = None):
    refs = recoverable(references)
    return match_to_references(outputs, refs), refs


THREAT_MODEL = ThreatModel(
    name="privacy",
    reference="clean_images",
    success="ssim",
    attack="reconstruct",
    floor="the attacker's public images in place of reconstructions, matched to the private images the same way",
    positive_control="the absolute value of each private image encoded alone (k = 1)",
    budget_norm="none",
    baseline_text="the images encoded alone (k = 1)",
    prepare=_prepare,
)
