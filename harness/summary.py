"""Result rows -> summary tables (the pieces; ``python -m harness.tables`` writes them with the reports).

Reads every row in ``<results_dir>/runs/*.json`` and writes ``<results_dir>/tables/summary.csv`` and
``summary.md``: one line per dataset x model x defense x purifier x mimic, and for each metric the mean over
images and seeds with a 95% interval from a two-level bootstrap (resample seeds, then images within each
seed; 2000 resamples, fixed RNG, so the same rows always give the same table).

    python -m harness.tables --results-dir results      # also rebuilds results/experiments/*/ and audits/*/
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.cache import atomic_write_text
from harness.threat_models import threat_models
from harness.verdict import (
    best_of,
    binary_metrics,
    bootstrap_ci,
    fewest_pairs,
    fmt_interval,
    fmt_number,
    paired_bootstrap,
    values_of,
)

__all__ = [
    "SIZED_STAGES",
    "sizes_line",
    "load_rows",
    "summarize",
    "defense_objectives",
    "purification_table",
    "write_summary",
    "GROUP_COLUMNS",
    "BEST_OF",
]

log = logging.getLogger(__name__)

GROUP_COLUMNS = ["dataset", "model", "defense", "control", "purifier", "mimic"]


def load_rows(results_dir: str | Path) -> list[dict[str, Any]]:
    """All result rows under ``results_dir/runs``, sorted by file name. Unreadable rows are skipped with a warning."""
    runs = Path(results_dir) / "runs"
    rows = []
    for path in sorted(runs.glob("*.json")):
        try:
            row = json.loads(path.read_text())
            if not isinstance(row, dict) or "per_image" not in row or "labels" not in row:
                raise ValueError("not a result row (no 'labels' or 'per_image')")
        except (OSError, ValueError) as err:
            log.warning("skipping %s: %s", path, err)
            continue
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, bool]]:
    """Aggregate rows into one line per group. Returns the table and metric -> higher_is_better."""
    higher: dict[str, bool] = {}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = tuple(row["labels"].get(c, "") for c in GROUP_COLUMNS)
        groups.setdefault(key, []).append(row)
        higher.update(row.get("higher_is_better", {}))
    metric_names = sorted(
        {m for row in rows for m in [*row["per_image"], *row.get("set_metrics", {})]}, key=_metric_order
    )
    binary = binary_metrics(rows)
    records = []
    for key in sorted(groups):
        members = groups[key]
        rec: dict[str, Any] = dict(zip(GROUP_COLUMNS, key, strict=False))
        rec["seeds"] = len({r.get("seed") for r in members})
        rec["images"] = max(len(r.get("image_ids", [])) for r in members)
        for m in metric_names:
            mean, lo, hi = bootstrap_ci(values_of(members, m), binary=m in binary)
            rec[f"{m} mean"], rec[f"{m} ci_low"], rec[f"{m} ci_high"] = mean, lo, hi
        records.append(rec)
    records.extend(_best_of_records(groups, metric_names, higher, binary))
    return pd.DataFrame.from_records(records), higher


BEST_OF = "best-of"


def _best_of_records(
    groups: dict[tuple, list[dict[str, Any]]], metric_names: list[str], higher: dict[str, bool], binary: set[str]
) -> list[dict[str, Any]]:
    """The attacker's best purifier per image: for each dataset x model x defense x control x mimic with two or
    more purifiers, each image's best success value over the purifiers (same seed, same image id), then the
    same bootstrap. The worst case for the defense (BlurGuard's and Hönig et al.'s reporting); compare it only
    with another best-of over the same purifiers (a per-image maximum inflates any row)."""
    success = [m for m in metric_names if m.split("/", 1)[0] in ("editing", "mimicry")]
    by_cell: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for key, members in groups.items():
        dataset, model, defense, control, purifier, mimic = key
        if not mimic or mimic.lower() == "none":
            continue  # no mimic, no success to take the best of
        by_cell.setdefault((dataset, model, defense, control, mimic), {})[purifier] = members
    records = []
    for (dataset, model, defense, control, mimic), purifiers in sorted(by_cell.items()):
        if len(purifiers) < 2:
            continue
        rec: dict[str, Any] = {
            "dataset": dataset,
            "model": model,
            "defense": defense,
            "control": control,
            "purifier": f"{BEST_OF} ({len(purifiers)})",
            "mimic": mimic,
        }
        seeds = sorted({r.get("seed") for rows in purifiers.values() for r in rows}, key=str)
        rec["seeds"] = len(seeds)
        rec["images"] = 0
        for m in metric_names:
            if m not in success:
                rec[f"{m} mean"] = rec[f"{m} ci_low"] = rec[f"{m} ci_high"] = math.nan
                continue
            by_seed = best_of([values_of(rows, m) for rows in purifiers.values()], higher.get(m, True))
            rec["images"] = max([rec["images"]] + [len(v) for v in by_seed.values()])
            rec[f"{m} mean"], rec[f"{m} ci_low"], rec[f"{m} ci_high"] = bootstrap_ci(by_seed, binary=m in binary)
        if rec["images"]:  # a cell whose rows carry no success metric has nothing to take the best of
            records.append(rec)
    return records


def _metric_order(name: str) -> tuple[int, str]:
    prefix = name.split("/", 1)[0]
    order = {**dict.fromkeys(threat_models(), 0), "budget": 2, "purified": 3}
    return order.get(prefix, 1), name


def to_markdown(table: pd.DataFrame, higher: dict[str, bool]) -> str:
    """A Markdown table: each metric as "mean [low, high]" with an arrow for the better direction."""
    metrics = [c[: -len(" mean")] for c in table.columns if c.endswith(" mean")]
    header = [*GROUP_COLUMNS, "seeds", "images"]
    header += [f"{m} {'↑' if higher.get(m, True) else '↓'}" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [str(r[c]) for c in GROUP_COLUMNS] + [str(r["seeds"]), str(r["images"])]
        for m in metrics:
            cells.append(fmt_interval(r[f"{m} mean"], r[f"{m} ci_low"], r[f"{m} ci_high"]))
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nEach cell: mean over images and seeds [95% interval, two-level bootstrap over seeds and images]; the "
        f"mean alone where its values are too few for an interval (fewer than {fewest_pairs(0.95)} images of one "
        f"seed, or {fewest_pairs(0.95)} seeds of a set-level metric such as KID). "
        "↑/↓: higher/lower is better for the attacker. Generated by `python -m harness.tables` from the rows "
        "in `runs/`; do not edit.\n"
    )
    return "\n".join(lines) + "\n" + note


def defense_objectives(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One line per dataset x model x defense x objective: the defense's own objective on the clean images, on
    uniform noise of the same budget and on the protected images (means over rows), how far the protected
    images moved it beyond noise in the defense's direction, with a paired bootstrap interval over seeds and
    images, and the realised budget.

    A defense reports ``<objective>_clean``, ``<objective>_noise`` and ``<objective>_protected`` in its info,
    plus ``<objective>_direction`` (+1 when it raises the objective) and ``<objective>_per_image`` (the three
    per image). ``beats noise`` is "yes" when the interval of direction x (protected - noise) lies above 0;
    rows written before per-image objectives were recorded give no interval ("no interval").
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        info = row.get("defense_info") or {}
        if row["labels"].get("control") or not any(k.endswith("_protected") for k in info):
            continue
        key = tuple(row["labels"].get(c, "") for c in ("dataset", "model", "defense"))
        groups.setdefault(key, []).append(row)
    records = []
    for key in sorted(groups):
        members = groups[key]
        info0 = members[0]["defense_info"]
        # an objective is what objective_report measured: it states its direction
        objectives = [k[: -len("_protected")] for k in info0 if k.endswith("_protected")]
        for obj in sorted(o for o in objectives if f"{o}_direction" in info0 or "objective_direction" in info0):
            vals = {
                part: float(np.mean([r["defense_info"].get(f"{obj}_{part}", np.nan) for r in members]))
                for part in ("clean", "noise", "protected")
            }
            direction = float(info0.get(f"{obj}_direction", info0.get("objective_direction", -1.0)))
            per_image = {part: {} for part in ("noise", "protected")}
            for r in members:
                pi = r["defense_info"].get(f"{obj}_per_image") or {}
                for part in per_image:
                    if part in pi:
                        per_image[part][r.get("seed")] = dict(zip(r["image_ids"], pi[part], strict=False))
            if per_image["noise"] and per_image["protected"]:
                beyond = paired_bootstrap(per_image, lambda m, d=direction: d * (m["protected"] - m["noise"]))
                beyond_text = fmt_interval(beyond.value, beyond.low, beyond.high)
                beats = "yes" if beyond.low > 0 else "no" if beyond.defined else "no interval"
            else:
                beyond_text = fmt_number(direction * (vals["protected"] - vals["noise"]))
                beats = "no interval"
            budget = members[0].get("budget", {})
            records.append(
                {
                    "dataset": key[0],
                    "model": key[1],
                    "defense": key[2],
                    "objective": obj,
                    "direction": "raise" if direction > 0 else "lower",
                    "clean": vals["clean"],
                    "noise baseline": vals["noise"],
                    "protected": vals["protected"],
                    "beyond noise [95%]": beyond_text,
                    "beats noise": beats,
                    "linf max (x255)": 255 * float(budget.get("linf_max", np.nan)),
                    "psnr": float(budget.get("psnr_mean", np.nan)),
                    "ssim": float(budget.get("ssim_mean", np.nan)),
                }
            )
    return pd.DataFrame.from_records(records)


def purification_table(table: pd.DataFrame) -> pd.DataFrame:
    """Purifier x protection: the latent-distance ratio (purified vs unpurified, 0 = protection's latent shift
    removed, 1 = untouched), with the purified images' PSNR and SSIM to the clean images, from the summary."""
    need = {"purified/latent_l2_ratio mean", "purified/psnr mean", "purified/ssim mean"}
    if not need <= set(table.columns):
        return pd.DataFrame()
    sub = table[table["purifier"].astype(str) != "none"]
    sub = sub[~sub["purifier"].astype(str).str.startswith(BEST_OF)]
    sub = sub[sub["mimic"].astype(str) == "none"]  # purification-only runs
    alone = {
        (r["dataset"], r["purifier"]): r.get("purified/latent_l2 mean", float("nan"))
        for _, r in sub.iterrows()
        if r["defense"] == "none"
    }
    records = []
    for _, r in sub.iterrows():
        records.append(
            {
                "dataset": r["dataset"],
                "defense": r["defense"],
                "purifier": r["purifier"],
                "latent dist before": r.get("budget/latent_l2 mean", float("nan")),
                "latent dist after": r.get("purified/latent_l2 mean", float("nan")),
                "purifier alone": alone.get((r["dataset"], r["purifier"]), float("nan")),
                "latent ratio": r["purified/latent_l2_ratio mean"],
                "psnr to clean": r["purified/psnr mean"],
                "ssim to clean": r["purified/ssim mean"],
            }
        )
    return pd.DataFrame.from_records(records)


def _plain_markdown(table: pd.DataFrame, note: str) -> str:
    header = list(table.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(fmt_number(v) if isinstance(v, float) else str(v) for v in r.tolist()) + " |")
    return "\n".join(lines) + "\n\n" + note + "\n"


#: the stages whose image side a row records (``row["sizes"]``), in pipeline order
SIZED_STAGES = ("data", "protect", "purify", "mimic")


def sizes_line(rows: list[dict[str, Any]]) -> str | None:
    """The side in pixels at which each stage ran, over ``rows`` (None when no row records it: rows written
    before sizes were recorded). A stage whose side differs between components lists each component's, e.g.
    ``purify 512 px (jpeg, noisy_upscale), 64 px (diffpure)``."""
    recorded = [r for r in rows if r.get("sizes")]
    if not recorded:
        return None
    parts = []
    for stage in SIZED_STAGES:
        label = {"protect": "defense", "purify": "purifier"}.get(stage, stage)
        by_side: dict[int, set[str]] = {}
        for r in recorded:
            if stage in r["sizes"]:
                by_side.setdefault(int(r["sizes"][stage]), set()).add(str(r.get("labels", {}).get(label, "?")))
        if len(by_side) == 1:
            parts.append(f"{stage} {next(iter(by_side))} px")
        elif by_side:
            parts.append(
                f"{stage} "
                + ", ".join(f"{side} px ({', '.join(sorted(names))})" for side, names in sorted(by_side.items()))
            )
    return (
        "Image sizes: " + "; ".join(parts) + " (a stage that uses the model runs at the model's resolution; the "
        "others at the images' own size)."
    )


def write_summary(results_dir: str | Path, rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, bool]]:
    """Write ``tables/summary.csv`` and ``summary.md`` from ``rows`` (and ``purification.md``, ``defenses.md``
    where rows have them) under ``results_dir``. Returns the summary table and metric -> higher_is_better."""
    table, higher = summarize(rows)
    out = Path(results_dir) / "tables"
    atomic_write_text(out / "summary.csv", table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    atomic_write_text(out / "summary.md", to_markdown(table, higher))
    purification = purification_table(table)
    if len(purification):
        atomic_write_text(
            out / "purification.md",
            _plain_markdown(
                purification,
                (
                    "Purifiers on clean and protected images (runs without a mimic). `latent ratio`: distance between "
                    "the purified image's and the clean image's VAE latents over the same distance before "
                    "purification (0: the protection's latent shift is gone; 1: untouched; - for clean images). "
                    "PSNR/SSIM: purified vs clean images. Generated by `python -m harness.tables`; do not edit."
                ),
            ),
        )
    objectives = defense_objectives(rows)
    if len(objectives):
        atomic_write_text(
            out / "defenses.csv", objectives.to_csv(index=False, float_format="%.6g", lineterminator="\n")
        )
        atomic_write_text(
            out / "defenses.md",
            _plain_markdown(
                objectives,
                (
                    "Each defense's own objective on the clean images, on uniform noise of the same L-inf budget, and on "
                    "the protected images (same random draws for all three). `beyond noise`: how far the protected "
                    "images moved the objective beyond noise, in the defense's direction (positive: further than "
                    "noise), mean over images and seeds with a 95% paired bootstrap interval; `beats noise`: that "
                    "interval lies above 0 (`no interval`: rows written before per-image objectives were recorded). "
                    "Budget columns: realised on the protected images. Generated by `python -m harness.tables`; do "
                    "not edit."
                ),
            ),
        )
    return table, higher
