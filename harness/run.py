"""Hydra entry point: ``python -m harness.run [group=option ...] [-m for sweeps]``.

Composes the config tree under ``experiments/``, instantiates the components, runs the stage pipeline
through the artifact store in ``runtime.cache_dir``, and writes one result row (JSON) into
``${runtime.results_dir}/runs/``. After every run or sweep the summary tables in
``${runtime.results_dir}/tables/`` are rebuilt from all rows.

Examples::

    python -m harness.run                                   # one run with the defaults
    python -m harness.run -m defense=none,noise purifier=none,jpeg seed=0,1
    python -m harness.run experiment=quickstart             # a recipe that carries its own sweep
    python -m harness.run -m ... hydra/launcher=joblib      # local parallel jobs
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from harness.cache import ArtifactStore, atomic_write_text, canonical_json
from harness.errors import ConfigError, DataError, HarnessError
from harness.pipeline import Experiment, RunResult, planned_keys, realised_linf, run_experiment
from harness.protocols import Context
from harness.provenance import provenance
from harness.threat_models import threat_model

log = logging.getLogger("harness.run")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "experiments")
ROW_SCHEMA = 1
GROUPS = ("dataset", "model", "defense", "purifier", "mimic", "metrics")
#: the controls a run can be (``control=...``); None is the configured defense itself
CONTROLS = ("clean", "noise", "floor")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={device} but CUDA is not available on this machine (use cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"runtime.device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    def wrap(iterable: Iterable, **kw: Any) -> Iterable:
        return tqdm(iterable, disable=not enabled, leave=False, dynamic_ncols=True, **kw)

    return wrap


def _option_overrides(cfg: DictConfig, choices: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    """``option_overrides`` entries that apply to this run: ``{group: {key: value}}`` for each group whose chosen
    option the config lists (``option_overrides.<group>.<option>``)."""
    table = cfg.get("option_overrides") or {}
    out: dict[str, dict[str, Any]] = {}
    for group, per_option in table.items():
        if group not in GROUPS:
            raise HarnessError(f"option_overrides.{group}: not a config group (use one of {list(GROUPS)})")
        choice = (choices or {}).get(str(group))
        if per_option and choice in per_option and per_option[choice]:
            out[str(group)] = OmegaConf.to_container(per_option[choice], resolve=True)
    return out


def apply_option_overrides(cfg: DictConfig, choices: Mapping[str, str] | None) -> list[str]:
    """Merge the ``option_overrides`` of the chosen options into ``cfg`` (an experiment's settings for one
    option, e.g. fewer IMPRESS steps on CPU, that must not touch the other options of a sweep). Returns them
    as ``group.key=value`` strings, for the labels."""
    applied = []
    for group, values in _option_overrides(cfg, choices).items():
        if cfg.get(group) is None:
            continue
        with open_dict(cfg):
            cfg[group] = OmegaConf.merge(cfg[group], values)
        applied += [f"{group}.{k}={v}" for k, v in values.items()]
    return applied


def _labels(cfg: DictConfig, choices: Mapping[str, str] | None, overrides: Sequence[str]) -> dict[str, str]:
    """Readable names for the table: the config choice plus any option overridden on the command line or by
    the experiment's ``option_overrides`` (pass what :func:`apply_option_overrides` returned among
    ``overrides``)."""
    labels = {}
    for group in GROUPS:
        node = cfg.get(group)
        base = (choices or {}).get(group)
        if base is None:
            base = "none" if node is None else str(node.get("_target_", group)).rsplit(".", 1)[-1]
        extra = list(dict.fromkeys(o.split(".", 1)[1] for o in overrides if o.startswith(f"{group}.") and "=" in o))
        labels[group] = f"{base}[{','.join(extra)}]" if extra else str(base)
    return labels


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def _instantiate(group: str, node: Any) -> Any:
    if node is None:
        return None
    try:
        return hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, (ConfigError, FileNotFoundError, ValueError)):
            raise HarnessError(f"{group}: {cause}") from cause
        raise HarnessError(f"{group}: cannot instantiate {node.get('_target_')}: {err}") from err


def build_experiment(cfg: DictConfig) -> Experiment:
    if cfg.get("defense") is None or cfg.get("purifier") is None or cfg.get("dataset") is None:
        raise HarnessError("dataset, defense and purifier must be configured (use defense=none, purifier=none)")
    metrics_cfg = cfg.get("metrics") or {}
    metrics = {str(name): _instantiate(f"metrics.{name}", node) for name, node in metrics_cfg.items()}
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise HarnessError(f"seed must be a non-negative integer, got {seed!r}")
    return Experiment(
        dataset=_instantiate("dataset", cfg.dataset),
        defense=_instantiate("defense", cfg.defense),
        purifier=_instantiate("purifier", cfg.purifier),
        mimic=_instantiate("mimic", cfg.get("mimic")),
        metrics=metrics,
        model=_instantiate("model", cfg.get("model")),
        seed=seed,
        configs={g: _plain(cfg.get(g)) for g in GROUPS},
    )


def compose_config(overrides: Sequence[str]) -> tuple[DictConfig, dict[str, str]]:
    """The config ``python -m harness.run <overrides>`` would run, outside a Hydra job, and its group choices."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]  # job-time fields (sweep dirs) do not resolve outside a Hydra job
    return cfg, choices


def row_id(stage_keys: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The row's id: a hash of its stage keys, and for a control also of the control and the defense it serves
    (the clean control of two protections has the same stages but belongs to two audits)."""
    key: Any = dict(stage_keys)
    if labels and labels.get("control"):
        key = {"stage_keys": key, "control": labels["control"], "defense": labels.get("defense")}
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:20]


def control_of(cfg: DictConfig) -> str | None:
    """The run's control (``control=clean|noise|floor``), or None for the configured defense itself."""
    value = cfg.get("control")
    if value is None:
        return None
    if value not in CONTROLS:
        raise HarnessError(f"control must be null or one of {list(CONTROLS)}, got {value!r}")
    return str(value)


def skipped_cell(cfg: DictConfig, choices: Mapping[str, str] | None, control: str | None) -> dict[str, Any] | None:
    """The first ``sweep_skip`` entry of an experiment that this run's cell matches, or None. Each entry maps
    options to a value or a list of values; a cell matches when every option has one of them. Options: a config
    group (its chosen option: ``purifier: jpeg``), ``control``, ``seed`` or a dotted option (``mimic.poison_count``).
    A sweep is a grid; this takes out the combinations an experiment does not need (one countermeasure at a
    time, the controls only where they differ)."""
    rules = cfg.get("sweep_skip") or []
    for rule in rules:
        if not isinstance(rule, Mapping) or not rule:
            raise HarnessError(f"sweep_skip entries must map options to values, got {rule!r}")
        cell = {str(k): _cell_value(cfg, choices, control, str(k)) for k in rule}  # every option checked
        if all(cell[str(k)] in _values(v) for k, v in rule.items()):
            return {str(k): v for k, v in rule.items()}
    return None


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def _cell_value(cfg: DictConfig, choices: Mapping[str, str] | None, control: str | None, key: str) -> Any:
    if key == "control":
        return control
    if key in GROUPS:
        node = cfg.get(key)
        return (choices or {}).get(key) or ("none" if node is None else None)
    missing = object()
    value = OmegaConf.select(cfg, key, default=missing)
    if value is missing:
        raise HarnessError(f"sweep_skip: no option {key!r} in the config (a group, control, seed or a dotted option)")
    return value


def _option_config(group: str, option: str, **values: Any) -> DictConfig:
    """The config file ``experiments/<group>/<option>.yaml`` with ``values`` set."""
    node = OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml")
    node.pop("defaults", None)
    return OmegaConf.merge(node, values) if values else node


def as_control(
    cfg: DictConfig,
    exp: Experiment,
    control: str,
    store: ArtifactStore | None,
    ctx: Context | None,
    linf: float | None = None,
) -> tuple[Experiment, dict[str, Any]]:
    """``exp`` turned into one of its controls. Returns the experiment and what the row records about it.

    - ``clean`` (the positive control): no protection, the configured purifier and mimic;
    - ``noise``: uniform noise whose L-inf bound is the configured defense's *realised* L-inf budget on these
      images (its protect stage is run or found in the store first), the configured purifier and mimic;
    - ``floor``: no protection, no purifier, the mimic's floor (:meth:`harness.protocols.Mimic.floor`); for a
      threat model with a ``floor_defense`` (poisoning), that defense (taking the audited defense's
      ``floor_defense_args``), no purifier and the mimic's ordinary run.

    ``linf``: the realised budget when it is already known (a row records it); otherwise it is measured.
    """
    configs = dict(exp.configs)
    info: dict[str, Any] = {"kind": control}
    if control == "noise":
        norm = threat_model(exp.mimic.threat_model).budget_norm if exp.mimic is not None else "linf"
        if norm != "linf":  # the baseline is uniform noise in an L-inf ball: no other norm is matched yet
            raise HarnessError(f"control=noise matches the realised L-inf budget; the threat model states {norm}")
        if linf is None:
            linf = realised_linf(exp, store, ctx)
        eps = round(linf * 255) / 255  # stored images are 8-bit: the realised budget is a whole number of levels
        info.update(realised_linf=linf, eps=eps, matched_to=dict(configs["defense"] or {}))
        node = _option_config("defense", "noise", eps=eps)
    else:
        node = _option_config("defense", "none")
    tm = threat_model(exp.mimic.threat_model) if exp.mimic is not None else None
    floor_by_defense = control == "floor" and tm is not None and tm.floor_defense is not None
    if floor_by_defense:  # the mimic's ordinary run on another defense's output (poisoning: dirty-label poison)
        audited = dict(configs["defense"] or {})
        taken = {k: audited[k] for k in tm.floor_defense_args if k in audited}
        node = _option_config("defense", tm.floor_defense, **taken)
        info.update(defense=tm.floor_defense, **{f"defense_{k}": v for k, v in taken.items()})
    configs["defense"] = _plain(node)
    defense = _instantiate("defense", node)
    purifier = exp.purifier
    if control == "floor":
        if exp.mimic is None:
            raise HarnessError("control=floor needs a mimic (the floor is what the mimic gets with nothing useful)")
        node = _option_config("purifier", "none")
        configs["purifier"] = _plain(node)
        purifier = _instantiate("purifier", node)
    changed = Experiment(
        dataset=exp.dataset,
        defense=defense,
        purifier=purifier,
        mimic=exp.mimic,
        metrics=exp.metrics,
        model=exp.model,
        seed=exp.seed,
        configs=configs,
        control="floor" if control == "floor" and not floor_by_defense else None,
    )
    return changed, info


def make_row(cfg: DictConfig, exp: Experiment, result: RunResult, labels: dict[str, str], device: str) -> dict:
    return {
        "schema": ROW_SCHEMA,
        "run_id": row_id(result.stage_keys, labels),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "labels": labels,
        "seed": exp.seed,
        "seeds": {s: r.seed for s, r in result.stages.items() if r.seed is not None},
        "stage_keys": result.stage_keys,
        # the side in pixels of each stage's images (model-based stages run at the model's resolution)
        "sizes": result.sizes,
        "stages": {
            s: {"cached": r.cached, "seconds": round(r.seconds, 4), "compute_seconds": round(r.compute_seconds, 4)}
            for s, r in result.stages.items()
        },
        "metrics": result.metrics,
        "higher_is_better": result.higher_is_better,
        "per_image": result.per_image,
        "set_metrics": result.per_set,
        "image_ids": result.image_ids,
        # only where the measures' values are per output (probe generations): the ids they belong to
        **({"output_ids": result.output_ids, "output_metrics": result.output_metrics} if result.output_ids else {}),
        "budget": {
            # the defense's budget as (norm, radius); eps: the L-inf bound it implies (None for an L2 budget)
            **(budget.as_dict() if (budget := exp.defense.budget) is not None else {}),
            "eps": getattr(exp.defense, "eps", None),
            **{f"{k.split('/', 1)[1]}_mean": v for k, v in result.metrics.items() if k.startswith("budget/")},
            **{
                f"{k.split('/', 1)[1]}_max": max(v)
                for k, v in result.per_image.items()
                if k.startswith("budget/") and k.split("/")[1] in ("linf", "l2") and v
            },
        },
        "defense_info": result.defense_info,
        "purifier_params": result.purifier_params,
        # only when the mimic reported something (a training-data filter's counts): older rows stay as they were
        **({"mimic_info": result.mimic_info} if result.mimic_info else {}),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance(device),
    }


def write_row(results_dir: Path, row: Mapping[str, Any]) -> Path:
    """Write ``row`` as ``results_dir/runs/<run_id>.json`` (atomically) and return the path."""
    path = results_dir / "runs" / f"{row['run_id']}.json"
    atomic_write_text(path, json.dumps(row, indent=1, sort_keys=False, allow_nan=True) + "\n")
    return path


def stored_row(
    cfg: DictConfig,
    exp: Experiment,
    labels: Mapping[str, str],
    control: str | None,
    runs: Path,
    row_extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], bool] | None:
    """With ``runtime.reuse_rows=true``: this run's row from the rows already in ``runs``, without computing,
    and whether it is a new row to write. None when no row qualifies. Stage keys name every stage's inputs, code
    versions and model weights, so a row with this run's keys holds what the run would compute (the cache would
    serve the same stages); committed rows then resume a long sweep on a machine without the cache.

    - ``(row, False)``: a row with the same labels, seed and extra fields (an audit's command and role) and the
      stage keys today's code gives this config (:func:`row_planned_keys`: a noise control at the realised
      budget that row records, as ``python -m harness.rerun --check-keys`` does). It is this run's row.
    - ``(row, True)``, for a clean or floor control only, which does not run the configured defense: a row of
      the same control for another defense with this run's stage keys and control record (the clean controls of
      Mist and of ASPL train the same finetune on the same clean art), returned as this cell's row (its labels,
      config and id) with ``results_of`` naming the row that computed the results, whose ``created`` and
      ``provenance`` it keeps. Never for the defense itself or its noise control: their results depend on it."""
    rows = list(_rows_of_seed(runs, exp.seed, row_extra))
    for row in rows:
        if row.get("labels") == dict(labels) and row_planned_keys(cfg, exp, control, row) == row.get("stage_keys"):
            return row, False
    if control not in ("clean", "floor"):
        return None
    planned, info = as_control(cfg, exp, control, None, None)  # type: ignore[arg-type]
    keys = planned_keys(planned)
    for row in rows:
        if row.get("stage_keys") != keys or (row.get("labels") or {}).get("control") != control:
            continue
        if row.get("control") != info:
            continue
        relabelled = {
            **row,
            "run_id": row_id(keys, labels),
            "labels": dict(labels),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "results_of": row.get("results_of") or row["run_id"],
            **(row_extra or {}),
        }
        return relabelled, True
    return None


def _rows_of_seed(runs: Path, seed: int, row_extra: Mapping[str, Any] | None) -> Iterable[dict[str, Any]]:
    """The readable rows in ``runs`` of ``seed`` that carry ``row_extra``'s fields, in file order."""
    if not runs.is_dir():
        return
    for path in sorted(runs.glob("*.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(row, dict)
            and row.get("seed") == seed
            and all(row.get(k) == v for k, v in (row_extra or {}).items())
        ):
            yield row


def row_planned_keys(cfg: DictConfig, exp: Experiment, control: str | None, row: Mapping[str, Any]) -> dict | None:
    """The stage keys today's code gives ``exp`` as ``row`` ran it: a control of it (a noise control at the
    realised budget the row records), computed without running anything. None for a noise row that records no
    budget."""
    if control is None:
        return planned_keys(exp)
    linf = (row.get("control") or {}).get("realised_linf")
    if control == "noise" and linf is None:
        return None
    planned, _ = as_control(cfg, exp, control, None, None, linf=linf)  # type: ignore[arg-type]
    return planned_keys(planned)


def run_from_config(
    cfg: DictConfig,
    choices: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
    row_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Run one experiment from a composed config and write its result row. Returns the row, or None for a
    floor control with a purifier (the floor uses none: that cell of a sweep is the ``purifier=none`` one) and
    for a cell the experiment's ``sweep_skip`` takes out.
    ``row_extra``: more fields for the row (the audit records its role there)."""
    rt = cfg.runtime
    device = resolve_device(str(rt.device))
    if int(rt.batch_size) < 1:
        raise ConfigError(f"runtime.batch_size must be >= 1, got {rt.batch_size}")
    control = control_of(cfg)
    applied = apply_option_overrides(cfg, choices)
    labels = _labels(cfg, choices, [*overrides, *applied])
    labels["control"] = control or ""
    if (rule := skipped_cell(cfg, choices, control)) is not None:
        log.info("sweep_skip %s: the experiment does not run this cell; skipped", rule)
        return None
    if control == "floor" and labels["purifier"] != "none":
        log.info("control=floor ignores the purifier: this cell is the purifier=none one; skipped")
        return None
    exp = build_experiment(cfg)
    log.info(
        "experiment: dataset=%s model=%s defense=%s%s purifier=%s mimic=%s seed=%d (device %s)",
        labels["dataset"],
        labels["model"],
        labels["defense"],
        f" ({control} control)" if control else "",
        labels["purifier"],
        labels["mimic"],
        exp.seed,
        device,
    )
    if bool(rt.get("reuse_rows", False)):
        stored = stored_row(cfg, exp, labels, control, Path(rt.results_dir) / "runs", row_extra)
        if stored is not None:
            row, new = stored
            if not new:
                log.info("row %s reused: its stage keys are this run's (runtime.reuse_rows)", row["run_id"])
                return row
            path = write_row(Path(rt.results_dir), row)
            log.info(
                "row %s: the results of row %s (the same %s control, the same stage keys; runtime.reuse_rows)",
                path,
                row["results_of"],
                control,
            )
            return row
    ctx = Context(device=device, batch_size=int(rt.batch_size), model=exp.model, progress=_progress(bool(rt.progress)))
    store = ArtifactStore(rt.cache_dir)
    control_info = None
    if control is not None:
        exp, control_info = as_control(cfg, exp, control, store, ctx)
    result = run_experiment(exp, store, ctx)
    row = make_row(cfg, exp, result, labels, device)
    if control_info is not None:
        row["control"] = control_info
    if row_extra:
        row.update(row_extra)
    path = write_row(Path(rt.results_dir), row)
    headline = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if not k.startswith("purified/"))
    n_cached = sum(r.cached for r in result.stages.values())
    log.info("row %s: %d/%d stages cached; %s", path, n_cached, len(result.stages), headline)
    return row


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    try:
        row = run_from_config(cfg, choices=choices, overrides=list(hc.overrides.task))
        if row is None:
            return {}
    except (HarnessError, ConfigError) as err:
        log.error("error: %s", err)
        raise SystemExit(2) from None
    except (FileNotFoundError, DataError) as err:  # missing checkpoint, bad input file: the message names it
        log.error("error: %s", err)
        raise SystemExit(2) from None
    return row["metrics"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
