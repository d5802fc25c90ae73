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


def _experiment_rows(layout):
    spec = {"title": "t", "layout": layout, "baseline": "noise", "success": "mimicry/style_match"}
    ids = tuple(f"i{k}" for k in range(8))
    cells = {  # (defense, purifier): per-image success
        ("none", "none"): [1] * 8,
        ("noise", "none"): [1] * 7 + [0],
        ("mist", "none"): [0] * 8,  # beats noise, wholly below its interval
        ("mist", "jpeg"): [0] * 8,
        ("mist", "upscale"): [1] * 6 + [0, 0],  # restores mimicry
        ("glaze", "none"): [1] * 6 + [0, 0],  # does not beat noise
        ("glaze", "jpeg"): [1] * 6 + [0, 0],
    }
    rows = []
    for (d, p), v in cells.items():
        r = _row(d, p, v, ids=ids)
        r["config"] = {"report": spec, "runtime": {"results_dir": "results/experiments/demo"}}
        r["created"] = "2026-01-01T00:00:00+00:00"
        r["stage_keys"] = {}
        rows.append(r)
    return rows


def test_experiment_report_matrix_and_findings_follow_the_intervals(tmp_path):
    from harness.experiment_report import write_experiment_report

    report = write_experiment_report(tmp_path, _experiment_rows("matrix"), cache_dir=None).read_text()
    assert "experiment=demo" in report
    lines = [line for line in report.splitlines() if line.startswith("- lora:")]
    mist = next(line for line in lines if "lora: mist" in line)
    glaze = next(line for line in lines if "lora: glaze" in line)
    assert "mist beats the random-noise baseline" in mist and "best single purifier upscale" in mist
    assert mist.endswith("a purifier restores mimicry to the noise baseline's level.")
    assert "restores" not in glaze  # nothing to restore when the protection does not work
    assert "glaze does not beat" in glaze
    # one matrix line per protection: clean first, then the baseline, with the best-of column last
    matrix = [line for line in report.splitlines() if line.startswith("| mist |")]
    assert matrix and matrix[0].split("|")[-2].strip().startswith("0.750")  # best of jpeg/none/upscale per image
    assert (tmp_path / "report.html").is_file()
    # the same rows give the same report, byte for byte
    again = write_experiment_report(tmp_path, _experiment_rows("matrix"), cache_dir=None).read_text()
    assert again == report


def test_experiment_report_rejects_an_unknown_layout(tmp_path):
    from harness.experiment_report import write_experiment_report

    with pytest.raises(ValueError, match="report.layout"):
        write_experiment_report(tmp_path, _experiment_rows("pie"), cache_dir=None)
    rows = _experiment_rows("matrix")
    for r in rows:
        del r["config"]
    assert write_experiment_report(tmp_path, rows, cache_dir=None) is None  # not an experiment: no report
