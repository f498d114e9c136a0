"""Section ``env``: this image's key, READY or why not, the interpreter, half-built and other envs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bootstrap import errors
from bootstrap.diagnose.context import Context, probe_environ
from bootstrap.diagnose.fmt import at_utc, dir_size, human_age, jsonl_mtime, size_text
from bootstrap.diagnose.model import Check, Status
from bootstrap.env import (
    BROKEN_PREFIX,
    TMP_PREFIX,
    env_python,
    is_ready,
    leftover_is_dead,
    pyvenv_home,
    read_failure,
    read_ready,
)
from bootstrap.errors import BootstrapError
from bootstrap.lease import holder_dead_here, list_leases
from bootstrap.timeline import JSONL, read_events
from worker import pipelines  # noqa: F401 - registers the capabilities (standard library only)
from worker.capabilities import needing_programs
from worker.encoders import Tools

_IDENTITY = (
    "import json, platform, sys, sysconfig;"
    "print(json.dumps({'implementation': sys.implementation.name, 'version': platform.python_version(),"
    "'abi': str(sysconfig.get_config_var('SOABI')), 'executable': sys.executable}))"
)


def describe_python(p: Mapping[str, Any]) -> str:
    return f"{p.get('implementation', '?')} {p.get('version', '?')} at {p.get('path', '?')}"


def _stale_lease(ctx: Context, record: dict[str, Any] | None, age: float) -> bool:
    if age >= ctx.settings.lease_ttl_s:
        return True
    return holder_dead_here(record)


def _live_env_leases(ctx: Context) -> dict[str, dict[str, Any]]:
    """Lease name → record, for env leases whose holder looks alive."""
    assert ctx.volume is not None
    out: dict[str, dict[str, Any]] = {}
    for path, record, age in list_leases(ctx.volume.leases):
        name = path.name.removesuffix(".lease")
        if name.startswith("env-") and not _stale_lease(ctx, record, age):
            out[name] = record or {}
    return out


def check_env(ctx: Context) -> list[Check]:
    o = ctx.options
    checks: list[Check] = []
    if ctx.key_error is not None or ctx.key_inputs is None or ctx.key is None:
        err = ctx.key_error or BootstrapError("no env key", hint="see the settings section")
        return [Check("key", Status.BROKEN, err.message, hint=err.hint)]
    inputs, key = ctx.key_inputs, ctx.key
    expected = dict(inputs.get("python") or {})
    extras = ",".join(inputs.get("extras") or []) or "(base only)"
    checks.append(
        Check(
            "key",
            Status.OK,
            f"{key}: extras {extras}; {describe_python(expected)}; uv.lock {str(inputs.get('uv_lock', ''))[:12]}",
        )
    )
    vol = ctx.volume
    if vol is None:
        return checks + ctx.no_volume()
    deadline = time.monotonic() + o.size_budget_s
    final = vol.envs / key
    ready = read_ready(final) if final.is_dir() else None
    entries = sorted(vol.envs.iterdir()) if vol.envs.is_dir() else []
    tmp_prefix = TMP_PREFIX
    others = [p for p in entries if p.is_dir() and p.name != key and not p.name.startswith((tmp_prefix, "."))]
    half = [p for p in entries if p.is_dir() and p.name.startswith(tmp_prefix)]
    aside = [p for p in entries if p.is_dir() and p.name.startswith(BROKEN_PREFIX)]
    live = _live_env_leases(ctx)
    if ready is not None:
        built = ready.get("built_at")
        when = (
            f"built {at_utc(built)} ({human_age(o.clock() - built)} ago)"
            if isinstance(built, (int, float))
            else "built"
        )
        checks.append(
            Check(
                "ready",
                Status.OK,
                f"{final} is READY: {when} by {ready.get('builder', '?')} in {ready.get('build_s', '?')} s, "
                f"{ready.get('uv', 'uv ?')}",
            )
        )
        checks.append(_interpreter_check(ctx, final, expected))
    else:
        checks.append(_not_ready_check(ctx, key, final, expected, inputs, others, live))
        in_use = ctx.env_in_use()
        if in_use is not None:
            checks.append(_interpreter_check(ctx, in_use, expected))
        else:
            checks.append(
                Check(
                    "interpreter",
                    Status.OK,
                    f"this image's interpreter: {describe_python(expected)} (no env to compare)",
                )
            )
    checks.append(check_programs(ctx, list(inputs.get("extras") or [])))
    checks.append(_half_built_check(ctx, key, ready is not None, half, live, deadline))
    if aside:
        listed = "\n".join(f"{p.name}: {size_text(dir_size(p, deadline), o.size_budget_s)}" for p in aside)
        checks.append(
            Check(
                "moved_aside",
                Status.DEGRADED,
                "environments a boot found unusable (pyvenv.cfg home wrong for this interpreter) and "
                f"moved aside before rebuilding:\n{listed}",
                hint="`bootstrap gc` removes them; if this recurs, workers run different images on one "
                "volume (see interpreter)",
            )
        )
    lines = []
    for p in others:
        rec = read_ready(p)
        size = size_text(dir_size(p, deadline), o.size_budget_s)
        if rec is None:
            lines.append(f"{p.name}: not READY, {size}")
            continue
        py = (rec.get("inputs") or {}).get("python") or {}
        ex = ",".join(rec.get("extras") or []) or "base"
        built = rec.get("built_at")
        age = f", built {human_age(o.clock() - built)} ago" if isinstance(built, (int, float)) else ""
        lines.append(f"{p.name}: READY, {size}, extras {ex}, {describe_python(py)}{age}")
    if lines:
        checks.append(
            Check("other_envs", Status.OK, f"{len(lines)} other environment(s):\n" + "\n".join(lines))
        )
    else:
        checks.append(Check("other_envs", Status.OK, "none"))
    return checks


def _not_ready_check(
    ctx: Context,
    key: str,
    final: Path,
    expected: Mapping[str, Any],
    inputs: Mapping[str, Any],
    others: list[Path],
    live: Mapping[str, dict[str, Any]],
) -> Check:
    holder = live.get(f"env-{key}")
    if holder is not None:
        return Check(
            "ready",
            Status.DEGRADED,
            f"{final} is being built now by {holder.get('owner', '?')} on {holder.get('host', '?')}",
            hint=f"wait for it (its log: logs/{str(holder.get('owner', '?')).split(':')[0]}/boot.log); "
            "other workers reuse it once READY",
        )
    failure = read_failure(ctx.volume, key) if ctx.volume else None
    if failure is not None:
        published = str(failure.get("published_key") or "?")
        dropped = failure.get("dropped") or {}
        names = ", ".join(sorted(map(str, dropped))) or "?"
        errors_text = "; ".join(
            f"{k}: {str(v).strip().splitlines()[-1] if str(v).strip() else v}" for k, v in dropped.items()
        )
        at = failure.get("at")
        when = f" {human_age(ctx.options.clock() - at)} ago" if isinstance(at, (int, float)) else ""
        usable = is_ready(ctx.volume.env(published)) if ctx.volume else False
        return Check(
            "ready",
            Status.DEGRADED if usable else Status.BROKEN,
            f"the full set of extras failed to build{when}; dropped {names} ({errors_text[:600]}); "
            f"workers use envs/{published}"
            + (" (READY)" if usable else " (NOT READY)")
            + " and retry the full set every 10 min",
            hint=f"fix the dependency of {names} in pyproject.toml and `uv lock`, or remove it from "
            "BOOTSTRAP_EXTRAS; uv's full error is in the builder's boot.log",
        )
    for p in others:
        rec = read_ready(p)
        if rec is None:
            continue
        theirs = rec.get("inputs") or {}
        if (
            theirs.get("uv_lock") == inputs.get("uv_lock")
            and theirs.get("extras") == inputs.get("extras")
            and theirs.get("python") != inputs.get("python")
        ):
            return Check(
                "ready",
                Status.BROKEN,
                f"no READY environment for this image's interpreter ({describe_python(expected)}): "
                f"envs/{p.name} holds the same lock and extras but was built for another interpreter "
                f"({describe_python(theirs.get('python') or {})}), so this image cannot use it and will "
                "build its own on the next boot (a cold start)",
                hint="environments are built where they run: run `bootstrap prepare` from a pod started "
                "from THIS image (same Python) before deploying; `bootstrap gc` removes the other "
                "environment once no worker uses it",
            )
    failed = _last_env_failure(ctx)
    if failed is not None:
        worker, event = failed
        d = event.get("detail") or {}
        first = (str(d.get("error") or "?").strip().splitlines() or ["?"])[0][:400]
        return Check(
            "ready",
            Status.BROKEN,
            f"{final} does not exist, and the latest attempt to build an environment failed "
            f"(worker {worker}, exit {d.get('code')} {d.get('name')}): {first}",
            hint=str(d.get("hint") or errors.BY_CODE[errors.ENV].todo),
        )
    changed = ""
    for p in others:
        theirs = (read_ready(p) or {}).get("inputs") or {}
        if theirs.get("python") == inputs.get("python") and theirs.get("uv_lock") != inputs.get("uv_lock"):
            changed = f" (uv.lock changed since envs/{p.name} was built)"
            break
    return Check(
        "ready",
        Status.DEGRADED,
        f"not built yet: {final} does not exist{changed}; the next boot builds it (a cold start)",
        hint="fill the volume before deploying with `bootstrap prepare` from a pod running this image",
    )


def _last_env_failure(ctx: Context) -> tuple[str, dict[str, Any]] | None:
    """(worker, event) when the newest env-phase event on the volume is a ``fail``."""
    if ctx.volume is None or not ctx.volume.logs.is_dir():
        return None
    newest: tuple[float, str, dict[str, Any]] | None = None
    dirs = sorted(ctx.volume.logs.iterdir(), key=jsonl_mtime, reverse=True)[: ctx.options.max_workers]
    for d in dirs:
        env_events = [e for e in read_events(d / JSONL) if e.get("phase") == "env"]
        if env_events:
            last = env_events[-1]
            ts = float(last.get("ts") or 0)
            if newest is None or ts > newest[0]:
                newest = (ts, d.name, last)
    if newest is None or newest[2].get("event") != "fail":
        return None
    return newest[1], newest[2]


def _interpreter_check(ctx: Context, final: Path, expected: Mapping[str, Any]) -> Check:
    o = ctx.options
    vol = ctx.volume
    assert vol is not None
    want_path = str(expected.get("path", ""))
    if want_path and not Path(want_path).is_absolute():
        want_path = str(vol.root / want_path)  # a managed interpreter, recorded relative to the volume
    want_home = os.path.realpath(Path(want_path).parent) if want_path else ""
    home = pyvenv_home(final)
    fix = f"delete the broken environment (rm -rf {final}) and run `bootstrap prepare` from this image"
    if home is None:
        return Check("interpreter", Status.BROKEN, f"{final}/pyvenv.cfg is missing or has no home", hint=fix)
    if not Path(home).is_dir():
        return Check(
            "interpreter",
            Status.BROKEN,
            f"{final} was made from the interpreter in {home}, which does not exist here "
            f"(this image's interpreter: {describe_python(expected)})",
            hint=fix,
        )
    python = env_python(final)
    try:
        proc = subprocess.run(
            [str(python), "-I", "-c", _IDENTITY],
            env=probe_environ(ctx.settings),
            capture_output=True,
            text=True,
            timeout=o.probe_timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check(
            "interpreter",
            Status.BROKEN,
            f"{python} did not start within {o.probe_timeout_s:g} s",
            hint="the volume or the interpreter is hanging: see the volume section",
        )
    except OSError as err:
        return Check("interpreter", Status.BROKEN, f"{python} cannot run: {err}", hint=fix)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Check("interpreter", Status.BROKEN, f"{python} fails to start: {last}", hint=fix)
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Check("interpreter", Status.UNKNOWN, f"{python} printed {proc.stdout[-200:]!r}", hint=fix)
    if got.get("version") != expected.get("version") or got.get("abi") != expected.get("abi"):
        return Check(
            "interpreter",
            Status.BROKEN,
            f"{final} runs {got.get('implementation')} {got.get('version')} ({got.get('abi')}) but its key "
            f"says {describe_python(expected)}",
            hint=fix,
        )
    if want_home and os.path.realpath(home) != want_home:
        return Check(
            "interpreter",
            Status.DEGRADED,
            f"pyvenv.cfg home {home} differs from this image's interpreter directory {want_home} "
            f"(same version {got.get('version')})",
            hint="it runs, but was made from another copy of the interpreter: rebuild it from this image "
            "with `bootstrap prepare` if imports fail",
        )
    return Check(
        "interpreter",
        Status.OK,
        f"pyvenv.cfg home {home} matches this image's interpreter; env python runs "
        f"{got.get('implementation')} {got.get('version')}",
    )


def _half_built_check(
    ctx: Context,
    key: str,
    ready: bool,
    half: list[Path],
    live: Mapping[str, dict[str, Any]],
    deadline: float,
) -> Check:
    o = ctx.options
    if not half:
        return Check("half_built", Status.OK, "no half-built environments")
    lines: list[str] = []
    worst = Status.OK
    ours_dead = False
    for p in half:
        fragment = p.name[len("." if p.name.startswith(".") else "") :]
        fragment = re.sub(r"^tmp-", "", fragment).split("-")[0]
        builder = next((r for n, r in live.items() if fragment and n.startswith(f"env-{fragment}")), None)
        try:
            age = human_age(o.clock() - p.stat().st_mtime)
        except OSError:
            age = "?"
        size = size_text(dir_size(p, deadline), o.size_budget_s)
        # The builder's own heartbeat file (``.builder``: host, pid, touched every TTL/3) is the
        # witness; the lease only names who it is.
        if not leftover_is_dead(p, ctx.settings.stale_after_s, o.clock()):
            who = builder.get("owner", "?") if builder else "a live builder"
            lines.append(f"{p.name}: being built by {who} ({size}, {age} old)")
            continue
        lines.append(f"{p.name}: its builder is gone ({size}, last change {age} ago)")
        worst = Status.DEGRADED if worst is Status.OK else worst
        if fragment and key.startswith(fragment) and not ready:
            ours_dead = True
    if ours_dead:
        return Check(
            "half_built",
            Status.BROKEN,
            "a builder was killed while building this image's environment and left it half-built; "
            "this key has no READY environment, so the next boot builds it from scratch:\n"
            + "\n".join(lines),
            hint="build it now with `bootstrap prepare` (a half-built directory is never used); "
            "`bootstrap gc` removes the leftovers",
        )
    if worst is Status.OK:
        return Check("half_built", Status.OK, "\n".join(lines))
    return Check(
        "half_built",
        Status.DEGRADED,
        "leftovers of killed builders (never used, only taking space):\n" + "\n".join(lines),
        hint="`bootstrap gc` removes them (`bootstrap gc --dry-run` lists them first)",
    )


# -- leases -----------------------------------------------------------------------------------


def check_programs(ctx: Context, extras: list[str]) -> Check:
    """ffmpeg and ffprobe, for the capabilities that run them: found on PATH and answering
    ``-version`` (the env's smoke test asks the same at build time; this is the image now)."""
    needs = needing_programs(extras)
    if not needs:
        return Check("ffmpeg", Status.OK, "not needed: no capability in this image's extras runs it")
    users = ", ".join(sorted(needs))
    required = [c for c in needs if not ctx.settings.is_optional(c)]
    try:
        tools = Tools.find(ctx.settings.environ.get("PATH", os.defpath))
        versions = tools.versions()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        return Check(
            "ffmpeg",
            Status.BROKEN if required else Status.DEGRADED,
            f"{users} need ffmpeg and ffprobe: {err}",
            hint="install Debian's ffmpeg in the image (Dockerfile.runpod does: apt-get install ffmpeg); "
            + (
                "the worker cannot start its " + ", ".join(required)
                if required
                else "those capabilities degrade"
            ),
        )
    return Check(
        "ffmpeg",
        Status.OK,
        f"ffmpeg {versions['ffmpeg']} ({tools.ffmpeg}) and ffprobe {versions['ffprobe']} run; used by {users}",
    )
