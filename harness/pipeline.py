"""The stage pipeline: data -> protect -> purify -> mimic -> measure, each stage through the artifact store.

Every stage's key chains its parents' keys (see :mod:`harness.cache`), so a re-run finds every finished
stage in the store and computes only what is missing, and a killed sweep resumes where it stopped.

Sizes: the data stage loads the images at ``dataset.size`` (a user's folder may keep its own resolution,
``dataset.size=native``). A component that uses the experiment's model (``uses_model``) sees the images at the
model's resolution (antialiased bicubic resize, :func:`for_component`) and returns them at that size; a
model-free one (JPEG, noise, an external tool's files) runs at the images' own size. Comparisons between two
stages (the budget, the purifier's distance, the references of the measures) bring the clean images to the
size of the other side. Each run records the side at which every stage ran (``RunResult.sizes``).

The mimic's threat model (:mod:`harness.threat_models`) says what its outputs are compared with: for editing the
mimic also runs on the clean images (same config, same seed), and success of the attacker means the edit of the
purified protected image looks like the edit of the clean image; for mimicry the generations are compared
with the clean images (set measures with the dataset's held-out part).
"""

from __future__ import annotations

import logging
import math
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
from harness.threat_models import ThreatModel, threat_model
from harness.types import ImageSet

__all__ = [
    "Experiment",
    "StageRecord",
    "RunResult",
    "RunState",
    "Stage",
    "STAGE_SEQUENCE",
    "run_experiment",
    "planned_keys",
    "realised_linf",
]

log = logging.getLogger(__name__)


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
    """What a run measured. ``sizes``: the side in pixels of the images each stage produced (``data``,
    ``protect``, ``purify``, ``mimic``); a model-based stage ran at its model's resolution."""

    stages: dict[str, StageRecord]
    sizes: dict[str, int]
    per_image: dict[str, list[float]]
    image_ids: list[str]
    higher_is_better: dict[str, bool]
    defense_info: dict[str, Any]
    purifier_params: dict[str, Any]
    per_set: dict[str, float] = field(default_factory=dict)
    #: what the mimic reported besides its outputs (:meth:`harness.protocols.Mimic.run_with_info`)
    mimic_info: dict[str, Any] = field(default_factory=dict)
    #: the ids of the outputs that the per-image values of ``output_metrics`` belong to (a threat model with
    #: ``own_output_ids``: probe generations); every other per-image value belongs to ``image_ids``
    output_ids: list[str] = field(default_factory=list)
    output_metrics: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        """Each per-image metric's mean over the images it is defined on (NaN marks an image outside it: a probe
        of another group, a latent-distance ratio of an unperturbed image; NaN when it is defined on none),
        and the set metrics."""
        out = {k: _defined_mean(v) for k, v in self.per_image.items()}
        return {**out, **self.per_set}

    @property
    def stage_keys(self) -> dict[str, str]:
        return {k: r.key for k, r in self.stages.items()}


def _defined_mean(values: list[float]) -> float:
    defined = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(defined) / len(defined) if defined else float("nan")


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


def for_component(component: Any, images: ImageSet, ctx: Context) -> ImageSet:
    """``images`` as ``component`` gets them: at the model's resolution if it uses the experiment's model and
    the images are of another size, else unchanged."""
    model = ctx.model
    if not getattr(component, "uses_model", False) or model is None or not getattr(model, "resolution", None):
        return images
    return images.resized(int(model.resolution))


def _side(images: ImageSet) -> int:
    return images.size[0]


def _check_same_layout(stage: str, before: ImageSet, after: ImageSet) -> None:
    if after.ids != before.ids or after.captions != before.captions:
        raise RuntimeError(f"{stage}: the component changed the image ids or captions")
    if after.images.shape != before.images.shape:
        raise RuntimeError(
            f"{stage}: the component changed the shape {tuple(before.images.shape)} -> {tuple(after.images.shape)}"
        )


def _model_key(exp: Experiment) -> Any:
    """What a key records of the experiment's model (None without one)."""
    if exp.model is None:
        return None
    return exp.model.key_dict() if hasattr(exp.model, "key_dict") else exp.configs.get("model")


def _json_artifact(s: RunState, stage: str, key: str, compute: Callable[[], dict[str, Any]]) -> tuple[dict, bool]:
    """A stage's values kept in the store as canonical JSON: (the values, whether they were read back), computed
    with ``compute`` and stored when absent. Canonical JSON sorts keys and writes a non-finite float as its repr."""
    art = s.store.get(stage, key)
    if art is not None:
        return art.meta(), True
    values = compute()
    s.store.put(stage, key, lambda f: (Path(f) / "meta.json").write_text(canonical_json(values)))
    return values, False


def _model_cfg(component: Any, exp: Experiment) -> dict[str, Any]:
    """What a stage key adds for ``component``: the model it uses, and the content it reads from outside the
    config (``cache_token()``, e.g. the digest of an external defense's folder)."""
    extra: dict[str, Any] = {}
    if getattr(component, "uses_model", False) and exp.model is not None:
        extra["model"] = _model_key(exp)
    token = getattr(component, "cache_token", None)
    if callable(token):
        extra["content"] = token()
    return extra


def _data_key(exp: Experiment) -> str:
    return stage_key("data", {}, {"dataset": exp.configs["dataset"]}, exp.dataset.version, None)


def _protect_key(exp: Experiment, k_data: str) -> str:
    return stage_key(
        "protect",
        {"data": k_data},
        {"defense": exp.configs["defense"], **_model_cfg(exp.defense, exp)},
        exp.defense.version,
        derive_seed(exp.seed, "protect"),
    )


def _data_stage(exp: Experiment, store: ArtifactStore) -> tuple[ImageSet, StageRecord]:
    k_data = _data_key(exp)
    clean, record = _stage_images(store, "data", k_data, None, exp.dataset.name, lambda: (exp.dataset.load(), {}))
    if len(clean) == 0:
        raise RuntimeError("the dataset is empty")
    return clean, record


def _protect_stage(
    exp: Experiment, store: ArtifactStore, ctx: Context, clean: ImageSet, k_data: str
) -> tuple[ImageSet, StageRecord]:
    s_protect = derive_seed(exp.seed, "protect")
    k_protect = _protect_key(exp, k_data)

    def do_protect() -> tuple[ImageSet, dict[str, Any]]:
        given = for_component(exp.defense, clean, ctx)
        out = exp.defense.protect(given, make_generator(s_protect), ctx)
        if getattr(exp.defense, "changes_layout", False):  # encodings: a new set, at the images' size
            if len(out.images) == 0 or out.images.size != given.size:
                raise RuntimeError(f"protect: {exp.defense.name} returned no images or another image size")
        else:
            _check_same_layout("protect", given, out.images)
        return out.images, {"info": dict(out.info)}

    return _stage_images(store, "protect", k_protect, s_protect, exp.defense.name, do_protect)


def realised_linf(exp: Experiment, store: ArtifactStore, ctx: Context) -> float:
    """The largest L-inf distance (in [0, 1] units, on the stored 8-bit images) between a protected image of
    ``exp``'s defense and its clean image: the budget the protection actually used. Runs (or finds in the
    store) the data and protect stages only."""
    clean, rec = _data_stage(exp, store)
    protected, _ = _protect_stage(exp, store, ctx, clean, rec.key)
    return float((protected.images - clean.resized(_side(protected)).images).abs().amax()) if len(clean) else 0.0


@dataclass
class RunState:
    """What the stages of one run share: the experiment, the store and context, and what earlier stages made."""

    exp: Experiment
    store: ArtifactStore
    ctx: Context
    images: dict[str, ImageSet] = field(default_factory=dict)
    records: dict[str, StageRecord] = field(default_factory=dict)
    per_image: dict[str, list[float]] = field(default_factory=dict)
    per_set: dict[str, float] = field(default_factory=dict)
    higher: dict[str, bool] = field(default_factory=dict)
    #: ids of the outputs the measures' per-image values belong to, and those measures (a threat model with
    #: ``own_output_ids``); empty otherwise: every per-image value belongs to an input image
    output_ids: list[str] = field(default_factory=list)
    output_metrics: list[str] = field(default_factory=list)

    @property
    def threat_model(self) -> ThreatModel:
        mimic = self.exp.mimic
        return threat_model(mimic.threat_model, option=f"mimic {mimic.name}: threat_model")

    def mimic_seed(self) -> int:
        return derive_seed(self.exp.seed, "mimic")

    def mimic_config(self) -> dict[str, Any]:
        return {"mimic": self.exp.configs["mimic"], **_model_cfg(self.exp.mimic, self.exp)}


class Stage:
    """One step of a run. ``applies`` says whether it runs for this experiment; ``run`` loads or computes its
    output through the store and leaves it (and its :class:`StageRecord`) in the :class:`RunState`."""

    #: the record's name in ``RunResult.stages`` (None: the stage stores nothing)
    record: str | None = None

    def applies(self, s: RunState) -> bool:
        return True

    def key(self, s: RunState) -> str | None:
        """The stage's key, from the keys of the records before it (None: nothing stored)."""
        return None

    def run(self, s: RunState) -> None:
        raise NotImplementedError


class DataStage(Stage):
    record = "data"

    def key(self, s: RunState) -> str:
        return _data_key(s.exp)

    def run(self, s: RunState) -> None:
        s.images["clean"], s.records["data"] = _data_stage(s.exp, s.store)


class ProtectStage(Stage):
    record = "protect"

    def key(self, s: RunState) -> str:
        return _protect_key(s.exp, s.records["data"].key)

    def run(self, s: RunState) -> None:
        clean, k_data = s.images["clean"], s.records["data"].key
        s.images["protected"], s.records["protect"] = _protect_stage(s.exp, s.store, s.ctx, clean, k_data)


class PurifyStage(Stage):
    record = "purify"

    def key(self, s: RunState) -> str:
        exp = s.exp
        return stage_key(
            "purify",
            {"protect": s.records["protect"].key},
            {"purifier": exp.configs["purifier"], **_model_cfg(exp.purifier, exp)},
            exp.purifier.version,
            derive_seed(exp.seed, "purify"),
        )

    def run(self, s: RunState) -> None:
        exp, protected = s.exp, s.images["protected"]
        s_purify = derive_seed(exp.seed, "purify")
        k_purify = self.key(s)

        def do_purify() -> tuple[ImageSet, dict[str, Any]]:
            given = for_component(exp.purifier, protected, s.ctx)
            out = exp.purifier.purify(given, make_generator(s_purify), s.ctx)
            _check_same_layout("purify", given, out.images)
            return out.images, {"params": dict(out.params), "randomized": bool(exp.purifier.randomized)}

        s.images["purified"], s.records["purify"] = _stage_images(
            s.store, "purify", k_purify, s_purify, exp.purifier.name, do_purify
        )


class BudgetStage(Stage):
    """The protection's realised budget, and how far the purifier moved the images from the clean ones, in
    pixels and in the model's latent space. Cached as JSON like the measures, keyed by the purified images' key
    (which chains the protected and the clean images' keys), the model whose autoencoder gives the latent
    distance and the metrics' versions; it keeps no record of its own, so a row's stage keys are what they were
    before it was cached (its values are the same: computed or read back)."""

    def applies(self, s: RunState) -> bool:
        # a defense that publishes another set (instance encodings) has no per-image perturbation to measure
        return s.images["protected"].ids == s.images["clean"].ids

    def key(self, s: RunState) -> str:
        versions = {n: m.version for n, m in budget_metrics().items()} | {"latent_l2": LatentDistance.version}
        return stage_key(
            "budget", {"purify": s.records["purify"].key}, {"model": _model_key(s.exp)}, canonical_json(versions), None
        )

    def run(self, s: RunState) -> None:
        key, t0 = self.key(s), time.perf_counter()

        def compute() -> dict[str, Any]:
            measured = self.measure(s)
            return {**measured, "order": list(measured["per_image"])}

        measured, cached = _json_artifact(s, "budget", key, compute)
        # back in the order they were measured (canonical JSON sorts keys), as rows list them
        measured["per_image"] = {k: [float(x) for x in measured["per_image"][k]] for k in measured["order"]}
        measured["higher_is_better"] = {k: measured["higher_is_better"][k] for k in measured["order"]}
        state = "cached" if cached else "computed"
        log.info("%-11s %-24s %-9s (key %s, %.2f s)", "budget", "", state, key[:12], time.perf_counter() - t0)
        s.per_image.update(measured["per_image"])
        s.higher.update(measured["higher_is_better"])

    @staticmethod
    def measure(s: RunState) -> dict[str, Any]:
        clean, protected, purified = s.images["clean"], s.images["protected"], s.images["purified"]
        per_image: dict[str, list[float]] = {}
        higher: dict[str, bool] = {}
        # no purifier: the purified images are the protected ones, and so are their distances
        unpurified = purified.ids == protected.ids and torch.equal(purified.images, protected.images)
        for name, metric in budget_metrics().items():
            per_image[f"budget/{name}"] = metric(protected, clean.resized(_side(protected))).tolist()
            higher[f"budget/{name}"] = metric.higher_is_better
            if name in ("psnr", "ssim"):  # at the size of the stage's images
                per_image[f"purified/{name}"] = (
                    list(per_image[f"budget/{name}"])
                    if unpurified
                    else metric(purified, clean.resized(_side(purified))).tolist()
                )
                higher[f"purified/{name}"] = metric.higher_is_better
        vae = _model_vae(s.ctx) if s.exp.model is not None else None
        if vae is not None:
            latent = LatentDistance(vae, s.ctx.batch_size)
            side = int(s.exp.model.resolution) if getattr(s.exp.model, "resolution", None) else _side(clean)
            clean, protected, purified = (x.resized(side) for x in (clean, protected, purified))
            before = latent(protected, clean)
            after = before.clone() if unpurified else latent(purified, clean)
            per_image["budget/latent_l2"], per_image["purified/latent_l2"] = before.tolist(), after.tolist()
            # 1: the purifier left the protection's latent shift as it was; 0: it removed it; nan without a shift
            ratio = torch.where(before > 1e-9, after / before.clamp_min(1e-9), torch.full_like(before, float("nan")))
            per_image["purified/latent_l2_ratio"] = ratio.tolist()
            for k in ("budget/latent_l2", "purified/latent_l2", "purified/latent_l2_ratio"):
                higher[k] = False
        return {"per_image": per_image, "higher_is_better": higher}


class MimicStage(Stage):
    """The attacker on the purified images, or with ``control="floor"`` the mimic's floor on the clean ones."""

    def applies(self, s: RunState) -> bool:
        return s.exp.mimic is not None

    record = "mimic"

    def key(self, s: RunState) -> str:
        exp, mimic_cfg = s.exp, s.mimic_config()
        if exp.control == "floor":  # keyed on the clean data: the floor never sees the protection
            parents, key_cfg = {"data": s.records["data"].key}, {**mimic_cfg, "control": "floor"}
        else:
            parents, key_cfg = {"purify": s.records["purify"].key}, mimic_cfg
        return stage_key("mimic", parents, key_cfg, exp.mimic.version, s.mimic_seed())

    def run(self, s: RunState) -> None:
        exp, seed = s.exp, s.mimic_seed()
        if exp.control == "floor":  # the attacker with nothing useful: no finetune, or another seed's edit
            clean, label = for_component(exp.mimic, s.images["clean"], s.ctx), f"{exp.mimic.name} (floor)"
            attack = lambda: (exp.mimic.floor(clean, make_generator(seed), s.ctx), {})  # noqa: E731
        else:
            purified, label = for_component(exp.mimic, s.images["purified"], s.ctx), exp.mimic.name
            attack = lambda: _with_info(exp.mimic.run_with_info(purified, make_generator(seed), s.ctx))  # noqa: E731
        s.images["outputs"], s.records["mimic"] = _stage_images(s.store, "mimic", self.key(s), seed, label, attack)


def _with_info(result: tuple[ImageSet, dict[str, float]]) -> tuple[ImageSet, dict[str, Any]]:
    """A mimic's (outputs, info) as a stage's (images, extra): the info, if any, under ``info``."""
    images, info = result
    return images, ({"info": dict(info)} if info else {})


class ReferenceStage(Stage):
    """What the outputs are compared with, by the threat model: the mimic's own run on the clean images under
    the same seed (``clean_run``), or the clean images (``clean_images``)."""

    record = "mimic_clean"

    def applies(self, s: RunState) -> bool:
        return s.exp.mimic is not None

    def key(self, s: RunState) -> str | None:
        if s.threat_model.reference != "clean_run":
            return None
        data = {"data": s.records["data"].key}
        return stage_key("mimic", data, s.mimic_config(), s.exp.mimic.version, s.mimic_seed())

    def run(self, s: RunState) -> None:
        exp, clean = s.exp, for_component(s.exp.mimic, s.images["clean"], s.ctx)
        k_ref = self.key(s)
        if k_ref is None:  # the clean images, at the size of the outputs they are compared with
            s.images["references"] = s.images["clean"].resized(_side(s.images["outputs"]))
            return
        seed = s.mimic_seed()
        s.images["references"], s.records["mimic_clean"] = _stage_images(
            s.store,
            "mimic",
            k_ref,
            seed,
            f"{exp.mimic.name} (clean)",
            lambda: (exp.mimic.run(clean, make_generator(seed), s.ctx), {}),
        )


class HeldOutStage(Stage):
    """Set-level mimicry measures compare the generations with the artist's held-out images where the dataset
    has them (artworks the mimic never trained on); per-image measures pair each generation with its training
    image's id."""

    def applies(self, s: RunState) -> bool:
        return (
            s.exp.mimic is not None
            and s.threat_model.reference == "clean_images"
            and callable(getattr(s.exp.dataset, "held_out", None))
            and any(isinstance(m, SetMetric) for m in s.exp.metrics.values())
        )

    record = "held_out"

    def key(self, s: RunState) -> str:
        exp = s.exp
        return stage_key("data", {}, {"dataset": exp.configs["dataset"], "part": "held_out"}, exp.dataset.version, None)

    def run(self, s: RunState) -> None:
        exp = s.exp
        s.images["set_references"], s.records["held_out"] = _stage_images(
            s.store, "data", self.key(s), None, f"{exp.dataset.name} (held out)", lambda: (exp.dataset.held_out(), {})
        )


class MeasureStage(Stage):
    """The metrics on the outputs against their references: cached as JSON, keyed by every earlier stage and
    the metric configs."""

    def applies(self, s: RunState) -> bool:
        return s.exp.mimic is not None

    record = "measure"

    def key(self, s: RunState) -> str:
        exp = s.exp
        return stage_key(
            "measure",
            {name: r.key for name, r in s.records.items()},
            {"metrics": exp.configs.get("metrics", {})},
            canonical_json({n: m.version for n, m in exp.metrics.items()}),
            None,
        )

    def run(self, s: RunState) -> None:
        exp = s.exp
        k_measure = self.key(s)
        t0 = time.perf_counter()
        measured, cached = _json_artifact(s, "measure", k_measure, lambda: self.measure(s))
        if cached:  # canonical JSON stores a non-finite value (a refused FID: NaN) as its repr; float() reads it back
            measured["per_image"] = {k: [float(x) for x in v] for k, v in measured["per_image"].items()}
            measured["per_set"] = {k: float(v) for k, v in measured.get("per_set", {}).items()}
        dt = time.perf_counter() - t0
        state = "cached" if cached else "computed"
        log.info("%-11s %-24s %-9s (key %s, %.2f s)", "measure", ",".join(exp.metrics), state, k_measure[:12], dt)
        s.records["measure"] = StageRecord("measure", k_measure, cached, dt, dt, None)
        s.per_image.update(measured["per_image"])
        s.per_set.update(measured.get("per_set", {}))
        s.higher.update(measured["higher_is_better"])
        if s.threat_model.own_output_ids:
            s.output_ids = [str(i) for i in measured.get("ids", s.images["outputs"].ids)]
            s.output_metrics = list(measured["per_image"])

    @staticmethod
    def measure(s: RunState) -> dict[str, Any]:
        outputs, references = s.images["outputs"], s.images["references"]
        set_references = s.images.get("set_references", references).resized(_side(outputs))
        if s.threat_model.prepare is not None:  # e.g. unordered reconstructions matched to the private images
            outputs, references = s.threat_model.prepare(outputs, references)
            set_references = references
        measured: dict[str, Any] = {"per_image": {}, "higher_is_better": {}, "per_set": {}}
        for name, metric in s.exp.metrics.items():
            key = s.threat_model.result_key(name)
            if isinstance(metric, SetMetric):  # FID, KID: one number for the two sets
                measured["per_set"][key] = float(metric.value(outputs, set_references))
            else:
                measured["per_image"][key] = metric(outputs, references).tolist()
            measured["higher_is_better"][key] = metric.higher_is_better
        if s.threat_model.own_output_ids:
            measured["ids"] = [str(i) for i in outputs.ids]
        return measured


#: (stage, the images it made) whose side ``RunResult.sizes`` records
_SIZED = (("data", "clean"), ("protect", "protected"), ("purify", "purified"), ("mimic", "outputs"))

#: the stages of a run, in order
STAGE_SEQUENCE: tuple[Stage, ...] = (
    DataStage(),
    ProtectStage(),
    PurifyStage(),
    BudgetStage(),
    MimicStage(),
    ReferenceStage(),
    HeldOutStage(),
    MeasureStage(),
)


def planned_keys(exp: Experiment) -> dict[str, str]:
    """The stage keys a run of ``exp`` would have, computed without running or reading anything (what
    ``python -m harness.rerun --check-keys`` compares with the keys the committed rows recorded)."""
    s = RunState(exp, store=None, ctx=Context())  # type: ignore[arg-type]
    for stage in STAGE_SEQUENCE:
        if stage.record and stage.applies(s):
            key = stage.key(s)
            if key is not None:
                s.records[stage.record] = StageRecord(stage.record, key, False, 0.0, 0.0, None)
    return {name: r.key for name, r in s.records.items()}


def run_experiment(exp: Experiment, store: ArtifactStore, ctx: Context) -> RunResult:
    """Run every stage of ``exp`` through ``store`` and measure. Returns per-image metric values."""
    if exp.control not in (None, "floor"):
        raise ValueError(f"Experiment.control must be None or 'floor', got {exp.control!r}")
    s = RunState(exp, store, ctx)
    for stage in STAGE_SEQUENCE:
        if stage.applies(s):
            stage.run(s)
    return RunResult(
        stages=s.records,
        sizes={name: _side(s.images[image]) for name, image in _SIZED if image in s.images},
        per_image=s.per_image,
        image_ids=list(s.images["clean"].ids),
        higher_is_better=s.higher,
        defense_info=s.records["protect"].extra.get("info", {}),
        purifier_params=s.records["purify"].extra.get("params", {}),
        per_set=s.per_set,
        mimic_info=s.records["mimic"].extra.get("info", {}) if "mimic" in s.records else {},
        output_ids=s.output_ids,
        output_metrics=s.output_metrics,
    )
