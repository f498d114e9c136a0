"""`bootstrap run`: preflight → env → weights → ``exec`` the worker (SPEC §1, §2).

Each phase runs inside the timeline's ``phase`` context (start/end/fail events) and under its
budget (`bootstrap.budget`), so a boot never outlives RunPod's init window silently (F17).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from bootstrap.budget import budget
from bootstrap.capabilities import capability_table, select
from bootstrap.childenv import child_environ
from bootstrap.env import ensure_env
from bootstrap.env.build import PREFETCH
from bootstrap.errors import BootstrapError, EnvBuildError
from bootstrap.plan import Capability, Plan, write_plan
from bootstrap.settings import PLAN, Settings
from bootstrap.timeline import Timeline, scrub, scrub_data
from bootstrap.volume import Volume, preflight, resolve_volume
from bootstrap.weights import ensure_weights, validate_weights

UNTIL = ("env", "weights")

#: Set for the worker so no hub library reaches for the network on a warm boot (FAILURES F16).
OFFLINE_FLAGS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
}


def worker_environ(settings: Settings, plan_path: Path) -> dict[str, str]:
    """The worker's environment: a child's (no weights credentials), the plan, the app on
    PYTHONPATH and offline flags. Settings reach the worker through the plan, never from here."""
    env = child_environ(settings.environ, pythonpath=[settings.app_dir], inherit_pythonpath=True)
    env[PLAN] = str(plan_path)
    env.update(OFFLINE_FLAGS)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def with_capability_closure(settings: Settings) -> Settings:
    """Settings whose extras include every capability the selected ones need (exit 2 for an
    unknown name, before anything is built)."""
    sel = select(settings.extras, settings.optional, capability_table(settings.project_dir))
    return dataclasses.replace(settings, extras=sel.extras, optional=sel.optional)


def make_timeline(settings: Settings, stream: IO[str] | None = None) -> Timeline:
    return Timeline.for_settings(settings, stream)


def run(
    settings: Settings,
    *,
    until: str | None = None,
    serve: bool = False,
    stream: IO[str] | None = None,
) -> int:
    """The whole boot. Returns an exit code, or does not return (the worker replaced us)."""
    timeline = make_timeline(settings, stream)
    plan = Plan(
        worker_id=settings.worker_id,
        volume="",
        app_dir=str(settings.app_dir),
        boot_started=timeline.started,
    )
    volume: Volume | None = None
    phase = "preflight"
    try:
        with (
            budget(timeline, "preflight", settings.budget("preflight")),
            timeline.phase("preflight") as detail,
        ):
            settings = with_capability_closure(settings)
            plan.capabilities = {c: Capability(required=not settings.is_optional(c)) for c in settings.extras}
            volume = resolve_volume(settings, allow_local=serve)
            if _can_log(volume, settings):
                timeline.attach(volume.log_dir(settings.worker_id))
            if volume.degraded:
                timeline.log(f"degraded: no volume — using {volume.root} on container disk", level="warn")
            detail.update(preflight(settings, volume))
            validate_weights(settings)  # the manifest and mirror, before any env is built (exit 2)
        plan.volume = str(volume.root)
        phase = "env"
        with budget(timeline, "env", settings.budget("env")), timeline.phase("env") as detail:
            env = ensure_env(settings, volume, timeline, detail)
        plan.env_key, plan.env_path, plan.python, plan.env_reused = (
            env.key,
            str(env.path),
            str(env.python),
            env.reused,
        )
        for cap, reason in env.dropped.items():
            plan.degrade(cap, reason)
        if until == "env":
            return 0
        if until is None:  # a boot that starts the worker: warm the page cache for its imports
            start_prefetch(env.path, timeline)
        phase = "weights"
        with (
            budget(timeline, "weights", settings.budget("weights")),
            timeline.phase("weights") as detail,
        ):
            ensure_weights(settings, volume, timeline, plan, detail)
        if until == "weights":
            return 0
    except BootstrapError as err:
        if not _serve_error(settings, plan, volume, phase):
            _print_error(err, stream, timeline.secrets)
            timeline.close()
            return err.exit_code
        plan.fatal = scrub_data(err.as_detail(), timeline.secrets)  # state/*.json lives on the volume
        timeline.log(
            f"BOOTSTRAP_ON_FATAL=serve-error: serving the error for {settings.fatal_grace_s:g} s",
            level="warn",
        )
    except Exception:
        timeline.close()
        raise
    assert volume is not None
    plan.boot_ms = {p: round(ms, 1) for p, ms in timeline.phase_ms.items()}
    plan.carry(settings)
    plan_path = volume.plan_path(settings.worker_id)
    write_plan(plan_path, plan)
    python = Path(plan.python or sys.executable)
    try:  # the timeline's files are not inherited: exec closes them, every line already written
        exec_worker(settings, python, plan_path)
    except OSError as err:
        failure = EnvBuildError(
            f"cannot start the worker: exec of {python} failed: {err.strerror or err}",
            hint="the environment is damaged: `bootstrap diagnose` shows it; move "
            f"{plan.env_path} aside (its name starting with .broken-) and the next boot rebuilds it",
        )
        timeline.event("import", "fail", detail=failure.as_detail())
        timeline.log(f"error: {failure.message}", level="error")
        _print_error(failure, stream, timeline.secrets)
        return failure.exit_code
    finally:
        timeline.close()
    return 1  # only reached when exec is replaced in tests


def _can_log(volume: Volume, settings: Settings) -> bool:
    """Attach the log early when the log directory can be made (preflight may still fail later)."""
    try:
        volume.log_dir(settings.worker_id).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return True


def _serve_error(settings: Settings, plan: Plan, volume: Volume | None, phase: str) -> bool:
    """Keep serving the error (BOOTSTRAP_ON_FATAL=serve-error) only once an environment exists."""
    return (
        settings.on_fatal == "serve-error"
        and volume is not None
        and plan.env_path is not None
        and phase == "weights"
    )


def _print_error(err: BootstrapError, stream: IO[str] | None, secrets: Sequence[str]) -> None:
    """The ``error:``/``hint:`` lines on stderr, scrubbed like every other stream bootstrap writes."""
    out = sys.stderr if stream is None else stream
    print(f"error: {scrub(err.message, secrets)}", file=out)
    print(f"hint: {scrub(err.hint, secrets)}", file=out)
    print(
        f"exit code {err.exit_code} ({err.name}); `bootstrap explain {err.exit_code}` says more",
        file=out,
    )


def start_prefetch(env: Path, timeline: Timeline) -> subprocess.Popen[bytes] | None:
    """Read the files the worker's start will (``<env>/.prefetch``, `bootstrap.env.build`) in a
    detached process, while the weights phase runs and the worker imports: on MooseFS each
    first read waits a round trip, many threads overlap them (docs/moosefs.md). Its own session,
    so it outlives the exec and no signal to the worker's group reaches it; only a hint."""
    listing = env / PREFETCH
    if not listing.is_file():
        return None
    from bootstrap import fastfs

    cmd = [sys.executable, str(Path(fastfs.__file__)), "prefetch", str(env), str(listing)]
    try:
        proc = subprocess.Popen(
            cmd,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError as err:
        timeline.log(f"prefetch not started: {err}", level="warn")
        return None
    timeline.log(f"prefetching the worker's files (pid {proc.pid})")
    return proc


def exec_worker(settings: Settings, python: Path, plan_path: Path) -> None:
    """Replace this process with the environment's Python running the worker."""
    argv = [str(python), "-m", "worker", "--plan", str(plan_path)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, worker_environ(settings, plan_path))  # noqa: S606 - exec is the point: the worker becomes this process


def serve_settings(settings: Settings, host: str | None, port: int | None) -> Settings:
    """`bootstrap serve`: the local API on, and every capability optional (SPEC §2)."""
    cur_host, cur_port = settings.serve_api or ("127.0.0.1", 8000)
    return dataclasses.replace(
        settings,
        serve_api=(host or cur_host, port or cur_port),
        optional=frozenset(settings.extras) | settings.optional,
    )
