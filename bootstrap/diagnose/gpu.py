"""Section ``gpu``: nvidia-smi, then torch and onnxruntime as the env's own Python sees them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bootstrap import errors
from bootstrap.childenv import child_environ
from bootstrap.diagnose.context import Context, probe_environ
from bootstrap.diagnose.model import Check, Status
from bootstrap.env import env_python
from bootstrap.settings import REQUIRE_GPU, Settings
from worker import gpu_probe, pipelines  # noqa: F401 - pipelines registers the capabilities
from worker.capabilities import CAPABILITIES
from worker.encoders import ENCODERS, Tools, nvenc_failure_reason, trial_encode

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def version_tuple(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    m = re.match(r"(\d+)\.(\d+)", str(text))
    return (int(m.group(1)), int(m.group(2))) if m else None


def gpu_probe_environ(settings: Settings) -> dict[str, str]:
    """The GPU probe's: no secrets, the app (``worker``) importable, no bytecode written (diagnose
    never writes into the app or the env)."""
    return child_environ(
        settings.environ, secrets=False, pythonpath=[settings.app_dir], extra={"PYTHONDONTWRITEBYTECODE": "1"}
    )


def _run_smi(ctx: Context, args: list[str]) -> subprocess.CompletedProcess[str]:
    smi = shutil.which("nvidia-smi", path=ctx.settings.environ.get("PATH", os.defpath))
    assert smi is not None
    return subprocess.run(
        [smi, *args],
        env=probe_environ(ctx.settings),
        capture_output=True,
        text=True,
        timeout=ctx.options.gpu_timeout_s,
        check=False,
    )


def check_gpu(ctx: Context) -> list[Check]:
    s, o = ctx.settings, ctx.options
    required = s.require_gpu
    problem = Status.BROKEN if required else Status.DEGRADED
    absent = Status.BROKEN if required else Status.UNKNOWN
    gpu_todo = errors.BY_CODE[errors.GPU].todo
    checks: list[Check] = []
    driver_cuda: tuple[int, ...] | None = None
    device = False
    if shutil.which("nvidia-smi", path=s.environ.get("PATH", os.defpath)) is None:
        checks.append(
            Check(
                "device",
                absent,
                "no NVIDIA GPU visible: nvidia-smi is not on PATH",
                hint=gpu_todo
                if required
                else "fine on a CPU machine (jobs run on CPU); on RunPod pick a GPU endpoint, and set "
                f"{REQUIRE_GPU}=1 so a worker without a usable GPU fails fast with exit 16",
            )
        )
    else:
        try:
            q = _run_smi(ctx, ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
            if q.returncode != 0:
                out = (q.stdout + q.stderr).strip().splitlines()
                checks.append(
                    Check(
                        "device",
                        problem,
                        f"nvidia-smi failed ({q.returncode}): {out[-1] if out else 'no output'}",
                        hint="the GPU driver is not answering: terminate this worker so RunPod replaces it; "
                        + gpu_todo,
                    )
                )
            else:
                devices = [line.strip() for line in q.stdout.strip().splitlines() if line.strip()]
                full = _run_smi(ctx, [])
                m = re.search(r"CUDA Version:\s*([\d.]+)", full.stdout)
                driver_cuda = version_tuple(m.group(1)) if m else None
                device = bool(devices)
                cuda_text = f"; driver supports CUDA up to {m.group(1)}" if m else ""
                if devices:
                    checks.append(Check("device", Status.OK, "; ".join(devices) + cuda_text))
                else:
                    checks.append(Check("device", absent, "nvidia-smi lists no GPU", hint=gpu_todo))
        except subprocess.TimeoutExpired:
            checks.append(
                Check(
                    "device",
                    problem,
                    f"nvidia-smi did not answer within {o.gpu_timeout_s:g} s: the GPU or its driver is hung",
                    hint="terminate this worker (or restart the pod) so RunPod gives you another GPU; "
                    "a worker here would hang at CUDA init",
                )
            )
    checks += _gpu_env_checks(ctx, device, driver_cuda, problem, absent)
    if (nvenc := check_nvenc(ctx, device, absent)) is not None:
        checks.append(nvenc)
    return checks


def check_nvenc(ctx: Context, device: bool, absent: Status) -> Check | None:
    """For a capability that encodes video: does ``h264_nvenc`` really encode here? Decided as the
    video pipeline decides at warm-load (`worker.encoders`): the build must list it and a
    one-frame trial encode must work; Debian's ffmpeg lists NVENC on machines without any GPU."""
    users = sorted(
        c
        for c in (ctx.key_inputs or {}).get("extras") or []
        if c in CAPABILITIES and CAPABILITIES[c].encodes_video
    )
    if not users:
        return None
    gpu, cpu = ENCODERS["h264"]
    try:
        tools = Tools.find(ctx.settings.environ.get("PATH", os.defpath))
        listed = tools.encoders()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        return Check(
            "nvenc", Status.UNKNOWN, f"cannot ask ffmpeg: {err}", hint="see the env section's ffmpeg check"
        )
    who = ", ".join(users)
    if gpu not in listed:
        return Check(
            "nvenc",
            Status.DEGRADED if device else Status.OK,
            f"this ffmpeg build has no {gpu}: {who} encode with {cpu} on the CPU",
            hint="Debian's ffmpeg has NVENC; an ffmpeg built without it is slower on a GPU worker",
        )
    if not device:
        return Check(
            "nvenc",
            absent,
            f"no GPU: {who} encode with {cpu} on the CPU",
            hint="on a GPU worker the same check tries a one-frame NVENC encode",
        )
    trial = trial_encode(tools, gpu, timeout=ctx.options.gpu_timeout_s)
    if trial.ok:
        return Check("nvenc", Status.OK, f"{gpu} encodes on this GPU (a one-frame trial): {who} use it")
    return Check(
        "nvenc",
        Status.DEGRADED,
        f"{gpu} is listed but a one-frame trial failed: {nvenc_failure_reason(trial.stderr, trial.returncode)}; {who} encode with {cpu} on the CPU (slower)",
        hint="the image sets NVIDIA_DRIVER_CAPABILITIES=compute,utility,video so RunPod mounts the driver's NVENC library; "
        "a GPU without NVENC (A100, H100) always encodes on the CPU",
    )


def _gpu_env_checks(
    ctx: Context, device: bool, driver_cuda: tuple[int, ...] | None, problem: Status, absent: Status
) -> list[Check]:
    if ctx.volume is None:
        return ctx.no_volume()
    if ctx.key is None:
        why = ctx.key_error.message if ctx.key_error else "?"
        return [Check("env_probe", Status.UNKNOWN, f"no env key: {why}", hint="see the env section")]
    final = ctx.env_in_use()
    if final is None:
        return [
            Check(
                "env_probe",
                Status.UNKNOWN,
                "no READY environment for this image to probe torch and onnxruntime with",
                hint="run `bootstrap prepare`, then `bootstrap diagnose` again",
            )
        ]
    found = _run_probe(ctx, final, problem)
    if isinstance(found, Check):
        return [found]
    data, stderr = found
    checks: list[Check] = []
    wheel_cuda: list[tuple[str, tuple[int, ...]]] = []
    if (t := data.get("torch")) is None:
        checks.append(Check("torch", Status.OK, "not installed in this environment (no capability needs it)"))
    else:
        checks.append(_torch_check(t, wheel_cuda, problem if device else absent))
    if (r := data.get("onnxruntime")) is None:
        checks.append(
            Check("onnxruntime", Status.OK, "not installed in this environment (no capability needs it)")
        )
    else:
        checks.append(_onnxruntime_check(r, stderr, wheel_cuda, device, problem if device else absent))
    if wheel_cuda:
        checks.append(_cuda_versions_check(wheel_cuda, driver_cuda, problem, absent))
    return checks


def _run_probe(ctx: Context, final: Path, problem: Status) -> tuple[dict[str, Any], str] | Check:
    """`worker.gpu_probe` run with the env's Python: (its findings, its stderr) or why it failed."""
    s, o = ctx.settings, ctx.options
    python = env_python(final)
    try:
        proc = subprocess.run(
            [str(python), "-s", "-m", gpu_probe.__name__],
            env=gpu_probe_environ(s),
            cwd=s.app_dir,
            capture_output=True,
            text=True,
            timeout=o.gpu_timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check(
            "env_probe",
            problem,
            f"importing torch/onnxruntime and initialising CUDA took longer than {o.gpu_timeout_s:g} s: "
            "CUDA init is hanging",
            hint="terminate this worker so RunPod replaces it (a hung GPU); "
            + errors.BY_CODE[errors.GPU].todo,
        )
    except OSError as err:
        return Check("env_probe", Status.BROKEN, f"{python} cannot run: {err}", hint="see the env section")
    marker = proc.stdout.rfind(gpu_probe.MARKER)
    if marker < 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Check(
            "env_probe",
            Status.BROKEN,
            f"the probe failed in {python}: {last}",
            hint="see the env section",
        )
    data = json.loads(proc.stdout[marker + len(gpu_probe.MARKER) :].strip())
    return data, _ANSI.sub("", proc.stderr)


def _torch_check(t: dict[str, Any], wheel_cuda: list[tuple[str, tuple[int, ...]]], unusable: Status) -> Check:
    if (v := version_tuple(t.get("cuda"))) is not None:
        wheel_cuda.append((f"torch {t.get('version')}", v))
    if t.get("available") and not t.get("error"):
        return Check(
            "torch",
            Status.OK,
            f"torch {t.get('version')} (CUDA {t.get('cuda')}): CUDA works on {t.get('device')}",
        )
    why = t.get("error") or "torch.cuda.is_available() is False"
    return Check(
        "torch",
        unusable,
        f"torch {t.get('version', '?')} (CUDA {t.get('cuda')}): CUDA unusable: {why}",
        hint=errors.BY_CODE[errors.GPU].todo,
    )


def _onnxruntime_check(
    r: dict[str, Any],
    stderr: str,
    wheel_cuda: list[tuple[str, tuple[int, ...]]],
    device: bool,
    unusable: Status,
) -> Check:
    if (v := version_tuple(r.get("cuda"))) is not None:
        wheel_cuda.append((f"{r.get('package') or 'onnxruntime'} {r.get('version')}", v))
    session = r.get("session") or []
    head = f"{r.get('package') or 'onnxruntime'} {r.get('version', '?')}"
    if r.get("error"):
        return Check(
            "onnxruntime", Status.BROKEN, f"{head}: a session fails: {r['error']}", hint="see the env section"
        )
    if "CUDAExecutionProvider" in session:
        return Check("onnxruntime", Status.OK, f"{head}: a session runs on {', '.join(session)}")
    reasons = [
        line.strip()
        for line in stderr.splitlines()
        if "Failed to load library" in line or "Require cuDNN" in line or "Failed to create CUDA" in line
    ]
    why = ("; ".join(reasons))[-600:] or "the CUDA provider is not available in this build"
    if device:
        detail = (
            f"{head}: onnxruntime falls back to CPU on this GPU machine (session providers {session}): {why}"
        )
    else:
        detail = f"{head}: CPU only here (no GPU; session providers {session}); on a GPU: {why}"
    return Check(
        "onnxruntime",
        unusable,
        detail,
        hint="install the CUDA/cuDNN libraries the wheel needs (or pick wheels for the "
        f"driver's CUDA); {errors.BY_CODE[errors.GPU].todo}",
    )


def _cuda_versions_check(
    wheel_cuda: list[tuple[str, tuple[int, ...]]],
    driver_cuda: tuple[int, ...] | None,
    problem: Status,
    absent: Status,
) -> Check:
    wants = ", ".join(f"{name} wants CUDA {'.'.join(map(str, v))}" for name, v in wheel_cuda)
    if driver_cuda is None:
        return Check(
            "cuda_versions",
            absent,
            f"{wants}; no NVIDIA driver here to compare with",
            hint="on RunPod, pick GPU types whose driver supports that CUDA version (the endpoint's "
            "CUDA version filter)",
        )
    have = ".".join(map(str, driver_cuda))
    if any(v > driver_cuda for _n, v in wheel_cuda):
        return Check(
            "cuda_versions",
            problem,
            f"{wants}, but the driver supports CUDA up to {have}",
            hint="pick a GPU type whose driver supports the wheels' CUDA (the endpoint's CUDA "
            "version filter), or pin wheels built for CUDA " + have,
        )
    return Check("cuda_versions", Status.OK, f"{wants}; the driver supports up to {have}")


# -- last boot --------------------------------------------------------------------------------
