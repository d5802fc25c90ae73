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


def test_audit_writes_a_report_with_verdict_controls_tables_and_grids(tmp_path, capsys):
    args = audit_args(tmp_path, "defense=photoguard_encoder", "defense.steps=2", *FAST)
    assert main(args) == 0
    folder = tmp_path / "R" / "audits" / "photoguard_encoder-steps-2"
    report = (folder / "report.md").read_text()
    assert "**Verdict (img2img[steps=4]).** editing" in report and "## Budget actually used" in report
    # two photos and one seed: too few for an interval, so no verdict, whatever the effect
    assert "no verdict on photoguard_encoder[steps=2]: 2 image(s) over 1 seed(s)" in report
    assert "## Method" in report and "protection = (noise - protected) / (noise - floor)" in report
    for role in ("| positive control (clean) |", "| floor |", "| noise baseline |", "| protected |", "best-of (2)"):
        assert role in report, role
    assert "| protection (no purifier) |" in report and "| residual after jpeg |" in report
    assert "mimicry" not in report.split("## Summary")[1].split("##")[0]  # PhotoGuard claims editing only
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "<table>" in html
    rows = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    roles = sorted((r["audit"]["role"], r["labels"]["purifier"]) for r in rows)
    assert roles == [
        ("clean", "none"),
        ("floor", "none"),
        ("noise", "jpeg"),
        ("noise", "none"),
        ("protected", "jpeg"),
        ("protected", "none"),
    ]
    noise = [r for r in rows if r["audit"]["role"] == "noise"]
    protected = next(r for r in rows if r["audit"]["role"] == "protected")
    # the noise baseline gets the protection's realised budget on the same images
    assert all(r["budget"]["eps"] == pytest.approx(round(255 * protected["budget"]["linf_max"]) / 255) for r in noise)
    assert all(r["labels"]["defense"] == "photoguard_encoder[steps=2]" for r in rows)
    floor = next(r for r in rows if r["audit"]["role"] == "floor")
    assert floor["stage_keys"]["mimic"] != floor["stage_keys"]["mimic_clean"]  # another seed's edit
    assert floor["metrics"]["editing/ssim"] < protected["metrics"]["editing/ssim"]
    # a second run computes nothing
    assert main(args) == 0
    again = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    assert len(again) == 6 and all(all(s["cached"] for s in r["stages"].values()) for r in again)
    # python -m harness.tables re-renders the report from the rows alone, to the same text
    from harness.audit import rebuild_reports

    before = (folder / "report.md").read_text()
    (folder / "report.md").unlink()
    rebuild_reports(tmp_path / "R", tmp_path / "C")
    assert (folder / "report.md").read_text() == before
    # a row an earlier audit wrote with the same command (other models, say) stays in runs/ but out of the report
    stale = {**protected, "run_id": "stale", "created": "2000-01-01T00:00:00+00:00"}
    stale["metrics"] = {**protected["metrics"], "editing/ssim": 0.0}
    (folder / "runs" / "stale.json").write_text(json.dumps(stale))
    assert json.loads((folder / "audit.json").read_text())["run_ids"] == sorted(r["run_id"] for r in again)
    rebuild_reports(tmp_path / "R", tmp_path / "C")
    assert (folder / "report.md").read_text() == before


def test_auditing_noise_reports_no_measurable_protection(tmp_path):
    # four photos: the fewest of one seed that a 95% interval, and so a verdict, can rest on
    four = "audit.threat_models.editing.overrides=['dataset.limit=4','mimic.steps=4']"
    args = audit_args(tmp_path, "defense=noise", "defense.eps=0.004", *FAST, four)
    assert main(args) == 0
    report = (tmp_path / "R" / "audits" / "noise-eps-0.004" / "report.md").read_text()
    summary = report.split("## Summary")[1].split("## Method")[0]
    assert "gives no measurable protection" in summary and "protects" not in summary


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
        "audit.budget_sweep.radii=[0.01,0.03,0.05]",
    )
    assert main(args) == 0
    folder = tmp_path / "R" / "audits" / "photoguard_encoder-steps-2"
    assert (folder / "budget_editing.png").stat().st_size > 1000
    report = (folder / "report.md").read_text()
    # 0.03 is the protection's own budget: that point is the protected run, not a second copy of it
    assert report.count("| budget sweep (") == 2 and "![success vs budget](budget_editing.png)" in report


def test_budget_sweep_refuses_a_norm_it_does_not_sweep(tmp_path, capsys):
    # photoguard_diffusion's budget is an L2 radius: an L-inf sweep of defense.eps would mean another thing
    args = audit_args(tmp_path, "defense=photoguard_diffusion", *FAST, "audit.budget_sweep.radii=[0.5,2.0]")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "audit.budget_sweep.norm=linf" in err and "l2" in err
    assert not (tmp_path / "R" / "audits").exists()  # refused before any run


def test_mimicry_audit_runs_finetunes_and_skips_editing(tmp_path):
    args = audit_args(
        tmp_path,
        "defense=mist",
        "defense.steps=2",
        "audit.threat_models.mimicry.model=tiny-random",
        "audit.threat_models.mimicry.seeds=[0,1]",
        "audit.threat_models.mimicry.overrides=['dataset.subjects=[house,tree]','mimic.steps=2','mimic.sample_steps=2',"
        "'mimic.batch_size=2','~metrics.kid_inception','~metrics.stlpips','~metrics.style_gram_distance']",
        "audit.purifiers=[none,jpeg]",
        "audit.grid_images=2",
        "runtime.progress=false",
    )
    assert main(args) == 0
    folder = tmp_path / "R" / "audits" / "mist-steps-2"
    report = (folder / "report.md").read_text()
    assert "**Verdict (lora[" in report and "## Editing" not in report  # Mist claims mimicry only
    assert "mimicry/style_match" in report and list(folder.glob("grid_mimicry_lora*.png"))
    assert "mimic output on the clean images" in report  # the clean-trained mimic as the reference row
    assert "floor: base model" in report
    rows = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    assert len(rows) == 12 and all(len(r["image_ids"]) == 4 for r in rows)  # 6 roles x 2 finetune seeds
    assert {r["seed"] for r in rows} == {0, 1}
    floor = [r for r in rows if r["audit"]["role"] == "floor"]
    clean = [r for r in rows if r["audit"]["role"] == "clean"]
    # the floor samples the base model: it shares the data but not the finetuned mimic's outputs
    assert {r["stage_keys"]["mimic"] for r in floor}.isdisjoint({r["stage_keys"]["mimic"] for r in clean})


def test_a_folder_of_the_users_art_is_measured_with_any_art_metrics():
    from harness.audit import _cells, _success_metric
    from harness.run import compose_config

    cfg, _ = compose_config(["defense=mist"])
    cells = _cells(cfg.audit, "mist", [], cfg.defense.eps, ["mimicry"], ["dataset=folder", "dataset.path=/art"])
    assert cells and all("metrics=mimicry_any_art" in cell for _, _, cell in cells)
    embedded = _cells(cfg.audit, "mist", [], cfg.defense.eps, ["mimicry"], [])
    assert all("metrics=mimicry" in cell for _, _, cell in embedded)
    assert len({c[2][-1] for c in embedded if c[1] == "floor"}) == 1  # the floor takes no purifier
    assert sorted({int(o.split("=")[1]) for _, _, cell in embedded for o in cell if o.startswith("seed=")}) == [0, 1, 2]
    # the verdict reads the configured success metric, or the any-art one where the judge did not run
    spec = cfg.audit.threat_models.mimicry
    rows = [{"per_image": {"mimicry/style_gram_distance": [1.0]}}]
    assert _success_metric(rows, "mimicry", spec) == "mimicry/style_gram_distance"
    rows = [{"per_image": {"mimicry/style_match": [1.0], "mimicry/style_gram_distance": [1.0]}}]
    assert _success_metric(rows, "mimicry", spec) == "mimicry/style_match"


def test_privacy_audit_plans_controls_without_noise_or_model():
    """InstaHide claims only the privacy threat model: its audit runs the protection, the clean control and the
    floor for every seed, no noise baseline (there is no budget to match), no purifier and no model."""
    from harness.audit import audit_runs

    runs = audit_runs(["defense=instahide"])
    assert runs and all("~model" in r and "mimic=instahide_reconstruction" in r for r in runs)
    assert not any("control=noise" in r for r in runs)
    roles = sorted(next((o for o in r if o.startswith("control=")), "protected") for r in runs)
    assert roles == sorted(["protected", "control=clean", "control=floor"] * 3)
    assert all("purifier=none" in r for r in runs)


def test_an_audit_resumes_from_its_rows_without_the_cache(tmp_path):
    """runtime.reuse_rows=true on a machine without the cache (a fresh clone of committed results): the audit's
    rows are found by their keys, nothing is computed and the report comes out the same."""
    args = ["defense=photoguard_encoder", "defense.steps=2", *FAST]
    assert main(audit_args(tmp_path, *args)) == 0
    folder = tmp_path / "R" / "audits" / "photoguard_encoder-steps-2"
    report, rows = (folder / "report.md").read_text(), sorted(p.name for p in (folder / "runs").glob("*.json"))
    empty = tmp_path / "empty-cache"
    assert (
        main([*args, "runtime.reuse_rows=true", f"runtime.results_dir={tmp_path / 'R'}", f"runtime.cache_dir={empty}"])
        == 0
    )
    assert not empty.exists() or not any(p.is_file() for p in empty.rglob("*"))
    assert sorted(p.name for p in (folder / "runs").glob("*.json")) == rows
    assert (folder / "report.md").read_text() == report
    assert "runtime." not in json.loads((folder / "audit.json").read_text())["command"]


def test_the_users_dataset_model_or_metrics_replace_the_threat_models_defaults():
    """The user's overrides come before each cell's: a threat model's default choice after them would win and
    silently audit another model (model=sd15 ran tiny-sd) or refuse the user's folder (dataset.path)."""
    from harness.audit import _plan
    from harness.run import compose_config

    def composed(*args):
        _, _, cells, common = _plan(["defense=noise", *args])
        return [compose_config([*common, *cell]) for _, _, cell in cells]

    for cfg, choices in composed("model=sd15", "metrics=editing", "audit.seeds=[0]", "audit.purifiers=[none]"):
        assert choices["model"] == "sd15" and cfg.model.source.startswith("stable-diffusion-v1-5/")
        assert choices["metrics"] == "editing"
        assert choices["dataset"] in ("held_out_photos", "held_out_artist")  # the threat models' own data
    for cfg, choices in composed("dataset=folder", "dataset.path=/art", "audit.seeds=[0]", "audit.purifiers=[none]"):
        assert choices["dataset"] == "folder" and cfg.dataset.path == "/art"
        assert choices["model"] == "tiny-sd"
        editing = choices["mimic"] == "img2img"
        assert choices["metrics"] == ("photoguard_table1" if editing else "mimicry_any_art")  # any art: no judge
    # without a choice the threat models' defaults stand, in the order the committed rows were made with
    _, _, cells, _ = _plan(["defense=photoguard_encoder", "audit=quick"])
    assert cells[0][2][:3] == ["dataset=held_out_photos", "model=tiny-sd", "metrics=photoguard_table1"]
    _, _, cells, _ = _plan(["defense=instahide", "model=sd15"])
    assert all("~model" in cell for _, _, cell in cells)  # privacy uses no model, whatever the user names


def test_an_audit_of_other_data_or_another_model_gets_its_own_folder():
    """An audit's folder is named by the defense and the user's data set, model and metric choices, so that
    `model=sd15` or another folder of art does not replace the report of the default audit."""
    from harness.audit import folder_name

    assert folder_name("photoguard_encoder", ["audit=quick", "runtime.progress=false"]) == "photoguard_encoder"
    assert folder_name("photoguard_encoder", ["audit=quick", "model=sd15"]) == "photoguard_encoder-model-sd15"
    art = folder_name("external[folder=/g]", ["dataset=folder", "dataset.path=/art/a", "dataset.size=native"])
    assert art == "external-folder-g-dataset-folder-dataset.path-art-a-dataset.size-native"
    assert art != folder_name("external[folder=/g]", ["dataset=folder", "dataset.path=/art/b", "dataset.size=native"])
    long = folder_name("external", ["dataset=folder", "dataset.path=/" + "x" * 300])
    assert len(long) == 113 and long != folder_name("external", ["dataset=folder", "dataset.path=/" + "x" * 301])


def test_a_closed_tools_output_is_audited_on_the_users_folder(tmp_path):
    """The README's command for a closed tool, `defense=external defense.folder=... dataset=folder
    dataset.path=... dataset.size=native`, end to end on the tiny-random model: the files are read at their own
    72 px, the model's stages run at its resolution, and the report's grid shows both."""
    import numpy as np
    from PIL import Image

    originals, protected = tmp_path / "originals", tmp_path / "glazed"
    originals.mkdir()
    protected.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)
        Image.fromarray(image).save(originals / f"art{i}.png")
        cloak = np.clip(image.astype(int) + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(cloak).save(protected / f"art{i}.png")
    args = audit_args(
        tmp_path,
        "defense=external",
        f"defense.folder={protected}",
        "dataset=folder",
        f"dataset.path={originals}",
        "dataset.size=native",
        *FAST,  # audit=quick: the editing threat model only
    )
    assert main(args) == 0
    (folder,) = (tmp_path / "R" / "audits").glob("*")
    assert folder.name.startswith("external-folder-") and "-dataset-folder-" in folder.name  # tmp paths: hashed
    assert "## Budget actually used" in (folder / "report.md").read_text()
    (grid,) = folder.glob("grid_*.png")
    rows = [json.loads(p.read_text()) for p in (tmp_path / "R" / "audits").glob("*/runs/*.json")]
    assert rows and all(r["labels"]["dataset"].startswith(f"folder[path={originals},") for r in rows)
    protected_rows = [r for r in rows if r["audit"]["role"] == "protected"]
    assert all(r["budget"]["linf_max"] <= 6 / 255 + 1e-6 for r in protected_rows)  # the tool's files were read
    assert {r["sizes"]["protect"] for r in protected_rows} == {72}  # read at their own size
    from PIL import Image

    assert Image.open(grid).height % 72 == 0  # every row of the grid is shown at the first (clean) row's size
