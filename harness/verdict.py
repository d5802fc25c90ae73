"""Verdicts a skeptic accepts: effect sizes between two controls, with paired bootstrap intervals.

A protection's success is never judged on its own number. Every verdict places it between two controls that
were measured on the same images, seeds and model (see ``control=`` in ``experiments/config.yaml``):

- the **floor**: what the attacker gets with nothing useful (an editor: the same image edited with another
  seed; a finetuning mimic: the base model prompted the same way, with no finetune);
- the **noise baseline**: uniform noise at the protection's realised L-inf budget (the same purifiers);
- the **positive control**: the attacker on the clean images, which must clearly beat the floor, or else
  the attacker could not edit or mimic even unprotected images and nothing about the protection follows.

With success oriented so that higher is the attacker's gain (values of a lower-is-better metric are negated),

- **protection** = (noise - protected) / (noise - floor), on naive mimicry (no purifier): 0 is noise of the
  same budget, 1 brings the attacker down to the floor;
- **residual** after purification = (best-of protected - floor) / (best-of noise - floor), both best-of taken
  per image over the same purifier set (a per-image maximum inflates any row, so it is compared only with
  another best-of); per purifier, (protected+p - floor) / (noise+p - floor).

Each comes with a **paired** bootstrap interval: one resample draws seeds with replacement (the outer
level: seeds change the protection's draws, the finetune and the generations) and then, within each drawn
seed, image ids with replacement, the same ids for every condition; the statistic is the ratio of the
resampled means. For yes/no metrics a resample's rate of each condition is drawn from its Jeffreys Beta
posterior given the resample's counts, so that an interval does not collapse at 0 or 1 (8 of 8 successes
give [0.76, 1.00], not [1, 1]). Too few pairs give no interval at all (:func:`too_few_pairs`: at 95%, fewer
than 4 images of one seed), since its bounds would be single pairs' values, and no verdict.

The verdict has three outcomes (``audit.min_effect``, default 0.5): **protects** (the protection interval
lies above ``min_effect``), **weak** (above 0 but not above the threshold: a statistically separated but
negligible effect is not protection), **no measurable protection**. A protection that protects is **broken**
by a purifier (or by the attacker's best-of) when the residual interval lies at or above 1 - ``min_effect``,
**holds** when it lies below, and is *not shown to hold* otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.threat_models import threat_model as get_threat_model
from harness.threat_models import threat_models

__all__ = [
    "Estimate",
    "Verdict",
    "Values",
    "ControlSet",
    "paired_bootstrap",
    "values_of",
    "best_of",
    "role_of",
    "controls_from_rows",
    "judge",
    "method_note",
    "verdict_settings",
    "bootstrap_ci",
    "binary_metrics",
    "fmt_number",
    "fmt_interval",
    "N_BOOTSTRAP",
    "OUTCOMES",
    "too_few_pairs",
    "fewest_pairs",
]

N_BOOTSTRAP = 2000
OUTCOMES = ("protects", "weak", "no measurable protection", "no verdict", "not measured")

#: per condition: seed -> image id -> value
Values = dict[Any, dict[str, float]]


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its interval (NaN when undefined)."""

    value: float
    low: float
    high: float
    pairs: int = 0
    seeds: int = 0

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.value) or math.isnan(self.low) or math.isnan(self.high))

    def fmt(self, digits: int = 2) -> str:
        """``value [low, high]``; ``value (no interval)`` when only the point is defined; ``undefined``."""
        if self.defined:
            return fmt_interval(self.value, self.low, self.high, digits)
        return "undefined" if math.isnan(self.value) else f"{fmt_number(self.value, digits)} (no interval)"


NAN = Estimate(math.nan, math.nan, math.nan)


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_number(x: Any, digits: int | None = None) -> str:
    """One number as every table and report prints it: ``digits`` decimals, or by default 1 decimal from 100,
    2 from 10, 3 from 0.01 (and for 0), 3 significant digits below; ``-`` for a missing value."""
    if _missing(x):
        return "-"
    if digits is not None:
        return f"{x:.{digits}f}"
    a = abs(x)
    if a >= 100:
        return f"{x:.1f}"
    if a >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}" if a >= 0.01 or a == 0 else f"{x:.3g}"


def fmt_interval(mean: Any, low: Any, high: Any, digits: int | None = None) -> str:
    """``mean [low, high]`` (:func:`fmt_number` each); the mean alone when there is no interval (a missing bound,
    or one value: ``low == high == mean``), ``-`` when there is no mean."""
    if _missing(mean):
        return "-"
    if _missing(low) or _missing(high) or (low == high == mean):
        return fmt_number(mean, digits)
    return f"{fmt_number(mean, digits)} [{fmt_number(low, digits)}, {fmt_number(high, digits)}]"


def option_name(label: Any) -> str:
    """The option a row's label names, without the settings a sweep appended (``impress[steps=100]``: impress)."""
    return str(label).split("[", 1)[0]


def role_of(row: Mapping[str, Any], baseline: str = "noise") -> str:
    """A row's role: ``clean``, ``floor``, ``noise`` (its ``control`` label) or ``protected``. Rows written before
    controls were labelled: ``defense=none`` is the clean control and the ``baseline`` defense the noise baseline
    (at whatever budget it was run)."""
    labels = row["labels"]
    if "control" in labels:
        return labels["control"] or "protected"
    defense = option_name(labels.get("defense", ""))
    if defense == "none":
        return "clean"
    if defense == baseline:
        return "noise"
    return "protected"


def values_of(rows: Sequence[Mapping[str, Any]], metric: str) -> Values:
    """``metric``'s per-image values of ``rows`` as seed -> image id -> value (set-level metrics: one value
    under the id ``"<set>"``). A row's ``output_metrics`` are keyed by its ``output_ids`` (probe generations),
    every other metric by its ``image_ids``; a row whose ids and values differ in number is an error."""
    out: Values = {}
    for r in rows:
        seed = r.get("seed")
        if metric in r.get("per_image", {}):
            own = metric in r.get("output_metrics", ())
            ids, values = (r["output_ids"] if own else r.get("image_ids", [])), r["per_image"][metric]
            if len(ids) != len(values):
                raise ValueError(
                    f"row {r.get('run_id', '?')}: {metric} has {len(values)} per-image values for {len(ids)} "
                    f"{'output' if own else 'image'} ids"
                )
            for i, v in zip(ids, values, strict=True):
                out.setdefault(seed, {})[str(i)] = float(v) if v is not None else math.nan
        elif metric in r.get("set_metrics", {}):
            v = r["set_metrics"][metric]
            out.setdefault(seed, {})["<set>"] = float(v) if v is not None else math.nan
    return out


def best_of(conditions: Sequence[Values], higher: bool) -> Values:
    """The attacker's best value per seed and image over ``conditions`` (e.g. one per purifier)."""
    pick = max if higher else min
    out: Values = {}
    for values in conditions:
        for seed, per_id in values.items():
            for i, v in per_id.items():
                if math.isnan(v):
                    continue
                cur = out.setdefault(seed, {})
                cur[i] = v if i not in cur else pick(cur[i], v)
    return out


def _blocks(conditions: Mapping[str, Values]) -> list[np.ndarray]:
    """One (conditions, images) array per seed that every condition has, over the ids all of them have."""
    names = list(conditions)
    seeds = set.intersection(*(set(v) for v in conditions.values())) if names else set()
    blocks = []
    for s in sorted(seeds, key=str):
        ids = sorted(set.intersection(*(set(conditions[c][s]) for c in names)))
        rows = [[conditions[c][s][i] for i in ids] for c in names]
        block = np.asarray(rows, dtype=np.float64).reshape(len(names), len(ids))
        block = block[:, np.isfinite(block).all(axis=0)]
        if block.shape[1]:
            blocks.append(block)
    return blocks


def paired_bootstrap(
    conditions: Mapping[str, Values],
    statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    *,
    binary: bool = False,
    n_boot: int = N_BOOTSTRAP,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``statistic`` of the conditions' means, with a paired two-level percentile bootstrap interval.

    Args:
        conditions: name -> seed -> image id -> value. Only seeds and ids present in every condition count
            (the pairs); NaN values drop their pair.
        statistic: maps name -> array of means (any shape) to an array of the same shape; it must work
            elementwise (it gets 0-d arrays for the point estimate and (n_boot,) arrays for the replicates).
        binary: the values are yes/no: each replicate draws each condition's rate from Beta(k + 1/2,
            n - k + 1/2) given the replicate's k successes of n (Jeffreys), so intervals do not collapse.
        n_boot, level, seed: replicates, coverage, and the fixed RNG seed (the same rows give the same table).

    Returns:
        the statistic on all pairs and its interval; NaN when no pair exists or most replicates are undefined;
        NaN bounds when the pairs are too few for a ``level`` interval (:func:`too_few_pairs`).
    """
    names = list(conditions)
    blocks = _blocks(conditions)
    if not blocks:
        return NAN
    pooled = np.concatenate(blocks, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(statistic({c: pooled[k].mean() for k, c in enumerate(names)}))
    if too_few_pairs([b.shape[1] for b in blocks], level):  # the bounds would be single pairs' values
        return Estimate(point, math.nan, math.nan, pooled.shape[1], len(blocks))
    rng = np.random.default_rng(seed)
    n_seeds = len(blocks)
    picks = rng.integers(0, n_seeds, (n_boot, n_seeds))  # which seed fills each slot of each replicate
    sums = np.zeros((len(names), n_boot))
    counts = np.zeros(n_boot)
    for slot in range(n_seeds):
        for g, block in enumerate(blocks):
            chosen = picks[:, slot] == g
            m = int(chosen.sum())
            if not m:
                continue
            n = block.shape[1]
            idx = rng.integers(0, n, (m, n))  # a fresh resample of the seed's images, shared by every condition
            sums[:, chosen] += block[:, idx].sum(axis=-1)
            counts[chosen] += n
    if binary:
        means = rng.beta(sums + 0.5, counts - sums + 0.5)
    else:
        means = sums / counts
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = np.asarray(statistic({c: means[k] for k, c in enumerate(names)}), dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if len(stats) < n_boot / 2:  # the statistic is undefined in most replicates (a denominator near 0)
        return Estimate(point, math.nan, math.nan, pooled.shape[1], n_seeds)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return Estimate(point, float(lo), float(hi), pooled.shape[1], n_seeds)


def too_few_pairs(per_seed: Sequence[int], level: float = 0.95) -> bool:
    """Whether pairs laid out as ``per_seed`` (how many each seed has) are too few for a ``level`` percentile
    bootstrap interval. A replicate of :func:`paired_bootstrap` that repeats a single pair everywhere (every
    seed slot draws that pair's seed, every draw within it that pair: probability s ** -s * n ** -(n * s) for
    s seeds, the pair's seed holding n) is that pair's own value; when it is at least (1 - level) / 2 likely,
    the interval's bounds are the most extreme pairs' values, the range of the data and not a ``level``
    interval. At 95% one seed needs 4 images (3 repeat one in 1 replicate of 27, above 2.5%) and a set-level
    metric 4 seeds; 2 seeds of 2 images are enough (1 in 64)."""
    s = len(per_seed)
    if not s or min(per_seed) < 1:
        return True
    n = min(per_seed)
    return float(s) ** -s * float(n) ** -(n * s) >= (1 - level) / 2


def fewest_pairs(level: float) -> int:
    """The fewest images of one seed (or seeds of one value each) that :func:`too_few_pairs` accepts."""
    n = 1
    while too_few_pairs([n], level):
        n += 1
    return n


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(np.abs(den) > 1e-12, num / np.where(np.abs(den) > 1e-12, den, 1.0), np.nan)


def _oriented(values: Values, higher: bool) -> Values:
    return values if higher else {s: {i: -v for i, v in d.items()} for s, d in values.items()}


@dataclass
class ControlSet:
    """The success values of one threat model's cell (one mimic): per role, seed -> image id -> value.

    ``noise`` and ``protected`` map purifier label -> values; ``"none"`` is naive mimicry.
    """

    clean: Values | None = None
    floor: Values | None = None
    noise: dict[str, Values] = field(default_factory=dict)
    protected: dict[str, Values] = field(default_factory=dict)


def controls_from_rows(
    rows: Sequence[Mapping[str, Any]], defense: str, metric: str, baseline: str = "noise"
) -> ControlSet:
    """The controls of the protection labelled ``defense`` among ``rows`` (one threat model and mimic): its own
    control rows (``control=clean|floor|noise`` with its label). Rows written before controls were labelled
    share one clean row (``defense=none``) and one noise row (the ``baseline`` defense) among all protections;
    they have no floor. Auditing the noise baseline itself, its protected rows are the noise baseline."""
    own = [r for r in rows if r["labels"].get("defense") == defense]
    by_role: dict[str, list[Mapping[str, Any]]] = {}
    for r in own:
        by_role.setdefault(role_of(r, baseline), []).append(r)
    for role in ("clean", "noise"):
        if not by_role.get(role):
            legacy = [r for r in rows if "control" not in r["labels"] and role_of(r, baseline) == role]
            if legacy and option_name(defense) != baseline:
                by_role[role] = legacy
    cs = ControlSet()
    for role in ("clean", "floor"):
        if sel := by_role.get(role):
            # the attacker on the clean images as they were: a sweep that also purifies the clean art (to match
            # each purifier's noise row) holds one clean row per purifier and seed; those are not the control
            plain = [r for r in sel if option_name(r["labels"].get("purifier", "none")) == "none"]
            setattr(cs, role, values_of(plain or sel, metric))
    for role in ("noise", "protected"):
        per: dict[str, list[Mapping[str, Any]]] = {}
        for r in by_role.get(role, []):
            per.setdefault(str(r["labels"].get("purifier", "none")), []).append(r)
        setattr(cs, role, {p: values_of(sel, metric) for p, sel in per.items()})
    if not cs.noise and option_name(defense) == baseline:
        cs.noise = dict(cs.protected)
    return cs


@dataclass
class Verdict:
    outcome: str
    sentence: str
    protection: Estimate = NAN
    residual: Estimate = NAN
    residual_by_purifier: dict[str, Estimate] = field(default_factory=dict)
    positive_control: Estimate = NAN  # clean - floor
    noise_gap: Estimate = NAN  # noise - floor
    broken_by: str | None = None
    holds: bool | None = None
    means: dict[str, Estimate] = field(default_factory=dict)


def _mean(values: Values, binary: bool, n_boot: int, level: float) -> Estimate:
    return paired_bootstrap({"x": values}, lambda m: m["x"], binary=binary, n_boot=n_boot, level=level)


def judge(
    cs: ControlSet,
    *,
    threat_model: str,
    defense: str,
    metric: str,
    higher: bool,
    binary: bool = False,
    min_effect: float = 0.5,
    n_boot: int = N_BOOTSTRAP,
    level: float = 0.95,
) -> Verdict:
    """The verdict on one protection for one threat model and mimic, from its controls (module docstring)."""
    kw = {"binary": binary, "n_boot": n_boot, "level": level}
    name = metric.split("/", 1)[-1]
    tm = get_threat_model(threat_model, option="judge(threat_model=...)")
    attack, floor_text, baseline_text = tm.attack, tm.floor, tm.baseline_text
    if not tm.noise_baseline:  # the effect is measured from the positive control: no budget, no noise run
        cs = ControlSet(clean=cs.clean, floor=cs.floor, noise={"none": cs.clean}, protected=cs.protected)
    means: dict[str, Estimate] = {}
    for role, values in (("clean", cs.clean), ("floor", cs.floor), ("noise", cs.noise.get("none"))):
        if values:
            means[role] = _mean(values, binary, n_boot, level)
    if cs.protected.get("none"):
        means["protected"] = _mean(cs.protected["none"], binary, n_boot, level)
    missing = [
        label
        for label, present in (
            ("the protected run without purifier", bool(cs.protected.get("none"))),
            (f"the baseline ({baseline_text})", bool(cs.noise.get("none"))),
            (f"the floor ({floor_text})", bool(cs.floor)),
            ("the positive control (the attacker on the clean images)", bool(cs.clean)),
        )
        if not present
    ]
    if missing:
        return Verdict(
            "not measured",
            f"{threat_model}: no verdict on {defense}: not measured in these rows: {'; '.join(missing)}.",
            means=means,
        )
    o = {
        "clean": _oriented(cs.clean, higher),
        "floor": _oriented(cs.floor, higher),
        "noise": _oriented(cs.noise["none"], higher),
        "protected": _oriented(cs.protected["none"], higher),
    }
    positive = paired_bootstrap({"a": o["clean"], "b": o["floor"]}, lambda m: m["a"] - m["b"], **kw)
    noise_gap = paired_bootstrap({"a": o["noise"], "b": o["floor"]}, lambda m: m["a"] - m["b"], **kw)
    v = Verdict("no verdict", "", positive_control=positive, noise_gap=noise_gap, means=means)
    sign = "" if higher else " (lower is the attacker's gain)"
    levels = (
        f"{name}{sign}: protected {means['protected'].fmt(3)}, "
        + (f"noise {means['noise'].fmt(3)}, " if tm.noise_baseline else "")
        + f"floor {means['floor'].fmt(3)}, clean {means['clean'].fmt(3)}"
    )
    per_seed = [b.shape[1] for b in _blocks(o)]
    few = too_few_pairs(per_seed, level)  # the effects get their point estimates, and there is no verdict
    if not few and not (positive.defined and positive.low > 0):
        v.sentence = (
            f"{threat_model}: no verdict on {defense}: the positive control does not clearly beat the floor "
            f"(clean minus floor {positive.fmt(3)} in {name}): "
            + (tm.unseparated or f"the attacker could not {attack} even the clean images with this model")
            + f", so nothing about the protection follows. {levels}."
        )
        return v
    if not few and not (noise_gap.defined and noise_gap.low > 0):
        v.sentence = (
            f"{threat_model}: no verdict on {defense}: uniform noise of the same budget already brings the "
            f"attacker to the floor (noise minus floor {noise_gap.fmt(3)} in {name}), so the protection's own "
            f"effect cannot be told apart from its budget. {levels}."
        )
        return v
    protection = paired_bootstrap(
        {"n": o["noise"], "p": o["protected"], "f": o["floor"]},
        lambda m: _ratio(m["n"] - m["p"], m["n"] - m["f"]),
        **kw,
    )
    v.protection = protection
    purifiers = sorted(set(cs.protected) & set(cs.noise) - {"none"})
    if purifiers:
        for p in purifiers:
            v.residual_by_purifier[p] = paired_bootstrap(
                {"p": _oriented(cs.protected[p], higher), "n": _oriented(cs.noise[p], higher), "f": o["floor"]},
                lambda m: _ratio(m["p"] - m["f"], m["n"] - m["f"]),
                **kw,
            )
        pool = ["none", *purifiers]
        best_p = best_of([_oriented(cs.protected[p], higher) for p in pool], True)
        best_n = best_of([_oriented(cs.noise[p], higher) for p in pool], True)
        v.residual = paired_bootstrap(
            {"p": best_p, "n": best_n, "f": o["floor"]}, lambda m: _ratio(m["p"] - m["f"], m["n"] - m["f"]), **kw
        )
    if few:
        v.sentence = (
            f"{threat_model}: no verdict on {defense}: {sum(per_seed)} image(s) over {len(per_seed)} seed(s) "
            f"measured in every control are too few for a {100 * level:g}% interval (its bounds would be single "
            f"images' values, the range of the data): measure more images or seeds; protection "
            f"{protection.fmt(3)}. {levels}."
        )
        return v
    scale = f"0 = {baseline_text}, 1 = the floor, {floor_text}"
    if protection.defined and protection.low > min_effect:
        v.outcome = "protects"
        head = f"{defense} protects: protection {protection.fmt(3)} > {min_effect:g} ({scale})"
    elif protection.defined and protection.low > 0:
        v.outcome = "weak"
        head = (
            f"{defense} gives weak protection: protection {protection.fmt(3)} is above 0 but not above the "
            f"{min_effect:g} the audit requires ({scale})"
        )
    else:
        v.outcome = "no measurable protection"
        head = f"{defense} gives no measurable protection: protection {protection.fmt(3)} ({scale})"
    sentence = f"{threat_model}: {head}; {levels}"
    if v.outcome == "protects" and v.residual.defined:
        target = 1 - min_effect
        breaking = {p: e for p, e in v.residual_by_purifier.items() if e.defined and e.low >= target}
        if breaking:
            p = max(breaking, key=lambda k: breaking[k].value)
            v.broken_by = p
            sentence += f"; broken by {p}: residual {breaking[p].fmt()} >= {target:g} (1 - audit.min_effect)"
        elif v.residual.low >= target:
            v.broken_by = f"the attacker's best of {len(pool)}"
            sentence += (
                f"; broken by the attacker's best per image over {len(pool)} purifier settings: residual "
                f"{v.residual.fmt()} >= {target:g} (1 - audit.min_effect)"
            )
        elif v.residual.high < target:
            v.holds = True
            sentence += (
                f"; it holds against the {len(purifiers)} configured purifiers: the attacker's best per image "
                f"recovers {v.residual.fmt()} of what noise leaves (< {target:g})"
            )
        else:
            v.holds = False
            sentence += (
                f"; not shown to hold: the attacker's best per image recovers {v.residual.fmt()} of what noise "
                f"leaves, an interval that straddles {target:g}"
            )
    elif v.residual.defined:
        sentence += f"; the attacker's best per image over the purifiers: residual {v.residual.fmt()}"
    v.sentence = sentence + "."
    return v


def method_note(min_effect: float, level: float = 0.95, n_boot: int = N_BOOTSTRAP) -> str:
    """The report's method note: the controls, the formulas and the thresholds (Markdown)."""
    pct = f"{100 * level:g}%"
    floors = "; ".join(f"{tm.name}: {tm.floor}" for tm in threat_models().values())
    positives = "; ".join(f"{tm.name}: {tm.positive_control}" for tm in threat_models().values())
    return "\n".join(
        [
            "## Method",
            "",
            "Every number is placed between controls measured on the same images, seeds and model:",
            "",
            f"- **positive control**: the attacker on the clean images ({positives}; it must clearly beat the "
            "floor, or there is no verdict);",
            f"- **floor**: the attacker with nothing useful ({floors});",
            "- **noise baseline**: uniform noise at the protection's realised L-inf budget on these images, under "
            "the same purifiers"
            + "".join(
                f"; {tm.name} has none (no perturbation budget): its protection is measured from the positive "
                f"control, protection = (clean - protected) / (clean - floor)"
                for tm in threat_models().values()
                if not tm.noise_baseline
            )
            + ".",
            "",
            "With success oriented so that higher is the attacker's gain:",
            "",
            "- protection = (noise - protected) / (noise - floor), without purifier (0: no better than noise of "
            "the same budget; 1: the attacker is down to the floor);",
            "- residual = (best-of protected - floor) / (best-of noise - floor), each image's best over the same "
            "purifier set for both; per purifier, (protected - floor) / (noise - floor) under that purifier.",
            "",
            f"Intervals: {pct} paired percentile bootstrap ({n_boot} replicates, fixed RNG): seeds resampled with "
            "replacement, then image ids within each seed, the same ids for every condition; the statistic is the "
            "ratio of the resampled means. Yes/no metrics (the style match) draw each condition's rate from its "
            "Jeffreys Beta(k + 1/2, n - k + 1/2) posterior in every replicate, so their intervals do not collapse "
            "at 0 or 1; the tables' success intervals use the same bootstrap.",
            "",
            f"Verdict (`audit.min_effect` = {min_effect:g}): **protects** when the protection interval lies above "
            f"{min_effect:g}; **weak** when it lies above 0 only (a separated but negligible effect is not "
            "protection); otherwise **no measurable protection**. A protection that protects is **broken** by a "
            f"purifier or by the attacker's best-of when the residual interval lies at or above "
            f"{1 - min_effect:g} (1 - `audit.min_effect`), **holds** when it lies below, and is *not shown to "
            "hold* otherwise. No verdict when the positive control does not clearly beat the floor (clean minus "
            "floor interval above 0), when noise of the same budget already reaches the floor, when a control "
            "was not measured, or when the pairs are too few for an interval (a bootstrap replicate that repeats "
            f"one pair is at least {100 * (1 - level) / 2:g}% likely, so the bounds would be single pairs' "
            f"values: here fewer than {fewest_pairs(level)} images of one seed, or {fewest_pairs(level)} seeds of "
            "a set-level metric).",
        ]
    )


def verdict_settings(section: Mapping[str, Any]) -> tuple[str, float, float, int]:
    """The verdict's settings in a config section (an audit's ``audit``, an experiment's ``report``), with the
    rule's defaults: (the baseline defense of legacy rows, ``min_effect``, the interval ``level``,
    ``n_bootstrap`` replicates)."""
    return (
        str(section.get("baseline", "noise")),
        float(section.get("min_effect", 0.5)),
        float(section.get("level", 0.95)),
        int(section.get("n_bootstrap", N_BOOTSTRAP)),
    )


def bootstrap_ci(
    values_by_seed: Sequence[Sequence[float]] | Mapping[Any, Mapping[str, float]],
    n_boot: int = N_BOOTSTRAP,
    level: float = 0.95,
    seed: int = 0,
    binary: bool = False,
) -> tuple[float, float, float]:
    """Mean and percentile interval of the pooled mean, resampling seeds and then images within seeds (the
    bootstrap of :func:`harness.verdict.paired_bootstrap` with one condition; ``binary``: Jeffreys-smoothed
    replicates for yes/no values, so that 8 of 8 does not give [1, 1]).

    Args:
        values_by_seed: seed -> image id -> value (the verdicts' form: the same values give the same interval
            there and here), or one sequence of per-image values per seed. NaN values do not count.

    Returns:
        (mean, low, high); NaN bounds when the values are too few for an interval (:func:`too_few_pairs`).
    """
    if isinstance(values_by_seed, Mapping):
        values = {s: {str(i): float(v) for i, v in d.items()} for s, d in values_by_seed.items()}
    else:
        values = {s: {str(i): float(v) for i, v in enumerate(vs)} for s, vs in enumerate(values_by_seed)}
    e = paired_bootstrap({"x": values}, lambda m: m["x"], binary=binary, n_boot=n_boot, level=level, seed=seed)
    return e.value, e.low, e.high


def binary_metrics(rows: list[dict[str, Any]]) -> set[str]:
    """The result names (``<threat model>/<metric>``) of yes/no metrics in ``rows``: those whose configured
    class declares ``binary = True`` (e.g. the zero-shot style match)."""
    import importlib

    out: set[str] = set()
    seen: dict[str, bool] = {}
    for row in rows:
        metrics_cfg = (row.get("config") or {}).get("metrics") or {}
        for name, node in metrics_cfg.items():
            target = (node or {}).get("_target_") if isinstance(node, dict) else None
            if not target:
                continue
            if target not in seen:
                module, _, cls = target.rpartition(".")
                try:
                    seen[target] = bool(getattr(getattr(importlib.import_module(module), cls), "binary", False))
                except (ImportError, AttributeError):
                    seen[target] = False
            if seen[target]:
                out |= {m for m in [*row.get("per_image", {}), *row.get("set_metrics", {})] if m.endswith(f"/{name}")}
    return out
