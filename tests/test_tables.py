"""Tables by hand: the attacker's best-of per image, NaN handling, and the defense-objective table."""

import math

import pytest

from harness.tables import bootstrap_ci, defense_objectives, summarize


def _row(defense, purifier, values, seed=0, ids=("a", "b", "c"), info=None):
    return {
        "labels": {"dataset": "d", "model": "m", "defense": defense, "purifier": purifier, "mimic": "lora"},
        "seed": seed,
        "image_ids": list(ids),
        "per_image": {"mimicry/style_match": values, "budget/linf": [0.03] * len(values)},
        "higher_is_better": {"mimicry/style_match": True, "budget/linf": False},
        "defense_info": info or {},
        "budget": {"linf_max": 0.031, "psnr_mean": 35.0, "ssim_mean": 0.9},
    }


def test_best_of_takes_each_images_best_purifier():
    rows = [_row("mist", "none", [0, 0, 1]), _row("mist", "jpeg", [1, 0, 0]), _row("mist", "noise", [0, 0, 0])]
    table, _ = summarize(rows)
    best = table[table["purifier"] == "best-of (3)"].iloc[0]
    assert best["mimicry/style_match mean"] == pytest.approx(2 / 3)  # images a and c succeed with some purifier
    assert math.isnan(best["budget/linf mean"])  # budgets are not "best-of"-able
    single = table[table["purifier"] == "jpeg"].iloc[0]
    assert single["mimicry/style_match mean"] == pytest.approx(1 / 3)


def test_bootstrap_ignores_undefined_values():
    mean, lo, hi = bootstrap_ci([[1.0, float("nan"), 3.0]])
    assert mean == pytest.approx(2.0) and 1.0 <= lo <= hi <= 3.0
    assert all(math.isnan(v) for v in bootstrap_ci([[float("nan")]]))


def test_defense_objective_table_says_whether_the_defense_beats_noise():
    info = {"latent_protected": 40.0, "latent_clean": 50.0, "latent_noise": 49.5, "latent_direction": -1.0}
    weak = {"loss_protected": 0.101, "loss_clean": 0.1, "loss_noise": 0.105, "loss_direction": 1.0}
    table = defense_objectives([_row("pg", "none", [1, 1, 1], info=info), _row("weak", "none", [1, 1, 1], info=weak)])
    got = dict(zip(table["defense"], table["beats noise"], strict=True))
    assert got == {"pg": True, "weak": False}


def test_purification_table_sets_each_purifier_beside_its_distortion_on_clean_images():
    def row(defense, purifier, before, after):
        return {
            "labels": {"dataset": "d", "model": "m", "defense": defense, "purifier": purifier, "mimic": "none"},
            "seed": 0,
            "image_ids": ["a"],
            "per_image": {
                "budget/latent_l2": [before],
                "purified/latent_l2": [after],
                "purified/latent_l2_ratio": [after / before if before else float("nan")],
                "purified/psnr": [30.0],
                "purified/ssim": [0.9],
            },
            "higher_is_better": {},
        }

    from harness.tables import purification_table

    table, _ = summarize(
        [row("none", "jpeg", 0.0, 2.0), row("mist", "jpeg", 10.0, 9.0), row("mist", "none", 10.0, 10.0)]
    )
    got = purification_table(table)
    mist = got[got["defense"] == "mist"].iloc[0]
    assert (mist["latent dist before"], mist["latent dist after"], mist["purifier alone"]) == (10.0, 9.0, 2.0)
    assert mist["latent ratio"] == pytest.approx(0.9)
    assert list(got["purifier"]) == ["jpeg", "jpeg"]  # "none" is not a purifier row
