"""The stage pipeline: data -> protect -> purify -> mimic -> measure, each stage through the artifact store.

Every stage's key chains its parents' keys (see :mod:`harness.cache`), so a re-run finds every finished
stage in the store and computes only what is missing, and a killed sweep resumes where it stopped.

The mimic's threat model (:mod:`harness.threat_models`) says what its outputs are compared with: for editing the
mimic also runs on the clean images (same config, same seed), and success of the attacker means the edit of the
purified protected image looks like the edit of the clean image; for mimicry the generations are compared
with the clean images (set measures with the dataset's held-out part).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.cache import ArtifactStore, canonical_json, load_imageset, save_imageset, stage_key
from harness.metrics import LatentDistance, budget_metrics
from harness.protocols import Context, Defense, Metric, Mimic, Purifier, SetMetric
from harness.seeding import derive_seed, make_generator
from harness.threat_models import threat_model
from harness.types import ImageSet

__all__ = ["Experiment", "StageRecord", "RunResult", "run_experiment", "realised_linf"]

log = logging.getLogger(__name__)

STAGES = ("data", "protect", "purify", "mimic", "mimic_clean", "measure")


@dataclass
class Experiment:
    """One cell of a sweep: the instantiated components and the resolved configs that key them.

    Attributes:
        dataset: has ``load() -> ImageSet``, ``name`` and ``version``.
        defense, purifier, mimic: the components (``mimic`` may be None: then no mimic or its metrics run).
        metrics: name -> Metric, applied to the mimic's outputs against its references.
        model: the model spec (``harness.models.ModelSpec``) or None.
        seed: the experiment seed; each stage derives its own from it.
        configs: group -> resolved config (plain dicts) used for the stage keys: ``dataset``, ``defense``,
            ``purifier``, ``mimic``, ``metrics``, ``model``.
        control: None for an ordinary run; ``"floor"`` runs the mimic's floor control (:meth:`Mimic.floor`:
            the success an attacker gets with nothing useful) on the clean images instead of the mimic on the
            purified ones. The clean and noise controls are ordinary runs of ``defense=none`` and of the noise
            baseline (see :func:`harness.run.run_from_config`).
    """

    dataset: Any
    defense: Defense
    purifier: Purifier
    mimic: Mimic | None
    metrics: Mapping[str, Metric]
    model: Any
    seed: int
    configs: Mapping[str, Any]
    control: str | None = None


@dataclass
class StageRecord:
    """What happened to one stage in this run."""

    stage: str
    key: str
    cached: bool
    seconds: float
    compute_seconds: float
    seed: int | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    stages: dict[str, StageRecord]
    per_image: dict[str, list[float]]
    image_ids: list[str]
    higher_is_better: dict[str, bool]
    defense_info: dict[str, Any]
    purifier_params: dict[str, Any]
    per_set: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in self.per_image.items()}
        return {**out, **self.per_set}

    @property
    def stage_keys(self) -> dict[str, str]:
        return {k: r.key for k, r in self.stages.items()}


def _stage_images(
    store: ArtifactStore,
    stage: str,
    key: str,
    seed: int | None,
    label: str,
    compute: Callable[[], tuple[ImageSet, dict[str, Any]]],
) -> tuple[ImageSet, StageRecord]:
    """Load a stage's ImageSet from the store, or compute, quantize and store it."""
    t0 = time.perf_counter()
    art = store.get(stage, key)
    if art is not None:
        images, extra = load_imageset(art.path)
        dt = time.perf_counter() - t0
        log.info("%-11s %-24s cached    (key %s, %.2f s)", stage, label, key[:12], dt)
        return images, StageRecord(stage, key, True, dt, float(extra.get("compute_seconds", 0.0)), seed, extra)
    images, extra = compute()
    images = images.quantized()
    compute_seconds = time.perf_counter() - t0
    extra = {**extra, "compute_seconds": compute_seconds}
    store.put(stage, key, lambda folder: save_imageset(folder, images, extra))
    dt = time.perf_counter() - t0
    log.info("%-11s %-24s computed  (key %s, %.2f s)", stage, label, key[:12], dt)
    return images, StageRecord(stage, key, False, dt, compute_seconds, seed, extra)


def _model_vae(ctx: Context) -> Any:
    """The experiment model's VAE (text-to-image or inpainting checkpoints alike), or None if it has none."""
    from harness.protocols import ConfigError

    for task in ("text2img", "inpaint"):
        try:
            return getattr(ctx.pipeline(task), "vae", None)
        except ConfigError:
            continue
    return None


def _check_same_layout(stage: str, before: ImageSet, after: ImageSet) -> None:
    if after.ids != before.ids or after.captions != before.captions:
        raise RuntimeError(f"{stage}: the component changed the image ids or captions")
    if after.images.shape != before.images.shape:
        raise RuntimeError(
            f"{stage}: the component changed the shape {tuple(before.images.shape)} -> {tuple(after.images.shape)}"
        )


def _model_cfg(component: Any, exp: Experiment) -> dict[str, Any]:
    """What a stage key adds for ``component``: the model it uses, and the content it reads from outside the
    config (``cache_token()``, e.g. the digest of an external defense's folder)."""
    extra: dict[str, Any] = {}
    if getattr(component, "uses_model", False) and exp.model is not None:
        extra["model"] = exp.model.key_dict() if hasattr(exp.model, "key_dict") else exp.configs.get("model")
    token = getattr(component, "cache_token", None)
    if callable(token):
        extra["content"] = token()
    return extra


def _data_stage(exp: Experiment, store: ArtifactStore) -> tuple[ImageSet, StageRecord]:
    k_data = stage_key("data", {}, {"dataset": exp.configs["dataset"]}, exp.dataset.version, None)
    clean, record = _stage_images(store, "data", k_data, None, exp.dataset.name, lambda: (exp.dataset.load(), {}))
    if len(clean) == 0:
        raise RuntimeError("the dataset is empty")
    return clean, record


def _protect_stage(
    exp: Experiment, store: ArtifactStore, ctx: Context, clean: ImageSet, k_data: str
) -> tuple[ImageSet, StageRecord]:
    s_protect = derive_seed(exp.seed, "protect")
    k_protect = stage_key(
        "protect",
        {"data": k_data},
        {"defense": exp.configs["defense"], **_model_cfg(exp.defense, exp)},
        exp.defense.version,
        s_protect,
    )

    def do_protect() -> tuple[ImageSet, dict[str, Any]]:
        out = exp.defense.protect(clean, make_generator(s_protect), ctx)
        _check_same_layout("protect", clean, out.images)
        return out.images, {"info": dict(out.info)}

    return _stage_images(store, "protect", k_protect, s_protect, exp.defense.name, do_protect)


def realised_linf(exp: Experiment, store: ArtifactStore, ctx: Context) -> float:
    """The largest L-inf distance (in [0, 1] units, on the stored 8-bit images) between a protected image of
    ``exp``'s defense and its clean image: the budget the protection actually used. Runs (or finds in the
    store) the data and protect stages only."""
    clean, rec = _data_stage(exp, store)
    protected, _ = _protect_stage(exp, store, ctx, clean, rec.key)
    return float((protected.images - clean.images).abs().amax()) if len(clean) else 0.0


def run_experiment(exp: Experiment, store: ArtifactStore, ctx: Context) -> RunResult:
    """Run every stage of ``exp`` through ``store`` and measure. Returns per-image metric values."""
    rec: dict[str, StageRecord] = {}
    cfg = exp.configs
    if exp.control not in (None, "floor"):
        raise ValueError(f"Experiment.control must be None or 'floor', got {exp.control!r}")

    clean, rec["data"] = _data_stage(exp, store)
    k_data = rec["data"].key
    protected, rec["protect"] = _protect_stage(exp, store, ctx, clean, k_data)
    k_protect = rec["protect"].key
    # purify
    s_purify = derive_seed(exp.seed, "purify")
    k_purify = stage_key(
        "purify",
        {"protect": k_protect},
        {"purifier": cfg["purifier"], **_model_cfg(exp.purifier, exp)},
        exp.purifier.version,
        s_purify,
    )

    def do_purify() -> tuple[ImageSet, dict[str, Any]]:
        out = exp.purifier.purify(protected, make_generator(s_purify), ctx)
        _check_same_layout("purify", protected, out.images)
        return out.images, {"params": dict(out.params), "randomized": bool(exp.purifier.randomized)}

    purified, rec["purify"] = _stage_images(store, "purify", k_purify, s_purify, exp.purifier.name, do_purify)

    per_image: dict[str, list[float]] = {}
    per_set: dict[str, float] = {}
    higher: dict[str, bool] = {}
    # the protection's realised budget, and how far the purifier moved the images from the clean ones
    for name, metric in budget_metrics().items():
        pairs = [("budget", protected)] + ([("purified", purified)] if name in ("psnr", "ssim") else [])
        for prefix, images in pairs:
            per_image[f"{prefix}/{name}"] = metric(images, clean).tolist()
            higher[f"{prefix}/{name}"] = metric.higher_is_better
    # the same in the model's latent space: how far the purifier brought the latent back to the clean one
    vae = _model_vae(ctx) if exp.model is not None else None
    if vae is not None:
        latent = LatentDistance(vae, ctx.batch_size)
        before, after = latent(protected, clean), latent(purified, clean)
        per_image["budget/latent_l2"], per_image["purified/latent_l2"] = before.tolist(), after.tolist()
        # 1: the purifier left the protection's latent shift as it was; 0: it removed it; nan without a shift
        ratio = torch.where(before > 1e-9, after / before.clamp_min(1e-9), torch.full_like(before, float("nan")))
        per_image["purified/latent_l2_ratio"] = ratio.tolist()
        for k in ("budget/latent_l2", "purified/latent_l2", "purified/latent_l2_ratio"):
            higher[k] = False

    # mimic (on the purified images, and on the clean ones as the reference for editing)
    if exp.mimic is not None:
        s_mimic = derive_seed(exp.seed, "mimic")
        mimic_cfg = {"mimic": cfg["mimic"], **_model_cfg(exp.mimic, exp)}
        if exp.control == "floor":  # the attacker with nothing useful: no finetune, or another seed's edit
            parents, mimic_key_cfg, label = (
                {"data": k_data},
                {**mimic_cfg, "control": "floor"},
                f"{exp.mimic.name} (floor)",
            )
            attack = lambda: (exp.mimic.floor(clean, make_generator(s_mimic), ctx), {})  # noqa: E731
        else:
            parents, mimic_key_cfg, label = {"purify": k_purify}, mimic_cfg, exp.mimic.name
            attack = lambda: (exp.mimic.run(purified, make_generator(s_mimic), ctx), {})  # noqa: E731
        k_mimic = stage_key("mimic", parents, mimic_key_cfg, exp.mimic.version, s_mimic)
        outputs, rec["mimic"] = _stage_images(store, "mimic", k_mimic, s_mimic, label, attack)
        tm = threat_model(exp.mimic.threat_model, option=f"mimic {exp.mimic.name}: threat_model")
        if tm.reference == "clean_run":
            k_ref = stage_key("mimic", {"data": k_data}, mimic_cfg, exp.mimic.version, s_mimic)
            references, rec["mimic_clean"] = _stage_images(
                store,
                "mimic",
                k_ref,
                s_mimic,
                f"{exp.mimic.name} (clean)",
                lambda: (exp.mimic.run(clean, make_generator(s_mimic), ctx), {}),
            )
        else:
            references = clean
        # set-level mimicry measures compare the generations with the artist's held-out images where the dataset
        # has them (artworks the mimic never trained on); per-image measures pair each generation with its
        # training image's id
        set_references = references
        held_out = getattr(exp.dataset, "held_out", None)
        if (
            tm.reference == "clean_images"
            and callable(held_out)
            and any(isinstance(m, SetMetric) for m in exp.metrics.values())
        ):
            k_held = stage_key("data", {}, {"dataset": cfg["dataset"], "part": "held_out"}, exp.dataset.version, None)
            set_references, rec["held_out"] = _stage_images(
                store, "data", k_held, None, f"{exp.dataset.name} (held out)", lambda: (held_out(), {})
            )

        # measure: cached as JSON, keyed by its inputs and the metric configs
        parents = {s: r.key for s, r in rec.items()}
        k_measure = stage_key(
            "measure",
            parents,
            {"metrics": cfg.get("metrics", {})},
            canonical_json({n: m.version for n, m in exp.metrics.items()}),
            None,
        )
        t0 = time.perf_counter()
        art = store.get("measure", k_measure)
        if art is not None:
            measured = art.meta()
            # canonical JSON stores a non-finite value (a refused FID: NaN) as its repr; float() reads it back
            measured["per_image"] = {k: [float(x) for x in v] for k, v in measured["per_image"].items()}
            measured["per_set"] = {k: float(v) for k, v in measured.get("per_set", {}).items()}
            cached = True
        else:
            measured = {"per_image": {}, "higher_is_better": {}}
            measured["per_set"] = {}
            for name, metric in exp.metrics.items():
                key = tm.result_key(name)
                if isinstance(metric, SetMetric):  # FID, KID: one number for the two sets
                    measured["per_set"][key] = float(metric.value(outputs, set_references))
                else:
                    measured["per_image"][key] = metric(outputs, references).tolist()
                measured["higher_is_better"][key] = metric.higher_is_better
            store.put("measure", k_measure, lambda f: (Path(f) / "meta.json").write_text(canonical_json(measured)))
            cached = False
        dt = time.perf_counter() - t0
        log.info(
            "%-11s %-24s %-9s (key %s, %.2f s)",
            "measure",
            ",".join(exp.metrics),
            "cached" if cached else "computed",
            k_measure[:12],
            dt,
        )
        rec["measure"] = StageRecord("measure", k_measure, cached, dt, dt, None)
        per_image.update(measured["per_image"])
        per_set.update(measured.get("per_set", {}))
        higher.update(measured["higher_is_better"])

    return RunResult(
        stages=rec,
        per_image=per_image,
        image_ids=list(clean.ids),
        higher_is_better=higher,
        defense_info=rec["protect"].extra.get("info", {}),
        purifier_params=rec["purify"].extra.get("params", {}),
        per_set=per_set,
    )
