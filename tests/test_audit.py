"""The audit end to end on the tiny-random model: rows, report, verdict, grids, cache reuse, errors."""

import json

import pytest

from harness.audit import main

FAST = [
    "audit=quick",
    "audit.threat_models.editing.model=tiny-random",
    "audit.threat_models.editing.metrics=editing",
    "audit.threat_models.editing.dataset=sample_photos",
    "audit.threat_models.editing.overrides=['dataset.limit=2','mimic.steps=4']",
    "audit.purifiers=[none,jpeg]",
    "audit.grid_images=2",
    "runtime.progress=false",
]


def audit_args(tmp_path, *options):
    """``options`` plus the run's own results and cache folders under ``tmp_path``."""
    return [*options, f"runtime.results_dir={tmp_path / 'R'}", f"runtime.cache_dir={tmp_path / 'C'}"]


def test_audit_writes_a_report_with_verdict_tables_and_grids(tmp_path, capsys):
    args = audit_args(tmp_path, "defense=photoguard_encoder", "defense.steps=2", *FAST)
    assert main(args) == 0
    folder = tmp_path / "R" / "audits" / "photoguard_encoder-steps-2"
    report = (folder / "report.md").read_text()
    assert "**Verdict.** editing:" in report and "## Budget actually used" in report
    for role in ("| clean |", "| noise baseline |", "| protected |", "best-of (2)"):
        assert role in report, role
    assert "mimicry" not in report.split("## Summary")[1].split("##")[0]  # PhotoGuard claims editing only
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "<table>" in html
    rows = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    assert len(rows) == 4  # clean, noise baseline, protected x 2 purifiers
    noise = next(r for r in rows if r["labels"]["defense"].startswith("noise"))
    assert noise["budget"]["eps"] == pytest.approx(0.03)  # the baseline gets the protection's budget
    # a second run computes nothing
    assert main(args) == 0
    again = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    assert all(all(s["cached"] for s in r["stages"].values()) for r in again)


def test_audit_errors_name_the_problem(tmp_path, capsys):
    assert main(["audit=quick"]) == 2
    assert "defense=<name>" in capsys.readouterr().err
    assert main(["defense=nonexistent"]) == 2
    assert "nonexistent" in capsys.readouterr().err


def test_budget_sweep_draws_success_against_budget(tmp_path):
    args = audit_args(
        tmp_path,
        "defense=photoguard_encoder",
        "defense.steps=2",
        *FAST,
        "audit.purifiers=[none]",
        "audit.budgets=[0.01,0.03,0.05]",
    )
    assert main(args) == 0
    folder = tmp_path / "R" / "audits" / "photoguard_encoder-steps-2"
    assert (folder / "budget_editing.png").stat().st_size > 1000
    report = (folder / "report.md").read_text()
    # 0.03 is the protection's own budget: that point is the protected run, not a second copy of it
    assert report.count("| budget sweep |") == 2 and "![success vs budget](budget_editing.png)" in report
    assert "not enough runs" not in report


def test_mimicry_audit_runs_finetunes_and_skips_editing(tmp_path):
    args = audit_args(
        tmp_path,
        "defense=mist",
        "defense.steps=2",
        "audit.threat_models.mimicry.model=tiny-random",
        "audit.threat_models.mimicry.overrides=['dataset.subjects=[house,tree]','mimic.steps=2','mimic.sample_steps=2','mimic.batch_size=2']",
        "audit.purifiers=[none,jpeg]",
        "audit.grid_images=2",
        "runtime.progress=false",
    )
    assert main(args) == 0
    folder = tmp_path / "R" / "audits" / "mist-steps-2"
    report = (folder / "report.md").read_text()
    assert "**Verdict.** mimicry:" in report and "## Editing" not in report  # Mist claims mimicry only
    assert "mimicry/style_match" in report and list(folder.glob("grid_mimicry_lora*.png"))
    assert "mimic output on the clean images" in report  # the clean-trained mimic as the reference row
    rows = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    assert len(rows) == 4 and all(len(r["image_ids"]) == 4 for r in rows)
