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
  encoding to encoding and fall into the residual);
- joint refinement (in place of the paper's joint solve for images and weights): a non-negative factorisation
  of all absolute encodings, ``|E| ~ W Y`` with one row of ``Y`` per private image, started from the groups and
  their rank-one images (``|sum_j lambda_j x_j| <= sum_j lambda_j |x_j|``, with equality where the mixed pixels
  share a sign), so that an encoding can load on every private image it mixes, not only on its group's;
- scale: each image's loadings on its encodings average ``1 / k`` (the mean of InstaHide's weights), which
  makes a k = 1 encoding's reconstruction exactly its absolute value.

What is recovered is ``|2 p - 1|`` for each pixel ``p`` of the private image in [0, 1]: the absolute value
removes whether a pixel was above or below mid-grey, per pixel, and no step of the attack restores it (the
published colour adjustment is a learned post-processing step, not implemented here).
"""

from __future__ import annotations

import numpy as np
import torch

from harness.protocols import ConfigError, Context, Mimic, check_int
from harness.threat_models.privacy import read_encodings_caption, recoverable
from harness.types import ImageSet

__all__ = ["similarity", "group", "recover", "refine", "reconstruct", "InstaHideReconstruction"]


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
    if n_groups >= len(sim):
        return np.arange(len(sim))
    affinity = sim.clamp_min(0).double().numpy()
    np.fill_diagonal(affinity, 1.0)
    model = SpectralClustering(n_clusters=n_groups, affinity="precomputed", random_state=seed, assign_labels="kmeans")
    import warnings

    with warnings.catch_warnings():  # well-separated groups leave the graph unconnected: that is the good case
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return model.fit_predict(affinity)


def recover(encodings: torch.Tensor, k: int = 1) -> torch.Tensor:
    """One image (3, H, W) in [0, 1] from a group of encodings (G, 3, H, W) in [-1, 1]: the rank-one factor ``y``
    of their absolute values ``|e_m| ~ alpha_m y``, scaled so that the loadings ``alpha_m`` average ``1 / k``."""
    a = encodings.abs().flatten(1).double()
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    y, alpha = vh[0] * sv[0], u[:, 0]
    if float(y.sum()) < 0:
        y, alpha = -y, -alpha
    y = y * alpha.mean() * k
    return y.clamp(0, 1).float().view(encodings.shape[1:])


def refine(
    encodings: torch.Tensor, images: torch.Tensor, labels: np.ndarray, k: int, members: int, iterations: int
) -> torch.Tensor:
    """The joint refinement (module docstring): a non-negative factorisation ``|E| ~ W Y`` started from the
    groups (``W``) and their images (``Y``), ``iterations`` multiplicative updates; each row of ``Y`` is then
    scaled so that its ``members`` largest loadings (the encodings it is expected to be mixed into) average
    ``1 / k``."""
    from sklearn.decomposition import NMF

    n = len(images)
    a = encodings.abs().flatten(1).double().numpy()
    w0 = np.full((len(a), n), 1e-3)
    w0[np.arange(len(a)), labels] = 1.0 / k
    h0 = images.flatten(1).double().numpy() + 1e-3
    model = NMF(n, init="custom", solver="mu", beta_loss="frobenius", max_iter=iterations, tol=0.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the iteration count is the setting: it always "fails to converge"
        w = model.fit_transform(a, W=w0, H=h0)
    h = model.components_
    top = max(1, min(members, len(a)))
    scale = np.sort(w, axis=0)[-top:].mean(axis=0) * k
    y = h * scale[:, None]
    return torch.from_numpy(y).clamp(0, 1).float().view(images.shape)


def reconstruct(
    encodings: torch.Tensor, n_private: int, k: int = 1, members: int | None = None, iterations: int = 0, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """The attack end to end on encodings (M, 3, H, W) in [-1, 1]: (n_private, 3, H, W) reconstructions of
    ``|2 p - 1|`` (unordered: the attacker does not know which original each one is) and each encoding's group.
    ``members``: how many encodings each private image is expected in (the refinement's scale; default
    ``M / n_private``); ``iterations``: of the joint refinement (0: none; never for k = 1)."""
    labels = group(similarity(encodings), n_private, seed)
    images = torch.stack([recover(encodings[torch.from_numpy(labels == g)], k) for g in range(n_private)])
    if iterations > 0 and k > 1 and n_private < len(encodings):  # k = 1: each group is one image, exactly
        members = members if members is not None else len(encodings) // n_private
        images = refine(encodings, images, labels, k, members, iterations)
    return images, labels


class InstaHideReconstruction(Mimic):
    """The reconstruction attack on instance encodings (module docstring) as the privacy threat model's mimic.

    Reads the scheme's public parameters from the encodings' captions (the number of private images, k and how
    many of the k are private); images without them are taken as the private images themselves, each its own
    encoding with k = 1 (the audit's clean control). Outputs one reconstruction of ``|2 p - 1|`` per private
    image, unordered, ids ``rec000`` ... (the measure matches them to the private images).

    Args:
        refine_iterations: multiplicative updates of the joint refinement (0: groups and rank-one images only).
        public: a dataset config (``_target_``) of the attacker's public images: the floor control.
    """

    name = "instahide_reconstruction"
    version = "1"
    threat_model = "privacy"
    uses_model = False

    def __init__(self, refine_iterations: int = 300, public: object = None) -> None:
        self.refine_iterations = check_int("mimic.refine_iterations", refine_iterations, 0)
        self.public = public
        if public is not None and not callable(getattr(public, "load", None)):
            raise ConfigError(f"mimic.public: expected a dataset config (with _target_), got {public!r}")

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        if len(images) == 0:
            raise ValueError("instahide_reconstruction: no encodings given")
        found = {read_encodings_caption(c) is not None for c in images.captions}
        if len(found) > 1:
            raise ValueError("instahide_reconstruction: some captions state the encoding's parameters, some do not")
        params = read_encodings_caption(images.captions[0])
        m = len(images)
        if params is None:  # not encodings: each image is its own private image (k = 1)
            n, k, members = m, 1, 1
        else:
            n, k = params["private_images"], params["k"]
            members = max(1, round(m * params["private_per_encoding"] / n))
            if not 1 <= n <= m:
                raise ValueError(f"instahide_reconstruction: the captions state {n} private images for {m} encodings")
        e = images.images * 2 - 1
        recon, _ = reconstruct(e, n, k, members, self.refine_iterations, seed=generator.initial_seed() % (2**31))
        ids = tuple(f"rec{j:03d}" for j in range(n))
        return ImageSet(recon, ids, ("",) * n)

    def floor(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        """The attacker's public images in place of reconstructions: as many as ``images`` (the private images),
        drawn at random from ``public``, their absolute values ``|2 q - 1|`` at the private images' size."""
        if self.public is None:
            raise ConfigError("mimic.public: the floor control needs the attacker's public images (a dataset config)")
        public = self.public.load().resized(images.size[0])
        if len(public) < len(images):
            raise ConfigError(f"mimic.public: {len(public)} public images, fewer than the {len(images)} private ones")
        pick = torch.randperm(len(public), generator=generator)[: len(images)].tolist()
        chosen = recoverable(public.select(pick))
        return ImageSet(chosen.images, tuple(f"rec{j:03d}" for j in range(len(images))), ("",) * len(images))
