"""Phase ``env``: reuse the READY env for this key, or build and publish it under its lease."""

from __future__ import annotations

# ruff: noqa: PTH104 - rename of whole trees reads clearer at the os level, as elsewhere in bootstrap
import contextlib
import os
import uuid
from typing import Any

from bootstrap import interpreter as interp
from bootstrap import lease as leases
from bootstrap.childenv import child_environ
from bootstrap.env.build import EnvResult, build, run_uv, uv_error
from bootstrap.env.key import (
    env_key,
    env_problem,
    env_python,
    find_uv,
    is_ready,
    key_inputs,
    recent_failure,
)
from bootstrap.env.leftovers import BROKEN_PREFIX, clean_leftovers
from bootstrap.errors import EnvBuildError
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume

# -- the phase ----------------------------------------------------------------------------------


def ensure_env(settings: Settings, volume: Volume, timeline: Timeline, detail: dict[str, Any]) -> EnvResult:
    """Reuse the READY environment for this key, or build and publish it.

    Internal logic:

    1. the interpreter (managed: installed into ``python/`` under a lease) and the full key;
    2. READY with the expected ``pyvenv.cfg`` home → reuse; a READY env whose home is wrong is
       renamed aside (never repaired in place) and rebuilt;
    3. a degraded env for this key that failed less than `RETRY_FULL_AFTER_S` ago → reuse it;
    4. the lease ``env-<key>``, waiting while another worker builds (``done`` ends the wait);
    5. recheck, remove dead builders' leftovers, check disk, build, publish.
    """
    uv = find_uv()
    python = _interpreter(settings, volume, timeline, uv)
    extras = settings.extras
    inputs = key_inputs(settings, extras, python=python)
    key = env_key(inputs)
    final = volume.envs / key
    detail["key"] = key
    detail["python"] = f"{python.implementation} {python.version}"

    def reusable() -> EnvResult | None:
        if is_ready(final):
            problem = env_problem(final, python)
            if problem is None:
                return EnvResult(key, final, env_python(final), True, extras)
            timeline.log(f"not reusing {final}: {problem}; moving it aside and rebuilding", level="warn")
            with contextlib.suppress(OSError):
                os.rename(final, volume.envs / f"{BROKEN_PREFIX}{key}-{uuid.uuid4().hex[:8]}")
        failure = recent_failure(volume, key)
        if failure is not None:
            held = volume.envs / str(failure.get("published_key"))
            dropped = {str(k): str(v) for k, v in (failure.get("dropped") or {}).items()}
            still_optional = all(settings.is_optional(c) for c in dropped)  # else: build, and fail
            if still_optional and is_ready(held) and env_problem(held, python) is None:
                kept = tuple(e for e in extras if e not in dropped)
                return EnvResult(str(failure["published_key"]), held, env_python(held), True, kept, dropped)
        return None

    found = reusable()
    if found is None:
        owner = f"{settings.worker_id}:{os.getpid()}"
        lease = leases.acquire(
            volume.leases,
            f"env-{key}",
            owner=owner,
            ttl_s=settings.lease_ttl_s,
            timeout_s=settings.lock_timeout_s,
            timeline=timeline,
            phase="env",
            done=lambda: is_ready(final) or recent_failure(volume, key) is not None,
            enabled=settings.locks,
        )
        try:
            found = reusable()
            if found is None:
                clean_leftovers(volume, timeline, stale_after_s=settings.stale_after_s)
                found = build(settings, volume, timeline, uv, python, inputs, key)
        finally:
            if lease is not None:
                lease.release()
    detail["reused"] = found.reused
    if found.key != key:
        detail["published_key"] = found.key
    if found.dropped:
        detail["dropped"] = sorted(found.dropped)
    return found


def _interpreter(settings: Settings, volume: Volume, timeline: Timeline, uv: str) -> interp.Interpreter:
    """The interpreter to build from; installs the managed one under a lease when missing."""
    if settings.python != "managed":
        return interp.system_interpreter()
    request = interp.managed_request(settings)
    found = interp.managed_interpreter(volume.root, request)
    if found is not None:
        return found
    volume.python.mkdir(parents=True, exist_ok=True)
    lease = leases.acquire(
        volume.leases,
        f"python-{request}",
        owner=f"{settings.worker_id}:{os.getpid()}",
        ttl_s=settings.lease_ttl_s,
        timeout_s=settings.lock_timeout_s,
        timeline=timeline,
        phase="env",
        done=lambda: interp.find_managed(volume.root, request) is not None,
        enabled=settings.locks,
    )
    try:
        if interp.find_managed(volume.root, request) is None:
            argv, extra = interp.install_command(uv, volume, request)
            env = child_environ(settings.environ, extra=extra)
            proc = run_uv(argv, env, settings.project_dir, timeline)
            if proc.returncode != 0:
                raise EnvBuildError(
                    f"uv python install {request} failed: {uv_error(proc)}",
                    hint="uv downloads Python from GitHub: allow that, set UV_PYTHON_INSTALL_MIRROR, "
                    "or use BOOTSTRAP_PYTHON=system",
                )
    finally:
        if lease is not None:
            lease.release()
    found = interp.managed_interpreter(volume.root, request)
    if found is None:
        raise EnvBuildError(
            f"uv python install {request} finished but no interpreter is in {volume.python}",
            hint="run `bootstrap diagnose`; or use BOOTSTRAP_PYTHON=system",
        )
    return found
