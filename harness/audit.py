"""The audit: one command that tries to break a protection and writes a report a person can read.

    python -m harness.audit defense=mist
    python -m harness.audit defense=photoguard_encoder audit=quick          # the README's main command
    python -m harness.audit defense=external defense.folder=/path/to/glazed defense.tool=glaze-2.1

For every threat model the protection claims (``Defense.threat_models``) and the audit configures
(``experiments/audit/*.yaml``), the audit runs through the cached stage pipeline, for every configured mimic
and seed (``audit.threat_models.<tm>.seeds``; finetunes run with several):

- the **positive control** (``control=clean``: the attacker on the clean images) and the **floor**
  (``control=floor``: the attacker with nothing useful, another seed's edit or the base model unfinetuned);
- the protection and the **noise baseline** (``control=noise``: uniform noise at the protection's realised
  L-inf budget on these images), each with no purifier (naive) and with every configured purifier;

then writes ``${runtime.results_dir}/audits/<defense>/report.md`` and ``report.html`` (one offline file, images
embedded): the verdict per threat model as an effect size between the controls (:mod:`harness.verdict`), the
method note, the budget actually used, the protection's own objective against noise, a success table per
threat model with intervals, image grids and, when ``audit.budget_sweep.radii`` lists radii, a plot of success against
budget. Result rows land in ``audits/<defense>/runs/`` with full provenance and their role in the audit; the
report is rebuilt from them alone by ``python -m harness.tables``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from harness.cache import ArtifactStore, atomic_write_bytes, atomic_write_text
from harness.errors import ConfigError, HarnessError
from harness.report import grid_from_store, html_page, safe_filename
from harness.run import compose_config, run_from_config
from harness.summary import defense_objectives, load_rows, sizes_line
from harness.threat_models import threat_model, threat_models
from harness.types import NORMS, Budget
from harness.verdict import (
    Verdict,
    best_of,
    binary_metrics,
    bootstrap_ci,
    controls_from_rows,
    fmt_interval,
    judge,
    method_note,
    role_of,
    values_of,
    verdict_settings,
)

log = logging.getLogger("harness.audit")

__all__ = ["main", "run_audit", "audit_runs", "write_report", "rebuild_reports"]
ROLE_ORDER = {"clean": 0, "floor": 1, "noise": 2, "protected": 3, "budget sweep": 4}
ROLE_NAMES = {
    "clean": "positive control (clean)",
    "floor": "floor",
    "noise": "noise baseline",
    "protected": "protected",
    "budget sweep": "budget sweep",
}


def _split(overrides: Sequence[str]) -> tuple[list[str], list[str], str]:
    """(overrides for the audited defense, overrides for every cell, the defense's config name)."""
    defense_name, defense_opts, common = None, [], []
    for o in overrides:
        if o.startswith("defense="):
            defense_name = o.split("=", 1)[1]
        elif o.startswith("defense."):
            defense_opts.append(o)
        else:
            common.append(o)
    if not defense_name:
        raise HarnessError("name the protection to audit: python -m harness.audit defense=<name>")
    return defense_opts, common, defense_name


def _tm_setting(audit: Any, tm: str, key: str, default: Any) -> Any:
    spec = audit.threat_models[tm]
    value = spec.get(key)
    return default if value is None else value


def _cells(
    audit: Any,
    defense: str,
    defense_opts: list[str],
    budget: Budget | None,
    threat_models: list[str],
    common_user: list[str],
):
    """Every run of the audit: (threat model, role, overrides). Controls keep the audited defense's options, so
    their rows carry its label (the noise control measures the protection's realised budget from its run)."""
    cells = []
    auditing_baseline = defense == audit.baseline  # its protected rows are the noise baseline
    chosen = _user_choices(common_user)
    folder = chosen.get("dataset") == "folder"
    for tm in threat_models:
        spec = audit.threat_models[tm]
        metrics = spec.get("folder_metrics") if folder and spec.get("folder_metrics") else spec.metrics
        # the user's choice of a data set, model or metric set (dataset=folder, model=sd15, ...) replaces the
        # threat model's default: the user's overrides come first, so a default after them would win
        model = f"model={spec.model}" if spec.get("model") is not None else "~model"  # privacy: no model
        defaults = {"dataset": f"dataset={spec.dataset}", "model": model, "metrics": f"metrics={metrics}"}
        base = [o for group, o in defaults.items() if group not in chosen or o == "~model"]
        base += list(spec.get("overrides", []))
        own = [f"defense={defense}", *defense_opts]
        purifiers = list(_tm_setting(audit, tm, "purifiers", audit.purifiers))
        noise_baseline = threat_model(tm).noise_baseline and not auditing_baseline
        for seed in _tm_setting(audit, tm, "seeds", audit.seeds):
            for mimic in spec.mimics:
                common = [*base, f"mimic={mimic}", f"seed={seed}"]
                cells.append((tm, "protected", [*common, *own, "purifier=none"]))
                cells.append((tm, "clean", [*common, *own, "control=clean", "purifier=none"]))
                cells.append((tm, "floor", [*common, *own, "control=floor", "purifier=none"]))
                for purifier in purifiers:
                    if purifier != "none":
                        cells.append((tm, "protected", [*common, *own, f"purifier={purifier}"]))
                    if noise_baseline:
                        cells.append((tm, "noise", [*common, *own, "control=noise", f"purifier={purifier}"]))
                for b in _sweep_radii(audit, budget):
                    if budget is not None and abs(float(b) - budget.radius) < 1e-12:
                        continue  # that point is the protected run itself (same stage keys, same row)
                    cells.append((tm, "budget sweep", [*common, *own, f"defense.eps={b!r}", "purifier=none"]))
    return cells


#: config groups whose choice on the command line replaces every threat model's default
USER_GROUPS = ("dataset", "model", "metrics")


def _user_choices(common_user: Sequence[str]) -> dict[str, str]:
    """The groups of :data:`USER_GROUPS` that the user's overrides choose (``dataset=folder``, ``+model=local``),
    with the last choice of each."""
    chosen = {}
    for option in common_user:
        key, sep, value = option.lstrip("+").partition("=")
        if sep and key in USER_GROUPS:
            chosen[key] = value
    return chosen


def folder_name(label: str, common_user: Sequence[str]) -> str:
    """The audit's folder under ``audits/``: the audited defense's label, then each ``dataset``, ``model`` or
    ``metrics`` choice of the user's overrides and their options (``dataset=folder dataset.path=/art``) in the
    order given, so that an audit of other images or another model writes its own report beside the default
    one instead of replacing it. A name over 120 characters keeps its first 100 and a hash of the whole."""
    import hashlib

    chosen = [o.lstrip("+") for o in common_user if o.lstrip("+").partition("=")[0].split(".")[0] in USER_GROUPS]
    name = safe_filename(" ".join([label, *chosen]))
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def _sweep_radii(audit: Any, budget: Budget | None) -> list[float]:
    """The radii of ``audit.budget_sweep`` (empty: no sweep). The sweep sets ``defense.eps``, the radius in the
    defense's own norm, so it refuses a defense whose budget is in another norm than the sweep's."""
    sweep = audit.get("budget_sweep") or {}
    radii = list(sweep.get("radii") or [])
    if not radii:
        return []
    norm = sweep.get("norm", "linf")
    if norm not in NORMS:
        raise HarnessError(f"audit.budget_sweep.norm must be one of {list(NORMS)}, got {norm!r}")
    if budget is None:
        raise HarnessError("audit.budget_sweep: the audited defense states no budget of its own to sweep")
    if budget.norm != norm:
        raise HarnessError(
            f"audit.budget_sweep.norm={norm}, but the defense's budget is {budget}: its radii would be read in "
            f"{budget.norm}; set audit.budget_sweep.norm={budget.norm} with radii in that norm"
        )
    for b in radii:
        if not isinstance(b, (int, float)) or b < 0 or (norm == "linf" and b > 1):
            raise HarnessError(f"audit.budget_sweep.radii: {b!r} is not a {norm} radius in [0, 1] pixel units")
    return [float(b) for b in radii]


def _success_metric(rows: list[dict[str, Any]], tm: str, spec: Any) -> str:
    """The verdict's success metric: the threat model's configured one, or for a folder of the user's own
    images (no embedded judge) the configured ``folder_success``."""
    names = {m for r in rows for m in [*r.get("per_image", {}), *r.get("set_metrics", {})]}
    for candidate in (spec.get("success") or threat_model(tm).success, spec.get("folder_success")):
        if candidate and f"{tm}/{candidate}" in names:
            return f"{tm}/{candidate}"
    return f"{tm}/{spec.get('success') or threat_model(tm).success}"


def _audit_roles(rows: list[dict[str, Any]], baseline: str) -> dict[str, tuple[str, str]]:
    """run_id -> (threat model, role), from what the rows record (rows written before the audit recorded
    roles: from their labels and metric names)."""
    out = {}
    for r in rows:
        info = r.get("audit")
        if info:
            out[r["run_id"]] = (info["threat_model"], info["role"])
            continue
        names = [*r.get("per_image", {}), *r.get("set_metrics", {})]
        tm = next((m.split("/", 1)[0] for m in names if m.split("/", 1)[0] in threat_models()), None)
        if tm is not None:
            out[r["run_id"]] = (tm, role_of(r, baseline))
    return out


def _radius(row: dict[str, Any]) -> float:
    """The budget radius a row ran at, in its defense's norm (rows before budgets were typed: their eps)."""
    b = row.get("budget", {})
    return float(b.get("radius", b.get("eps")) or 0.0)


def _claimed(b: dict[str, Any]) -> str:
    if "norm" in b:
        return str(Budget(b["norm"], float(b["radius"]), b.get("note", "")))
    return f"L-inf eps {b.get('eps')}"


def _row_mean(rows: list[dict[str, Any]], metric: str, binary: bool = False) -> tuple[float, float, float]:
    values = values_of(rows, metric)
    return bootstrap_ci(values, binary=binary) if values else (math.nan, math.nan, math.nan)


def _grid(store: ArtifactStore | None, lines: list[tuple], out: Path, n_images: int) -> Path | None:
    """A labelled grid (:func:`harness.report.grid_from_store`), redrawn only when the store holds every line;
    otherwise (a checkout re-rendering committed rows without their cache) the grid already beside the report is
    kept as it is. Writes the legend beside it (``.txt``)."""
    made = grid_from_store(store, lines, out, n_images, label_width=210)
    if made is None:
        return out if out.is_file() else None
    atomic_write_text(out.with_suffix(".txt"), "\n".join(f"row {i + 1}: {t[0]}" for i, t in enumerate(lines)) + "\n")
    return out


def _budget_plot(
    points: list[tuple[float, tuple[float, float, float]]], success: str, out: Path, title: str
) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(p for p in points if not math.isnan(p[1][0]))
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    x = [255 * e for e, _ in points]
    m = [v[0] for _, v in points]
    ax.errorbar(x, m, yerr=[[v[0] - v[1] for _, v in points], [v[2] - v[0] for _, v in points]], marker="o", capsize=3)
    ax.set_xlabel("budget eps (x 1/255)")
    ax.set_ylabel(success)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def audit_runs(overrides: Sequence[str]) -> list[list[str]]:
    """The Hydra overrides of every run :func:`run_audit` makes for ``overrides``, in its order (without the
    results folder it sets): what a caller needs to run the same cells another way (``harness.bench`` runs
    them each with a cache of its own)."""
    _, _, cells, common = _plan(overrides)
    return [[*common, *cell] for _, _, cell in cells]


def _plan(overrides: Sequence[str]) -> tuple[Any, str, list[tuple[str, str, list[str]]], list[str]]:
    """The audit's config, label, runs (threat model, role, overrides) and the user's common overrides."""
    import hydra

    defense_opts, common, defense_name = _split(overrides)
    cfg, _ = compose_config([*common, f"defense={defense_name}", *defense_opts])
    audit = cfg.audit
    try:
        defense = hydra.utils.instantiate(cfg.defense, _convert_="all")
    except Exception as err:  # the cause names the bad option
        raise HarnessError(f"defense: {err.__cause__ or err}") from err
    for t in [*audit.threat_models, *defense.threat_models]:
        try:
            threat_model(t, option="audit.threat_models" if t in audit.threat_models else "defense.threat_models")
        except ConfigError as err:
            raise HarnessError(str(err)) from None
    for key in ("min_effect",):
        v = audit.get(key)
        if v is None or not (0.0 < float(v) < 1.0):
            raise HarnessError(f"audit.{key} must be in (0, 1), got {v!r}")
    tms = [t for t in audit.threat_models if t in defense.threat_models]
    if not tms:
        raise HarnessError(
            f"defense={defense_name} claims {list(defense.threat_models)}, but audit.threat_models configures "
            f"{list(audit.threat_models)}"
        )
    label = defense_name + (f"[{','.join(o.split('.', 1)[1] for o in defense_opts)}]" if defense_opts else "")
    return cfg, label, _cells(audit, defense_name, defense_opts, defense.budget, tms, list(common)), list(common)


def run_audit(overrides: Sequence[str]) -> Path:
    """Run the audit for ``overrides`` (Hydra syntax, must include ``defense=<name>``). Returns the report."""
    cfg, label, cells, common = _plan(overrides)
    out = Path(cfg.runtime.results_dir) / "audits" / folder_name(label, common)
    # runtime settings (paths, device, progress, reuse_rows) never change a result: the recorded command leaves
    # them out, so an audit resumed elsewhere (runtime.reuse_rows=true) is the same audit
    command = "python -m harness.audit " + " ".join(o for o in overrides if not o.lstrip("+~").startswith("runtime."))
    run_ids: list[str] = []
    tms = list(dict.fromkeys(tm for tm, _, _ in cells))
    log.info("audit of %s: %d runs over %s (rows in %s)", label, len(cells), ", ".join(tms), out / "runs")
    for k, (tm, role, cell) in enumerate(cells, 1):
        cell_overrides = [*common, *cell, f"runtime.results_dir='{out}'"]
        cfg_k, choices = compose_config(cell_overrides)
        print(
            f"[audit {k}/{len(cells)}] {tm}: {ROLE_NAMES[role]}: "
            + " ".join(o for o in cell if not o.startswith(("defense=", "control="))),
            file=sys.stderr,
            flush=True,
        )
        extra = {"audit": {"label": label, "command": command, "threat_model": tm, "role": role}}
        row = run_from_config(cfg_k, choices=choices, overrides=cell_overrides, row_extra=extra)
        if row is not None:
            run_ids.append(row["run_id"])
    rows = [r for r in load_rows(out) if r["run_id"] in set(run_ids)]
    # which rows are this audit's: a rebuilt report reads them again (runs/ keeps earlier audits' rows, and an
    # earlier audit may have run the same command, on other models or code)
    manifest = {"command": command, "run_ids": sorted(set(run_ids))}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return write_report(out, rows, cfg.runtime.cache_dir)


#: the last audit's command and run ids, beside its report
MANIFEST = "audit.json"


def _select_current(rows: list[dict[str, Any]], folder: Path | None = None) -> list[dict[str, Any]]:
    """The rows of the audit last run in ``folder``: those its manifest (:data:`MANIFEST`) lists; without one
    (folders written before it existed), the rows of the latest command. Rows of earlier audits stay in runs/."""
    if folder is not None and (folder / MANIFEST).is_file():
        ids = set(json.loads((folder / MANIFEST).read_text())["run_ids"])
        return [r for r in rows if r["run_id"] in ids]
    recorded = [r for r in rows if r.get("audit")]
    if not recorded:
        return rows  # rows written before the audit recorded itself: all of them
    latest = max(recorded, key=lambda r: r.get("created", ""))["audit"]["command"]
    return [r for r in recorded if r["audit"]["command"] == latest]


def rebuild_reports(results_dir: str | Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Re-render every audit report under ``results_dir/audits`` from its rows (grids from ``cache_dir`` where it
    still holds the images). Used by ``python -m harness.tables``."""
    made = []
    for runs in sorted((Path(results_dir) / "audits").glob("*/runs")):
        rows = load_rows(runs.parent)
        if rows:
            made.append(write_report(runs.parent, _select_current(rows, runs.parent), cache_dir))
    return made


@dataclass
class _AuditReport:
    """What every section of an audit report reads: the audit's rows (those with a role), their roles, the
    audit settings from their config, the audited label and the artifact store (None: keep the grids)."""

    out: Path
    rows: list[dict[str, Any]]
    roles: dict[str, tuple[str, str]]
    audit: Any
    store: ArtifactStore | None
    binary: set[str]  # the yes/no metrics (:func:`harness.verdict.binary_metrics`)
    # the verdict's settings (:func:`harness.verdict.verdict_settings`)
    baseline: str
    min_effect: float
    level: float
    n_boot: int

    @cached_property
    def info(self) -> dict[str, Any] | None:
        return next((r["audit"] for r in self.rows if r.get("audit")), None)

    def role(self, row: dict[str, Any]) -> str:
        return self.roles[row["run_id"]][1]

    @cached_property
    def protected_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if self.role(r) == "protected"]

    @cached_property
    def label(self) -> str:
        info, protected = self.info, self.protected_rows
        return info["label"] if info else (protected[0]["labels"]["defense"] if protected else self.out.name)


def write_report(out: Path, rows: list[dict[str, Any]], cache_dir: str | Path | None = None) -> Path:
    """Write report.md and report.html of the audit whose rows are ``rows`` (in ``out/runs``); every number
    comes from the rows, the audit settings from their config."""
    if not rows:
        raise HarnessError(f"no audit rows in {out / 'runs'}")
    from omegaconf import OmegaConf

    audit = OmegaConf.create(rows[0]["config"]["audit"])
    settings = verdict_settings(audit)  # baseline, min_effect, level, n_bootstrap
    roles = _audit_roles(rows, settings[0])
    store = ArtifactStore(cache_dir) if cache_dir is not None and Path(cache_dir).is_dir() else None
    rows = [r for r in rows if r["run_id"] in roles]
    rep = _AuditReport(out, rows, roles, audit, store, binary_metrics(rows), *settings)
    verdicts: list[str] = []
    sections: list[str] = []
    for tm in [t for t in threat_models() if any(roles[r["run_id"]][0] == t for r in rows)]:
        section, tm_verdicts = _threat_model_section(rep, tm)
        sections.append(section)
        verdicts += tm_verdicts
    md = [
        *_header(rep),
        "## Summary",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        method_note(rep.min_effect, rep.level, rep.n_boot),
        "",
        *_budget_used_section(rep),
        *_objectives_section(rep.protected_rows),
        *sections,
        "Generated by `python -m harness.audit` (rebuilt by `python -m harness.tables`); do not edit. "
        "Rows: `runs/*.json`.",
    ]
    report = "\n".join(md) + "\n"
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "report.html", html_page(f"Audit of {rep.label}", report, out))
    log.info("report: %s (and report.html)", out / "report.md")
    return out / "report.md"


def _header(rep: _AuditReport) -> list[str]:
    """The title, the command (reconstructed for rows that predate its record, with a note on such rows) and
    where the numbers come from."""
    info, label, rows = rep.info, rep.label, rep.rows
    if info:
        command, legacy = info["command"], []
    else:
        command = (
            f"python -m harness.audit defense={label} audit.purifiers=[{','.join(rep.audit.purifiers)}] "
            "(reconstructed from the rows' config: these rows predate the audit's record of its command)"
        )
        legacy = [
            "These rows were written before audits ran and recorded their controls (the floor, noise at the "
            "protection's realised budget, several seeds) and by the code of the commit named below; controls they "
            "lack are reported as not measured. Re-run the command to audit the protection as the harness does "
            "now.",
            "",
        ]
    commits = sorted({str(r.get("provenance", {}).get("git", {}).get("commit", "?"))[:10] for r in rows})
    created = max(r.get("created", "") for r in rows)
    return [
        f"# Audit of `{label}`",
        "",
        *legacy,
        f"Command: `{command}`  ",
        f"Generated by `harness.audit` from {len(rows)} result rows in `runs/` (code commit(s) {', '.join(commits)}; "
        f"latest row {created}). Intervals: {100 * rep.level:g}% paired bootstrap over seeds and images (see Method).",
        "",
    ]


def _threat_model_section(rep: _AuditReport, tm: str) -> tuple[str, list[str]]:
    """One threat model's section (a verdict, tables, grids and budget sweep per mimic) and its verdicts."""
    tm_rows = [r for r in rep.rows if rep.roles[r["run_id"]][0] == tm]
    success = _success_metric(tm_rows, tm, rep.audit.threat_models[tm])
    higher = next((r["higher_is_better"][success] for r in tm_rows if success in r.get("higher_is_better", {})), True)
    lines = [f"## {tm.capitalize()}", ""]
    verdicts = []
    for mimic in sorted({r["labels"]["mimic"] for r in tm_rows}):
        m_rows = [r for r in tm_rows if r["labels"]["mimic"] == mimic]
        sentence, mimic_lines = _mimic_section(rep, tm, mimic, m_rows, success, higher)
        verdicts.append(sentence)
        lines += mimic_lines
    return "\n".join(lines), verdicts


def _mimic_section(
    rep: _AuditReport, tm: str, mimic: str, rows: list[dict[str, Any]], success: str, higher: bool
) -> tuple[str, list[str]]:
    """The verdict sentence on one mimic and its part of the section: verdict, effects, success table, grid and
    budget sweep."""
    binary = rep.binary
    v: Verdict = judge(
        controls_from_rows([r for r in rows if rep.role(r) != "budget sweep"], rep.label, success, rep.baseline),
        threat_model=tm,
        defense=rep.label,
        metric=success,
        higher=higher,
        binary=success in binary,
        min_effect=rep.min_effect,
        n_boot=rep.n_boot,
        level=rep.level,
    )
    sentence = v.sentence if mimic == "none" else v.sentence.replace(f"{tm}: ", f"{tm} ({mimic}): ", 1)
    return sentence, [
        f"**Verdict ({mimic}).** {sentence}",
        "",
        *_effects_table(v, threat_model(tm).noise_baseline),
        *_success_table(rows, rep.roles, success, higher, binary),
        *_grid_section(rep.store, rows, rep.roles, tm, mimic, rep.out, int(rep.audit.get("grid_images", 6))),
        *_budget_sweep_section(rep, tm, rows, success, success in binary),
    ]


def _budget_sweep_section(
    rep: _AuditReport, tm: str, rows: list[dict[str, Any]], success: str, binary: bool
) -> list[str]:
    """The plot of success against budget (the sweep's rows and the protected run without purifier), when the
    rows hold a budget sweep."""
    if not any(rep.role(r) == "budget sweep" for r in rows):
        return []
    by_eps: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        if rep.role(r) == "budget sweep" or (rep.role(r) == "protected" and r["labels"]["purifier"] == "none"):
            by_eps.setdefault(_radius(r), []).append(r)
    sweep = [(e, _row_mean(rs, success, binary)) for e, rs in by_eps.items()]
    plot = _budget_plot(sweep, success, rep.out / f"budget_{tm}.png", f"{rep.label}: {tm} success vs budget")
    return [] if plot is None else [f"![success vs budget]({plot.name})", ""]


def _budget_used_section(rep: _AuditReport) -> list[str]:
    """The claimed and realised budget of the protected rows, and the noise baseline's bound."""
    if not rep.protected_rows:
        return []
    b = rep.protected_rows[0]["budget"]
    if "norm" not in b and "linf_max" not in b:  # instance encodings: a new set, no perturbation of the images
        info = rep.protected_rows[0].get("defense_info", {})
        made = (
            f": {info['encodings']:.0f} encodings of {info['private_images']:.0f} private images"
            if "encodings" in info and "private_images" in info
            else ""
        )
        lines = ["## Budget actually used", "", f"No perturbation budget: the protection publishes another set{made}."]
        if (sizes := sizes_line(rep.rows)) is not None:
            lines.append(sizes)
        return [*lines, ""]
    lines = [
        "## Budget actually used",
        "",
        f"Claimed budget: {_claimed(b)}; realised: L-inf max {255 * b.get('linf_max', float('nan')):.2f}/255, "
        f"mean L2 {b.get('l2_mean', float('nan')):.3f}, PSNR {b.get('psnr_mean', float('nan')):.2f} dB, "
        f"SSIM {b.get('ssim_mean', float('nan')):.4f} (protected vs clean).",
    ]
    if (sizes := sizes_line(rep.rows)) is not None:
        lines.append(sizes)
    noise_rows = [r for r in rep.rows if r.get("control", {}).get("kind") == "noise"]
    if noise_rows:
        eps = sorted({round(255 * r["control"]["eps"], 2) for r in noise_rows})
        lines.append(
            f"The noise baseline: uniform noise with L-inf bound {', '.join(f'{e:g}' for e in eps)}/255, "
            "the protection's realised budget on the same images."
        )
    return [*lines, ""]


def _objectives_section(protected_rows: list[dict[str, Any]]) -> list[str]:
    """The protection's own objective against the noise baseline (:func:`harness.summary.defense_objectives`)."""
    objectives = defense_objectives(protected_rows)
    if not len(objectives):
        return []
    lines = [
        "## The protection's own objective",
        "",
        "| objective | direction | clean | noise baseline | protected | beyond noise [95%] | beats noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, o in objectives.iterrows():
        lines.append(
            f"| {o['objective']} | {o['direction']} | {o['clean']:.4g} | {o['noise baseline']:.4g} | "
            f"{o['protected']:.4g} | {o['beyond noise [95%]']} | {o['beats noise']} |"
        )
    return [*lines, ""]


def _effects_table(v: Verdict, noise_baseline: bool = True) -> list[str]:
    rows = [
        ("positive control: clean - floor", v.positive_control),
        *([("noise baseline - floor", v.noise_gap)] if noise_baseline else []),
        ("protection (no purifier)", v.protection),
        *[(f"residual after {p}", e) for p, e in sorted(v.residual_by_purifier.items())],
        ("residual after the attacker's best per image", v.residual),
    ]
    rows = [(n, e) for n, e in rows if not math.isnan(e.value)]  # a point without interval: too few pairs
    if not rows:
        return []
    out = ["| effect | estimate [interval] | pairs | seeds |", "|---|---|---|---|"]
    out += [f"| {n} | {e.fmt(3)} | {e.pairs} | {e.seeds} |" for n, e in rows]
    return out + [""]


def _success_table(
    rows: list[dict[str, Any]], roles: dict[str, tuple[str, str]], success: str, higher: bool, binary: set[str]
) -> list[str]:
    """Success per role and purifier (mean [interval] over seeds and images), with the best-of rows."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        role = roles[r["run_id"]][1]
        name = r["labels"]["defense"] if role == "budget sweep" else ""
        groups.setdefault((role, name, r["labels"]["purifier"]), []).append(r)
    out = [
        f"| role | purifier | {success} {'↑' if higher else '↓'} | seeds | L-inf (x255) | purified PSNR | purified SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for (role, name, purifier), members in sorted(
        groups.items(), key=lambda kv: (ROLE_ORDER[kv[0][0]], kv[0][1], kv[0][2] != "none", kv[0][2])
    ):
        linf = max((r["budget"].get("linf_max") or 0.0) for r in members)
        shown = f"{ROLE_NAMES[role]} ({name})" if name else ROLE_NAMES[role]
        out.append(
            f"| {shown} | {purifier} | **{fmt_interval(*_row_mean(members, success, success in binary), 3)}** | "
            f"{len({r['seed'] for r in members})} | {255 * linf:.2f} | {fmt_interval(*_row_mean(members, 'purified/psnr'), 3)} | "
            f"{fmt_interval(*_row_mean(members, 'purified/ssim'), 3)} |"
        )
    for role in ("noise", "protected"):
        members = [r for r in rows if roles[r["run_id"]][1] == role]
        purifiers = sorted({r["labels"]["purifier"] for r in members})
        if len(purifiers) < 2:
            continue
        by_seed = best_of(
            [values_of([r for r in members if r["labels"]["purifier"] == p], success) for p in purifiers], higher
        )
        est = bootstrap_ci(by_seed, binary=success in binary)
        out.append(
            f"| {ROLE_NAMES[role]} | best-of ({len(purifiers)}) | **{fmt_interval(*est, 3)}** | {len(by_seed)} | - | - | - |"
        )
    return out + [""]


def _grid_section(
    store: ArtifactStore | None,
    rows: list[dict[str, Any]],
    roles: dict[str, tuple[str, str]],
    tm: str,
    mimic: str,
    out: Path,
    n_images: int,
) -> list[str]:
    """Clean, protected, the mimic on the clean images and its floor, then per purifier (in the configured
    order) the purified images and the mimic output; the first seed's rows."""
    seed = min((r["seed"] for r in rows), default=0)
    first = [r for r in rows if r["seed"] == seed]
    protected = [r for r in first if roles[r["run_id"]][1] == "protected"]
    if not protected:
        return []
    audit_purifiers = [str(p) for p in (protected[0]["config"]["audit"].get("purifiers") or [])]
    rank = {p: k for k, p in enumerate(audit_purifiers)}
    protected.sort(key=lambda r: rank.get(r["labels"]["purifier"], len(rank)))
    keys = protected[0]["stage_keys"]
    clean_row = next((r for r in first if roles[r["run_id"]][1] == "clean"), None)
    floor_row = next((r for r in first if roles[r["run_id"]][1] == "floor"), None)
    reference = keys.get("mimic_clean") or (clean_row or {}).get("stage_keys", {}).get("mimic")
    prepare = threat_model(tm).prepare
    if prepare is not None:  # unordered outputs (reconstructions): shown matched to the clean images
        lines = [
            ("clean", "data", keys.get("data")),
            ("what the measures compare with", "data", keys.get("data"), lambda x, c: prepare(c, c)[1]),
            ("protected (first images)", "protect", keys.get("protect")),
            (
                "floor, matched",
                "mimic",
                (floor_row or {}).get("stage_keys", {}).get("mimic"),
                lambda x, c: prepare(x, c)[0],
            ),
            *[
                (
                    f"output after {r['labels']['purifier']}, matched",
                    "mimic",
                    r["stage_keys"].get("mimic"),
                    lambda x, c: prepare(x, c)[0],
                )
                for r in protected
            ],
        ]
        made = _grid(store, lines, out / safe_filename(f"grid_{tm}_{mimic}.png"), n_images)
        if made is None:
            return []
        legend = made.with_suffix(".txt").read_text().strip().replace("\n", "; ")
        return [f"![{tm} grid, {mimic}]({made.name})", "", f"Grid rows: {legend}.", ""]
    lines: list[tuple[str, str, str | None]] = [
        ("clean", "data", keys.get("data")),
        ("protected", "protect", keys.get("protect")),
        ("mimic output on the clean images", "mimic", reference),
    ]
    if floor_row is not None:
        lines.append(
            (
                "floor: " + ("another seed's edit" if tm == "editing" else "base model"),
                "mimic",
                floor_row["stage_keys"].get("mimic"),
            )
        )
    for r in protected:
        purifier = r["labels"]["purifier"]
        if purifier != "none":
            lines.append((f"purified by {purifier}", "purify", r["stage_keys"].get("purify")))
        lines.append((f"mimic output after {purifier}", "mimic", r["stage_keys"].get("mimic")))
    path = out / safe_filename(f"grid_{tm}_{mimic}.png")
    made = _grid(store, lines, path, n_images)
    if made is None:
        return []
    legend_file = made.with_suffix(".txt")
    legend = legend_file.read_text().strip().replace("\n", "; ") if legend_file.is_file() else ""
    return [f"![{tm} grid, {mimic}]({made.name})", "", f"Grid rows: {legend}.", ""]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("harness").setLevel(logging.INFO)
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        report = run_audit(args)
    except (HarnessError, ConfigError, FileNotFoundError, ValueError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {err}", file=sys.stderr)  # Hydra's message lists the available options
        return 2
    print(report.read_text())
    print(f"report: {report} and {report.with_suffix('.html')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
