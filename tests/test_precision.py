"""trainer.precision=auto: bf16 only where the device runs it natively, judged from the CPU's own flags."""

import logging

import pytest
import torch

from mnist_sweep import config, training

CPU = torch.device("cpu")
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}  # an AMD EPYC of the project's machines: bf16 is emulated there
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}
AMX = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16"}


@pytest.mark.parametrize(("flags", "expected"), [(AVX2_ONLY, "fp32"), (AVX512_BF16, "bf16"), (AMX, "bf16")])
def test_auto_picks_bf16_only_on_cpus_with_native_bf16(flags, expected, caplog):
    with caplog.at_level(logging.WARNING):
        assert training.resolve_precision("auto", CPU, flags) == expected
    assert not caplog.records  # auto never warns


def test_explicit_bf16_on_a_cpu_without_it_still_runs_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert training.resolve_precision("bf16", CPU, AVX2_ONLY) == "bf16"
    (record,) = caplog.records
    assert "no native bf16" in record.getMessage() and "trainer.precision=auto" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert training.resolve_precision("bf16", CPU, AMX) == "bf16"
        assert training.resolve_precision("fp32", CPU, AMX) == "fp32"  # an explicit choice is kept as it is
    assert not caplog.records


def test_the_flags_are_read_from_this_machine():
    flags = training.cpu_flags()
    with open("/proc/cpuinfo") as f:
        assert ("avx512_bf16" in f.read()) == ("avx512_bf16" in flags)
    assert training.native_bf16(CPU) == bool(training.NATIVE_BF16_FLAGS & flags)


def test_auto_is_the_default_and_unknown_values_are_refused():
    assert config.TrainerConfig().precision == "auto"
    with pytest.raises(config.ConfigError, match=r"trainer.precision=fp16 is invalid: choose auto, fp32 or bf16"):
        config.TrainerConfig(precision="fp16")


@pytest.mark.parametrize(("isa", "native"), [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True)])
def test_onednn_held_below_bf16_counts_as_emulated(isa, native):
    """ONEDNN_MAX_CPU_ISA keeps oneDNN (torch's CPU matmuls) below the CPU's level: bf16 is emulated there."""
    assert training.native_bf16(CPU, AMX, {"ONEDNN_MAX_CPU_ISA": isa}) is native
    assert training.native_bf16(CPU, AMX, {"DNNL_MAX_CPU_ISA": isa}) is native  # its older name
    assert training.native_bf16(CPU, AMX, {}) is True
    assert training.native_bf16(CPU, AVX2_ONLY, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}) is False
