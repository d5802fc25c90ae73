"""Re-run committed result rows from what they record, after a change that alters their results.

Every row records its config choices and the options set on them (its ``labels``, e.g.
``defense: aspl[lr=0.003]``), its seed and its control. This command turns those back into Hydra overrides,
runs each row again through the cached pipeline (unchanged stages come from the cache), writes the new row and
removes the old row file when the new one has another id (a component whose ``version`` changed), then rebuilds
the tables:

    python -m harness.rerun results --where defense=mist --where purifier=noisy_upscale
    python -m harness.rerun results --where mimic=none,purifier=none --dry-run
    python -m harness.rerun results --check-keys     # after a refactor: are the cached results still found?
    python -m harness.rerun old-results --into results   # rows of older models, re-run on today's into results/

``--where`` takes ``label=value`` pairs joined by commas (all must hold; a value matches the whole label or its
name before ``[``); several ``--where`` select the rows any of them selects. Without ``--where``: every row.
Audits (``results/audits/*``) are re-run with their own command (``python -m harness.audit ...``, see their
report) and experiments with ``python -m harness.run experiment=<name>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.summary import load_rows
from harness.verdict import option_name

__all__ = ["overrides_of", "select", "check_keys", "main"]

log = logging.getLogger("harness.rerun")

GROUPS = ("dataset", "model", "defense", "purifier", "mimic", "metrics")


def overrides_of(row: Mapping[str, Any]) -> list[str]:
    """Hydra overrides that reproduce ``row``: each group's option and the options its label lists, the seed
    and the control. A group the row ran without (``mimic: none`` with no mimic config) is removed (``~mimic``)."""
    labels, config = row["labels"], row.get("config") or {}
    out = []
    for group in GROUPS:
        label = str(labels.get(group, ""))
        if not label:
            continue
        if label == "none" and config.get(group) is None:
            out.append(f"~{group}")
            continue
        name, _, rest = label.partition("[")
        out.append(f"{group}={name}")
        for item in filter(None, rest.rstrip("]").split(",")) if rest else []:
            out.append(f"{group}.{item}")
    out.append(f"seed={row.get('seed', 0)}")
    if labels.get("control"):
        out.append(f"control={labels['control']}")
    return out


def _matches(labels: Mapping[str, Any], condition: str) -> bool:
    for pair in condition.split(","):
        key, _, value = pair.partition("=")
        label = str(labels.get(key.strip(), ""))
        if value.strip() not in (label, option_name(label)):
            return False
    return True


def select(rows: Sequence[Mapping[str, Any]], where: Sequence[str]) -> list[Mapping[str, Any]]:
    """The rows that any ``where`` condition selects (all rows without conditions)."""
    return [r for r in rows if not where or any(_matches(r["labels"], w) for w in where)]


def check_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Compare each row's recorded stage keys with the keys today's code gives the config it recorded, without
    running anything (:func:`harness.pipeline.planned_keys`; a noise control uses the realised budget its row
    records). Returns one line per row whose keys differ (empty: every cached result is still found under its
    key). A component whose ``version`` changed since the row ran shows here too: such rows are re-run."""
    from omegaconf import OmegaConf

    from harness.errors import HarnessError
    from harness.run import build_experiment, control_of, row_planned_keys

    changed = []
    for row in rows:
        cfg = OmegaConf.create(row["config"])  # as the row ran it (option_overrides applied)
        try:
            exp = build_experiment(cfg)
        except HarnessError as err:  # an option that no longer exists (the component changed since)
            changed.append(f"{row['run_id']}: cannot build the config it recorded: {err}")
            continue
        planned, recorded = row_planned_keys(cfg, exp, control_of(cfg), row) or {}, row.get("stage_keys", {})
        differ = sorted(s for s in set(planned) | set(recorded) if planned.get(s) != recorded.get(s))
        if differ:
            changed.append(f"{row['run_id']} ({' '.join(overrides_of(row)[:6])}): stage keys differ in {differ}")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.rerun", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", help="folder holding runs/ (e.g. results)")
    parser.add_argument("--where", action="append", default=[], help="label=value[,label=value]; repeatable")
    parser.add_argument("--cache-dir", default="results/cache", help="artifact cache (default: results/cache)")
    parser.add_argument("--dry-run", action="store_true", help="print the overrides of each selected row")
    parser.add_argument(
        "--into",
        default=None,
        help="results folder for the re-run rows and their tables (default: RESULTS_DIR itself, where a row whose "
        "id changed replaces the old one); with another folder RESULTS_DIR is left as it is",
    )
    parser.add_argument(
        "--check-keys",
        action="store_true",
        help="run nothing: check that each selected row's stage keys are the ones its overrides give today",
    )
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show each run's progress bars (a re-run of finetunes or long defenses takes minutes per row)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = Path(args.results_dir)
    if not (results / "runs").is_dir():
        print(f"error: no runs/ folder in {results}", file=sys.stderr)
        return 2
    rows = select(load_rows(results), args.where)
    if not rows:
        print(f"error: no row in {results / 'runs'} matches {args.where}", file=sys.stderr)
        return 2
    if args.check_keys:
        changed = check_keys(rows)
        print("\n".join(changed) or f"the stage keys of all {len(rows)} rows are unchanged")
        return 1 if changed else 0
    from harness.run import compose_config, run_from_config
    from harness.tables import write_tables

    into = Path(args.into) if args.into else results
    for k, row in enumerate(rows, 1):
        overrides = [
            *overrides_of(row),
            f"runtime.results_dir={into}",
            f"runtime.cache_dir={args.cache_dir}",
            f"runtime.progress={'true' if args.progress else 'false'}",
        ]
        print(f"[rerun {k}/{len(rows)}] {' '.join(overrides[:-3])}", file=sys.stderr, flush=True)
        if args.dry_run:
            continue
        cfg, choices = compose_config(overrides)
        new = run_from_config(cfg, choices=choices, overrides=overrides)
        if new is not None and new["run_id"] != row["run_id"] and into == results:
            (results / "runs" / f"{row['run_id']}.json").unlink(missing_ok=True)
    if not args.dry_run:
        write_tables(into, args.cache_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
