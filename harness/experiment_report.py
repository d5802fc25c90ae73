"""The report of an experiment that reproduces a published table (``experiments/experiment/*.yaml``).

An experiment file carries its own sweep and a ``report:`` section; after the sweep (and on every
``python -m harness.tables``) this module writes ``<results_dir>/report.md`` and ``report.html`` from the result
rows alone, so the same rows always give the same report:

- ``layout: metrics`` (PhotoGuard's Table 1): one line per protection x edit, one column per metric in
  ``report.columns``;
- ``layout: matrix`` (Hönig et al.): per mimic, a protection x purifier matrix of ``report.success`` with the
  attacker's best purifier per image as the last column, and a second matrix for every other column;

then the findings, one verdict per protection and mimic (:func:`harness.verdict.judge`: the protection's effect
size between its noise baseline and the floor, and what the purifiers leave of it; controls not in the rows
are named as not measured),
and image grids (clean / protected / purified / mimic output) read from the artifact cache. Where the cache no
longer holds the images (a fresh checkout), the committed grid files are kept as they are.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.cache import ArtifactStore, atomic_write_text, load_imageset
from harness.report import html_page, safe_filename, save_grid
from harness.summary import BEST_OF, summarize
from harness.verdict import binary_metrics, controls_from_rows, fmt_interval, judge, method_note

log = logging.getLogger(__name__)

__all__ = ["write_experiment_report", "experiment_spec"]

LAYOUTS = ("metrics", "matrix")
ROLE_NAMES = {
    "clean": "positive control (clean)",
    "floor": "floor",
    "noise": "noise baseline",
    "protected": "protected",
}


def experiment_spec(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``report`` section and experiment name the rows were produced with (None: not an experiment)."""
    for r in rows:
        cfg = r.get("config") or {}
        if cfg.get("report"):
            return {**cfg["report"], "experiment": _experiment_name(r)}
    return None


def _experiment_name(row: dict[str, Any]) -> str:
    results_dir = str((row.get("config") or {}).get("runtime", {}).get("results_dir", ""))
    return Path(results_dir).name or "experiment"


def _cell(t: pd.Series, metric: str) -> str:
    return fmt_interval(t.get(f"{metric} mean"), t.get(f"{metric} ci_low"), t.get(f"{metric} ci_high"))


def _short(metric: str) -> str:
    return metric.split("/", 1)[-1]


def _base(label: str) -> str:
    return str(label).split("[", 1)[0]


def _grid(store: ArtifactStore, lines: list[tuple[str, str, str | None]], out: Path, n: int) -> Path | None:
    """A labelled grid with one image row per ``(label, stage, key)``; None when the cache lacks any of them."""
    import torch

    images, labels = [], []
    for label, stage, key in lines:
        art = store.get(stage, key) if key else None
        if art is None:
            return None
        images.append(load_imageset(art.path)[0].images[:n])
        labels.append(label)
    k = min(len(x) for x in images)
    save_grid(torch.cat([x[:k] for x in images]), len(images), out, labels=labels, scale=2, label_width=220)
    return out


def _write_grid(
    store: ArtifactStore | None, lines: list[tuple[str, str, str | None]], out: Path, n: int, md: list[str], title: str
) -> None:
    made = _grid(store, lines, out, n) if store is not None else None
    if made is None and not out.is_file():
        return
    legend = "; ".join(f"row {i + 1}: {label}" for i, (label, _, _) in enumerate(lines))
    md += [f"![{title}]({out.name})", "", f"{title}. Grid rows: {legend}.", ""]


def _role_column(table: pd.DataFrame, baseline: str) -> pd.Series:
    """Each summary line's role (see :func:`harness.verdict.role_of`): its control, or for lines of rows written
    before controls were labelled, clean for ``defense=none`` and noise for the baseline defense."""

    def role(d: str, c: str) -> str:
        if c:
            return c
        return {"none": "clean", baseline: "noise"}.get(_base(d), "protected")

    return pd.Series([role(d, c) for d, c in zip(table["defense"], table["control"], strict=True)], index=table.index)


def write_experiment_report(
    results_dir: str | Path,
    rows: list[dict[str, Any]],
    cache_dir: str | Path | None,
    summary: tuple[pd.DataFrame, dict[str, bool]] | None = None,
) -> Path | None:
    """Write ``report.md`` and ``report.html`` for an experiment's rows (see the module docstring). Returns the
    path of report.md, or None when the rows carry no ``report`` section. ``summary``: :func:`summarize` of
    the same rows, when the caller has it already."""
    spec = experiment_spec(rows)
    if spec is None:
        return None
    layout = spec.get("layout", "metrics")
    if layout not in LAYOUTS:
        raise ValueError(f"report.layout must be one of {list(LAYOUTS)}, got {layout!r}")
    results_dir = Path(results_dir)
    store = ArtifactStore(cache_dir) if cache_dir is not None and Path(cache_dir).is_dir() else None
    table, higher = summary if summary is not None else summarize(rows)
    success = str(spec["success"])
    columns = [str(c) for c in spec.get("columns") or [success]]
    baseline = str(spec.get("baseline", "noise"))
    min_effect = float(spec.get("min_effect", 0.5))
    n_images = int(spec.get("grid_images", 6))
    name = spec["experiment"]
    binary = binary_metrics(rows)
    commits = sorted({str(r.get("provenance", {}).get("git", {}).get("commit", "?"))[:10] for r in rows})
    seeds = sorted({r.get("seed") for r in rows})
    table = table.copy()
    table["role"] = _role_column(table, baseline)
    md = [
        f"# {spec.get('title', name)}",
        "",
        f"Command: `python -m harness.run experiment={name}`  ",
        f"Generated by `harness.experiment_report` from the {len(rows)} result rows in `runs/` (code commit(s) "
        f"{', '.join(commits)}). Dataset `{rows[0]['labels']['dataset']}`, model "
        f"`{rows[0]['labels']['model']}`, seed(s) {seeds}. Each cell: mean over images and seeds [95% bootstrap "
        "interval over seeds, then images]; set-level metrics (FID, KID, precision) are one number per run. "
        "Arrows: the attacker's better direction. Each protection has its own controls: the clean images "
        "(positive control), the floor and uniform noise at its realised L-inf budget (see Method).",
        "",
    ]
    refused = [c for c in columns if c in table.columns or f"{c} mean" in table.columns]
    refused = [c for c in refused if f"{c} mean" in table.columns and table[f"{c} mean"].isna().all()]
    if refused:
        md += [
            "Not reported: "
            + ", ".join(f"`{_short(c)}`" for c in refused)
            + " (every run refused it: FID and precision need more images per set than the features have "
            "dimensions, see harness/metrics/distribution.py; KID is unbiased at any set size).",
            "",
        ]
    by_label: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in rows:
        lab = r["labels"]
        if r.get("seed") == seeds[0]:
            by_label[(lab["defense"], lab.get("control", ""), lab["purifier"], lab["mimic"])] = r

    def arrow(m: str) -> str:
        return "↑" if higher.get(m, True) else "↓"

    findings: list[str] = []
    effects: list[str] = []
    grids: list[str] = []
    mimics = list(dict.fromkeys(table["mimic"]))
    plain = table[~table["purifier"].astype(str).str.startswith(BEST_OF)]
    protections = sorted(set(plain.loc[plain["role"] == "protected", "defense"]))

    def control_line(t_m: pd.DataFrame, role: str) -> pd.Series | None:
        hit = t_m[(t_m["role"] == role) & (t_m["purifier"] == "none")]
        return hit.iloc[0] if len(hit) else None

    for mimic in mimics:
        m_rows = [r for r in rows if r["labels"]["mimic"] == mimic]
        for d in protections:
            v = judge(
                controls_from_rows(m_rows, d, success, baseline),
                threat_model=success.split("/", 1)[0],
                defense=d,
                metric=success,
                higher=higher.get(success, True),
                binary=success in binary,
                min_effect=min_effect,
            )
            findings.append(v.sentence.replace(": ", f" ({mimic}): ", 1))
            effects.append(
                f"| {mimic} | {d} | {v.outcome} | {v.protection.fmt(3)} | {v.residual.fmt(3)} | "
                f"{v.broken_by or ('holds' if v.holds else '-')} |"
            )
    if layout == "metrics":
        md += [
            "| protection | role | edit | "
            + " | ".join(f"{_short(c)} {arrow(c)}" for c in columns)
            + " | L-inf (x255) | L2 |",
            "|---|---|---|" + "---|" * (len(columns) + 2),
        ]
        order = {"clean": 0, "floor": 1, "noise": 2, "protected": 3}
        for mimic in mimics:
            t_m = plain[plain["mimic"] == mimic]
            lines = []
            for role in ("clean", "floor"):
                c = control_line(t_m, role)
                if c is not None:
                    lines.append(("(any)", role, c))
            for d in protections:
                for _, r in t_m[(t_m["defense"] == d) & t_m["role"].isin(["noise", "protected"])].iterrows():
                    lines.append((d, r["role"], r))
            legacy_noise = t_m[(t_m["role"] == "noise") & (t_m["control"] == "")]
            for _, r in legacy_noise.iterrows():
                lines.append((r["defense"], "noise", r))
            for d, role, r in sorted(lines, key=lambda x: (x[0] != "(any)", x[0], order[x[1]])):
                linf, l2 = r.get("budget/linf mean", math.nan), r.get("budget/l2 mean", math.nan)
                md.append(
                    f"| {d} | {ROLE_NAMES[role]} | {mimic} | "
                    + " | ".join(_cell(r, c) for c in columns)
                    + f" | {255 * linf:.2f} | {l2:.3f} |"
                )
        md.append("")
        for mimic in mimics:
            first = next((v for k, v in by_label.items() if k[3] == mimic and k[1] == ""), None)
            if first is None:
                continue
            keys = first["stage_keys"]
            lines_g: list[tuple[str, str, str | None]] = [
                ("clean photo", "data", keys.get("data")),
                ("edit of the clean photo", "mimic", keys.get("mimic_clean")),
            ]
            floor = next((v for k, v in by_label.items() if k[3] == mimic and k[1] == "floor"), None)
            if floor is not None:
                lines_g.append(("the same edit, another seed (floor)", "mimic", floor["stage_keys"].get("mimic")))
            for (d, c, pur, m), r in sorted(by_label.items()):
                if m == mimic and pur == "none" and c == "" and d in protections:
                    lines_g += [  # grid labels without the settings (the legend under the grid has them)
                        (_base(d), "protect", r["stage_keys"].get("protect")),
                        (f"edit after {_base(d)}", "mimic", r["stage_keys"].get("mimic")),
                    ]
            out = results_dir / safe_filename(f"grid_{mimic}.png")
            _write_grid(store, lines_g, out, n_images, grids, f"{mimic} edits")
    else:
        purifiers = list(dict.fromkeys(p for p in plain["purifier"]))
        purifiers.sort(key=lambda p: (p != "none", p))
        for mimic in mimics:
            t_m = table[table["mimic"] == mimic]

            def matrix_line(label: str, sel: pd.DataFrame, c: str) -> str:
                cells = []
                for p in purifiers:
                    hit = sel[sel["purifier"] == p]
                    cells.append(_cell(hit.iloc[0], c) if len(hit) else "-")
                best = sel[sel["purifier"].astype(str).str.startswith(BEST_OF)]
                cells.append(_cell(best.iloc[0], c) if len(best) else "-")
                return f"| {label} | " + " | ".join(cells) + " |"

            for c in columns:
                md += [
                    f"## {mimic}: {_short(c)} {arrow(c)}",
                    "",
                    "| row | " + " | ".join(purifiers) + " | attacker's best per image |",
                    "|---|" + "---|" * (len(purifiers) + 1),
                ]
                for role in ("clean", "floor"):
                    sel = t_m[t_m["role"] == role]
                    if len(sel):
                        first_defense = sorted(set(sel["defense"]))[0]
                        md.append(matrix_line(ROLE_NAMES[role], sel[sel["defense"] == first_defense], c))
                legacy_noise = t_m[(t_m["role"] == "noise") & (t_m["control"] == "")]
                if len(legacy_noise):
                    md.append(
                        matrix_line(f"{legacy_noise.iloc[0]['defense']} (noise, budget not matched)", legacy_noise, c)
                    )
                for d in protections:
                    own_noise = t_m[(t_m["defense"] == d) & (t_m["control"] == "noise")]
                    if len(own_noise):
                        md.append(matrix_line(f"{d}: noise at its budget", own_noise, c))
                    md.append(matrix_line(d, t_m[(t_m["defense"] == d) & (t_m["role"] == "protected")], c))
                md.append("")
            for d in protections:
                r0 = by_label.get((d, "", "none", mimic))
                if r0 is None:
                    continue
                c0 = next(
                    (
                        v
                        for k, v in by_label.items()
                        if k[1] in ("clean",) and k[0] == d and k[2] == "none" and k[3] == mimic
                    ),
                    None,
                ) or next(
                    (v for k, v in by_label.items() if _base(k[0]) == "none" and k[2] == "none" and k[3] == mimic), None
                )
                keys = r0["stage_keys"]
                lines_g = [
                    ("clean artwork", "data", keys.get("data")),
                    (f"protected ({d})", "protect", keys.get("protect")),
                ]
                if c0 is not None:
                    lines_g.append(("mimic trained on clean art", "mimic", c0["stage_keys"].get("mimic")))
                for p in purifiers:
                    r = by_label.get((d, "", p, mimic))
                    if r is None:
                        continue
                    if p != "none":
                        lines_g.append((f"purified: {p}", "purify", r["stage_keys"].get("purify")))
                    lines_g.append((f"mimic after {p}", "mimic", r["stage_keys"].get("mimic")))
                out = results_dir / safe_filename(f"grid_{mimic}_{d}.png")
                _write_grid(store, lines_g, out, n_images, grids, f"{d}, {mimic}")
    head = [
        "## Findings",
        "",
        *[f"- {f}" for f in findings],
        "",
        "| mimic | protection | verdict | protection effect | residual (best-of) | broken by |",
        "|---|---|---|---|---|---|",
        *effects,
        "",
    ]
    md = md[:5] + head + md[5:] + ["", method_note(min_effect), ""]
    if grids:
        md += ["## Image grids", "", *grids]
    md.append("Generated from the rows; do not edit. Rebuild with `python -m harness.tables`.")
    text = "\n".join(md) + "\n"
    atomic_write_text(results_dir / "report.md", text)
    # the grids lie beside the report (committed with it): link them rather than embed megabytes of base64
    atomic_write_text(
        results_dir / "report.html", html_page(str(spec.get("title", name)), text, results_dir, embed_images=False)
    )
    log.info("experiment report: %s", results_dir / "report.md")
    return results_dir / "report.md"
