"""The face-swap dependencies (FAILURES F5, F15): the lock carries only the headless opencv and,
on Linux x86-64, only the GPU onnxruntime; the environment the product builds imports without
libGL and without a GPU, and its import smoke test would catch a clobbered onnxruntime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.helpers import REPO

LINUX_X86 = {
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "os_name": "posix",
}
MAC_ARM = {
    "sys_platform": "darwin",
    "platform_machine": "arm64",
    "platform_system": "Darwin",
    "os_name": "posix",
}


def _exported(platform: dict[str, str], python: str) -> set[str]:
    """Distributions `uv sync --no-dev --extra faceswap` installs on ``platform``, from the lock."""
    proc = subprocess.run(
        [
            "uv",
            "export",
            "--frozen",
            "--no-dev",
            "--extra",
            "faceswap",
            "--no-hashes",
            "--no-emit-project",
            "--no-header",
            "--no-annotate",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    env = {
        **platform,
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "faceswap",
    }
    names = set()
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        if req.marker is None or Marker(str(req.marker)).evaluate(env):
            names.add(req.name.lower())
    return names


def test_lock_never_lists_opencv_python() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    names = {p["name"] for p in lock["package"]}
    assert "opencv-python" not in names
    assert "opencv-python-headless" in names
    insightface = next(p for p in lock["package"] if p["name"] == "insightface")
    assert not any(d["name"] == "opencv-python" for d in insightface.get("dependencies", []))


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_linux_x86_64_installs_only_the_gpu_onnxruntime_and_headless_opencv(python: str) -> None:
    names = _exported(LINUX_X86, python)
    assert {"insightface", "onnxruntime-gpu", "opencv-python-headless", "boto3"} <= names
    # The CUDA libraries onnxruntime-gpu loads come with the env: the slim image has none.
    assert {
        "nvidia-cuda-runtime-cu12",
        "nvidia-cublas-cu12",
        "nvidia-cudnn-cu12",
        "nvidia-cufft-cu12",
        "nvidia-curand-cu12",
    } <= names
    # CUDA 12 wheels (driver R525+), not CUDA 13 (R580+): see the pin in pyproject.toml.
    assert not {n for n in names if n.endswith("-cu13")}
    assert "onnxruntime" not in names
    assert "opencv-python" not in names


def test_other_platforms_get_the_cpu_onnxruntime() -> None:
    names = _exported(MAC_ARM, "3.12")
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names
    assert "opencv-python" not in names


def _gl_libraries() -> list[str]:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    paths = set()
    for line in out.splitlines():
        name, _, path = line.partition("=>")
        if name.strip().startswith(("libGL.so", "libGLX", "libOpenGL", "libEGL")):
            real = os.path.realpath(path.strip())
            if os.path.isfile(real):
                paths.add(real)
    return sorted(paths)


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare to hide libGL"
)
def test_built_env_imports_without_libgl_and_passes_the_smoke_test(
    tmp_path: Path, env_volume_factory
) -> None:  # type: ignore[no-untyped-def]
    volume = env_volume_factory(tmp_path / "vol", ("faceswap",))
    envs = [p for p in (volume / ".bootstrap" / "envs").iterdir() if (p / "READY").is_file()]
    assert len(envs) == 1
    python = envs[0] / "bin" / "python"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}

    # The environment holds the GPU onnxruntime and the headless opencv, nothing else of either.
    listing = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, json; print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    dists = set(json.loads(listing.stdout))
    assert {"onnxruntime-gpu", "opencv-python-headless", "insightface"} <= dists
    assert "onnxruntime" not in dists and "opencv-python" not in dists

    # Hide every GL library (bind /dev/null over it, in a private mount namespace), then run the
    # env's import smoke test: cv2 and the pipeline still import. The control proves GL is gone.
    hide = " ".join(f"mount --bind /dev/null {lib} &&" for lib in _gl_libraries())
    assert hide, "no libGL on this machine to hide"
    script = (
        f"{hide} "
        f"if {python} -c 'import ctypes; ctypes.CDLL(\"libGL.so.1\")' 2>/dev/null; then echo GL-STILL-LOADS; exit 3; fi; "
        f"exec {python} -m worker.smoke faceswap"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "GL-STILL-LOADS" not in proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: result[k] for k in ("base", "capabilities")} == {
        "base": None,
        "capabilities": {"faceswap": None},
    }
    # what imported, for the env's prefetch list: the faceswap stack with GL hidden
    assert {"cv2", "onnxruntime", "insightface", "worker.pipelines.faceswap"} <= set(result["modules"])

    # Every CUDA library the CUDA provider needs is in the env: on this GPU-less machine the
    # only thing it misses is the driver, which a GPU host provides. The session is made by the
    # product's own path (worker.device.new_session: the one every worker session and
    # diagnose's GPU probe take), so this proves what the worker will see.
    probe = (
        "from onnx import helper as h, TensorProto as T; from worker import device; "
        "g = h.make_graph([h.make_node('Relu', ['x'], ['y'])], 'g', [h.make_tensor_value_info('x', T.FLOAT, [1])], "
        "[h.make_tensor_value_info('y', T.FLOAT, [1])]); m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)]); "
        "m.ir_version = 8; s = device.new_session(m.SerializeToString(), [device.CUDA, device.CPU]); "
        "print(s.get_providers())"
    )
    proc = subprocess.run(
        [str(python), "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    # The CUDA provider loaded and failed only for want of a driver (which names libcuda, or
    # says the driver is missing/insufficient, depending on onnxruntime's release).
    assert "libcuda.so.1" in said or "CUDA driver version is insufficient" in said, said
    for lib in ("libcudart", "libcublas", "libcudnn", "libcufft", "libcurand"):
        assert f"{lib}.so" not in said, said
