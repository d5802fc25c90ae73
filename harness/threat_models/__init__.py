"""Threat models: what an attacker tries to do with protected images, and how the harness judges it.

A threat model says how the attacker's success is measured (what each output is compared with), its success
metric, its floor and positive control (the two ends every effect size is scaled between, see
:mod:`harness.verdict`), the words a verdict uses, and the norm its budgets are stated in. Each lives in one
module of this package that defines ``THREAT_MODEL``; the audit's settings for it (dataset, model, mimics,
metrics, seeds) live in ``experiments/threat_model/<name>.yaml``. Adding a threat model is those two files:
the registry below finds the module, and ``pipeline``, ``audit``, ``summary``, ``verdict`` and the reports read
it from here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from harness.errors import ConfigError

__all__ = ["ThreatModel", "threat_model", "threat_models", "REFERENCES"]

#: how a mimic's outputs are compared: with the mimic's own output on the clean images under the same seed
#: (``"clean_run"``: an edit of the protected photo against the edit of the clean one), or with the clean images
#: themselves (``"clean_images"``: generations against the artist's works; set measures use the dataset's
#: held-out part where it has one)
REFERENCES = ("clean_run", "clean_images")


@dataclass(frozen=True)
class ThreatModel:
    """One threat model.

    Attributes:
        name: the name result keys use (``<name>/<metric>``), the mimics' ``threat_model`` and the YAML's name.
        reference: one of :data:`REFERENCES`.
        success: the default success metric of verdicts (its direction is the metric's ``higher_is_better``).
        attack: the verb of a verdict sentence ("the attacker could not <attack> even the clean images").
        floor: what the floor control is (:meth:`harness.protocols.Mimic.floor` implements it).
        positive_control: what the positive control is.
        budget_norm: the norm of the budget its noise baseline is matched in ("none": protections of this
            threat model have no perturbation budget, and no noise baseline runs).
        floor_reseeds: the floor of a mimic that defines none is its own run under another seed.
        baseline_text: how verdicts name what a protection's effect is measured from: uniform noise of the
            protection's budget (``control=noise``), or with ``budget_norm="none"`` the positive control itself
            (0 = as if unprotected; :attr:`noise_baseline`).
        prepare: None, or ``prepare(outputs, references) -> (outputs, references)``: what the measures compare,
            from the mimic's outputs and the references the pipeline chose (the privacy threat model matches
            unordered reconstructions to the private images there).
        floor_defense: None (the floor is :meth:`harness.protocols.Mimic.floor` on the clean images), or the
            defense option whose output the mimic runs on as the floor instead (poisoning: dirty-label poison of
            the same count); ``floor_defense_args`` are the audited defense's options it takes over (the
            target concept).
        own_output_ids: the measures' per-image values are per output (probe generations with ids of their own,
            not one per input image): rows record those ids as ``output_ids`` beside the ``image_ids`` of the
            inputs (:func:`harness.verdict.values_of` pairs each value by the id it belongs to).
        unseparated: what it means when the positive control does not clearly beat the floor, for the verdict's
            "no verdict" sentence ("": the attacker could not <attack> even the clean images with this model).
    """

    name: str
    reference: str
    success: str
    attack: str
    floor: str
    positive_control: str
    budget_norm: str = "linf"
    floor_reseeds: bool = False
    baseline_text: str = "noise of the same budget"
    prepare: Callable[..., Any] | None = None
    floor_defense: str | None = None
    floor_defense_args: tuple[str, ...] = ()
    own_output_ids: bool = False
    unseparated: str = ""

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"threat model {self.name}: reference must be one of {list(REFERENCES)}")

    @property
    def noise_baseline(self) -> bool:
        """Whether protections are measured from uniform noise of their budget (False: they have no budget, and
        the positive control is the baseline)."""
        return self.budget_norm != "none"

    def result_key(self, metric: str) -> str:
        """The name of ``metric``'s result in rows: ``<threat model>/<metric>``."""
        return f"{self.name}/{metric}"


@cache
def threat_models() -> dict[str, ThreatModel]:
    """Every threat model of this package, by name (each module's ``THREAT_MODEL``)."""
    found: dict[str, ThreatModel] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        tm = getattr(importlib.import_module(f"{__name__}.{info.name}"), "THREAT_MODEL", None)
        if isinstance(tm, ThreatModel):
            found[tm.name] = tm
    return found


def threat_model(name: str, option: str = "threat_model") -> ThreatModel:
    """The threat model called ``name``; a ConfigError naming ``option`` and the known ones otherwise."""
    known = threat_models()
    if name not in known:
        raise ConfigError(f"{option}: unknown threat model {name!r}; known: {sorted(known)}")
    return known[name]
