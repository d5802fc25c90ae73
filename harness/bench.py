"""Speed and memory side by side: ``python -m harness.bench``, the reference way beside the harness's, in one run.

For each method the same inputs go through two ways of running the same computation:

- **reference**: the published per-image loop as the paper's code runs it: one image at a time (batch 1), in
  the paper's precision, nothing cached or shared between images. It calls the harness's own implementation of
  the method (the one the audits run, checked against the papers in ``docs/methods.md``) on one image at a
  time, so the two ways differ only in how they run, not in what they compute.
- **ours**: the harness as an audit runs it: the whole set in batches of ``--batch-size``.

Each row gives seconds per image, the peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak
resident set size above the process's level before the call, sampled every 5 ms, after freed memory is handed
back to the system so that the level is what is live), the method's own objective
reached (the PGD defenses: their published objective on the protected images, lower or higher as the method
wants; both ways must reach the same value, so that a faster way is not a weaker attack), and the ratio of
the reference's seconds per image to ours.

The PGD defenses run with per-image random streams (:mod:`harness.pgd`), so batch 1 and batch N draw the same
noise and their objectives agree up to floating-point summation order; the bench prints both and the largest
relative difference. Purifiers that draw noise draw it per image as well.

On CPU the methods run on the embedded world (``tiny-sd`` at 128 px, the held-out photos, the held-out
artist's posted artworks) with step counts cut so that the whole table takes minutes on 2 cores; each row says
which steps it ran. On CUDA the same cases run at 512 px on SD-1.5-shaped pipelines with random weights
(compute does not depend on the weights' values; ``harness.tiny_random.save_sd15_shaped``).

    python -m harness.bench --device cpu                       # every method, CPU table
    python -m harness.bench --device cpu --only photoguard      # methods whose name contains "photoguard"
    python -m harness.bench --device cuda --out results/benchmarks

The table (markdown) and a JSON record with hardware, versions and the commit are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Case", "CASES", "Measurement", "measure", "run_case", "format_table", "main"]

#: where the committed benchmark records live
DEFAULT_OUT = Path("results/benchmarks")


@dataclass(frozen=True)
class Case:
    """One method to benchmark.

    Attributes:
        name: the row's name (``--only`` matches substrings of it).
        group: the config group of the component ("defense", "purifier" or "mimic").
        option: the option in that group (a file under ``experiments/<group>/``).
        overrides: Hydra overrides for both ways on CPU (cut step counts; say so in ``note``).
        cuda_overrides: the same on CUDA (empty: the published settings).
        dataset: the dataset option the inputs come from.
        objective: the key of the defense's report whose value both ways must reach (``<name>_protected``),
            or None when the method has none (purifiers, finetunes).
        reference_dtype: the paper's weight precision on CUDA (CPU always runs float32).
        reference_overrides: overrides that make the reference way the paper's (e.g. a LoRA's batch 1).
        per_image_units: how a mimic's work is counted per image (``samples``: training samples seen).
        note: what the row cuts or changes, printed under the table.
    """

    name: str
    group: str
    option: str
    overrides: tuple[str, ...] = ()
    cuda_overrides: tuple[str, ...] = ()
    dataset: str = "held_out_photos"
    objective: str | None = None
    reference_dtype: str = "float32"
    reference_overrides: tuple[str, ...] = ()
    note: str = ""


CASES: tuple[Case, ...] = (
    Case(
        "photoguard_encoder",
        "defense",
        "photoguard_encoder",
        overrides=("defense.steps=100",),
        objective="latent_distance_protected",
        reference_dtype="float16",
        note="PhotoGuard's encoder attack, 100 of its 1000 PGD steps on CPU (all 1000 on CUDA); the reference "
        "notebook runs batch 1 with fp16 weights",
    ),
    Case(
        "photoguard_diffusion",
        "defense",
        "photoguard_diffusion",
        overrides=("defense.steps=4", "defense.grad_repeats=2"),
        cuda_overrides=("defense.steps=10", "defense.gradient_checkpointing=true"),
        objective="output_distance_protected",
        reference_dtype="float16",
        note="PhotoGuard's diffusion attack, 4 of 200 steps with 2 of 10 gradient repeats on CPU (10 steps on "
        "CUDA, with gradient checkpointing as the 20 GB target needs)",
    ),
    Case(
        "mist",
        "defense",
        "mist",
        overrides=("defense.steps=20",),
        dataset="held_out_artist",
        objective="fused_loss_protected",
        note="Mist (fused textural and semantic loss), 20 of its 100 steps on CPU",
    ),
    Case(
        "noisy_upscale",
        "purifier",
        "noisy_upscale",
        dataset="held_out_artist",
        note="noisy upscaling (Gaussian noise, 4x down, Real-ESRGAN x4plus run with PyTorch)",
    ),
    Case(
        "diffpure",
        "purifier",
        "diffpure",
        dataset="held_out_artist",
        note="DiffPure through the attacker's model (img2img at t* = 0.1, 10 denoising steps)",
    ),
    Case(
        "audit_quick",
        "audit",
        "photoguard_encoder",
        overrides=("audit=quick", "defense.steps=100", "audit.purifiers=[none,jpeg]"),
        cuda_overrides=("audit=quick",),
        note="the README's quick audit end to end, cut on CPU to 100 PGD steps and the purifiers none and JPEG; "
        "the reference runs each of its runs alone (a cache of its own, batch 1: nothing shared between runs, "
        "as separate scripts would), ours is `python -m harness.audit` (one cache, batched); per image: per "
        "image of the audited set, whole audit",
    ),
    Case(
        "lora_step",
        "mimic",
        "lora",
        overrides=("mimic.steps=8", "mimic.batch_size=16", "mimic.sample_steps=1"),
        reference_overrides=("mimic.steps=128", "mimic.batch_size=1"),
        dataset="held_out_artist",
        note="LoRA finetune: the same 128 training samples at batch 1 (the reference) and at batch 16 (ours), "
        "plus one 1-step generation per image; seconds per training sample",
    ),
)


@dataclass
class Measurement:
    """One way of running one case."""

    way: str
    images: int
    batch: int
    dtype: str
    seconds: float
    peak_mb: float
    objective: float | None = None
    per_image_objective: list[float] = field(default_factory=list)
    units: int = 0  # the work counted per "image" (images, or training samples for a finetune)

    @property
    def seconds_per_unit(self) -> float:
        return self.seconds / max(1, self.units or self.images)


def _release_freed_memory() -> None:
    """Hand memory that freed tensors left in the C allocator's arenas back to the system (glibc ``malloc_trim``),
    so that the resident set before a measured call is what is live, not what an earlier case left behind."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline then includes what earlier cases freed
        pass


class _PeakRSS:
    """Peak resident set size (MB) above the level at entry, sampled every 5 ms on a thread (Linux)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page / 2**20
        except OSError:
            return 0.0

    def __enter__(self) -> _PeakRSS:
        _release_freed_memory()
        self.base = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


def measure(fn: Callable[[], Any], device: str) -> tuple[Any, float, float]:
    """Run ``fn`` once: (its result, wall seconds, peak memory in MB as the module docstring defines it)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, rss.peak


def _compose(case: Case, device: str, model_overrides: Sequence[str], extra: Sequence[str]) -> Any:
    from harness.run import build_experiment, compose_config

    overrides = [
        f"{case.group}={case.option}",
        f"dataset={case.dataset}",
        *model_overrides,
        *(case.cuda_overrides if device.startswith("cuda") else case.overrides),
        *extra,
    ]
    cfg, _ = compose_config(overrides)
    return build_experiment(cfg)


def _call(case: Case, exp: Any, images: Any, ctx: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    """One call of the case's component on ``images`` (an ImageSet at the size the pipeline gives it)."""
    from harness.seeding import make_generator

    component = getattr(exp, case.group)
    if case.group == "defense":
        out = component.protect(images, make_generator(seed), ctx)
        return out.images, dict(out.info)
    if case.group == "purifier":
        return component.purify(images, make_generator(seed), ctx), {}
    return component.run(images, make_generator(seed), ctx), {}


def run_case(
    case: Case,
    device: str = "cpu",
    batch_size: int = 8,
    model_overrides: Sequence[str] = (),
    limit: int | None = None,
    seed: int = 0,
) -> tuple[Measurement, Measurement]:
    """Run ``case`` the reference way (each image alone, the paper's precision) and ours (batched): the two
    :class:`Measurement` s, reference first. The model is loaded and warmed up before either is timed."""
    if case.group == "audit":
        return _run_audit_case(case, device, batch_size, model_overrides, limit)
    from harness.pipeline import for_component
    from harness.protocols import Context

    cuda = device.startswith("cuda")
    ref_dtype = case.reference_dtype if cuda else "float32"
    ours_exp = _compose(case, device, model_overrides, [])
    ref_exp = _compose(case, device, model_overrides, [*case.reference_overrides, f"model.dtype={ref_dtype}"])
    images = ours_exp.dataset.load()
    if limit:
        images = images.select(slice(0, limit))
    component = getattr(ours_exp, case.group)
    ours_ctx = Context(device=device, batch_size=batch_size, model=ours_exp.model)
    ref_ctx = Context(device=device, batch_size=1, model=ref_exp.model)
    given = for_component(component, images, ours_ctx)
    for ctx in (ref_ctx, ours_ctx):  # load (and memoize) the pipelines outside the timed calls
        for task in ("img2img", "text2img"):
            try:
                ctx.pipeline(task)
            except Exception:  # noqa: BLE001 (a model without that task: the component will not ask for it)
                pass

    def reference() -> list[tuple[Any, dict[str, Any]]]:
        if case.group == "mimic":  # a finetune learns from the whole set: its reference differs in batch size
            return [_call(case, ref_exp, given, ref_ctx, seed)]
        return [_call(case, ref_exp, given.select(slice(i, i + 1)), ref_ctx, seed) for i in range(len(given))]

    def ours() -> tuple[Any, dict[str, Any]]:
        return _call(case, ours_exp, given, ours_ctx, seed)

    ref_out, ref_s, ref_mb = measure(reference, device)
    ours_out, ours_s, ours_mb = measure(ours, device)
    units_ref = units_ours = len(given)
    if case.group == "mimic":  # training samples seen: steps x batch
        units_ref = int(ref_exp.mimic.steps) * int(ref_exp.mimic.batch_size)
        units_ours = int(ours_exp.mimic.steps) * int(ours_exp.mimic.batch_size)
    ref_m = Measurement("reference", len(given), 1, ref_dtype, ref_s, ref_mb, units=units_ref)
    ours_m = Measurement("ours", len(given), batch_size, str(ours_exp.model.dtype), ours_s, ours_mb, units=units_ours)
    if case.objective:
        key = case.objective.removesuffix("_protected")
        ref_m.per_image_objective = [info[f"{key}_per_image"]["protected"][0] for _, info in ref_out]
        ours_m.per_image_objective = list(ours_out[1][f"{key}_per_image"]["protected"])
        ref_m.objective = sum(ref_m.per_image_objective) / len(ref_m.per_image_objective)
        ours_m.objective = float(ours_out[1][case.objective])
    return ref_m, ours_m


def _run_audit_case(
    case: Case, device: str, batch_size: int, model_overrides: Sequence[str], limit: int | None
) -> tuple[Measurement, Measurement]:
    """The audit end to end, both ways from empty caches in a temporary folder; both must write the same rows
    (their metrics go into ``per_image_objective``, in run id and metric order, so that the table flags any
    difference)."""
    import tempfile

    from harness.audit import audit_runs, run_audit
    from harness.run import build_experiment, compose_config, run_from_config
    from harness.summary import load_rows

    chosen = case.cuda_overrides if device.startswith("cuda") else case.overrides
    base = [f"defense={case.option}", *chosen, *model_overrides, f"runtime.device={device}", "runtime.progress=false"]
    if limit:
        base.append(f"dataset.limit={limit}")
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        root = Path(tmp)
        cells = audit_runs(base)
        first, _ = compose_config(cells[0])
        n_images = len(build_experiment(first).dataset.load())

        def reference() -> None:
            for k, cell in enumerate(cells):
                own = [f"runtime.cache_dir={root / 'ref-cache' / str(k)}", f"runtime.results_dir={root / 'ref'}"]
                cfg, choices = compose_config([*cell, *own, "runtime.batch_size=1"])
                run_from_config(cfg, choices=choices, overrides=cell)

        def ours() -> None:
            shared = [f"runtime.cache_dir={root / 'ours-cache'}", f"runtime.results_dir={root / 'ours'}"]
            run_audit([*base, *shared, f"runtime.batch_size={batch_size}"])

        _, ref_s, ref_mb = measure(reference, device)
        _, ours_s, ours_mb = measure(ours, device)
        ref_rows = {r["run_id"]: r for r in load_rows(root / "ref")}
        ours_rows = {r["run_id"]: r for r in load_rows(next((root / "ours" / "audits").iterdir()))}
    if set(ref_rows) != set(ours_rows):
        raise RuntimeError(f"audit bench: the two ways wrote different runs ({len(ref_rows)} vs {len(ours_rows)})")
    dtype = str(build_experiment(first).model.dtype)
    ref_m = Measurement("reference", n_images, 1, dtype, ref_s, ref_mb)
    ours_m = Measurement("ours", n_images, batch_size, dtype, ours_s, ours_mb)
    for m, rows in ((ref_m, ref_rows), (ours_m, ours_rows)):
        m.per_image_objective = [
            float(v) for i in sorted(rows) for _, v in sorted(rows[i]["metrics"].items()) if isinstance(v, int | float)
        ]
    return ref_m, ours_m


def _fmt_mb(mb: float) -> str:
    return f"{mb:,.0f}" if mb >= 10 else f"{mb:.1f}"


def format_table(results: Sequence[tuple[Case, Measurement, Measurement]]) -> str:
    """The markdown table: one row per way, the ratio on ours' row."""
    lines = [
        "| method | way | images | batch | precision | s per image | peak MB | objective reached | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, ref, ours in results:
        unit = "s per sample" if case.group == "mimic" else ""
        for m in (ref, ours):
            objective = "" if m.objective is None else f"{m.objective:.4g}"
            ratio = f"{ref.seconds_per_unit / m.seconds_per_unit:.2f}x" if m is ours else "1 (reference)"
            per = f"{m.seconds_per_unit:.3g}" + (f" ({unit})" if unit else "")
            lines.append(
                f"| {case.name} | {m.way} | {m.images} | {m.batch} | {m.dtype} | {per} | {_fmt_mb(m.peak_mb)} | "
                f"{objective} | {ratio} |"
            )
    notes = [f"- {case.name}: {case.note}" for case, _, _ in results if case.note]
    mismatches = [
        f"- {case.name}: {_compared(case)} differ by {objective_gap(ref, ours):.2%} at the most"
        for case, ref, ours in results
        if ref.per_image_objective and objective_gap(ref, ours) > 1e-3
    ]
    return "\n".join(lines + ([""] + notes if notes else []) + ([""] + mismatches if mismatches else [])) + "\n"


def _compared(case: Case) -> str:
    """What the two ways of ``case`` must agree on, in words."""
    return "the two ways' result rows (each metric)" if case.group == "audit" else "the per-image objectives"


def objective_gap(ref: Measurement, ours: Measurement) -> float:
    """The largest relative difference between the two ways' per-image objectives (0 when equal)."""

    def gap(a: float, b: float) -> float:
        if math.isnan(a) or math.isnan(b):
            return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
        return abs(a - b) / max(abs(a), 1e-12)

    pairs = zip(ref.per_image_objective, ours.per_image_objective, strict=True)
    return max((gap(a, b) for a, b in pairs), default=0.0)


def _model_overrides(device: str) -> list[str]:
    """The model both ways run: the embedded default on CPU; on CUDA an SD-1.5-shaped pipeline with random
    weights at 512 px, written once to a temporary folder."""
    if not device.startswith("cuda"):
        return []
    from harness.tiny_random import save_sd15_shaped

    folder = save_sd15_shaped(Path(os.environ.get("TMPDIR", "/tmp")) / "harness-bench-sd15")
    return [f"model.source={folder}", "model.resolution=512", "model.inpaint_source=null", "model.dtype=float16"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--only", nargs="*", default=[], help="run the methods whose names contain any of these")
    parser.add_argument("--batch-size", type=int, default=16, help="ours' batch size")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per method")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the table and its record ('' : none)")
    args = parser.parse_args(argv)
    from harness.errors import HarnessError
    from harness.provenance import provenance

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in CASES if not args.only or any(s in c.name for s in args.only)]
    if not cases:
        print(f"--only {args.only}: no method matches; methods: {[c.name for c in CASES]}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available on this machine", file=sys.stderr)
        return 2
    model_overrides = _model_overrides(args.device)
    results = []
    t0 = time.time()
    for case in cases:
        print(f"[bench] {case.name} ...", file=sys.stderr, flush=True)
        try:
            ref, ours = run_case(case, args.device, args.batch_size, model_overrides, args.limit)
        except HarnessError as err:
            print(f"[bench] {case.name}: {err}", file=sys.stderr)
            return 2
        results.append((case, ref, ours))
        print("\n".join(format_table([(case, ref, ours)]).splitlines()[2:4]), file=sys.stderr, flush=True)
    table = format_table(results)
    prov = provenance(args.device)
    hw = prov["hardware"]
    if args.device.startswith("cuda"):
        machine = ", ".join(hw.get("gpus", []))
    else:
        machine = f"{hw['cpu_model'] or hw['machine']}, {hw['torch_cpu_capability']} kernels"
    head = (
        f"Device {args.device} ({machine}), {torch.get_num_threads()} threads; whole run {time.time() - t0:.0f} s.\n\n"
    )
    print(head + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "cuda" if args.device.startswith("cuda") else "cpu"
        (out / f"{stem}.md").write_text(f"# `python -m harness.bench --device {args.device}`\n\n" + head + table)
        record = {
            "command": "python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.time() - t0, 1),
            "provenance": prov,
            "rows": [{"case": c.name, "note": c.note, "reference": vars(r), "ours": vars(o)} for c, r, o in results],
        }
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
