"""Rebuild every table and report from the result rows: ``python -m harness.tables``.

For a results folder: the summary tables (:mod:`harness.summary`), the report of the experiment whose rows
it holds (:mod:`harness.experiment_report`); with ``python -m harness.tables`` also every experiment under
``<results-dir>/experiments/`` and every audit report under ``<results-dir>/audits/`` (:mod:`harness.audit`),
re-rendered with the current verdict rules. Nothing is computed anew: a second run changes no file.

    python -m harness.tables --results-dir results

:class:`RebuildTables` is the Hydra callback (``experiments/config.yaml``) that calls :func:`write_tables`
after every run and sweep of ``python -m harness.run``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.audit import rebuild_reports
from harness.experiment_report import write_experiment_report
from harness.summary import load_rows, write_summary

__all__ = ["write_tables", "RebuildTables", "main"]

log = logging.getLogger(__name__)


def write_tables(results_dir: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """Rebuild ``tables/`` from all rows of ``results_dir`` and, for the rows of an experiment with a ``report``
    section, its ``report.md`` (grids from ``cache_dir``). Returns the tables folder, or None without rows."""
    results_dir = Path(results_dir)
    rows = load_rows(results_dir)
    if not rows:
        log.warning("no result rows in %s; no tables written", results_dir / "runs")
        return None
    summary = write_summary(results_dir, rows)
    write_experiment_report(results_dir, rows, cache_dir, summary=summary)
    out = results_dir / "tables"
    log.info("tables rebuilt from %d rows: %s", len(rows), out / "summary.md")
    return out


class RebuildTables(Callback):
    """Hydra callback: rebuild the summary tables after a single run and after a whole sweep."""

    def _rebuild(self, config: DictConfig) -> None:
        try:
            results_dir = config.runtime.results_dir
        except Exception:  # the config of a failed composition
            return
        with contextlib.suppress(FileNotFoundError):
            write_tables(results_dir, config.runtime.get("cache_dir"))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._rebuild(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._rebuild(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="results", help="folder holding runs/ (default: results)")
    parser.add_argument(
        "--cache-dir",
        default="results/cache",
        help="artifact cache for the experiments' image grids (default: results/cache)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = Path(args.results_dir)
    experiments = sorted((results / "experiments").glob("*/runs"))
    audits = sorted((results / "audits").glob("*/runs"))
    if not ((results / "runs").is_dir() or experiments or audits):
        print(
            f"error: --results-dir {args.results_dir} holds no runs/ folder, no experiments/*/runs and no audits/*/runs",
            file=sys.stderr,
        )
        return 2
    # the loose rows' tables (a results folder may hold only experiments and audits, each with its own rows)
    out = write_tables(results, args.cache_dir) if (results / "runs").is_dir() else None
    # the experiments that reproduce published tables keep their rows in <results-dir>/experiments/<name>/runs
    made = [t for runs in experiments if (t := write_tables(runs.parent, args.cache_dir)) is not None]
    made += rebuild_reports(results, args.cache_dir)
    if out is not None:
        print((out / "summary.md").read_text())
    elif not made:
        print(f"error: no result rows under {args.results_dir}", file=sys.stderr)
        return 1
    else:
        print(f"rebuilt {len(made)} experiment tables and audit reports under {args.results_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
