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

import logging
from collections.abc import Sequence

import numpy as np
import torch

from harness.protocols import ConfigError, Context, Mimic, check_int
from harness.seeding import derive_seed, make_generator
from harness.threat_models.privacy import read_encodings_caption, recoverable
from harness.types import ImageSet

log = logging.getLogger(__name__)

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
    encodings: torch.Tensor,
    images: torch.Tensor,
    labels: np.ndarray,
    k: int,
    members: int,
    iterations: Sequence[int],
) -> list[torch.Tensor]:
    """The joint refinement (module docstring): a non-negative factorisation ``|E| ~ W Y`` started from the
    groups (``W``) and their images (``Y``), run by multiplicative updates; returns the images after each count
    in ``iterations`` (one run, cumulative: the updates are stateless, so stopping and going on is the same as
    running longer). Each row of ``Y`` is scaled so that its ``members`` largest loadings (the encodings it is
    expected to be mixed into) average ``1 / k``."""
    import warnings

    from sklearn.decomposition import NMF

    n = len(images)
    a = encodings.abs().flatten(1).double().numpy()
    w = np.full((len(a), n), 1e-3)
    w[np.arange(len(a)), labels] = 1.0 / k
    h = images.flatten(1).double().numpy() + 1e-3
    top = max(1, min(members, len(a)))
    out, done = [], 0
    for count in sorted(iterations):
        if count > done:
            model = NMF(n, init="custom", solver="mu", beta_loss="frobenius", max_iter=count - done, tol=0.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the iteration count is the setting: it always "fails to converge"
                w = model.fit_transform(a, W=w, H=h)
            h, done = model.components_, count
        if count == 0:
            out.append(images.clone())
            continue
        scale = np.sort(w, axis=0)[-top:].mean(axis=0) * k
        out.append(torch.from_numpy(h * scale[:, None]).clamp(0, 1).float().view(images.shape))
    return out


def reconstruct(
    encodings: torch.Tensor,
    n_private: int,
    k: int = 1,
    members: int | None = None,
    iterations: int | Sequence[int] = 0,
    seed: int = 0,
) -> tuple[torch.Tensor | list[torch.Tensor], np.ndarray]:
    """The attack end to end on encodings (M, 3, H, W) in [-1, 1]: (n_private, 3, H, W) reconstructions of
    ``|2 p - 1|`` (unordered: the attacker does not know which original each one is) and each encoding's group.
    ``members``: how many encodings each private image is expected in (the refinement's scale; default
    ``M / n_private``); ``iterations``: of the joint refinement (0: none; never for k = 1), or a list of counts:
    then one set of reconstructions per count, in the list's order."""
    counts = [iterations] if isinstance(iterations, int) else list(iterations)
    labels = group(similarity(encodings), n_private, seed)
    images = torch.stack([recover(encodings[torch.from_numpy(labels == g)], k) for g in range(n_private)])
    if max(counts, default=0) > 0 and k > 1 and n_private < len(encodings):  # k = 1: each group is one image
        members = members if members is not None else len(encodings) // n_private
        path = dict(zip(sorted(counts), refine(encodings, images, labels, k, members, counts), strict=True))
        results = [path[c] for c in counts]
    else:
        results = [images for _ in counts]
    return (results[0] if isinstance(iterations, int) else results), labels


#: the refinement's iteration counts the attacker chooses among (``refine_iterations: auto``)
AUTO_ITERATIONS = (0, 30, 100, 300)


class InstaHideReconstruction(Mimic):
    """The reconstruction attack on instance encodings (module docstring) as the privacy threat model's mimic.

    Reads the scheme's public parameters from the encodings' captions (the number of private images, k, how many
    of the k are private, encodings per image); images without them are taken as the private images themselves,
    each its own encoding with k = 1 (the audit's clean control). Outputs one reconstruction of ``|2 p - 1|`` per
    private image, unordered, ids ``rec000`` ... (the measure matches them to the private images).

    With ``refine_iterations: auto`` the attacker rehearses on its own public images, as Carlini et al. train their
    similarity on public data: it encodes as many public images with the published parameters (public partners
    for the cross-dataset variant from the rest of its public set), attacks them with each count of
    :data:`AUTO_ITERATIONS`, and uses the count whose matched SSIM to the public images is highest.

    Args:
        refine_iterations: multiplicative updates of the joint refinement (0: groups and rank-one images only), or
            ``"auto"``.
        public: a dataset config (``_target_``) of the attacker's public images: the floor control and the
            rehearsal.
    """

    name = "instahide_reconstruction"
    version = "1"
    threat_model = "privacy"
    uses_model = False

    def __init__(self, refine_iterations: int | str = "auto", public: object = None) -> None:
        if refine_iterations != "auto":
            check_int("mimic.refine_iterations", refine_iterations, 0)
        self.refine_iterations = refine_iterations
        self.public = public
        if public is not None and not callable(getattr(public, "load", None)):
            raise ConfigError(f"mimic.public: expected a dataset config (with _target_), got {public!r}")
        if refine_iterations == "auto" and public is None:
            raise ConfigError(
                "mimic.refine_iterations=auto rehearses on the attacker's public images: set mimic.public"
            )

    def run(self, images: ImageSet, generator: torch.Generator, ctx: Context) -> ImageSet:
        if len(images) == 0:
            raise ValueError("instahide_reconstruction: no encodings given")
        found = {read_encodings_caption(c) is not None for c in images.captions}
        if len(found) > 1:
            raise ValueError("instahide_reconstruction: some captions state the encoding's parameters, some do not")
        params = read_encodings_caption(images.captions[0])
        m = len(images)
        if params is None:  # not encodings: each image is its own private image (k = 1)
            params = {"private_images": m, "k": 1, "private_per_encoding": 1, "encodings_per_image": 1}
        n, k = params["private_images"], params["k"]
        if not 1 <= n <= m:
            raise ValueError(f"instahide_reconstruction: the captions state {n} private images for {m} encodings")
        members = max(1, round(m * params["private_per_encoding"] / n))
        seed = generator.initial_seed() % (2**31)
        iterations = self.refine_iterations
        if iterations == "auto":
            iterations = self._rehearse(params, images.size[0], seed) if k > 1 and n < m else 0
        recon, _ = reconstruct(images.images * 2 - 1, n, k, members, int(iterations), seed=seed)
        ids = tuple(f"rec{j:03d}" for j in range(n))
        return ImageSet(recon, ids, ("",) * n)

    def _rehearse(self, params: dict[str, int], side: int, seed: int) -> int:
        """The refinement count of :data:`AUTO_ITERATIONS` that reconstructs the attacker's own public images
        best when they are encoded with the published parameters (matched SSIM to ``|2 q - 1|``)."""
        from harness.instance_encoding import encode
        from harness.metrics import SSIM
        from harness.threat_models.privacy import match_to_references

        public = self.public.load().resized(side)
        order = torch.randperm(len(public), generator=make_generator(derive_seed(seed, "rehearsal"))).tolist()
        n, k, q = params["private_images"], params["k"], params["private_per_encoding"]
        stand_in = public.select(order[:n])
        pool = public.select(order[n:]).images if q < k and len(order) > n else None
        if len(stand_in) < max(2, q) or (q < k and pool is None):
            return 0  # too few public images to rehearse with
        enc = encode(
            stand_in.images,
            stand_in.ids,
            derive_seed(seed, "rehearsal-encoding"),
            k=k,
            encodings_per_image=params["encodings_per_image"],
            public=pool,
            private_slots=q,
        )
        members = max(1, round(len(enc.images) * q / len(stand_in)))
        results, _ = reconstruct(enc.images, len(stand_in), k, members, list(AUTO_ITERATIONS), seed=seed)
        target = recoverable(stand_in)
        scores = []
        for recon in results:
            out = ImageSet(recon, tuple(f"r{j}" for j in range(len(recon))), ("",) * len(recon))
            scores.append(float(SSIM()(match_to_references(out, target), target).mean()))
        best = AUTO_ITERATIONS[int(np.argmax(scores))]
        log.info(
            "instahide_reconstruction: rehearsal on %d public images: SSIM %s -> %d refinement iterations",
            len(stand_in),
            [round(x, 3) for x in scores],
            best,
        )
        return best

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
