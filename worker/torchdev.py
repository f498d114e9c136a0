"""Which torch device and dtype the torch capabilities (speech, animate) use, told truthfully.

One probe per process: CUDA is taken when ``torch.cuda.is_available()`` holds *after* a real
initialisation (a tensor allocated on the device), and the device's compute capability is in
the wheel's arch list; otherwise CPU with the reason. The dtype policy is bf16 on GPUs that have
it (Ampere and newer), fp16 on older GPUs, fp32 on CPU (half precision on CPU is slow and, for
some ops, missing). ``describe()`` is what ``health`` reports as ``device.torch``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TorchDevice:
    #: ``cuda:0`` or ``cpu``
    device: str
    #: ``bfloat16`` | ``float16`` | ``float32``
    dtype_name: str
    name: str = "cpu"
    capability: tuple[int, int] | None = None
    arch_list: tuple[str, ...] = ()
    total_memory: int | None = None
    #: why CUDA is not used (None on a GPU)
    reason: str | None = None
    torch_version: str = ""
    cuda_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)

    def describe(self) -> dict[str, Any]:
        return {
            "cuda": self.cuda,
            "device": self.device,
            "name": self.name,
            "dtype": self.dtype_name,
            "capability": ".".join(map(str, self.capability)) if self.capability else None,
            "arch_list": list(self.arch_list),
            "total_memory": self.total_memory,
            "torch": self.torch_version,
            "cuda_runtime": self.cuda_version,
            **({"reason": self.reason} if self.reason else {}),
        }


def dtype_policy(cuda: bool, bf16_supported: bool) -> str:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    if not cuda:
        return "float32"
    return "bfloat16" if bf16_supported else "float16"


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether the wheel carries kernels for ``capability`` (``sm_90``), or PTX it can JIT from."""
    if not arch_list:
        return True  # a build that does not say: let the real initialisation decide
    major, minor = capability
    want = major * 10 + minor
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        have = int(num)
        if kind == "sm" and have == want:
            return True
        if kind == "sm" and have // 10 == major and have <= want:
            return True  # same major: binary compatible with newer minors
        if kind == "compute" and have <= want:
            return True
    return False


@functools.cache
def probe() -> TorchDevice:
    """Probe torch once (imports torch; call at warm-load, never from bootstrap)."""
    import torch

    version = str(torch.__version__)
    cuda_version = torch.version.cuda
    if not torch.cuda.is_available():
        why = "torch sees no CUDA device" if cuda_version else "this torch build has no CUDA"
        return TorchDevice("cpu", "float32", reason=why, torch_version=version, cuda_version=cuda_version)
    arch_list = tuple(torch.cuda.get_arch_list())
    try:
        cap = tuple(torch.cuda.get_device_capability(0))
        capability = (int(cap[0]), int(cap[1]))
        name = torch.cuda.get_device_name(0)
        total = int(torch.cuda.get_device_properties(0).total_memory)
        if not arch_supported(capability, arch_list):
            return TorchDevice(
                "cpu",
                "float32",
                name=name,
                capability=capability,
                arch_list=arch_list,
                reason=f"the GPU's compute capability {capability[0]}.{capability[1]} is not in this torch build's arch list {list(arch_list)}",
                torch_version=version,
                cuda_version=cuda_version,
            )
        torch.ones(1, device="cuda:0").add_(1)  # a real initialisation, not only a device count
        torch.cuda.synchronize()
        bf16 = bool(torch.cuda.is_bf16_supported())
    except Exception as err:  # a driver too old for the wheel, a broken device: say so, run on CPU
        return TorchDevice(
            "cpu",
            "float32",
            reason=f"CUDA initialisation failed: {type(err).__name__}: {str(err)[:300]}",
            arch_list=arch_list,
            torch_version=version,
            cuda_version=cuda_version,
        )
    return TorchDevice(
        "cuda:0",
        dtype_policy(True, bf16),
        name=name,
        capability=capability,
        arch_list=arch_list,
        total_memory=total,
        torch_version=version,
        cuda_version=cuda_version,
    )


# -- memory fit (animate's warm-load) -----------------------------------------------------------

GiB = 1024**3


def free_memory(dev: TorchDevice) -> int | None:
    """Free bytes on the probed GPU right now (``torch.cuda.mem_get_info``), None on CPU."""
    if not dev.cuda:
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(0)
    return int(free)


@dataclass(frozen=True)
class MemoryPlan:
    """Where a model of ``need`` bytes runs on ``dev``: ``device`` | ``offload`` | ``refuse``."""

    action: str
    need: int
    have: int | None
    message: str


def memory_plan(
    dev: TorchDevice,
    *,
    need: int,
    largest: int,
    free: int | None,
    offload_allowed: bool,
    what: str = "the pipeline",
) -> MemoryPlan:
    """Decide, from the probe's numbers, whether ``need`` bytes fit the device.

    ``need`` is the whole pipeline resident (weights plus working memory); ``largest`` what must
    fit at once under model CPU offload (the largest component plus working memory). ``free``
    is the device's free memory now (None: use ``dev.total_memory``). CPU always fits here: host
    memory is the container's limit, reported by the kernel, not by torch.
    """
    if not dev.cuda:
        return MemoryPlan("device", need, None, f"{what} runs on CPU ({dev.reason or 'no GPU'})")
    have = free if free is not None else dev.total_memory
    if have is None:
        return MemoryPlan("device", need, None, f"{dev.name}: memory unknown, trying {what} on the GPU")
    numbers = f"{what} needs about {need / GiB:.1f} GiB; {dev.name} has {have / GiB:.1f} GiB free"
    if dev.total_memory is not None:
        numbers += f" of {dev.total_memory / GiB:.1f} GiB"
    if need <= have:
        return MemoryPlan("device", need, have, numbers)
    if offload_allowed and largest <= have:
        return MemoryPlan(
            "offload",
            need,
            have,
            numbers + f"; model CPU offload (largest part {largest / GiB:.1f} GiB on the GPU at a time)",
        )
    if offload_allowed:
        return MemoryPlan(
            "refuse",
            need,
            have,
            numbers + f"; even with model CPU offload its largest part needs {largest / GiB:.1f} GiB",
        )
    return MemoryPlan(
        "refuse", need, have, numbers + "; set WORKER_ANIMATE_OFFLOAD=1 for model CPU offload (slower)"
    )
