"""The audit: one command that tries to break a protection and writes a report a person can read.

    python -m harness.audit defense=mist
    python -m harness.audit defense=photoguard_encoder audit=quick          # the README's main command
    python -m harness.audit defense=external defense.folder=/path/to/glazed defense.tool=glaze-2.1

For every threat model the protection claims (``Defense.threat_models``) and the audit configures
(``experiments/audit/*.yaml``), the audit runs through the cached stage pipeline:

- the **clean baseline** (no protection) and the **random-noise baseline** (uniform noise of the protection's
  L-inf budget), both without purifier;
- the protection with **no purifier** (naive mimicry) and with **every configured purifier**, against every
  configured mimic, for every seed;

then writes ``${runtime.results_dir}/audits/<defense>/report.md`` and ``report.html`` (one offline file, images
embedded): the budget actually used, the protection's own objective against the noise baseline, a success
table per threat model with bootstrap intervals, the attacker's best purifier per image, a one-sentence
verdict, image grids (clean / protected / purified / mimic output) and, when ``audit.budgets`` lists several
budgets, a plot of success against budget. Result rows land in ``audits/<defense>/runs/`` with full provenance.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.cache import ArtifactStore, atomic_write_bytes, atomic_write_text, load_imageset
from harness.protocols import ConfigError
from harness.report import html_page, save_grid
from harness.run import CONFIG_DIR, HarnessError, run_from_config
from harness.tables import BEST_OF, defense_objectives, interval_beats, interval_reaches, load_rows, summarize

log = logging.getLogger("harness.audit")

__all__ = ["main", "run_audit", "verdict"]


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    from omegaconf import open_dict

    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]  # job-time fields (sweep dirs) do not resolve outside a Hydra job
    return cfg, choices


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


def _cells(audit: Any, defense: str, defense_opts: list[str], eps: float | None, threat_models: list[str]):
    """Every run of the audit: (threat model, role, overrides)."""
    cells = []
    baseline_eps = [] if eps is None else [f"defense.eps={eps!r}"]
    for tm in threat_models:
        spec = audit.threat_models[tm]
        base = [f"dataset={spec.dataset}", f"model={spec.model}", f"metrics={spec.metrics}", *spec.get("overrides", [])]
        for seed in audit.seeds:
            for mimic in spec.mimics:
                common = [*base, f"mimic={mimic}", f"seed={seed}"]
                cells.append((tm, "clean", [*common, "defense=none", "purifier=none"]))
                if defense != audit.baseline:  # auditing the baseline itself: its protected run is the baseline
                    cells.append(
                        (tm, "noise baseline", [*common, f"defense={audit.baseline}", *baseline_eps, "purifier=none"])
                    )
                for purifier in audit.purifiers:
                    cells.append(
                        (tm, "protected", [*common, f"defense={defense}", *defense_opts, f"purifier={purifier}"])
                    )
                for b in audit.get("budgets") or []:
                    if eps is not None and abs(float(b) - float(eps)) < 1e-12:
                        continue  # that point is the protected run itself (same stage keys, same row)
                    cells.append(
                        (
                            tm,
                            "budget sweep",
                            [*common, f"defense={defense}", *defense_opts, f"defense.eps={b!r}", "purifier=none"],
                        )
                    )
    return cells


def _ci(row: Any, metric: str) -> str:
    m, lo, hi = row.get(f"{metric} mean"), row.get(f"{metric} ci_low"), row.get(f"{metric} ci_high")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def verdict(table: Any, success: str, higher: bool, defense: str, tm: str) -> str:
    """One sentence: does the protection beat noise without purification, and does a purifier undo it?

    The protection "works" against naive mimicry when its success interval lies on the attacker's losing side
    of the noise baseline's interval; a purifier "breaks" it when the attacker's best-of interval reaches the
    noise baseline's (the attacker is then as well off as against unprotected-but-noisy images).
    """

    def pick(label: str):
        rows = table[table["purifier"] == label] if label.startswith(BEST_OF) else table[table["role"] == label]
        return rows.iloc[0] if len(rows) else None

    naive = table[(table["role"] == "protected") & (table["purifier"] == "none")]
    noise = pick("noise baseline")
    best = table[table["purifier"].astype(str).str.startswith(BEST_OF)]
    if naive.empty or noise is None:
        return f"{tm}: not enough runs for a verdict."
    n, z = naive.iloc[0], noise
    col = f"{success}"
    works = interval_beats(n, z, col, higher)
    head = (
        f"{tm}: {defense} lowers the attacker's {success} from {z[col + ' mean']:.3f} (noise of equal budget) to "
        f"{n[col + ' mean']:.3f} without purification"
        if works
        else f"{tm}: {defense} does not beat random noise of equal budget against naive {tm} "
        f"({n[col + ' mean']:.3f} vs {z[col + ' mean']:.3f} for noise)"
    )
    if best.empty:
        return head + "."
    b = best.iloc[0]
    restored = interval_reaches(b, z, col, higher)
    if works and restored:
        return (
            head
            + f"; the attacker's best purifier per image restores it to {b[col + ' mean']:.3f}: the protection is broken."
        )
    if works:
        return (
            head
            + f", and no configured purifier restores it (best-of {b[col + ' mean']:.3f}): the protection holds here."
        )
    return head + "."


def _grid(
    store: ArtifactStore, rows: list[dict[str, Any]], out: Path, n_images: int, clean_row: dict[str, Any] | None = None
) -> Path | None:
    """Rows of images: clean, protected, purified, mimic output; one column group per purifier."""
    import torch

    def load(stage: str, key: str | None):
        if key is None:
            return None
        art = store.get(stage, key)
        return None if art is None else load_imageset(art.path)[0].images[:n_images]

    lines, labels = [], []

    def add(label: str, imgs) -> None:
        if imgs is not None:
            lines.append(imgs)
            labels.append(label)

    if rows:  # shared by every purifier: the clean images, the protected ones, and the mimic on clean images
        keys = rows[0]["stage_keys"]
        add("clean", load("data", keys.get("data")))
        add("protected", load("protect", keys.get("protect")))
        # editing: the same edit of the clean images; mimicry: the mimic trained on the clean images
        reference = keys.get("mimic_clean") or (clean_row or {}).get("stage_keys", {}).get("mimic")
        add("mimic output on the clean images", load("mimic", reference))
    for r in rows:
        keys, purifier = r["stage_keys"], r["labels"]["purifier"]
        if purifier != "none":
            add(f"purified by {purifier}", load("purify", keys.get("purify")))
        add(f"mimic output after {purifier}", load("mimic", keys.get("mimic")))
    if not lines:
        return None
    k = min(len(x) for x in lines)
    save_grid(torch.cat([x[:k] for x in lines]), len(lines), out, labels=labels, scale=2, label_width=210)
    atomic_write_text(out.with_suffix(".txt"), "\n".join(f"row {i + 1}: {t}" for i, t in enumerate(labels)) + "\n")
    return out


def _budget_plot(table: Any, success: str, out: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = (table["role"] == "budget sweep") | ((table["role"] == "protected") & (table["purifier"] == "none"))
    sweep = table[points].sort_values("eps")
    if (table["role"] == "budget sweep").sum() == 0 or len(sweep) < 2:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    x = sweep["eps"] * 255
    ax.errorbar(
        x,
        sweep[f"{success} mean"],
        yerr=[
            sweep[f"{success} mean"] - sweep[f"{success} ci_low"],
            sweep[f"{success} ci_high"] - sweep[f"{success} mean"],
        ],
        marker="o",
        capsize=3,
    )
    ax.set_xlabel("budget eps (x 1/255)")
    ax.set_ylabel(success)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def run_audit(overrides: Sequence[str]) -> Path:
    """Run the audit for ``overrides`` (Hydra syntax, must include ``defense=<name>``). Returns the report."""
    import hydra

    defense_opts, common, defense_name = _split(overrides)
    cfg, _ = _compose([*common, f"defense={defense_name}", *defense_opts])
    audit = cfg.audit
    try:
        defense = hydra.utils.instantiate(cfg.defense, _convert_="all")
    except Exception as err:  # the cause names the bad option
        raise HarnessError(f"defense: {err.__cause__ or err}") from err
    unknown = [t for t in audit.threat_models if t not in ("editing", "mimicry")]
    if unknown:
        raise HarnessError(f"audit.threat_models: unknown threat model(s) {unknown}; use editing and/or mimicry")
    tms = [t for t in audit.threat_models if t in defense.threat_models]
    if not tms:
        raise HarnessError(
            f"defense={defense_name} claims {list(defense.threat_models)}, but audit.threat_models configures "
            f"{list(audit.threat_models)}"
        )
    label = defense_name + (f"[{','.join(o.split('.', 1)[1] for o in defense_opts)}]" if defense_opts else "")

    out = Path(cfg.runtime.results_dir) / "audits" / re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")
    cells = _cells(audit, defense_name, defense_opts, defense.eps, tms)
    roles: dict[str, tuple[str, str]] = {}
    log.info("audit of %s: %d runs over %s (rows in %s)", label, len(cells), ", ".join(tms), out / "runs")
    for k, (tm, role, cell) in enumerate(cells, 1):
        cell_overrides = [*common, *cell, f"runtime.results_dir='{out}'"]
        cfg_k, choices = _compose(cell_overrides)
        print(
            f"[audit {k}/{len(cells)}] {tm}: {role}: " + " ".join(o for o in cell if not o.startswith("seed=")),
            file=sys.stderr,
            flush=True,
        )
        row = run_from_config(cfg_k, choices=choices, overrides=cell_overrides)
        roles[row["run_id"]] = (tm, role)
    return write_report(out, label, roles, cfg, tms, overrides)


def write_report(
    out: Path, label: str, roles: dict[str, tuple[str, str]], cfg: Any, tms: list[str], overrides: Sequence[str]
) -> Path:
    """Write report.md and report.html for the audit rows in ``out/runs`` listed in ``roles``."""

    import pandas as pd

    rows = [r for r in load_rows(out) if r["run_id"] in roles]
    store = ArtifactStore(cfg.runtime.cache_dir)
    audit = cfg.audit
    md: list[str] = [f"# Audit of `{label}`", ""]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = rows[0]["provenance"].get("git", {}).get("commit") if rows and "provenance" in rows[0] else None
    md += [
        f"Command: `python -m harness.audit {' '.join(overrides)}`  ",
        f"Generated {now} from {len(rows)} result "
        f"rows in `runs/` (commit {commit}). Success = the attacker's success; intervals are 95% bootstrap over "
        "images and seeds.",
        "",
    ]
    objectives = defense_objectives([r for r in rows if roles[r["run_id"]][1] == "protected"])
    verdicts = []
    sections: list[tuple[str, str, list[Path]]] = []
    for tm in tms:
        spec = audit.threat_models[tm]
        tm_rows = [r for r in rows if roles[r["run_id"]][0] == tm]
        if not tm_rows:
            continue
        table, higher = summarize(tm_rows)
        success = f"{tm}/{spec.success}"
        role_of = {}
        for r in tm_rows:
            key = tuple(r["labels"][c] for c in ("defense", "purifier"))
            role_of[key] = roles[r["run_id"]][1]
        table["role"] = [
            role_of.get((d, p), "protected" if str(p).startswith(BEST_OF) else "")
            for d, p in zip(table["defense"], table["purifier"], strict=True)
        ]
        eps_of = {r["labels"]["defense"]: (r["budget"].get("eps") or 0.0) for r in tm_rows}
        table["eps"] = [eps_of.get(d, 0.0) for d in table["defense"]]
        sentence = verdict(table, success, higher.get(success, True), label, tm)
        verdicts.append(sentence)
        lines = [
            f"## {tm.capitalize()}",
            "",
            f"**Verdict.** {sentence}",
            "",
            f"| role | defense | purifier | mimic | {success} {'↑' if higher.get(success, True) else '↓'} | "
            "budget L-inf (x255) | purified PSNR | purified SSIM |",
            "|---|---|---|---|---|---|---|---|",
        ]
        order = {"clean": 0, "noise baseline": 1, "protected": 2, "budget sweep": 3}
        table = table.sort_values(by=["role", "purifier"], key=lambda s: s.map(order) if s.name == "role" else s)
        for _, t in table.iterrows():
            linf = t.get("budget/linf mean")
            lines.append(
                f"| {t['role']} | {t['defense']} | {t['purifier']} | {t['mimic']} | **{_ci(t, success)}** | "
                f"{'-' if linf is None or math.isnan(linf) else f'{255 * linf:.2f}'} | {_ci(t, 'purified/psnr')} | "
                f"{_ci(t, 'purified/ssim')} |"
            )
        images: list[Path] = []
        protected_rows = [r for r in tm_rows if roles[r["run_id"]][1] == "protected" and r["seed"] == audit.seeds[0]]
        # grid rows in the configured purifier order ("none", naive mimicry, first)
        rank = {str(p): k for k, p in enumerate(audit.purifiers)}
        protected_rows.sort(key=lambda r: rank.get(r["labels"]["purifier"], len(rank)))
        mimics = sorted({r["labels"]["mimic"] for r in protected_rows})
        for mimic in mimics:
            g = _grid(
                store,
                [r for r in protected_rows if r["labels"]["mimic"] == mimic],
                out / re.sub(r"[^A-Za-z0-9_.-]+", "-", f"grid_{tm}_{mimic}.png"),
                int(audit.grid_images),
                clean_row=next(
                    (r for r in tm_rows if roles[r["run_id"]][1] == "clean" and r["labels"]["mimic"] == mimic), None
                ),
            )
            if g is not None:
                images.append(g)
                legend = g.with_suffix(".txt").read_text().strip().replace("\n", "; ")
                lines += ["", f"![{tm} grid, {mimic}]({g.name})", "", f"Grid rows: {legend}."]
        plot = _budget_plot(table, success, out / f"budget_{tm}.png", f"{label}: {tm} success vs budget")
        if plot is not None:
            images.append(plot)
            lines += ["", f"![success vs budget]({plot.name})"]
        sections.append((tm, "\n".join(lines), images))
        pd.DataFrame(table).to_csv(out / f"table_{tm}.csv", index=False, float_format="%.6g", lineterminator="\n")
    md += ["## Summary", ""] + [f"- {v}" for v in verdicts] + [""]
    budget_rows = [r for r in rows if roles[r["run_id"]][1] == "protected"]
    if budget_rows:
        b = budget_rows[0]["budget"]
        md += [
            "## Budget actually used",
            "",
            f"Claimed L-inf eps: {b.get('eps')}; realised: L-inf max {255 * b.get('linf_max', float('nan')):.2f}/255, "
            f"mean L2 {b.get('l2_mean', float('nan')):.3f}, PSNR {b.get('psnr_mean', float('nan')):.2f} dB, "
            f"SSIM {b.get('ssim_mean', float('nan')):.4f} (protected vs clean).",
            "",
        ]
    if len(objectives):
        md += [
            "## The protection's own objective",
            "",
            "| objective | direction | clean | noise baseline | protected | beats noise |",
            "|---|---|---|---|---|---|",
        ]
        for _, o in objectives.iterrows():
            md.append(
                f"| {o['objective']} | {o['direction']} | {o['clean']:.4g} | {o['noise baseline']:.4g} | "
                f"{o['protected']:.4g} | {o['beats noise']} |"
            )
        md.append("")
    for _, text, _ in sections:
        md += [text, ""]
    md.append("Generated by `python -m harness.audit`; do not edit. Rows: `runs/*.json`.")
    report = "\n".join(md) + "\n"
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "report.html", html_page(f"Audit of {label}", report, out))
    log.info("report: %s (and report.html)", out / "report.md")
    return out / "report.md"


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
