"""What a row records about the machine that computed it."""

import platform

import torch

from harness.provenance import cpu_model, hardware


def test_cpu_model_reads_the_first_model_name_of_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n\n"
        "processor\t: 1\nmodel name\t: another\n"
    )
    assert cpu_model(info) == "AMD EPYC 9654 96-Core Processor"


def test_cpu_model_falls_back_to_platform_without_cpuinfo(tmp_path):
    assert cpu_model(tmp_path / "absent") == (platform.processor() or None)
    empty = tmp_path / "empty"
    empty.write_text("processor\t: 0\nmodel name\t:   \n")
    assert cpu_model(empty) == (platform.processor() or None)


def test_hardware_names_the_vector_instruction_set_torch_dispatches_to():
    info = hardware("cpu")
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_cpu_capability"]  # e.g. "AVX2", "AVX512", "DEFAULT"
    assert info["torch_threads"] == torch.get_num_threads()
