"""The attacker of instance encoding: Carlini et al.'s reconstruction attack on InstaHide (IEEE S&P 2021).

Published steps (their release): take absolute values of the encodings (this undoes the random sign flips,
leaving ``|sum_j lambda_j x_j|``); build a similarity graph over encodings that says which ones share a private
image (the paper learns it with a network trained on encodings the attacker makes from public images); find the
groups of encodings that share one private image (graph colouring into dense cliques, then a bipartite matching
of encodings to images); recover each private image from its group; adjust its colour curves.

This module implements the same pipeline with computed rather than learned parts (a deviation, stated in the
config and the report):

- similarity: the Pearson correlation of two encodings' absolute values (encodings that share an image with
  weights lambda and lambda' correlate in proportion to lambda lambda');
- grouping: spectral clustering of that similarity graph into as many groups as there are private images (the
  attacker knows how many, as in the challenge);
- recovery: the rank-one factorisation of the group's absolute values, ``|e_m| ~ alpha_m y`` (the leading
  singular vector: the part every encoding of the group shares; the other images' contributions differ from
  encoding to encoding and fall into the residual), rescaled to [0, 1].

What is recovered is ``|2 p - 1|`` for each pixel ``p`` of the private image in [0, 1]: the absolute value
removes whether a pixel was above or below mid-grey, per pixel, and no step of the attack restores it (the
published colour adjustment is a learned post-processing step, not implemented here).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["similarity", "group", "recover", "reconstruct"]


def similarity(encodings: torch.Tensor) -> torch.Tensor:
    """(M, M) Pearson correlation between the absolute values of the encodings (M, 3, H, W) in [-1, 1]."""
    a = encodings.abs().flatten(1).double()
    z = a - a.mean(dim=1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (z @ z.T).float()


def group(sim: torch.Tensor, n_groups: int, seed: int = 0) -> np.ndarray:
    """(M,) group labels: spectral clustering of the similarity graph (negative correlations cut to 0)."""
    from sklearn.cluster import SpectralClustering

    if n_groups == 1:
        return np.zeros(len(sim), dtype=int)
    affinity = sim.clamp_min(0).double().numpy()
    np.fill_diagonal(affinity, 1.0)
    model = SpectralClustering(n_clusters=n_groups, affinity="precomputed", random_state=seed, assign_labels="kmeans")
    return model.fit_predict(affinity)


def recover(encodings: torch.Tensor) -> torch.Tensor:
    """One image (3, H, W) in [0, 1] from a group of encodings (G, 3, H, W): the leading right singular vector of
    their absolute values, signed to be non-negative on average and scaled so that its 99.5th percentile is 1."""
    a = encodings.abs().flatten(1).double()
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    y = vh[0]
    if float(y.sum()) < 0:
        y = -y
    top = torch.quantile(y, 0.995).clamp_min(1e-12)
    return (y / top).clamp(0, 1).float().view(encodings.shape[1:])


def reconstruct(encodings: torch.Tensor, n_private: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """The attack end to end: (n_private, 3, H, W) reconstructions of ``|2 p - 1|`` (unordered: the attacker
    does not know which original each one is) and the group label of every encoding."""
    labels = group(similarity(encodings), n_private, seed)
    images = [recover(encodings[torch.from_numpy(labels == g)]) for g in range(n_private)]
    return torch.stack(images), labels
