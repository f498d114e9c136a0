"""Where the models run: onnxruntime's execution providers, asked for and actually in use.

onnxruntime silently falls back to CPU when the CUDA provider cannot start (missing CUDA or
cuDNN libraries, a driver too old for the wheels): the session is created, only slower. So the
providers are checked after each session exists, and a worker that requires the GPU refuses
to start (exit 16) instead of serving at CPU speed (FAILURES F15).

The distribution check runs when the face-swap pipeline is imported, that is in the env's
import smoke test: an environment where the CPU ``onnxruntime`` or the GUI ``opencv-python``
crept in beside the GPU/headless builds (they overwrite each other's files) fails at build
time, not at the first job (FAILURES F5, F15).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def wants_gpu_build() -> bool:
    """True where the lock ships ``onnxruntime-gpu`` (Linux x86-64)."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def distribution_problems(installed: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the installed onnxruntime/opencv distributions (empty when nothing).

    ``installed`` (names of installed distributions) is for tests; by default the running
    environment's metadata is read.
    """
    have = set(installed) if installed is not None else None

    def present(name: str) -> bool:
        return name in have if have is not None else _installed(name)

    problems = []
    if present("opencv-python"):
        problems.append(
            "opencv-python is installed: it needs libGL and overwrites opencv-python-headless's cv2; "
            "exclude it in [tool.uv] (exclude-dependencies) and `uv lock`"
        )
    if not present("opencv-python-headless"):
        problems.append("opencv-python-headless is not installed")
    if wants_gpu_build():
        if present("onnxruntime"):
            problems.append(
                "the CPU onnxruntime is installed beside onnxruntime-gpu: both write the same "
                "`onnxruntime` package and the CPU one can win; override it away in [tool.uv] and `uv lock`"
            )
        if not present("onnxruntime-gpu"):
            problems.append("onnxruntime-gpu is not installed (Linux x86-64 ships the GPU build)")
    elif not present("onnxruntime"):
        problems.append("onnxruntime is not installed")
    return problems


def requested_providers(available: Sequence[str]) -> list[str]:
    """CUDA first when this onnxruntime offers it, CPU always as the fallback."""
    return [CUDA, CPU] if CUDA in available else [CPU]


def load_onnxruntime() -> Any:
    """onnxruntime as every session of the worker sees it: the CUDA and cuDNN libraries of the
    env's ``nvidia-*`` wheels preloaded first, as insightface's model zoo does before each
    session it creates. Without this the CUDA provider cannot find ``libcublasLt.so.12``."""
    import onnxruntime

    onnxruntime.preload_dlls()
    return onnxruntime


def new_session(model: bytes | str, providers: Sequence[str]) -> Any:
    """An onnxruntime session made the worker's way (`load_onnxruntime`): diagnose probes with it."""
    return load_onnxruntime().InferenceSession(model, providers=list(providers))


def gpu_name() -> str:
    """The first GPU's name from ``nvidia-smi``, or ``cuda`` when it cannot be asked."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            first = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and first:
                return first[0].strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "cuda"


def describe(requested: Sequence[str], actual: Sequence[str], available: Sequence[str]) -> dict[str, Any]:
    """The ``device`` part of ``health``: the GPU (or None) and the providers really in use."""
    on_gpu = CUDA in actual
    out: dict[str, Any] = {
        "gpu": gpu_name() if on_gpu else None,
        "providers": list(actual),
        "requested": list(requested),
        "available": list(available),
    }
    if CUDA in requested and not on_gpu:
        out["fallback"] = "onnxruntime could not start the CUDA provider and runs on CPU: " + (
            driver_problem()
            or "the NVIDIA driver is there, so it is likely too old for the wheels' CUDA version "
            "(onnxruntime's own error is on the worker's stderr)"
        )
    return out


def driver_problem() -> str | None:
    """Why the NVIDIA driver cannot be used from this process, or None when it loads.

    The CUDA libraries come with the env (onnxruntime-gpu's ``cuda``/``cudnn`` extras); the
    driver (``libcuda.so.1``) is the one thing the host must provide.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return (
            "no NVIDIA driver in this container (libcuda.so.1 not found): the host has no GPU, "
            "or the container was started without the NVIDIA runtime"
        )
    return None


_OOM_MARKERS = (
    "out of memory",
    "failed to allocate memory",
    "cudaerrormemoryallocation",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "bfcarena",
)
_CUDA_MARKERS = ("cuda", "cudnn", "cublas", "cufft", "curand")


def classify_runtime_error(err: BaseException) -> tuple[str, bool] | None:
    """For an exception from a model run: (what happened, replace the worker?) or None.

    CUDA out-of-memory and other CUDA errors can leave the device in a broken state, so the
    worker asks RunPod to replace it; a host out-of-memory is reported the same way.
    """
    if isinstance(err, MemoryError):
        return ("out of memory while running the models", True)
    text = f"{type(err).__name__}: {err}".lower()
    if "can't allocate memory" in text or "cannot allocate memory" in text:  # torch's CPU allocator
        return (f"host out of memory while running the models: {str(err)[:300]}", True)
    if any(m in text for m in _OOM_MARKERS):
        where = "GPU" if any(m in text for m in _CUDA_MARKERS) else "device"
        return (f"{where} out of memory while running the models: {str(err)[:300]}", True)
    if any(m in text for m in _CUDA_MARKERS):
        return (f"CUDA error while running the models: {str(err)[:300]}", True)
    return None
