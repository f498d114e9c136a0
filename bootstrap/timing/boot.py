"""Driving one boot: its environment, start, the first job through the local API, stop, its phases."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.childenv import child_environ
from bootstrap.settings import PLAN, SERVE_API, VOLUME, WORKER_ID, Settings
from bootstrap.timeline import read_events
from bootstrap.timing.options import Options
from bootstrap.volume import Volume

#: Phases taken from the timeline's ``end`` events, in boot order.
BOOT_PHASES = ("preflight", "env", "weights", "import", "warm")
#: Every figure a boot records (``ready`` is cumulative; the others are durations).
PHASES = (*BOOT_PHASES, "ready", "first_job", "total")
#: The segments of a bar in the chart; they add up to ``total``.
SEGMENTS = (*BOOT_PHASES, "startup", "first_job")
SCENARIOS = ("cold", "warm", "concurrent", "recover", "baseline")
HEALTH_JOB: dict[str, Any] = {"input": {"task": "health"}}
STOP_GRACE_S = 10.0
#: Variables a boot gets from this script, never from the caller's environment.
PER_BOOT = (VOLUME, SERVE_API, WORKER_ID, PLAN)


@dataclass
class Boot:
    """One measured boot."""

    worker_id: str
    ok: bool = False
    exit_code: int | None = None
    error: str | None = None
    phases: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(PHASES))
    job_status: str | None = None
    health: str | None = None
    job_ms: float | None = None
    env_reused: bool | None = None
    quarantined: int | None = None
    log: str = ""
    #: the volume directory this boot was given (with ``--hosts``, through its host's mount)
    volume: str = ""
    #: the cores the worker's process could run on, read from it once it served (``--cpus-per-boot``)
    cpus: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- the environment of a boot -------------------------------------------------------------


def boot_environ(
    settings: Settings, opts: Options, volume: Path, worker_id: str, port: int
) -> dict[str, str]:
    """The caller's environment, the pass-through options, and this boot's volume, id and port."""
    # A boot fetches weights: it keeps their credentials (the worker it starts does not).
    env = child_environ(settings.environ, inherit_pythonpath=True, weights_credentials=True, drop=PER_BOOT)
    if opts.extras is not None:
        env["BOOTSTRAP_EXTRAS"] = opts.extras
    if opts.manifest is not None:
        env["BOOTSTRAP_MANIFEST"] = str(Path(opts.manifest).resolve())
    if opts.mirror is not None:
        env["BOOTSTRAP_MIRROR"] = opts.mirror
    env["BOOTSTRAP_VOLUME"] = str(volume)
    env["BOOTSTRAP_SERVE_API"] = f"127.0.0.1:{port}"
    env["BOOTSTRAP_WORKER_ID"] = worker_id
    env.setdefault("BOOTSTRAP_LOG_FORMAT", "json")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_volume(scratch: Path, name: str, seed_cache: Path | None) -> Path:
    """An empty volume directory; with a seed cache, its uv cache hard-linked in ("warm uv cache")."""
    root = scratch / f"vol-{name}-{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True)
    if seed_cache is not None:
        target = Volume(root, "timing").uv_cache
        target.parent.mkdir(parents=True)
        # Hard links cost no space and no time; the cache's files are never modified in place.
        proc = subprocess.run(["cp", "-al", str(seed_cache), str(target)], capture_output=True, check=False)
        if proc.returncode != 0:  # another filesystem: a copy, slower but the same contents
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(seed_cache, target, symlinks=True)
    return root


# -- driving one boot ----------------------------------------------------------------------


def post_job(url: str, job: Mapping[str, Any], timeout_s: float) -> tuple[int, Any]:
    req = urllib.request.Request(  # noqa: S310 - a loopback http:// URL this module built
        url, data=json.dumps(job).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - as above
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        body = err.read()
        with contextlib.suppress(ValueError):
            return int(err.code), json.loads(body or b"null")
        return int(err.code), body.decode(errors="replace")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the boot's process group, SIGKILL it after a grace period."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE_S)


def tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def drive(
    argv: list[str],
    env: Mapping[str, str],
    *,
    cwd: Path,
    volume: Path,
    worker_id: str,
    port: int,
    job: Mapping[str, Any],
    log: Path,
    timeout_s: float,
    started: float | None = None,
) -> Boot:
    """Start a boot, wait for its local API, send the first job, stop it, and read its timeline.

    ``started`` (``time.time()``) lets a caller count work done before this process (baseline).
    """
    boot = Boot(worker_id=worker_id, log=str(log))
    t0 = time.time() if started is None else started
    deadline = time.monotonic() + timeout_s
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            answered = first_job(proc, boot, port, job, deadline)
        finally:
            stop_group(proc)
    events = read_events(Volume(volume, "timing").events(worker_id))
    boot.phases = phases_from(events, t0, answered)
    boot.env_reused = next(
        (e.get("detail", {}).get("reused") for e in events if e["phase"] == "env" and e["event"] == "end"),
        None,
    )
    boot.job_ms = next((e.get("ms") for e in events if e["phase"] == "job" and e["event"] == "end"), None)
    if not boot.ok and boot.error is None:
        fail = next((e for e in events if e["event"] == "fail"), None)
        if fail is not None:
            d = fail.get("detail", {})
            boot.error = f"{fail['phase']} failed: {d.get('name')} ({d.get('code')}): {d.get('error')}"
        else:
            boot.error = "the boot failed:\n" + tail(log)
    if boot.ok and boot.phases.get("ready") is None:
        boot.ok, boot.error = False, "the worker answered but its timeline has no ready event"
    return boot


def first_job(
    proc: subprocess.Popen[bytes], boot: Boot, port: int, job: Mapping[str, Any], deadline: float
) -> float | None:
    """Wait for the local API, POST the job; returns the answer's ``time.time()`` or None."""
    while True:
        code = proc.poll()
        if code is not None:
            boot.exit_code = code
            return None
        if time.monotonic() > deadline:
            boot.error = "timed out waiting for the worker's local API"
            return None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.02)
    with contextlib.suppress(OSError):  # the worker is start.sh's pid (each step execs the next)
        boot.cpus = sorted(os.sched_getaffinity(proc.pid))
    remaining = max(1.0, deadline - time.monotonic())
    try:
        status, body = post_job(f"http://127.0.0.1:{port}/runsync", job, remaining)
    except (OSError, ValueError) as err:
        boot.error = f"the first job got no answer: {type(err).__name__}: {err}"
        boot.exit_code = proc.poll()
        return None
    answered = time.time()
    boot.job_status = body.get("status") if isinstance(body, dict) else None
    output = body.get("output") if isinstance(body, dict) else None
    if isinstance(output, dict) and isinstance(output.get("status"), str):
        boot.health = output["status"]
    if status == 200 and boot.job_status == "COMPLETED":
        boot.ok = True
    else:
        boot.error = f"the first job answered HTTP {status}: {json.dumps(body)[:800]}"
    return answered


def phases_from(
    events: list[dict[str, Any]], started: float, answered: float | None
) -> dict[str, float | None]:
    """A boot's phases (ms) from its timeline events; None for a phase that never ended."""
    out: dict[str, float | None] = dict.fromkeys(PHASES)
    ready_ts: float | None = None
    for e in events:
        if e.get("event") != "end":
            continue
        phase = e.get("phase")
        if phase in BOOT_PHASES and out[phase] is None:
            out[phase] = float(e.get("ms", 0.0))
        elif phase == "ready" and ready_ts is None:
            ready_ts = float(e["ts"])
            out["ready"] = float(e["ms"]) if e.get("ms") is not None else (ready_ts - started) * 1000
    if answered is not None:
        out["total"] = round((answered - started) * 1000, 1)
        if ready_ts is not None:
            out["first_job"] = round(max(0.0, answered - ready_ts) * 1000, 1)
    return out


def startup_ms(phases: Mapping[str, float | None]) -> float | None:
    """What ``total`` holds beyond the named phases (interpreters, exec, the SDK's server)."""
    total = phases.get("total")
    if total is None:
        return None
    named = sum(phases.get(p) or 0.0 for p in (*BOOT_PHASES, "first_job"))
    return round(max(0.0, total - named), 1)


# -- scenarios -----------------------------------------------------------------------------
