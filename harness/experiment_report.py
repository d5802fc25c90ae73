"""The report of an experiment that reproduces a published table (``experiments/experiment/*.yaml``).

An experiment file carries its own sweep and a ``report:`` section; after the sweep (and on every
``python -m harness.tables``) this module writes ``<results_dir>/report.md`` and ``report.html`` from the result
rows alone, so the same rows always give the same report:

- ``layout: metrics`` (PhotoGuard's Table 1): one line per protection x edit, one column per metric in
  ``report.columns``;
- ``layout: matrix`` (Hönig et al.): per mimic, a protection x purifier matrix of ``report.success`` with the
  attacker's best purifier per image as the last column, and a second matrix for every other column;

then the findings, one sentence per protection and mimic (does it beat the ``report.baseline`` protection,
random noise, against naive mimicry; does a purifier restore mimicry; the rule of :func:`harness.audit.verdict`),
and image grids (clean / protected / purified / mimic output) read from the artifact cache. Where the cache no
longer holds the images (a fresh checkout), the committed grid files are kept as they are.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from harness.cache import ArtifactStore, atomic_write_text, load_imageset
from harness.tables import BEST_OF, interval_beats, interval_reaches, summarize

log = logging.getLogger(__name__)

__all__ = ["write_experiment_report", "experiment_spec"]

LAYOUTS = ("metrics", "matrix")


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
    m, lo, hi = t.get(f"{metric} mean"), t.get(f"{metric} ci_low"), t.get(f"{metric} ci_high")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    digits = 2 if abs(m) >= 10 else 3

    def f(x: float) -> str:
        return f"{x:.{digits}f}" if 0.01 <= abs(x) < 1e4 or x == 0 else f"{x:.3g}"

    if lo is None or (isinstance(lo, float) and math.isnan(lo)) or abs(hi - lo) < 1e-12:
        return f(m)
    return f"{f(m)} [{f(lo)}, {f(hi)}]"


def _short(metric: str) -> str:
    return metric.split("/", 1)[-1]


def _base(label: str) -> str:
    return str(label).split("[", 1)[0]


def _grid(store: ArtifactStore, lines: list[tuple[str, str, str | None]], out: Path, n: int) -> Path | None:
    """A labelled grid with one image row per ``(label, stage, key)``; None when the cache lacks any of them."""
    import torch

    from harness.report import save_grid

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
    n_images = int(spec.get("grid_images", 6))
    name = spec["experiment"]
    commits = sorted({str(r.get("provenance", {}).get("git", {}).get("commit", "?"))[:10] for r in rows})
    seeds = sorted({r.get("seed") for r in rows})
    md = [
        f"# {spec.get('title', name)}",
        "",
        f"Command: `python -m harness.run experiment={name}`  ",
        f"Generated by `harness.experiment_report` from the {len(rows)} result rows in `runs/` (code commit(s) "
        f"{', '.join(commits)}). Dataset `{rows[0]['labels']['dataset']}`, model "
        f"`{rows[0]['labels']['model']}`, seed(s) {seeds}. Each cell: mean over images and seeds [95% bootstrap "
        "interval]; set-level metrics (FID, KID, precision) are one number per run. Arrows: the attacker's "
        "better direction.",
        "",
    ]
    by_label: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        lab = r["labels"]
        if r.get("seed") == seeds[0]:
            by_label[(lab["defense"], lab["purifier"], lab["mimic"])] = r

    def arrow(m: str) -> str:
        return "↑" if higher.get(m, True) else "↓"

    findings: list[str] = []
    grids: list[str] = []
    mimics = list(dict.fromkeys(table["mimic"]))
    if layout == "metrics":
        md += [
            "| protection | edit | "
            + " | ".join(f"{_short(c)} {arrow(c)}" for c in columns)
            + " | L-inf (x255) | L2 |",
            "|---|---|" + "---|" * (len(columns) + 2),
        ]
        t = table[~table["purifier"].astype(str).str.startswith(BEST_OF)]
        for _, r in t.sort_values(["mimic", "defense"]).iterrows():
            linf, l2 = r.get("budget/linf mean", math.nan), r.get("budget/l2 mean", math.nan)
            md.append(
                f"| {r['defense']} | {r['mimic']} | "
                + " | ".join(_cell(r, c) for c in columns)
                + f" | {255 * linf:.2f} | {l2:.3f} |"
            )
        md.append("")
        for mimic in mimics:
            t_m = t[t["mimic"] == mimic]
            noise = t_m[t_m["defense"].map(_base) == baseline]
            if noise.empty:
                continue
            z = noise.iloc[0]
            for _, r in t_m.iterrows():
                if _base(r["defense"]) in (baseline, "none"):
                    continue
                h = higher.get(success, True)
                verdict = "beats" if interval_beats(r, z, success, h) else "does not beat"
                findings.append(
                    f"{mimic}: {r['defense']} {verdict} the random-noise baseline ({_short(success)} "
                    f"{_cell(r, success)} vs {_cell(z, success)})."
                )
            lines: list[tuple[str, str, str | None]] = []
            first = next((v for k, v in by_label.items() if k[2] == mimic), None)
            if first is not None:
                keys = first["stage_keys"]
                lines += [
                    ("clean photo", "data", keys.get("data")),
                    ("edit of the clean photo", "mimic", keys.get("mimic_clean")),
                ]
                for (d, p, m), r in sorted(by_label.items()):
                    if m == mimic and p == "none":
                        lines += [  # grid labels without the settings (the legend under the grid has them)
                            (_base(d), "protect", r["stage_keys"].get("protect")),
                            (f"edit after {_base(d)}", "mimic", r["stage_keys"].get("mimic")),
                        ]
                out = results_dir / re.sub(r"[^A-Za-z0-9_.-]+", "-", f"grid_{mimic}.png")
                _write_grid(store, lines, out, n_images, grids, f"{mimic} edits")
    else:
        purifiers = list(dict.fromkeys(p for p in table["purifier"] if not str(p).startswith(BEST_OF)))
        purifiers.sort(key=lambda p: (p != "none", p))
        for mimic in mimics:
            t_m = table[table["mimic"] == mimic]
            defenses = sorted(set(t_m["defense"]), key=lambda d: (_base(d) != "none", _base(d) != baseline, d))
            for c in columns:
                md += [
                    f"## {mimic}: {_short(c)} {arrow(c)}",
                    "",
                    "| protection | " + " | ".join(purifiers) + " | attacker's best per image |",
                    "|---|" + "---|" * (len(purifiers) + 1),
                ]
                for d in defenses:
                    cells = []
                    for p in purifiers:
                        hit = t_m[(t_m["defense"] == d) & (t_m["purifier"] == p)]
                        cells.append(_cell(hit.iloc[0], c) if len(hit) else "-")
                    best = t_m[(t_m["defense"] == d) & t_m["purifier"].astype(str).str.startswith(BEST_OF)]
                    cells.append(_cell(best.iloc[0], c) if len(best) else "-")
                    md.append(f"| {d} | " + " | ".join(cells) + " |")
                md.append("")
            naive = {d: t_m[(t_m["defense"] == d) & (t_m["purifier"] == "none")] for d in defenses}
            noise = next((naive[d].iloc[0] for d in defenses if _base(d) == baseline and len(naive[d])), None)
            clean = next((naive[d].iloc[0] for d in defenses if _base(d) == "none" and len(naive[d])), None)
            h = higher.get(success, True)
            for d in defenses:
                if _base(d) in (baseline, "none") or noise is None or not len(naive[d]):
                    continue
                n = naive[d].iloc[0]
                works = interval_beats(n, noise, success, h)
                best = t_m[(t_m["defense"] == d) & t_m["purifier"].astype(str).str.startswith(BEST_OF)]
                s = (
                    f"{mimic}: {d} "
                    + ("beats" if works else "does not beat")
                    + f" the random-noise baseline against naive mimicry ({_short(success)} {_cell(n, success)} vs "
                    f"{_cell(noise, success)})"
                )
                purified = t_m[(t_m["defense"] == d) & ~t_m["purifier"].isin(["none"])]
                purified = purified[~purified["purifier"].astype(str).str.startswith(BEST_OF)]
                if len(purified):
                    top = purified.sort_values(f"{success} mean", ascending=not h).iloc[0]
                    s += f"; best single purifier {top['purifier']} ({_cell(top, success)})"
                if len(best):
                    b = best.iloc[0]
                    s += f"; attacker's best per image {_cell(b, success)}"
                    if clean is not None:
                        s += f" (clean: {_cell(clean, success)})"
                    if works:  # a purifier can only restore what the protection took away
                        s += (
                            ": a purifier restores mimicry to the noise baseline's level"
                            if interval_reaches(b, noise, success, h)
                            else ": no purifier restores mimicry to the noise baseline's level"
                        )
                findings.append(s + ".")
                r0 = by_label.get((d, "none", mimic))
                c0 = next(
                    (v for k, v in by_label.items() if _base(k[0]) == "none" and k[1] == "none" and k[2] == mimic), None
                )
                if r0 is None:
                    continue
                keys = r0["stage_keys"]
                lines = [
                    ("clean artwork", "data", keys.get("data")),
                    (f"protected ({d})", "protect", keys.get("protect")),
                ]
                if c0 is not None:
                    lines.append(("mimic trained on clean art", "mimic", c0["stage_keys"].get("mimic")))
                for p in purifiers:
                    r = by_label.get((d, p, mimic))
                    if r is None:
                        continue
                    if p != "none":
                        lines.append((f"purified: {p}", "purify", r["stage_keys"].get("purify")))
                    lines.append((f"mimic after {p}", "mimic", r["stage_keys"].get("mimic")))
                out = results_dir / re.sub(r"[^A-Za-z0-9_.-]+", "-", f"grid_{mimic}_{d}.png")
                _write_grid(store, lines, out, n_images, grids, f"{d}, {mimic}")
    md = md[:5] + ["## Findings", ""] + [f"- {f}" for f in findings] + [""] + md[5:]
    if grids:
        md += ["## Image grids", "", *grids]
    md.append("Generated from the rows; do not edit. Rebuild with `python -m harness.tables`.")
    text = "\n".join(md) + "\n"
    atomic_write_text(results_dir / "report.md", text)
    from harness.report import html_page

    # the grids lie beside the report (committed with it): link them rather than embed megabytes of base64
    atomic_write_text(
        results_dir / "report.html", html_page(str(spec.get("title", name)), text, results_dir, embed_images=False)
    )
    log.info("experiment report: %s", results_dir / "report.md")
    return results_dir / "report.md"
