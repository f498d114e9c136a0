"""Phase ``env``: a content-addressed Python environment on the volume, built with uv (SPEC §5).

Minimal first version: key, build into a unique temp directory, READY written last, one rename,
reuse when READY. Hardening (leases, kill safety, degradation, gc) builds on this.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap import lease as leases
from bootstrap.errors import EnvBuildError
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume

LAYOUT_VERSION = 1
READY = "READY"
TMP_PREFIX = ".tmp-"


@dataclass
class EnvResult:
    key: str
    path: Path
    python: Path
    reused: bool
    extras: tuple[str, ...]
    #: capability → why it was dropped (uv's or the smoke test's own error)
    dropped: dict[str, str] = field(default_factory=dict)


def find_uv() -> str:
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]

        return str(find_uv_bin())
    except Exception as err:
        raise EnvBuildError("uv is not installed", hint="pip install uv (the image installs it)") from err


def interpreter_identity() -> dict[str, str]:
    """What the key records of the image's interpreter (the one running bootstrap)."""
    base = getattr(sys, "_base_executable", sys.executable)
    return {
        "implementation": sys.implementation.name,
        "version": platform.python_version(),
        "abi": str(sysconfig.get_config_var("SOABI")),
        "path": os.path.realpath(base),
    }


def key_inputs(settings: Settings, extras: tuple[str, ...]) -> dict[str, Any]:
    lock = settings.project_dir / "uv.lock"
    try:
        lock_hash = hashlib.sha256(lock.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise EnvBuildError(
            f"{lock} is missing", hint="run `uv lock` in the project and commit uv.lock"
        ) from None
    libc = "-".join(platform.libc_ver()) or "unknown"
    return {
        "layout": LAYOUT_VERSION,
        "uv_lock": lock_hash,
        "extras": sorted(extras),
        "python": interpreter_identity(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "libc": libc,
    }


def env_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def is_ready(path: Path) -> bool:
    return (path / READY).is_file()


def _uv_env(settings: Settings, volume: Volume, target: Path) -> dict[str, str]:
    env = dict(settings.environ)
    env.pop("VIRTUAL_ENV", None)
    env["UV_PROJECT_ENVIRONMENT"] = str(target)
    env["UV_CACHE_DIR"] = str(volume.uv_cache)
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    env["UV_NO_PROGRESS"] = "1"
    return env


def _run(
    cmd: list[str], env: dict[str, str], cwd: Path, timeline: Timeline
) -> subprocess.CompletedProcess[str]:
    timeline.log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        timeline.log(f"  {line}")
    return proc


def ensure_env(settings: Settings, volume: Volume, timeline: Timeline, detail: dict[str, Any]) -> EnvResult:
    """Reuse the READY environment for this key, or build and publish it."""
    extras = settings.extras
    inputs = key_inputs(settings, extras)
    key = env_key(inputs)
    final = volume.envs / key
    detail["key"] = key
    if is_ready(final):
        detail["reused"] = True
        return EnvResult(key, final, final / "bin" / "python", True, extras)
    owner = f"{settings.worker_id}:{os.getpid()}"
    lease = leases.acquire(
        volume.leases,
        f"env-{key}",
        owner=owner,
        ttl_s=settings.lease_ttl_s,
        timeout_s=settings.lock_timeout_s,
        timeline=timeline,
        phase="env",
        done=lambda: is_ready(final),
        enabled=settings.locks,
    )
    try:
        if is_ready(final):
            detail["reused"] = True
            return EnvResult(key, final, final / "bin" / "python", True, extras)
        _build(settings, volume, timeline, final, inputs, extras)
    finally:
        if lease is not None:
            lease.release()
    detail["reused"] = False
    return EnvResult(key, final, final / "bin" / "python", False, extras)


def _build(
    settings: Settings,
    volume: Volume,
    timeline: Timeline,
    final: Path,
    inputs: dict[str, Any],
    extras: tuple[str, ...],
) -> None:
    uv = find_uv()
    tmp = volume.envs / f"{TMP_PREFIX}{final.name[:12]}-{uuid.uuid4().hex[:8]}"
    env = _uv_env(settings, volume, tmp)
    t0 = time.time()
    python = inputs["python"]["path"]
    proc = _run(
        [uv, "venv", "--quiet", "--relocatable", "--python", python, str(tmp)],
        env,
        settings.project_dir,
        timeline,
    )
    if proc.returncode != 0:
        raise EnvBuildError(f"uv venv failed: {proc.stderr.strip()[-2000:]}")
    cmd = [
        uv,
        "sync",
        "--frozen",
        "--no-install-project",
        "--no-dev",
        "--compile-bytecode",
        "--link-mode",
        "hardlink",
    ]
    for extra in extras:
        cmd += ["--extra", extra]
    proc = _run(cmd, env, settings.project_dir, timeline)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EnvBuildError(f"uv sync failed: {proc.stderr.strip()[-2000:]}")
    record = {
        "key": final.name,
        "inputs": inputs,
        "extras": list(extras),
        "uv": subprocess.run([uv, "--version"], capture_output=True, text=True, check=False).stdout.strip(),
        "python": python,
        "built_at": t0,
        "build_s": round(time.time() - t0, 2),
        "builder": settings.worker_id,
    }
    with open(tmp / READY, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(tmp, final)
    except OSError:
        if is_ready(final):  # another builder published first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
