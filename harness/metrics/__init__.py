"""Metrics: each a small :class:`harness.protocols.Metric` giving one value per image.

``higher_is_better`` says which direction means the attacker succeeded (for similarity between the edit of
a protected image and the edit of the clean image, higher means the protection failed).
"""

from harness.metrics.distance import L2Distance, LatentDistance, LinfDistance
from harness.metrics.similarity import FSIM, LPIPS, PSNR, SSIM, SSIMAtLeast, VIFp

__all__ = [
    "PSNR",
    "SSIM",
    "SSIMAtLeast",
    "VIFp",
    "FSIM",
    "LPIPS",
    "LinfDistance",
    "L2Distance",
    "LatentDistance",
    "budget_metrics",
]


def budget_metrics():
    """The metrics that state a protection's realised budget against the clean images."""
    return {"linf": LinfDistance(), "l2": L2Distance(), "psnr": PSNR(), "ssim": SSIM()}
