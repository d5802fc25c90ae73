"""The verdict rules (harness/verdict.py): each outcome on hand-made controls, and the paired bootstrap's
coverage on synthetic data with a known effect."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.verdict import (
    ControlSet,
    _ratio,
    best_of,
    bootstrap_ci,
    controls_from_rows,
    fewest_pairs,
    judge,
    paired_bootstrap,
    too_few_pairs,
    values_of,
)


def vals(level: float, seeds=(0, 1, 2), n: int = 12, jitter: float = 0.02, phase: float = 0.0):
    """seed -> id -> level plus a small deterministic per-image jitter (shared across conditions by id)."""
    return {s: {f"img{i}": level + jitter * math.sin(i + 0.7 * s + phase) for i in range(n)} for s in seeds}


def controls(protected: dict, noise: dict | None = None, floor=0.3, clean=1.0) -> ControlSet:
    noise = noise or {"none": 0.95}
    return ControlSet(
        clean=vals(clean),
        floor=vals(floor, phase=1.0),
        noise={p: vals(v, phase=2.0) for p, v in noise.items()},
        protected={p: vals(v, phase=3.0) for p, v in protected.items()},
    )


def verdict(cs: ControlSet, **kw):
    return judge(cs, threat_model="editing", defense="guard", metric="editing/ssim", higher=True, **kw)


def test_protects_and_broken_by_a_purifier():
    cs = controls({"none": 0.40, "jpeg": 0.90, "blur": 0.45}, {"none": 0.95, "jpeg": 0.93, "blur": 0.90})
    v = verdict(cs)
    assert v.outcome == "protects"
    assert v.protection.value == pytest.approx((0.95 - 0.40) / (0.95 - 0.30), abs=0.02)
    assert v.broken_by == "jpeg"
    assert v.residual_by_purifier["blur"].high < 0.5
    assert "protects" in v.sentence and "broken by jpeg" in v.sentence
    assert f"{v.protection.value:.2f}" in v.sentence  # the sentence states the numbers


def test_protects_and_holds():
    cs = controls({"none": 0.40, "jpeg": 0.42}, {"none": 0.95, "jpeg": 0.93})
    v = verdict(cs)
    assert v.outcome == "protects" and v.holds is True and v.broken_by is None
    assert "holds against the 1 configured purifiers" in v.sentence


def test_broken_only_by_the_best_of_when_purifiers_win_on_different_images():
    # each purifier restores half of the images; the per-image best-of restores all of them
    protected_jpeg = {s: {f"img{i}": (0.95 if i % 2 else 0.4) for i in range(12)} for s in (0, 1, 2)}
    protected_blur = {s: {f"img{i}": (0.4 if i % 2 else 0.95) for i in range(12)} for s in (0, 1, 2)}
    cs = controls({"none": 0.40}, {"none": 0.95, "jpeg": 0.95, "blur": 0.95})
    cs.protected["jpeg"], cs.protected["blur"] = protected_jpeg, protected_blur
    v = verdict(cs)
    assert v.outcome == "protects"
    assert all(e.low < 0.5 for e in v.residual_by_purifier.values())
    assert v.broken_by == "the attacker's best of 3" and v.residual.low >= 0.5


def test_weak_is_separated_but_negligible():
    v = verdict(controls({"none": 0.92}))
    assert v.protection.low > 0 and v.protection.high < 0.5
    assert v.outcome == "weak" and "weak protection" in v.sentence


def test_no_measurable_protection():
    v = verdict(controls({"none": 0.95}))
    assert v.outcome == "no measurable protection"
    assert v.protection.low <= 0 <= v.protection.high


def test_no_verdict_when_the_positive_control_does_not_beat_the_floor():
    v = verdict(controls({"none": 0.3}, {"none": 0.31}, floor=0.3, clean=0.3))
    assert v.outcome == "no verdict"
    assert "could not edit even the clean images" in v.sentence


def test_no_verdict_on_a_poison_when_dirty_label_poison_does_not_hurt_the_trainer():
    """Poisoning's floor is dirty-label poison: when training on it is no worse than on the clean images, the
    sentence says that (not that the attacker could not train)."""
    cs = controls({"none": 0.3}, {"none": 0.31}, floor=0.3, clean=0.3)
    v = judge(cs, threat_model="poisoning", defense="ns", metric="poisoning/concept_accuracy", higher=True)
    assert v.outcome == "no verdict"
    assert "dirty-label poison of this count does not clearly hurt the trainer" in v.sentence
    assert "could not" not in v.sentence


def test_no_verdict_when_noise_already_reaches_the_floor():
    v = verdict(controls({"none": 0.3}, {"none": 0.3}, floor=0.3, clean=1.0))
    assert v.outcome == "no verdict" and "noise of the same budget already brings" in v.sentence


def test_not_measured_names_the_missing_control():
    cs = controls({"none": 0.4})
    cs.floor = None
    v = verdict(cs)
    assert v.outcome == "not measured" and "the floor" in v.sentence and "not measured" in v.sentence


def test_lower_is_better_metrics_give_the_same_effect():
    cs = controls({"none": 0.40, "jpeg": 0.9}, {"none": 0.95, "jpeg": 0.93})
    neg = ControlSet(
        clean={s: {i: -x for i, x in d.items()} for s, d in cs.clean.items()},
        floor={s: {i: -x for i, x in d.items()} for s, d in cs.floor.items()},
        noise={p: {s: {i: -x for i, x in d.items()} for s, d in v.items()} for p, v in cs.noise.items()},
        protected={p: {s: {i: -x for i, x in d.items()} for s, d in v.items()} for p, v in cs.protected.items()},
    )
    a = verdict(cs)
    b = judge(neg, threat_model="editing", defense="guard", metric="editing/lpips", higher=False)
    assert b.outcome == a.outcome and b.broken_by == a.broken_by
    assert b.protection.value == pytest.approx(a.protection.value)


def test_min_effect_threshold_moves_the_outcome():
    cs = controls({"none": 0.62})  # protection about 0.5
    assert verdict(cs, min_effect=0.3).outcome == "protects"
    assert verdict(cs, min_effect=0.7).outcome == "weak"


def _synthetic(rng, seeds: int, n: int = 20, seed_sd: float = 0.04):
    """floor 0.3, noise 0.9, protected 0.6 (true protection 0.5); image effects shared by the conditions,
    seed effects that differ per condition (a finetune that happens to resist the protection better)."""
    out = {}
    img = rng.normal(0, 0.1, (seeds, n))
    for c, mu in (("f", 0.3), ("n", 0.9), ("p", 0.6)):
        v = mu + img + rng.normal(0, seed_sd, seeds)[:, None] + rng.normal(0, 0.08, (seeds, n))
        out[c] = {s: {str(i): v[s, i] for i in range(n)} for s in range(seeds)}
    return out


def _protection(m):
    return _ratio(m["n"] - m["p"], m["n"] - m["f"])


def test_too_few_pairs_give_no_interval_and_no_verdict():
    # the chance that a replicate repeats one pair everywhere, against the 2.5% tail of a 95% interval
    assert too_few_pairs([3]) and not too_few_pairs([4])  # 3 ** -3 = 3.7%, 4 ** -4 = 0.39%
    assert too_few_pairs([1, 1, 1]) and not too_few_pairs([1, 1, 1, 1])  # a set-level metric over 3 or 4 seeds
    assert not too_few_pairs([2, 2])  # 2 ** -2 * 2 ** -4 = 1.6%
    assert too_few_pairs([1, 5])  # 1 in 4 replicates is the first seed's single image, twice
    assert too_few_pairs([]) and fewest_pairs(0.95) == 4 and fewest_pairs(0.5) == 3
    # three values: their mean, and no interval (the percentile bounds would be the smallest and largest value)
    mean, low, high = bootstrap_ci([[0.1, 0.5, 0.9]])
    assert mean == pytest.approx(0.5) and math.isnan(low) and math.isnan(high)
    assert not math.isnan(bootstrap_ci([[0.1, 0.5, 0.9, 0.4]])[1])
    # an audit of 3 images and one seed gets no verdict, whatever its effect; of 4, a verdict
    v = verdict(_first(controls({"none": 0.40}), 3))
    assert v.outcome == "no verdict" and "3 image(s) over 1 seed(s)" in v.sentence and "too few" in v.sentence
    assert not v.protection.defined
    assert verdict(_first(controls({"none": 0.40}), 4)).outcome == "protects"


def _first(cs: ControlSet, n: int) -> ControlSet:
    """``cs`` cut to its first seed's first ``n`` images."""

    def cut(values: dict) -> dict:
        return {0: dict(list(values[0].items())[:n])}

    return ControlSet(
        clean=cut(cs.clean),
        floor=cut(cs.floor),
        noise={p: cut(v) for p, v in cs.noise.items()},
        protected={p: cut(v) for p, v in cs.protected.items()},
    )


def test_paired_bootstrap_covers_a_known_effect():
    rng = np.random.default_rng(2)
    trials = 150
    one_seed = sum(
        (e := paired_bootstrap(_synthetic(rng, 1, seed_sd=0.0), _protection, n_boot=400, seed=k)).low <= 0.5 <= e.high
        for k in range(trials)
    )
    assert 0.88 <= one_seed / trials <= 0.99
    # several seeds with seed-level effects: resampling seeds as the outer level keeps the coverage; pooling
    # every seed's images as if they were one sample would not
    two_level = pooled = 0
    for k in range(trials):
        data = _synthetic(rng, 8)
        e = paired_bootstrap(data, _protection, n_boot=400, seed=k)
        two_level += e.low <= 0.5 <= e.high
        flat = {c: {0: {f"{s}/{i}": x for s, d in v.items() for i, x in d.items()}} for c, v in data.items()}
        e = paired_bootstrap(flat, _protection, n_boot=400, seed=k)
        pooled += e.low <= 0.5 <= e.high
    assert two_level / trials >= 0.85
    assert pooled / trials < two_level / trials - 0.15


def test_pairing_narrows_the_interval_of_a_difference():
    rng = np.random.default_rng(0)
    data = _synthetic(rng, 1)
    paired = paired_bootstrap({"n": data["n"], "p": data["p"]}, lambda m: m["n"] - m["p"])
    shuffled = {0: {str((int(i) + 7) % 20): x for i, x in data["p"][0].items()}}  # breaks the pairs
    unpaired = paired_bootstrap({"n": data["n"], "p": shuffled}, lambda m: m["n"] - m["p"])
    assert paired.value == pytest.approx(unpaired.value)
    assert paired.high - paired.low < 0.7 * (unpaired.high - unpaired.low)


def test_yes_no_intervals_do_not_collapse():
    all_yes = {0: {f"g{i}": 1.0 for i in range(8)}}
    e = paired_bootstrap({"x": all_yes}, lambda m: m["x"], binary=True)
    assert e.value == 1.0 and 0.6 < e.low < 0.9 and e.high == pytest.approx(1.0, abs=1e-3)
    plain = paired_bootstrap({"x": all_yes}, lambda m: m["x"])
    assert plain.low == plain.high == 1.0  # what a plain percentile bootstrap does
    none = paired_bootstrap({"x": {0: {f"g{i}": 0.0 for i in range(8)}}}, lambda m: m["x"], binary=True)
    assert none.low == pytest.approx(0.0, abs=1e-3) and 0.1 < none.high < 0.4


def test_values_of_and_best_of():
    rows = [
        {"seed": 0, "image_ids": ["a", "b"], "per_image": {"m": [0.1, 0.9]}},
        {"seed": 1, "image_ids": ["a", "b"], "per_image": {"m": [0.5, 0.2]}},
    ]
    v = values_of(rows, "m")
    assert v == {0: {"a": 0.1, "b": 0.9}, 1: {"a": 0.5, "b": 0.2}}
    other = {0: {"a": 0.3, "b": 0.1}, 1: {"a": 0.4, "b": 0.6}}
    assert best_of([v, other], higher=True) == {0: {"a": 0.3, "b": 0.9}, 1: {"a": 0.5, "b": 0.6}}
    assert best_of([v, other], higher=False) == {0: {"a": 0.1, "b": 0.1}, 1: {"a": 0.4, "b": 0.2}}
    # values measured per output (probe generations) are keyed by the row's output ids, the rest by image ids
    probe_row = {
        "seed": 0,
        "image_ids": ["a", "b"],
        "output_ids": ["g1", "g2", "g3"],
        "output_metrics": ["p"],
        "per_image": {"m": [0.1, 0.9], "p": [1.0, 0.0, 1.0]},
    }
    assert values_of([probe_row], "p") == {0: {"g1": 1.0, "g2": 0.0, "g3": 1.0}}
    assert values_of([probe_row], "m") == {0: {"a": 0.1, "b": 0.9}}
    with pytest.raises(ValueError, match="3 per-image values for 2 image ids"):
        values_of([{**probe_row, "output_metrics": []}], "p")


def test_privacy_measures_protection_from_the_positive_control_without_a_noise_run():
    """A threat model without a noise baseline (privacy: no perturbation budget) needs no noise rows: the
    protection is (clean - protected) / (clean - floor), and the sentence names that baseline."""
    cs = ControlSet(clean=vals(1.0), floor=vals(0.1, phase=1.0), protected={"none": vals(0.3, phase=3.0)})
    v = judge(cs, threat_model="privacy", defense="instahide", metric="privacy/ssim", higher=True)
    assert v.outcome == "protects"
    assert v.protection.value == pytest.approx((1.0 - 0.3) / (1.0 - 0.1), abs=0.02)
    assert "0 = the images encoded alone (k = 1)" in v.sentence and "noise" not in v.sentence
    weak = judge(
        ControlSet(clean=vals(1.0), floor=vals(0.1, phase=1.0), protected={"none": vals(0.85, phase=3.0)}),
        threat_model="privacy",
        defense="instahide",
        metric="privacy/ssim",
        higher=True,
    )
    assert weak.outcome == "weak"


def test_the_positive_control_is_the_clean_art_without_a_purifier_in_any_row_order():
    """A sweep that purifies the clean art too (robust mimicry) holds a clean row per purifier and seed: the
    positive control is the unpurified one, whichever order the rows come in (before, the last row of a seed
    won: a purified clean row could stand in for the control)."""

    def row(control, purifier, seed, value):
        labels = {"defense": "mist", "purifier": purifier, "control": control, "mimic": "lora"}
        return {"labels": labels, "seed": seed, "image_ids": ["a", "b"], "per_image": {"m/x": [value, value]}}

    rows = [row("clean", p, s, v) for s in (0, 1) for p, v in (("none", 0.9), ("jpeg", 0.2), ("diffpure", 0.4))]
    rows += [row("floor", "none", s, 0.1) for s in (0, 1)]
    for order in (rows, rows[::-1]):
        cs = controls_from_rows(order, "mist", "m/x")
        assert cs.clean == {0: {"a": 0.9, "b": 0.9}, 1: {"a": 0.9, "b": 0.9}}
        assert cs.floor == {0: {"a": 0.1, "b": 0.1}, 1: {"a": 0.1, "b": 0.1}}
    # a sweep whose clean rows all carry one purifier keeps them
    only = [row("clean", "jpeg", 0, 0.5)]
    assert controls_from_rows(only, "mist", "m/x").clean == {0: {"a": 0.5, "b": 0.5}}
