"""The threat-model registry: every mimic and defense names a registered threat model, and each threat model
has its audit YAML."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.errors import ConfigError
from harness.protocols import Defense, Mimic
from harness.threat_models import REFERENCES, threat_model, threat_models

ROOT = Path(__file__).resolve().parent.parent


def _component_classes(group: str, base: type) -> list[type]:
    out = []
    for path in sorted((ROOT / "experiments" / group).glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target:
            module, _, name = target.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, base):
                out.append(cls)
    return out


def test_registry_holds_editing_and_mimicry_with_their_rules():
    tms = threat_models()
    assert {"editing", "mimicry"} <= set(tms)
    assert tms["editing"].reference == "clean_run" and tms["editing"].floor_reseeds
    assert tms["mimicry"].reference == "clean_images" and not tms["mimicry"].floor_reseeds
    assert all(tm.reference in REFERENCES and tm.budget_norm in ("linf", "l2", "none") for tm in tms.values())
    assert tms["editing"].noise_baseline and tms["mimicry"].noise_baseline and not tms["privacy"].noise_baseline
    assert tms["editing"].result_key("ssim") == "editing/ssim"


def test_unknown_threat_model_names_the_option_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"audit\.threat_models: unknown threat model 'poison'.*editing"):
        threat_model("poison", option="audit.threat_models")


def test_every_threat_model_has_its_audit_yaml_and_every_component_names_a_registered_one():
    for name in threat_models():
        spec = OmegaConf.load(ROOT / "experiments" / "threat_model" / f"{name}.yaml")
        assert spec.mimics and spec.metrics and spec.dataset
    mimics = _component_classes("mimic", Mimic)
    defenses = _component_classes("defense", Defense)
    assert len(mimics) >= 4 and len(defenses) >= 8
    for cls in mimics:
        threat_model(cls.threat_model)
    for cls in defenses:
        for name in cls.threat_models:
            threat_model(name)


def test_noise_control_refuses_a_threat_model_whose_budgets_are_not_linf(monkeypatch):
    import dataclasses

    import harness.run as run
    from harness.errors import HarnessError

    cfg, _ = run.compose_config(["model=tiny-random", "defense=noise", "mimic=img2img"])
    exp = run.build_experiment(cfg)
    tm = dataclasses.replace(threat_model("editing"), budget_norm="l2")
    monkeypatch.setattr(run, "threat_model", lambda name, **_: tm)
    with pytest.raises(HarnessError, match="realised L-inf budget; the threat model states l2"):
        run.as_control(cfg, exp, "noise", None, None, linf=4 / 255)
    monkeypatch.setattr(run, "threat_model", threat_model)
    changed, info = run.as_control(cfg, exp, "noise", None, None, linf=4 / 255)
    assert info["eps"] == 4 / 255 and changed.configs["defense"]["eps"] == 4 / 255
