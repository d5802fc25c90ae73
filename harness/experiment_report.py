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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from harness.cache import ArtifactStore, atomic_write_text
from harness.report import grid_from_store, html_page, safe_filename
from harness.summary import BEST_OF, sizes_line, summarize
from harness.threat_models import threat_model as get_threat_model
from harness.verdict import (
    binary_metrics,
    controls_from_rows,
    fmt_interval,
    judge,
    method_note,
    option_name,
    verdict_settings,
)

log = logging.getLogger(__name__)

__all__ = ["write_experiment_report", "experiment_spec"]

LAYOUTS = ("metrics", "matrix")
#: the order of the roles in a table: the controls first, then the protection
ROLE_ORDER = {"clean": 0, "floor": 1, "noise": 2, "protected": 3}
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


def _natural(label: str) -> list:
    """A sort key that orders the numbers inside a label by value (k=2 before k=10)."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(label))]


def _write_grid(store: ArtifactStore | None, lines: list[tuple], out: Path, n: int, title: str) -> list[str]:
    """Draw the grid (or keep the one already at ``out``) and return its report lines (none without a grid)."""
    made = grid_from_store(store, lines, out, n, label_width=220) if store is not None else None
    if made is None and not out.is_file():
        return []
    legend = "; ".join(f"row {i + 1}: {line[0]}" for i, line in enumerate(lines))
    return [f"![{title}]({out.name})", "", f"{title}. Grid rows: {legend}.", ""]


def _role_column(table: pd.DataFrame, baseline: str) -> pd.Series:
    """Each summary line's role (see :func:`harness.verdict.role_of`): its control, or for lines of rows written
    before controls were labelled, clean for ``defense=none`` and noise for the baseline defense."""

    def role(d: str, c: str) -> str:
        if c:
            return c
        return {"none": "clean", baseline: "noise"}.get(option_name(d), "protected")

    return pd.Series([role(d, c) for d, c in zip(table["defense"], table["control"], strict=True)], index=table.index)


@dataclass
class _Experiment:
    """What every section of an experiment report reads: the rows, their summary table (with each line's role),
    the ``report`` settings, and the first seed's row per (defense, control, purifier, mimic)."""

    results_dir: Path
    rows: list[dict[str, Any]]
    spec: dict[str, Any]
    table: pd.DataFrame
    higher: dict[str, bool]
    store: ArtifactStore | None
    # the verdict's settings (:func:`harness.verdict.verdict_settings`)
    baseline: str
    min_effect: float

    @property
    def success(self) -> str:
        return str(self.spec["success"])

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.spec.get("columns") or [self.success]]

    @property
    def n_images(self) -> int:
        return int(self.spec.get("grid_images", 6))

    @cached_property
    def seeds(self) -> list[Any]:
        return sorted({r.get("seed") for r in self.rows})

    @cached_property
    def mimics(self) -> list[str]:
        return list(dict.fromkeys(self.table["mimic"]))

    @cached_property
    def plain(self) -> pd.DataFrame:
        """The summary lines of single purifiers (without the best-of lines)."""
        return self.table[~self.table["purifier"].astype(str).str.startswith(BEST_OF)]

    @cached_property
    def protections(self) -> list[str]:
        plain = self.plain
        return sorted(set(plain.loc[plain["role"] == "protected", "defense"]), key=_natural)

    @property
    def noise_baseline(self) -> bool:
        """Whether the success metric's threat model measures protections from noise of their budget (privacy:
        from the positive control, no budget)."""
        return get_threat_model(self.success.split("/", 1)[0], option="report.success").noise_baseline

    @cached_property
    def by_label(self) -> dict[tuple[str, str, str, str], dict[str, Any]]:
        out = {}
        first_seed = self.seeds[0]
        for r in self.rows:
            lab = r["labels"]
            if r.get("seed") == first_seed:
                out[(lab["defense"], lab.get("control", ""), lab["purifier"], lab["mimic"])] = r
        return out

    def arrow(self, metric: str) -> str:
        return "↑" if self.higher.get(metric, True) else "↓"


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
    baseline, min_effect, _, _ = verdict_settings(spec)  # the findings use judge's default level and n_boot
    table = table.copy()
    table["role"] = _role_column(table, baseline)
    ex = _Experiment(results_dir, rows, spec, table, higher, store, baseline, min_effect)
    tables, grids = (_metrics_tables(ex), _metrics_grids(ex)) if layout == "metrics" else _matrix_layout(ex)
    md = [*_header(ex), *_findings(ex), *_refused_note(ex), *tables, "", *_mimic_info_table(ex), *_curve(ex)]
    md += [method_note(ex.min_effect), ""]
    if grids:
        md += ["## Image grids", "", *grids]
    md.append("Generated from the rows; do not edit. Rebuild with `python -m harness.tables`.")
    text = "\n".join(md) + "\n"
    atomic_write_text(results_dir / "report.md", text)
    # the grids lie beside the report (committed with it): link them rather than embed megabytes of base64
    title = str(spec.get("title", spec["experiment"]))
    atomic_write_text(results_dir / "report.html", html_page(title, text, results_dir, embed_images=False))
    log.info("experiment report: %s", results_dir / "report.md")
    return results_dir / "report.md"


def _header(ex: _Experiment) -> list[str]:
    """The title, the command and where the numbers come from."""
    name, rows = ex.spec["experiment"], ex.rows
    commits = sorted({str(r.get("provenance", {}).get("git", {}).get("commit", "?"))[:10] for r in rows})
    return [
        f"# {ex.spec.get('title', name)}",
        "",
        f"Command: `python -m harness.run experiment={name}`  ",
        f"Generated by `harness.experiment_report` from the {len(rows)} result rows in `runs/` (code commit(s) "
        f"{', '.join(commits)}). Dataset `{rows[0]['labels']['dataset']}`, model "
        f"`{rows[0]['labels']['model']}`, seed(s) {ex.seeds}. Each cell: mean over images and seeds [95% bootstrap "
        "interval over seeds, then images]; set-level metrics (FID, KID, precision) are one number per run. "
        "Arrows: the attacker's better direction. Each protection has its own controls: the clean images "
        + (
            "(positive control), the floor and uniform noise at its realised L-inf budget (see Method)."
            if ex.noise_baseline
            else "(positive control) and the floor; no noise baseline: the protection has no perturbation budget, and "
            "its effect is measured from the positive control (see Method)."
        ),
        "",
        *([sizes, ""] if (sizes := sizes_line(rows)) is not None else []),
    ]


def _findings(ex: _Experiment) -> list[str]:
    """One verdict per mimic and protection (:func:`harness.verdict.judge`), as sentences and as a table."""
    binary = binary_metrics(ex.rows)
    findings: list[str] = []
    effects: list[str] = []
    for mimic in ex.mimics:
        m_rows = [r for r in ex.rows if r["labels"]["mimic"] == mimic]
        for d in ex.protections:
            v = judge(
                controls_from_rows(m_rows, d, ex.success, ex.baseline),
                threat_model=ex.success.split("/", 1)[0],
                defense=d,
                metric=ex.success,
                higher=ex.higher.get(ex.success, True),
                binary=ex.success in binary,
                min_effect=ex.min_effect,
            )
            findings.append(v.sentence.replace(": ", f" ({mimic}): ", 1))
            effects.append(
                f"| {mimic} | {d} | {v.outcome} | {v.protection.fmt(3)} | {v.residual.fmt(3)} | "
                f"{v.broken_by or ('holds' if v.holds else '-')} |"
            )
    return [
        "## Findings",
        "",
        *[f"- {f}" for f in findings],
        "",
        "| mimic | protection | verdict | protection effect | residual (best-of) | broken by |",
        "|---|---|---|---|---|---|",
        *effects,
        "",
    ]


def _refused_note(ex: _Experiment) -> list[str]:
    """A note naming the reported columns that every run refused (all NaN)."""
    table = ex.table
    refused = [c for c in ex.columns if c in table.columns or f"{c} mean" in table.columns]
    refused = [c for c in refused if f"{c} mean" in table.columns and table[f"{c} mean"].isna().all()]
    if not refused:
        return []
    return [
        "Not reported: "
        + ", ".join(f"`{_short(c)}`" for c in refused)
        + " (every run refused it: FID and precision need more images per set than the features have "
        "dimensions, see harness/metrics/distribution.py; KID is unbiased at any set size).",
        "",
    ]


def _metrics_tables(ex: _Experiment) -> list[str]:
    """``layout: metrics``: one table, a line per protection x role (x purifier, where rows are purified) x edit,
    a column per reported metric."""
    columns, budget = ex.columns, ex.noise_baseline  # no budget columns for protections without a budget
    attack = "edit" if ex.success.split("/", 1)[0] == "editing" else "attack"
    purified = bool((ex.plain["purifier"] != "none").any())  # a purifier column where some rows have one
    md = [
        f"| protection | role | {'purifier | ' if purified else ''}{attack} | "
        + " | ".join(f"{_short(c)} {ex.arrow(c)}" for c in columns)
        + (" | L-inf (x255) | L2 |" if budget else " |"),
        "|---|---|---|" + "---|" * (len(columns) + (2 if budget else 0) + purified),
    ]
    for mimic in ex.mimics:
        for d, role, r in _metrics_lines(ex, ex.plain[ex.plain["mimic"] == mimic]):
            linf, l2 = r.get("budget/linf mean", math.nan), r.get("budget/l2 mean", math.nan)
            md.append(
                f"| {d} | {ROLE_NAMES[role]} | {r['purifier'] + ' | ' if purified else ''}{mimic} | "
                + " | ".join(_cell(r, c) for c in columns)
                + (f" | {255 * linf:.2f} | {l2:.3f} |" if budget else " |")
            )
    return [*md, ""]


def _mimic_info_table(ex: _Experiment) -> list[str]:
    """What the mimics reported about their own run (``mimic_info``: a training-data filter's precision and
    recall on the scraped images, say), per mimic, protection, role and purifier: the mean over seeds, and the
    per-seed range. Nothing when no row has any."""
    groups: dict[tuple[str, str, str, str], list[dict[str, float]]] = {}
    for r in ex.rows:
        if r.get("mimic_info"):
            lab = r["labels"]
            role = lab.get("control") or "protected"
            groups.setdefault((lab["mimic"], lab["defense"], role, lab["purifier"]), []).append(r["mimic_info"])
    if not groups:
        return []
    keys = list(dict.fromkeys(k for infos in groups.values() for info in infos for k in info))
    md = [
        "## What the mimics reported (`mimic_info`; mean over seeds [lowest, highest seed])",
        "",
        "| attack | protection | role | purifier | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for (mimic, d, role, pur), infos in sorted(
        groups.items(), key=lambda kv: (_natural(kv[0][0]), ROLE_ORDER.get(kv[0][2], 4))
    ):
        cells = []
        for k in keys:
            vals = [float(i[k]) for i in infos if k in i and not math.isnan(float(i[k]))]
            mean = sum(vals) / len(vals) if vals else math.nan
            cells.append(f"{mean:.3g} [{min(vals):.3g}, {max(vals):.3g}]" if len(vals) > 1 else f"{mean:.3g}")
        md.append(f"| {mimic} | {d} | {ROLE_NAMES.get(role, role)} | {pur} | " + " | ".join(cells) + " |")
    return [*md, ""]


def _metrics_lines(ex: _Experiment, t_m: pd.DataFrame) -> list[tuple[str, str, pd.Series]]:
    """One mimic's (protection, role, summary line)s, in table order: the shared controls first, then per
    protection its noise baseline and its protected line (and legacy noise rows, not budget-matched)."""
    lines = []
    for role in ("clean", "floor"):
        hit = t_m[(t_m["role"] == role) & (t_m["purifier"] == "none")]
        if len(hit):
            lines.append(("(any)", role, hit.iloc[0]))
    for d in ex.protections:
        for _, r in t_m[(t_m["defense"] == d) & t_m["role"].isin(["noise", "protected"])].iterrows():
            lines.append((d, r["role"], r))
    for _, r in t_m[(t_m["role"] == "noise") & (t_m["control"] == "")].iterrows():
        lines.append((r["defense"], "noise", r))
    return sorted(lines, key=lambda x: (x[0] != "(any)", _natural(x[0]), ROLE_ORDER[x[1]]))


def _metrics_grids(ex: _Experiment) -> list[str]:
    """``layout: metrics``: per edit, the clean photo and its edit, the floor, then each protection and its edit
    (the first seed's rows)."""
    grids: list[str] = []
    by_label, protections = ex.by_label, ex.protections
    tm = get_threat_model(ex.success.split("/", 1)[0], option="report.success")
    if tm.own_output_ids:
        return _generation_grids(ex)
    if tm.prepare is not None:
        return _matched_grids(ex, tm.prepare)
    for mimic in ex.mimics:
        first = next((v for k, v in by_label.items() if k[3] == mimic and k[1] == ""), None)
        if first is None:
            continue
        keys = first["stage_keys"]
        lines: list[tuple[str, str, str | None]] = [
            ("clean photo", "data", keys.get("data")),
            ("edit of the clean photo", "mimic", keys.get("mimic_clean")),
        ]
        floor = next((v for k, v in by_label.items() if k[3] == mimic and k[1] == "floor"), None)
        if floor is not None:
            lines.append(("the same edit, another seed (floor)", "mimic", floor["stage_keys"].get("mimic")))
        for (d, c, pur, m), r in sorted(by_label.items()):
            if m == mimic and pur == "none" and c == "" and d in protections:
                lines += [  # grid labels without the settings (the legend under the grid has them)
                    (option_name(d), "protect", r["stage_keys"].get("protect")),
                    (f"edit after {option_name(d)}", "mimic", r["stage_keys"].get("mimic")),
                ]
        out = ex.results_dir / safe_filename(f"grid_{mimic}.png")
        grids += _write_grid(ex.store, lines, out, ex.n_images, f"{mimic} edits")
    return grids


def _generation_grids(ex: _Experiment) -> list[str]:
    """For a threat model whose outputs are generations of their own (poisoning): per mimic, the scraped images
    clean, as each protection and the floor left them, then the source-prompted generations of the model trained
    on each (the first seed's rows, no purifier): one image per artist, so each column is one artist."""
    from harness.threat_models.poisoning import one_per_artist

    grids: list[str] = []
    for mimic in ex.mimics:
        mine = {k: v for k, v in ex.by_label.items() if k[3] == mimic and k[2] == "none"}
        if not mine:
            continue
        first = next(iter(sorted(mine.items())))[1]
        lines: list[tuple] = [("scraped images, clean", "data", first["stage_keys"].get("data"), one_per_artist)]
        roles = sorted(mine.items(), key=lambda kv: ("clean", "noise", "", "floor").index(kv[0][1]))
        for (d, c, _, _), r in roles:
            if c in ("", "floor"):
                what = "the floor's dirty-label poison" if c == "floor" else option_name(d)
                lines.append((f"scraped images: {what}", "protect", r["stage_keys"].get("protect"), one_per_artist))
        for (d, c, _, _), r in roles:
            what = {"clean": "clean images", "noise": "noise", "floor": "dirty-label poison"}.get(c, option_name(d))
            lines.append((f"trained on {what}: source probes", "mimic", r["stage_keys"].get("mimic"), one_per_artist))
        out = ex.results_dir / safe_filename(f"grid_{mimic}.png")
        grids += _write_grid(ex.store, lines, out, ex.n_images, f"{mimic}: scraped images and probes")
    return grids


def _matched_grids(ex: _Experiment, prepare: Any) -> list[str]:
    """For a threat model whose outputs are unordered (reconstructions): per mimic, the clean images, what the
    measures compare with, the floor and each protection's outputs, every set matched to the clean images the
    way the measures match them (the first seed's rows)."""
    grids: list[str] = []
    match = lambda x, c: prepare(x, c)[0]  # noqa: E731
    for mimic in ex.mimics:
        mine = {k: v for k, v in ex.by_label.items() if k[3] == mimic and k[2] == "none"}
        first = next((v for k, v in sorted(mine.items()) if k[1] == ""), None)
        if first is None:
            continue
        data = first["stage_keys"].get("data")
        lines: list[tuple] = [
            ("private images", "data", data),
            ("what the measures compare with", "data", data, lambda x, c: prepare(c, c)[1]),
        ]
        floor = next((v for k, v in sorted(mine.items()) if k[1] == "floor"), None)
        if floor is not None:
            lines.append(("floor, matched", "mimic", floor["stage_keys"].get("mimic"), match))
        for (d, c, _, _), r in sorted(mine.items(), key=lambda kv: _setting_order(kv[1])):
            if c == "" and d in ex.protections:
                label = ", ".join(f"{k}={v}" for k, v in _settings(r).items()) or d
                lines.append((f"{label}, matched", "mimic", r["stage_keys"].get("mimic"), match))
        out = ex.results_dir / safe_filename(f"grid_{mimic}.png")
        grids += _write_grid(ex.store, lines, out, ex.n_images, f"{mimic}: reconstructions")
    return grids


def _settings(row: dict[str, Any]) -> dict[str, Any]:
    """The defense settings a row's label names (``instahide[k=2,encodings_per_image=5]`` -> k, encodings_per_image)
    with their values from the row's config."""
    label = str(row["labels"]["defense"])
    items = label.split("[", 1)[1].rstrip("]").split(",") if "[" in label else []
    names = [item.split("=", 1)[0] for item in items]
    cfg = (row.get("config") or {}).get("defense") or {}
    return {n: cfg.get(n) for n in names if n in cfg}


def _setting_order(row: dict[str, Any]) -> tuple:
    return tuple((k, float(v) if isinstance(v, (int, float)) else str(v)) for k, v in _settings(row).items())


def _curve_value(row: dict[str, Any], key: str) -> Any:
    """A row's value of a curve key: ``labels.<name>`` (a label, e.g. the purifier), ``<section>.<option>`` (an
    option of that config section, e.g. ``mimic.poison_count``) or a bare ``<option>`` of the defense."""
    section, _, option = key.rpartition(".")
    if section == "labels":
        return row["labels"].get(option)
    return ((row.get("config") or {}).get(section or "defense") or {}).get(option)


def _curve(ex: _Experiment) -> list[str]:
    """``report.curve: {x: <key>, series: <key or keys>}``: the success against one setting, one line per value
    of the series keys, mean and interval over seeds and images. Keys as :func:`_curve_value` reads them. Rows:
    those with ``purifier`` none, or every purifier when the series names ``labels.purifier``. The controls are
    horizontal lines at their level; with ``controls: per_x`` (when they change with x, as the poisoning
    threat model's do with the poison count) each control is a line of its own."""
    spec = ex.spec.get("curve")
    if not spec:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from harness.cache import atomic_write_bytes
    from harness.verdict import bootstrap_ci, values_of

    x_key = str(spec["x"])
    s_keys = [str(k) for k in (spec["series"] if isinstance(spec["series"], list) else [spec["series"]])]
    per_x = spec.get("controls", "level") == "per_x"
    all_purifiers = "labels.purifier" in s_keys
    plain = not per_x and len(s_keys) == 1  # lines and table rows named by the one series key's value
    binary = ex.success in binary_metrics(ex.rows)
    groups: dict[Any, dict[float, list[dict[str, Any]]]] = {}
    controls: dict[str, list[dict[str, Any]]] = {}
    for r in ex.rows:
        if r["labels"]["purifier"] != "none" and not all_purifiers:
            continue
        control = r["labels"].get("control", "")
        x, series = _curve_value(r, x_key), tuple(_curve_value(r, k) for k in s_keys)
        if control and not per_x:
            if r["labels"]["purifier"] == "none":
                controls.setdefault(control, []).append(r)
            continue
        if x is None or any(v is None for v in series):
            continue
        name = ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in zip(s_keys, series, strict=True))
        if control or per_x:  # with the controls as lines of their own, every line names its role
            name = f"{ROLE_NAMES.get(control or 'protected', control)}, {name}"
        groups.setdefault(series[0] if plain else name, {}).setdefault(float(x), []).append(r)
    if not groups:
        return []
    fig, ax = plt.subplots(figsize=(5, 3.4) if not per_x else (9.5, 4.2), dpi=120)
    x_name, s_name = x_key.rpartition(".")[2], ", ".join(k.rpartition(".")[2] for k in s_keys)
    xs_all = sorted({x for g in groups.values() for x in g})
    table = [f"| {'line' if per_x else s_name} | " + " | ".join(f"{x_name}={x:g}" for x in xs_all) + " |"]
    table.append("|---|" + "---|" * len(xs_all))
    # with the controls as lines, many lines share an x: each is drawn a little to the side of it (a dodge of
    # at most a tenth of the smallest gap between xs), so their intervals stay apart
    gap = min((b - a for a, b in zip(xs_all, xs_all[1:], strict=False)), default=1.0)
    dodge = 0.1 * gap / max(len(groups) - 1, 1) if per_x else 0.0
    for i, series in enumerate(sorted(groups, key=lambda g: _natural(str(g)))):
        pts = {x: bootstrap_ci(values_of(rs, ex.success), binary=binary) for x, rs in groups[series].items()}
        xs = sorted(pts)
        label = f"{s_name}={series}" if plain else series
        ax.errorbar(
            [x + (i - (len(groups) - 1) / 2) * dodge for x in xs],
            [pts[x][0] for x in xs],
            yerr=[[pts[x][0] - pts[x][1] for x in xs], [pts[x][2] - pts[x][0] for x in xs]],
            marker="o",
            capsize=3,
            label=label,
            linestyle="--" if per_x and "floor" in str(series) else ":" if per_x and "control" in str(series) else "-",
        )
        table.append(f"| {series} | " + " | ".join(fmt_interval(*pts[x]) if x in pts else "-" for x in xs_all) + " |")
    for control, style in (("clean", ":"), ("floor", "--")):
        if controls.get(control):
            level = bootstrap_ci(values_of(controls[control], ex.success), binary=binary)[0]
            ax.axhline(level, color="grey", linestyle=style, linewidth=1, label=f"{control} control")
    ax.set_xlabel(x_key if per_x else x_name)
    ax.set_ylabel(ex.success)
    if per_x:  # many lines: the legend beside the plot, not over it
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    out = ex.results_dir / "curve.png"
    atomic_write_bytes(out, buf.getvalue())
    which = "every row" if per_x else "protected"
    which += "" if all_purifiers else ", no purifier"
    title = f"{_short(ex.success)} {ex.arrow(ex.success)} against {x_name}, per {s_name} ({which})"
    return [f"## {title}", "", *table, "", f"![{title}]({out.name})", ""]


def _matrix_layout(ex: _Experiment) -> tuple[list[str], list[str]]:
    """``layout: matrix``: per mimic, a protection x purifier table per reported column, and per protection a
    grid. Returns (the tables, the grids)."""
    purifiers = list(dict.fromkeys(p for p in ex.plain["purifier"]))
    purifiers.sort(key=lambda p: (p != "none", p))
    tables: list[str] = []
    grids: list[str] = []
    for mimic in ex.mimics:
        t_m = ex.table[ex.table["mimic"] == mimic]
        for c in ex.columns:
            tables += _matrix_table(ex, t_m, purifiers, f"{mimic}: {_short(c)} {ex.arrow(c)}", c)
        for d in ex.protections:
            grids += _matrix_grid(ex, purifiers, mimic, d)
    return tables, grids


def _matrix_table(ex: _Experiment, t_m: pd.DataFrame, purifiers: list[str], title: str, c: str) -> list[str]:
    """One mimic's matrix of metric ``c``: the controls, then per protection its noise baseline and itself."""
    md = [
        f"## {title}",
        "",
        "| row | " + " | ".join(purifiers) + " | attacker's best per image |",
        "|---|" + "---|" * (len(purifiers) + 1),
    ]
    for role in ("clean", "floor"):
        sel = t_m[t_m["role"] == role]
        if len(sel):
            first_defense = sorted(set(sel["defense"]))[0]
            md.append(_matrix_line(purifiers, ROLE_NAMES[role], sel[sel["defense"] == first_defense], c))
    legacy_noise = t_m[(t_m["role"] == "noise") & (t_m["control"] == "")]
    if len(legacy_noise):
        label = f"{legacy_noise.iloc[0]['defense']} (noise, budget not matched)"
        md.append(_matrix_line(purifiers, label, legacy_noise, c))
    for d in ex.protections:
        own_noise = t_m[(t_m["defense"] == d) & (t_m["control"] == "noise")]
        if len(own_noise):
            md.append(_matrix_line(purifiers, f"{d}: noise at its budget", own_noise, c))
        md.append(_matrix_line(purifiers, d, t_m[(t_m["defense"] == d) & (t_m["role"] == "protected")], c))
    return [*md, ""]


def _matrix_line(purifiers: list[str], label: str, sel: pd.DataFrame, c: str) -> str:
    """A matrix line: metric ``c`` of ``sel`` per purifier, then the attacker's best per image."""
    cells = []
    for p in purifiers:
        hit = sel[sel["purifier"] == p]
        cells.append(_cell(hit.iloc[0], c) if len(hit) else "-")
    best = sel[sel["purifier"].astype(str).str.startswith(BEST_OF)]
    cells.append(_cell(best.iloc[0], c) if len(best) else "-")
    return f"| {label} | " + " | ".join(cells) + " |"


def _matrix_grid(ex: _Experiment, purifiers: list[str], mimic: str, d: str) -> list[str]:
    """``layout: matrix``: protection ``d``'s grid for one mimic: clean, protected, the mimic trained on clean
    art, then per purifier the purified art and the mimic's output (the first seed's rows)."""
    by_label = ex.by_label
    r0 = by_label.get((d, "", "none", mimic))
    if r0 is None:
        return []
    c0 = next(
        (v for k, v in by_label.items() if k[1] in ("clean",) and k[0] == d and k[2] == "none" and k[3] == mimic),
        None,
    ) or next(
        (v for k, v in by_label.items() if option_name(k[0]) == "none" and k[2] == "none" and k[3] == mimic), None
    )
    keys = r0["stage_keys"]
    lines = [("clean artwork", "data", keys.get("data")), (f"protected ({d})", "protect", keys.get("protect"))]
    if c0 is not None:
        lines.append(("mimic trained on clean art", "mimic", c0["stage_keys"].get("mimic")))
    for p in purifiers:
        r = by_label.get((d, "", p, mimic))
        if r is None:
            continue
        if p != "none":
            lines.append((f"purified: {p}", "purify", r["stage_keys"].get("purify")))
        lines.append((f"mimic after {p}", "mimic", r["stage_keys"].get("mimic")))
    out = ex.results_dir / safe_filename(f"grid_{mimic}_{d}.png")
    return _write_grid(ex.store, lines, out, ex.n_images, f"{d}, {mimic}")
