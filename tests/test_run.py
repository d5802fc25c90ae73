"""End to end: the Hydra sweep writes rows and tables, re-runs come from the cache, a killed sweep resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

FAST = ["dataset.limit=2", "mimic.steps=4", "runtime.progress=false"]
SWEEP = ["-m", "defense=none,noise", "purifier=none,jpeg", "seed=0,1"]


def harness_cmd(results: Path, cache: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "harness.run",
        *args,
        f"runtime.results_dir={results}",
        f"runtime.cache_dir={cache}",
        *FAST,
    ]


def run(cmd, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def rows(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))}


def snapshot(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    results, cache = base / "R", base / "C"
    run(harness_cmd(results, cache, *SWEEP))
    return results, cache


def test_sweep_writes_eight_rows_and_tables(sweep):
    results, cache = sweep
    got = rows(results)
    assert len(got) == 8
    for row in got.values():
        assert {"config", "stage_keys", "metrics", "budget", "stages", "seeds", "provenance"} <= set(row)
        assert "runtime" in row["config"]
        assert row["provenance"]["packages"]["torch"]
        assert set(row["stages"]) == {"data", "protect", "purify", "mimic", "mimic_clean", "measure"}
        if row["labels"]["defense"] == "noise":
            assert row["budget"]["linf_max"] <= 8 / 255 + 1 / 255
            assert all(v > 0 for v in row["per_image"]["budget/latent_l2"])  # noise moves the latent
            if row["labels"]["purifier"] == "none":  # no purifier: the latent shift is left as it was
                assert all(abs(v - 1) < 1e-6 for v in row["per_image"]["purified/latent_l2_ratio"])
        else:
            assert all(v != v for v in row["per_image"]["purified/latent_l2_ratio"])  # nan: nothing to undo
    # the budget is cached once per purified image set (the key its values depend on), beside the stages
    assert len(list((cache / "budget").glob("*/*/meta.json"))) == len({r["stage_keys"]["purify"] for r in got.values()})
    summary = (results / "tables" / "summary.csv").read_text().strip().splitlines()
    assert len(summary) == 1 + 4 + 2  # header + defense x purifier x mimic + the best-of row per defense
    assert sum("best-of (2)" in line for line in summary) == 2
    assert "editing/ssim" in (results / "tables" / "summary.md").read_text()


def test_rerun_is_served_from_cache_and_rewrites_nothing(sweep):
    results, cache = sweep
    before_rows, before = rows(results), snapshot(cache)
    out = run(harness_cmd(results, cache, *SWEEP))
    assert " computed " not in out
    after_rows = rows(results)
    assert before_rows.keys() == after_rows.keys()
    for k, row in after_rows.items():
        assert all(s["cached"] for s in row["stages"].values())
        assert row["per_image"] == before_rows[k]["per_image"]
        assert list(row["per_image"]) == list(before_rows[k]["per_image"])  # the cached budget keeps the order
    assert snapshot(cache) == before


def test_changing_only_the_purifier_reuses_protections_and_runtime_never_changes_keys(sweep, tmp_path):
    results, cache = sweep
    run(
        harness_cmd(
            tmp_path / "R", cache, "defense=noise", "purifier=jpeg", "purifier.quality=50", "runtime.batch_size=1"
        )
    )
    (row,) = rows(tmp_path / "R").values()
    assert row["stages"]["data"]["cached"] and row["stages"]["protect"]["cached"]
    assert not row["stages"]["purify"]["cached"]
    assert row["stages"]["mimic_clean"]["cached"]  # batch size is a runtime setting


def test_killed_sweep_resumes_to_the_same_rows(sweep, tmp_path):
    results_ref, _ = sweep
    results, cache = tmp_path / "R", tmp_path / "C"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        harness_cmd(results, cache, *SWEEP),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((results / "runs").glob("*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((results / "runs").glob("*.json"))) < 8, "the sweep finished before it could be killed"
    run(harness_cmd(results, cache, *SWEEP))
    got, ref = rows(results), rows(results_ref)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k]["per_image"] == ref[k]["per_image"]
        assert got[k]["stage_keys"] == ref[k]["stage_keys"]


def test_joblib_launcher_with_a_shared_cache_gives_the_same_rows(sweep, tmp_path):
    results_ref, _ = sweep
    run(harness_cmd(tmp_path / "R", tmp_path / "C", *SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"))
    got, ref = rows(tmp_path / "R"), rows(results_ref)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k]["stage_keys"] == ref[k]["stage_keys"]
        for m, values in ref[k]["per_image"].items():
            if "latent" in m:  # measured through the VAE: other thread counts round float sums differently
                assert got[k]["per_image"][m] == pytest.approx(values, rel=1e-4, nan_ok=True)
            elif m.startswith(("budget/", "purified/")):  # CPU noise and JPEG: bit-exact
                assert got[k]["per_image"][m] == values
            else:  # model outputs: joblib workers use other thread counts, so float sums may round differently
                assert got[k]["per_image"][m] == pytest.approx(values, rel=0.02)


def test_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    run(harness_cmd(tmp_path / "R", tmp_path / "C", "-m", "defense=noise", "hydra/launcher=local_processes"))
    assert len(rows(tmp_path / "R")) == 1


def test_tables_cli_rebuilds_identically(sweep, tmp_path):
    results, _ = sweep
    md = (results / "tables" / "summary.md").read_text()
    run([sys.executable, "-m", "harness.tables", "--results-dir", str(results)])
    assert (results / "tables" / "summary.md").read_text() == md


@pytest.mark.parametrize(
    "args,needle",
    [
        (["defense=nosuchdefense"], "nosuchdefense"),
        (["defense=noise", "defense.eps=2"], "defense.eps"),
        (["dataset=folder", "dataset.path=/no/such/folder"], "/no/such/folder"),
        (["model=local", "model.source=/no/such/model"], "/no/such/model"),
    ],
)
def test_bad_options_give_one_clear_error(tmp_path, args, needle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        harness_cmd(tmp_path / "R", tmp_path / "C", *args),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


def test_reuse_rows_returns_a_committed_row_without_the_cache_and_only_when_its_keys_match(tmp_path):
    """runtime.reuse_rows=true: a run whose row is already in runs/ (same labels, seed and stage keys) returns it
    and computes nothing, with an empty cache (a fresh clone of committed results); a noise control finds its row
    through the realised budget the row records; a row whose keys differ from today's is computed again."""
    results, first_cache, empty = tmp_path / "R", tmp_path / "C1", tmp_path / "C2"
    args = ["defense=photoguard_encoder", "defense.steps=2", "model=tiny-random", "seed=3"]
    run(harness_cmd(results, first_cache, *args))
    run(harness_cmd(results, first_cache, *args, "control=noise"))
    before = {p.name: p.read_text() for p in (results / "runs").glob("*.json")}
    assert len(before) == 2
    for extra in ([], ["control=noise"]):
        out = run(harness_cmd(results, empty, *args, *extra, "runtime.reuse_rows=true"))
        assert "reused" in out
    assert not empty.exists() or not any(p.is_file() for p in empty.rglob("*"))  # nothing computed
    assert {p.name: p.read_text() for p in (results / "runs").glob("*.json")} == before  # rows untouched
    # a row whose recorded keys are not today's is not reused: the run computes (into the empty cache)
    name, text = next(iter(before.items()))
    row = json.loads(text)
    row["stage_keys"]["protect"] = "0" * 40
    (results / "runs" / name).write_text(json.dumps(row))
    extra = ["control=noise"] if row["labels"]["control"] == "noise" else []
    out = run(harness_cmd(results, empty, *args, *extra, "runtime.reuse_rows=true"))
    assert "reused" not in out and any(p.is_file() for p in empty.rglob("*"))


def test_reuse_rows_gives_a_clean_control_the_results_of_another_defenses_clean_control(tmp_path):
    """The clean control does not run the defense: with runtime.reuse_rows=true and no cache, the clean control
    of a second defense takes the results of the first's (same stage keys), relabelled, naming that row, and
    computes nothing; the second defense's own row is computed, not taken from another defense."""
    results, first_cache, empty = tmp_path / "R", tmp_path / "C1", tmp_path / "C2"
    common = ["defense.steps=2", "model=tiny-random", "seed=3", "control=clean"]
    run(harness_cmd(results, first_cache, "defense=photoguard_encoder", *common))
    (source,) = rows(results).values()
    out = run(harness_cmd(results, empty, "defense=photoguard_encoder_inpaint", *common, "runtime.reuse_rows=true"))
    assert "the results of row" in out
    assert not empty.exists() or not any(p.is_file() for p in empty.rglob("*"))  # nothing computed
    (shared,) = (r for r in rows(results).values() if r["run_id"] != source["run_id"])
    assert shared["labels"] == {**source["labels"], "defense": "photoguard_encoder_inpaint[steps=2]"}
    assert shared["results_of"] == source["run_id"] and shared["config"]["defense"] != source["config"]["defense"]
    assert shared["stage_keys"] == source["stage_keys"] and shared["per_image"] == source["per_image"]
    # a second pass finds the relabelled row itself; the defense's own row is never taken from another's
    out = run(harness_cmd(results, empty, "defense=photoguard_encoder_inpaint", *common, "runtime.reuse_rows=true"))
    assert "reused" in out and len(rows(results)) == 2
    own = [a for a in common if a != "control=clean"]
    out = run(harness_cmd(results, empty, "defense=photoguard_encoder_inpaint", *own, "runtime.reuse_rows=true"))
    assert "the results of row" not in out and "reused" not in out and any(p.is_file() for p in empty.rglob("*"))


def test_rerun_into_another_folder_writes_the_selected_rows_there_and_leaves_the_source(sweep, tmp_path):
    """python -m harness.rerun SRC --where ... --into DST: the selected rows re-run from what their labels record
    (here all from the cache) land in DST with their tables; SRC keeps its rows as they were."""
    from harness.rerun import main

    results, cache = sweep
    before = rows(results)
    args = [
        str(results),
        "--where",
        "defense=noise,purifier=jpeg",
        "--cache-dir",
        str(cache),
        "--into",
        str(tmp_path / "D"),
    ]
    assert main(args) == 0
    selected = {k for k, r in before.items() if r["labels"]["defense"] == "noise" and r["labels"]["purifier"] == "jpeg"}
    new = rows(tmp_path / "D")
    assert len(selected) == 2 and new.keys() == selected  # one row per seed, the same ids
    for k, row in new.items():
        assert row["per_image"] == before[k]["per_image"] and all(s["cached"] for s in row["stages"].values())
    assert rows(results) == before and (tmp_path / "D" / "tables" / "summary.md").is_file()


def test_rerun_shows_progress_bars_only_when_asked(sweep, tmp_path, monkeypatch):
    """--progress passes runtime.progress=true to every re-run (long rows show their bars); by default false."""
    import harness.rerun as rerun
    import harness.run
    import harness.tables

    seen = []

    def capture(cfg, choices=None, overrides=(), row_extra=None):
        seen.append(bool(cfg.runtime.progress))
        return None

    monkeypatch.setattr(harness.run, "run_from_config", capture)
    monkeypatch.setattr(harness.tables, "write_tables", lambda *a, **k: None)
    results, cache = sweep
    base = [str(results), "--where", "defense=noise,purifier=jpeg", "--cache-dir", str(cache), "--into", str(tmp_path)]
    assert rerun.main(base) == 0 and seen == [False, False]
    assert rerun.main([*base, "--progress"]) == 0 and seen[2:] == [True, True]


def test_sweep_skip_takes_out_the_matching_cells_only_and_names_an_unknown_option(tmp_path):
    """An experiment's ``sweep_skip``: a cell that matches every option of one entry (a value or a list of
    values) is not run and writes no row; a cell that differs in one option runs; an option the config does not
    have is an error naming it, whether or not the other options match."""
    from harness.errors import HarnessError
    from harness.run import compose_config, control_of, run_from_config, skipped_cell

    rule = "+sweep_skip=[{purifier: jpeg, control: [noise, clean], defense.eps: 0.03}]"
    common = [
        "model=tiny-random",
        "defense=noise",
        f"runtime.results_dir={tmp_path / 'R'}",
        f"runtime.cache_dir={tmp_path / 'C'}",
        "runtime.progress=false",
        rule,
    ]
    for extra, skipped in (
        (["purifier=jpeg", "control=noise", "defense.eps=0.03"], True),
        (["purifier=jpeg", "control=clean", "defense.eps=0.03"], True),
        (["purifier=jpeg", "defense.eps=0.03"], False),  # control null is not in the list
        (["purifier=none", "control=noise", "defense.eps=0.03"], False),
        (["purifier=jpeg", "control=noise", "defense.eps=0.05"], False),
    ):
        cfg, choices = compose_config([*common, *extra])
        assert (skipped_cell(cfg, choices, control_of(cfg)) is not None) == skipped, extra
    cfg, choices = compose_config([*common, "purifier=jpeg", "control=noise", "defense.eps=0.03"])
    assert run_from_config(cfg, choices=choices) is None
    assert not (tmp_path / "R" / "runs").exists() or not list((tmp_path / "R" / "runs").glob("*.json"))
    cfg, choices = compose_config([*common[:-1], "+sweep_skip=[{purifier: jpeg, defense.no_such_option: 1}]"])
    with pytest.raises(HarnessError, match="defense.no_such_option"):
        skipped_cell(cfg, choices, None)
