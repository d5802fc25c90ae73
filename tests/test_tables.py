"""Tables by hand: the attacker's best-of per image, NaN handling, yes/no intervals, the defense-objective table,
and experiment reports whose findings come from the verdict rules."""

import math

import pytest

from harness.summary import defense_objectives, summarize
from harness.verdict import bootstrap_ci


def _row(defense, purifier, values, seed=0, ids=("a", "b", "c"), info=None, control=""):
    return {
        "labels": {
            "dataset": "d",
            "model": "m",
            "defense": defense,
            "control": control,
            "purifier": purifier,
            "mimic": "lora",
        },
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


def test_no_best_of_line_without_a_success_metric():
    # rows without a mimic (a defense's objective under several purifiers) measure no success: no best-of line
    rows = [_row("mist", p, [0, 1, 0]) for p in ("none", "jpeg")]
    for r in rows:
        r["labels"]["mimic"] = "none"
        r["per_image"] = {"budget/linf": [0.03] * 3}
        r["higher_is_better"] = {"budget/linf": False}
    table, _ = summarize(rows)
    assert sorted(table["purifier"]) == ["jpeg", "none"]
    for r in rows:  # the same cell with a mimic's success metric gets its best-of line
        r["labels"]["mimic"] = "lora"
        r["per_image"]["mimicry/style_match"] = [0, 1, 0]
        r["higher_is_better"]["mimicry/style_match"] = True
    table, _ = summarize(rows)
    assert "best-of (2)" in set(table["purifier"])


def test_bootstrap_ignores_undefined_values():
    mean, lo, hi = bootstrap_ci([[1.0, float("nan"), 3.0, 2.0, 2.0]])
    assert mean == pytest.approx(2.0) and 1.0 <= lo <= hi <= 3.0
    mean, lo, hi = bootstrap_ci([[1.0, float("nan"), 3.0]])  # two values: a mean, too few for an interval
    assert mean == pytest.approx(2.0) and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in bootstrap_ci([[float("nan")]]))


def test_yes_no_metrics_get_intervals_that_do_not_collapse():
    rows = [_row("mist", "none", [1, 1, 1]), _row("mist", "none", [1, 1, 1], seed=1)]
    table, _ = summarize(rows)
    plain = table.iloc[0]
    assert plain["mimicry/style_match ci_low"] == 1.0  # a continuous metric's percentile bootstrap
    for r in rows:
        r["config"] = {"metrics": {"style_match": {"_target_": "harness.metrics.clip.StyleMatch"}}}
    table, _ = summarize(rows)
    judged = table.iloc[0]
    assert judged["mimicry/style_match mean"] == 1.0
    assert 0.6 < judged["mimicry/style_match ci_low"] < 0.95  # StyleMatch declares binary = True


def test_defense_objective_table_gives_the_difference_from_noise_an_interval():
    def per_image(clean, noise, protected):
        return {"clean": clean, "noise": noise, "protected": protected}

    pg = {"latent_protected": 40.0, "latent_clean": 50.0, "latent_noise": 49.5, "latent_direction": -1.0}
    pg["latent_per_image"] = per_image([50.0] * 4, [49.5, 49.4, 49.6, 49.5], [40.0, 41.0, 39.0, 40.0])
    weak = {"loss_protected": 0.101, "loss_clean": 0.1, "loss_noise": 0.105, "loss_direction": 1.0}
    weak["loss_per_image"] = per_image([0.1] * 4, [0.104, 0.105, 0.106, 0.105], [0.100, 0.101, 0.102, 0.101])
    old = {"loss_protected": 0.2, "loss_clean": 0.1, "loss_noise": 0.1, "loss_direction": 1.0}  # no per-image values
    few = {**pg, "latent_per_image": per_image([50.0] * 3, [49.5, 49.4, 49.6], [40.0, 41.0, 39.0])}  # 3 images
    four = ("a", "b", "c", "d")
    table = defense_objectives(
        [
            _row("pg", "none", [1] * 4, ids=four, info=pg),
            _row("weak", "none", [1] * 4, ids=four, info=weak),
            _row("old", "none", [1] * 4, ids=four, info=old),
            _row("few", "none", [1] * 3, info=few),
            _row("pg", "none", [1] * 4, ids=four, info={**pg, "latent_protected": 0.0}, control="noise"),  # skipped
        ]
    )
    got = dict(zip(table["defense"], table["beats noise"], strict=True))
    assert got == {"pg": "yes", "weak": "no", "old": "no interval", "few": "no interval"}
    pg_line = table[table["defense"] == "pg"].iloc[0]
    assert pg_line["protected"] == 40.0
    assert pg_line["beyond noise [95%]"].startswith("9.50")  # -1 x (40 - 49.5), averaged per image


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

    from harness.summary import purification_table

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
    cells = {  # (defense, control, purifier): per-image success
        ("mist", "clean", "none"): [1] * 8,
        ("mist", "floor", "none"): [0] * 8,
        ("mist", "noise", "none"): [1] * 7 + [0],
        ("mist", "noise", "jpeg"): [1] * 7 + [0],
        ("mist", "noise", "upscale"): [1] * 8,
        ("mist", "", "none"): [0] * 8,  # down to the floor: protects
        ("mist", "", "jpeg"): [0] * 8,
        ("mist", "", "upscale"): [1] * 8,  # restores mimicry: broken by upscale
        ("glaze", "clean", "none"): [1] * 8,
        ("glaze", "floor", "none"): [0] * 8,
        ("glaze", "noise", "none"): [1] * 7 + [0],
        ("glaze", "", "none"): [1] * 7 + [0],  # no better than noise
    }
    rows = []
    for (d, c, p), v in cells.items():
        r = _row(d, p, v, ids=ids, control=c)
        r["config"] = {"report": spec, "runtime": {"results_dir": "results/experiments/demo"}}
        r["created"] = "2026-01-01T00:00:00+00:00"
        r["stage_keys"] = {}
        rows.append(r)
    return rows


def test_experiment_report_findings_follow_the_verdict_rules(tmp_path):
    from harness.experiment_report import write_experiment_report

    report = write_experiment_report(tmp_path, _experiment_rows("matrix"), cache_dir=None).read_text()
    assert "experiment=demo" in report and "## Method" in report
    findings = [line for line in report.splitlines() if line.startswith("- mimicry (lora):")]
    mist = next(line for line in findings if "mist protects" in line)
    glaze = next(line for line in findings if "glaze" in line)
    assert "broken by upscale" in mist and "protection 1.000" in mist
    assert "glaze gives no measurable protection" in glaze and "broken" not in glaze
    assert "| lora | mist | protects |" in report and "| lora | glaze | no measurable protection |" in report
    # the matrix: the controls first, each protection beside its own noise baseline, the best-of column last
    mist_line = next(line for line in report.splitlines() if line.startswith("| mist |"))
    assert mist_line.split("|")[-2].strip().startswith("1.000")  # the best of none/jpeg/upscale per image
    labels = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")]
    assert labels.index("positive control (clean)") < labels.index("floor") < labels.index("mist: noise at its budget")
    assert (tmp_path / "report.html").is_file()
    # the same rows give the same report, byte for byte
    again = write_experiment_report(tmp_path, _experiment_rows("matrix"), cache_dir=None).read_text()
    assert again == report


def test_experiment_report_without_floor_says_not_measured(tmp_path):
    from harness.experiment_report import write_experiment_report

    rows = [r for r in _experiment_rows("matrix") if r["labels"]["control"] != "floor"]
    report = write_experiment_report(tmp_path, rows, cache_dir=None).read_text()
    assert "no verdict on mist: not measured in these rows: the floor" in report
    assert "protects" not in report.split("## Method")[0]


def test_experiment_report_rejects_an_unknown_layout(tmp_path):
    from harness.experiment_report import write_experiment_report

    with pytest.raises(ValueError, match="report.layout"):
        write_experiment_report(tmp_path, _experiment_rows("pie"), cache_dir=None)
    rows = _experiment_rows("matrix")
    for r in rows:
        del r["config"]
    assert write_experiment_report(tmp_path, rows, cache_dir=None) is None  # not an experiment: no report


def test_tables_cli_rebuilds_a_results_folder_that_holds_only_experiments(tmp_path, capsys):
    """A results folder need not hold loose rows: one with only experiments/<name>/runs (as results/
    was on world v2 while its loose rows were being regenerated) still gets its experiment rebuilt; one
    with no rows anywhere is one clear error naming the folder."""
    import json

    from harness.tables import main

    runs = tmp_path / "R" / "experiments" / "demo" / "runs"
    runs.mkdir(parents=True)
    for k, row in enumerate(_experiment_rows("matrix")):
        (runs / f"r{k:02d}.json").write_text(json.dumps({**row, "run_id": f"r{k:02d}"}))
    assert main(["--results-dir", str(tmp_path / "R"), "--cache-dir", str(tmp_path / "C")]) == 0
    report = (runs.parent / "report.md").read_text()
    assert "| lora | mist | protects |" in report and (runs.parent / "tables" / "summary.md").is_file()
    assert not (tmp_path / "R" / "tables").exists()  # no loose rows: no top-level tables
    (tmp_path / "E").mkdir()
    assert main(["--results-dir", str(tmp_path / "E")]) == 2
    assert str(tmp_path / "E") in capsys.readouterr().err


def test_experiment_curve_reads_mimic_options_and_draws_controls_per_x(tmp_path):
    """``report.curve`` with ``x: mimic.poison_count`` and the purifier as a series: one line per role and
    purifier, each point the mean over seeds and images of the rows at that count (by hand: 8 of 8, 4 of 8...);
    rows with another purifier are kept because the series names it. Without ``controls: per_x`` the controls
    are flat levels and only unpurified rows are plotted."""
    from harness.experiment_report import write_experiment_report

    spec = {
        "title": "t",
        "layout": "metrics",
        "baseline": "noise",
        "success": "mimicry/style_match",
        "curve": {"x": "mimic.poison_count", "series": "labels.purifier", "controls": "per_x"},
    }
    ids = tuple(f"i{k}" for k in range(8))
    rows = []
    for count, protected in ((10, 6), (50, 2)):
        for control, purifier, hits in (
            ("", "none", protected),
            ("", "jpeg", 8),
            ("clean", "none", 8),
            ("floor", "none", 0),
            ("noise", "none", 8),
        ):
            for seed in (0, 1):
                r = _row("ns", purifier, [1] * hits + [0] * (8 - hits), seed=seed, ids=ids, control=control)
                r["labels"]["mimic"] = f"poison[poison_count={count}]"
                r["config"] = {
                    "report": spec,
                    "runtime": {"results_dir": "results/experiments/demo"},
                    "mimic": {"poison_count": count},
                    "defense": {"eps": 0.04},
                }
                r["created"], r["stage_keys"] = "2026-01-01T00:00:00+00:00", {}
                if count == 50 and control == "" and purifier == "none":  # a filter's figures, per seed
                    r["mimic_info"] = {"filter_precision": 0.5 + 0.25 * seed}
                rows.append(r)
    report = write_experiment_report(tmp_path, rows, cache_dir=None).read_text()
    assert "## style_match ↑ against poison_count, per purifier (every row)" in report
    lines = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert lines["protected, purifier=none"].split("|")[2].strip().startswith("0.750")  # 6 of 8 at count 10
    assert lines["protected, purifier=none"].split("|")[3].strip().startswith("0.250")  # 2 of 8 at count 50
    assert lines["protected, purifier=jpeg"].split("|")[3].strip().startswith("1.000")
    assert lines["floor, purifier=none"].split("|")[2].strip().startswith("0.000")
    assert "positive control (clean), purifier=none" in lines
    assert (tmp_path / "curve.png").stat().st_size > 0
    # the mimics' own figures: mean over the seeds and the per-seed range (0.5 and 0.75 by hand)
    assert "| poison[poison_count=50] | ns | protected | none | 0.625 [0.5, 0.75] |" in report
    # some rows are purified: the metrics table names each line's purifier (a jpeg line beside the none one)
    assert "| protection | role | purifier | attack |" in report
    assert any(line.startswith("| ns | protected | jpeg | poison[poison_count=50] |") for line in report.splitlines())
    spec["curve"] = {"x": "mimic.poison_count", "series": "eps"}  # flat controls, unpurified protected rows only
    report = write_experiment_report(tmp_path, rows, cache_dir=None).read_text()
    table = report.split("against poison_count, per eps (protected, no purifier)", 1)[1]
    assert "| 0.04 | 0.750" in table and "jpeg" not in table.split("![", 1)[0]
