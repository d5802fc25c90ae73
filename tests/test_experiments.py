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


def cells(name):
    """Every cell of an experiment's own sweep, as override lists."""
    params = compose([f"experiment={name}"]).hydra.sweeper.params
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*values)]


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_cell_of_the_published_experiments_builds(name):
    from omegaconf import open_dict

    assert name in EXPERIMENTS
    todo = cells(name)
    assert len(todo) == {"photoguard_table1": 10, "robust_mimicry": 50}[name]
    seen_labels = set()
    for cell in todo:
        cfg = compose([f"experiment={name}", *cell])
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        labels = _labels(cfg, choices, [*cell, *apply_option_overrides(cfg, choices)])
        exp = build_experiment(cfg)  # every component's constructor validates its options
        assert exp.model.inpaint_source  # the inpainting cells use the family's inpainting checkpoint
        seen_labels.add((labels["defense"], labels["purifier"], labels["mimic"]))
        assert str(cfg.runtime.results_dir) == f"results/experiments/{name}"
        assert cfg.report.success.split("/")[0] in ("editing", "mimicry")
    assert len(seen_labels) == len(todo)  # no two cells share a label


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
        "dataset.names=['skimage/astronaut','skimage/camera','skimage/chelsea','skimage/coffee','skimage/rocket']",
        "mimic.steps=3",
        "+option_overrides.defense.photoguard_encoder={steps: 2}",
        "+option_overrides.defense.photoguard_encoder_inpaint={steps: 2}",
        "option_overrides.defense.photoguard_diffusion.steps=1",
        "option_overrides.defense.photoguard_diffusion_inpaint.steps=1",
        "option_overrides.defense.photoguard_diffusion.grad_repeats=1",
        "option_overrides.defense.photoguard_diffusion_inpaint.grad_repeats=1",
    ]
    import sys

    cmd = [sys.executable, "-m", "harness.run", *small]
    run(cmd)
    first = {p.name: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}
    assert len(first) == 10
    report = (results / "report.md").read_text()
    assert "## Findings" in report and report.count("random-noise baseline") == 8  # 4 protections x 2 edits
    assert (results / "tables" / "summary.md").is_file() and (results / "grid_inpaint-steps-3-.png").is_file()
    run(cmd)
    second = {p.name: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}
    assert second.keys() == first.keys()
    assert all(s["cached"] for row in second.values() for s in row["stages"].values())
    assert (results / "report.md").read_text().split("## Image grids")[0] == report.split("## Image grids")[0]
