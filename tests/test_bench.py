"""``python -m harness.bench``: both ways run the same computation (the PGD defenses reach the same objective per
image at batch 1 and batched), the table puts them side by side with the ratio, and the SD-1.5-shaped random
pipeline has SD 1.5's shapes."""

from __future__ import annotations

import json

import pytest
import torch

from harness.bench import CASES, Case, format_table, main, objective_gap, run_case

TINY = ["model.source=tiny-random", "model.resolution=32", "model.inpaint_source=null"]


def test_encoder_attack_reaches_the_same_objective_at_batch_one_and_batched():
    case = Case(
        "pg", "defense", "photoguard_encoder", overrides=("defense.steps=3",), objective="latent_distance_protected"
    )
    ref, ours = run_case(case, "cpu", batch_size=4, model_overrides=TINY, limit=3)
    assert (ref.batch, ours.batch, ref.images, ours.images) == (1, 4, 3, 3)
    assert len(ref.per_image_objective) == len(ours.per_image_objective) == 3
    assert objective_gap(ref, ours) < 1e-4
    assert ref.seconds > 0 and ours.seconds > 0 and ref.peak_mb >= 0
    table = format_table([(case, ref, ours)])
    rows = [line for line in table.splitlines() if line.startswith("| pg |")]
    assert [r.split("|")[2].strip() for r in rows] == ["reference", "ours"]
    assert rows[1].split("|")[-2].strip() == f"{ref.seconds_per_unit / ours.seconds_per_unit:.2f}x"


def test_a_finetune_counts_training_samples_and_a_purifier_images():
    lora = Case(
        "lora",
        "mimic",
        "lora",
        overrides=("mimic.steps=2", "mimic.batch_size=2", "mimic.sample_steps=1", "mimic.rank=2"),
        reference_overrides=("mimic.steps=4", "mimic.batch_size=1"),
    )
    ref, ours = run_case(lora, "cpu", model_overrides=TINY, limit=2)
    assert (ref.units, ours.units) == (4, 4)  # the same samples seen
    assert ref.objective is None and "s per sample" in format_table([(lora, ref, ours)])
    noise = Case("noise", "purifier", "gaussian_noise")
    ref, ours = run_case(noise, "cpu", model_overrides=TINY, limit=2)
    assert (ref.units, ours.units) == (2, 2)


def test_command_filters_names_refuses_unknown_ones_and_writes_its_record(tmp_path, monkeypatch, capsys):
    import harness.bench as bench

    cheap = Case("gaussian_noise", "purifier", "gaussian_noise", note="a model-free purifier")
    monkeypatch.setattr(bench, "CASES", (*CASES, cheap))
    assert main(["--only", "no-such-method", "--out", ""]) == 2
    assert "no method matches" in capsys.readouterr().err
    monkeypatch.setattr(bench, "_model_overrides", lambda device: TINY)
    assert main(["--only", "gaussian", "--limit", "2", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu.json").read_text())
    assert [r["case"] for r in record["rows"]] == ["gaussian_noise"]
    assert record["provenance"]["hardware"]["device"] == "cpu"
    md = (tmp_path / "cpu.md").read_text()
    assert "| gaussian_noise | ours |" in md
    hw = record["provenance"]["hardware"]
    assert f"{hw['torch_cpu_capability']} kernels" in md.splitlines()[2]  # the table names the machine it ran on


def test_every_case_names_an_existing_config_option():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments"
    for case in CASES:
        group = "defense" if case.group == "audit" else case.group  # an audit case names the audited defense
        assert (root / group / f"{case.option}.yaml").is_file(), case
        assert (root / "dataset" / f"{case.dataset}.yaml").is_file(), case


def test_sd15_shaped_pipeline_has_sd15_shapes_at_reduced_width():
    from harness.tiny_random import build_sd15_shaped

    pipe = build_sd15_shaped(width=1 / 10)
    unet, vae = pipe.unet.config, pipe.vae.config
    assert unet.sample_size == 64 and unet.layers_per_block == 2 and unet.attention_head_dim == 8
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert len(vae.block_out_channels) == 4 and vae.latent_channels == 4
    assert pipe.text_encoder.config.num_hidden_layers == 12
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("device", ["cuda:0"])
def test_cuda_request_without_cuda_is_one_clear_error(device, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--device", device, "--out", ""]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_audit_end_to_end_writes_the_same_rows_both_ways():
    """The audit case runs every run alone with a cache of its own, then the audit with one shared cache: the
    same runs and the same metrics (nothing the cache shares changes a result) up to floating-point summation
    order: batched and single-image convolutions differ in the last bits and 30 edit steps of a random model
    amplify that to about 1e-3 of a metric near zero; a cached stage from another run would differ wholly."""
    case = Case(
        "audit",
        "audit",
        "photoguard_encoder",
        overrides=(
            "audit=quick",
            "defense.steps=2",
            "audit.purifiers=[none]",
            "mimic.steps=2",
            "audit.threat_models.editing.dataset=held_out_photos",
        ),
    )
    at_48 = [*TINY[:1], "model.resolution=48", *TINY[2:]]  # the editing metrics need 41 px or more
    ref, ours = run_case(case, "cpu", batch_size=4, model_overrides=at_48, limit=2)
    assert ref.images == ours.images == 2
    assert len(ref.per_image_objective) == len(ours.per_image_objective) > 0
    assert objective_gap(ref, ours) < 1e-2


def test_cpu_peak_memory_sees_a_transient_allocation_after_another_was_freed():
    """The CPU measure: 50 MB in small tensors, held for 50 ms, shows as about 50 MB, right after another call
    allocated and freed 100 MB the same way (the baseline is read after freed memory is handed back)."""
    import time

    from harness.bench import measure

    def hold(megabytes: int) -> None:
        parts = [torch.ones(25_000) for _ in range(10 * megabytes)]  # 100 kB each
        time.sleep(0.05)
        del parts

    hold(100)
    _, seconds, peak = measure(lambda: hold(50), "cpu")
    assert seconds >= 0.05 and 40 <= peak <= 120, peak


@pytest.mark.parametrize("case", [c for c in CASES if c.objective], ids=lambda c: c.name)
def test_each_defense_case_reads_the_objective_its_defense_reports(case):
    """Every defense row's objective key is one its defense writes (one PGD step on tiny-random, 2 images)."""
    import dataclasses

    short = dataclasses.replace(
        case, overrides=(*(o for o in case.overrides if not o.startswith("defense.steps=")), "defense.steps=1")
    )
    ref, ours = run_case(short, "cpu", model_overrides=TINY, limit=2)
    assert ref.objective is not None and ours.objective is not None
    assert objective_gap(ref, ours) < 1e-3
