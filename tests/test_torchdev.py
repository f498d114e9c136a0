from __future__ import annotations

from worker.torchdev import arch_supported, dtype_policy, probe


def test_dtype_policy() -> None:
    assert dtype_policy(False, True) == "float32"
    assert dtype_policy(True, True) == "bfloat16"
    assert dtype_policy(True, False) == "float16"


def test_arch_list_decision_on_real_torch_arch_lists() -> None:
    # an arch list of the shape torch.cuda.get_arch_list() returns for a CUDA 12 wheel
    arch = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
    assert arch_supported((9, 0), arch)  # H100/H200
    assert arch_supported((8, 9), arch)  # L4/L40S: sm_86 is binary compatible within major 8
    assert not arch_supported((3, 7), arch)  # K80: dropped
    assert arch_supported((8, 0), ("compute_70",))  # PTX JIT
    assert not arch_supported((7, 0), ("sm_80",))


def test_probe_on_this_cpu_machine_says_why_not_cuda() -> None:
    dev = probe()
    assert dev.device == "cpu" and not dev.cuda
    assert dev.dtype_name == "float32"
    assert dev.reason
    shown = dev.describe()
    assert shown["cuda"] is False and shown["device"] == "cpu" and shown["reason"] == dev.reason
