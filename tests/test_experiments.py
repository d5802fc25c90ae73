"""The experiments that reproduce published tables: every cell of their sweeps composes and builds, option
overrides touch only the option they name, one model choice serves img2img and inpainting, and the one-command
experiment writes rows, tables and a report, then comes entirely from the cache on a second run."""

import itertools
import json

import pytest

from harness.models import ModelSpec, load_pipeline
from harness.run import HarnessError, _labels, apply_option_overrides, build_experiment
from tests.conftest import ROOT
from tests.test_run import run

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments" / "experiment").glob("*.yaml"))
PUBLISHED = ["photoguard_table1", "robust_mimicry"]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "experiments"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg


def cells(name, skip=("seed",)):
    """Every cell of an experiment's own sweep, as override lists (without the ``skip`` parameters, which change
    no component)."""
    params = compose([f"experiment={name}"]).hydra.sweeper.params
    keys = [k for k in params if k not in skip]
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*values)]


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_cell_of_the_published_experiments_builds(name):
    from omegaconf import open_dict

    assert name in EXPERIMENTS
    todo = cells(name)
    # protections x edits or recipes (x purifiers) x the four roles: protected, clean, noise, floor
    assert len(todo) == {"photoguard_table1": 32, "robust_mimicry": 120}[name]
    params = compose([f"experiment={name}"]).hydra.sweeper.params
    assert str(params["control"]) == "null,clean,noise,floor"
    if name == "robust_mimicry":
        assert len(str(params["seed"]).split(",")) >= 3  # several finetunes per cell
    seen_labels = set()
    for cell in todo:
        if "control=floor" in cell and "purifier=none" not in cell and "purifier=" in " ".join(cell):
            continue  # skipped at run time: the floor takes no purifier
        cfg = compose([f"experiment={name}", *cell])
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        labels = _labels(cfg, choices, [*cell, *apply_option_overrides(cfg, choices)])
        exp = build_experiment(cfg)  # every component's constructor validates its options
        assert exp.model.inpaint_source  # the inpainting cells use the family's inpainting checkpoint
        seen_labels.add((labels["defense"], cfg.control, labels["purifier"], labels["mimic"]))
        assert str(cfg.runtime.results_dir) == f"results/experiments/{name}"
        assert cfg.report.success.split("/")[0] in ("editing", "mimicry")
    assert len(seen_labels) == len(
        [
            c
            for c in todo
            if not ("control=floor" in c and "purifier=none" not in c and any(x.startswith("purifier=") for x in c))
        ]
    )


def test_option_overrides_touch_only_the_option_they_name():
    from omegaconf import open_dict

    def build(purifier):
        cfg = compose(["experiment=robust_mimicry", f"purifier={purifier}", "mimic=lora", "defense=mist"])
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        labels = _labels(cfg, choices, apply_option_overrides(cfg, choices))
        return cfg, labels

    cfg, labels = build("impress")
    assert cfg.purifier.steps == 100 and labels["purifier"] == "impress[steps=100]"
    assert cfg.mimic.steps == 150 and labels["mimic"] == "lora[steps=150,batch_size=8]"
    assert labels["defense"] == "mist"  # no override for it
    cfg, labels = build("diffpure")
    assert cfg.purifier.steps == 100 and labels["purifier"] == "diffpure"  # its own default, untouched
    bad = compose(["experiment=robust_mimicry", "+option_overrides.purifiers={jpeg: {quality: 50}}"])
    with pytest.raises(HarnessError, match="option_overrides.purifiers"):
        apply_option_overrides(bad, dict(bad.hydra.runtime.choices))


def test_one_model_choice_serves_img2img_and_inpainting():
    spec = ModelSpec(source="tiny-random", resolution=32, inpaint_source="tiny-random-inpaint")
    assert load_pipeline(spec, "img2img").unet.config.in_channels == 4
    assert load_pipeline(spec, "inpaint").unet.config.in_channels == 9
    assert spec.for_task("inpaint").source == "tiny-random-inpaint"
    assert spec.key_dict()["inpaint"]["source"] == "tiny-random-inpaint"
    assert "inpaint" not in ModelSpec(source="tiny-random", resolution=32).key_dict()
    with pytest.raises(Exception, match="model.inpaint_source"):
        ModelSpec(source="tiny-random", inpaint_source="")


def test_photoguard_table1_runs_with_one_command_then_comes_from_the_cache(tmp_path):
    results, cache = tmp_path / "R", tmp_path / "C"
    small = [
        "experiment=photoguard_table1",
        f"runtime.results_dir={results}",
        f"runtime.cache_dir={cache}",
        "runtime.progress=false",
        "dataset.names=['skimage/astronaut','skimage/chelsea','skimage/coffee']",
        "mimic.steps=3",
        "+option_overrides.defense.photoguard_encoder={steps: 2}",
        "+option_overrides.defense.photoguard_encoder_inpaint={steps: 2}",
        "option_overrides.defense.photoguard_diffusion.steps=1",
        "option_overrides.defense.photoguard_diffusion_inpaint.steps=1",
        "option_overrides.defense.photoguard_diffusion.grad_repeats=1",
        "option_overrides.defense.photoguard_diffusion_inpaint.grad_repeats=1",
        # one of the four protections, and no Inception features (their metrics have tests of their own)
        "defense=photoguard_encoder_inpaint",
        "~metrics.kid_inception",
        "~metrics.fid_inception",
        "~metrics.precision_inception",
    ]
    import sys

    cmd = [sys.executable, "-m", "harness.run", *small]
    run(cmd)
    first = {p.name: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}
    assert len(first) == 8  # 2 edits x (protected, clean, noise at its budget, floor)
    report = (results / "report.md").read_text()
    findings = [line for line in report.splitlines() if line.startswith("- editing (")]
    assert "## Findings" in report and len(findings) == 2  # one per edit
    assert "not measured" not in report.split("## Method")[0]  # every control ran
    floors = [r for r in first.values() if r["labels"]["control"] == "floor"]
    assert floors and all(r["stage_keys"]["mimic"] != r["stage_keys"]["mimic_clean"] for r in floors)
    assert (results / "tables" / "summary.md").is_file() and (results / "grid_inpaint-steps-3-.png").is_file()
    run(cmd)
    second = {p.name: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}
    assert second.keys() == first.keys()
    assert all(s["cached"] for row in second.values() for s in row["stages"].values())
    assert (results / "report.md").read_text().split("## Image grids")[0] == report.split("## Image grids")[0]
