"""Section ``last_boot``: how each worker's latest boot on this volume ended, from its timeline."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from bootstrap import errors
from bootstrap.diagnose.context import Context
from bootstrap.diagnose.fmt import at_utc, human_age, jsonl_mtime
from bootstrap.diagnose.model import Check, Status
from bootstrap.timeline import JSONL, PHASES, TEXT, read_events

_ERROR_LINE = re.compile(r"\]\s+(error|warn)\s|Traceback|Error:|error:")


def _error_lines(log: Path, limit: int = 5) -> list[str]:
    """The last error-ish lines of a boot.log (only its tail is read)."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [line.rstrip() for line in text.splitlines() if _ERROR_LINE.search(line)]
    return [line[:300] for line in lines[-limit:]]


def check_last_boot(ctx: Context) -> list[Check]:
    if ctx.volume is None:
        return ctx.no_volume()
    o, vol = ctx.options, ctx.volume
    dirs = [d for d in vol.logs.iterdir() if (d / JSONL).is_file()] if vol.logs.is_dir() else []
    if not dirs:
        return [
            Check("boots", Status.OK, "no boot logged on this volume yet", exit_code=None, exit_name=None)
        ]
    dirs.sort(key=jsonl_mtime, reverse=True)
    boots = [(d, read_events(d / JSONL)) for d in dirs[: o.max_workers]]
    last_ok = max(
        (e[-1].get("ts", 0) for _d, e in boots if e and any(x.get("phase") == "ready" for x in e)),
        default=0.0,
    )
    checks = [_boot_check(ctx, d, events, last_ok) for d, events in boots]
    if len(dirs) > o.max_workers:
        checks.append(
            Check(
                "older", Status.OK, f"{len(dirs) - o.max_workers} older worker logs not shown", exit_code=None
            )
        )
    return checks


def _boot_check(ctx: Context, log_dir: Path, events: list[dict[str, Any]], last_ok: float) -> Check:
    o, vol = ctx.options, ctx.volume
    assert vol is not None
    name = log_dir.name
    log = log_dir / TEXT
    if not events:
        return Check(
            name, Status.UNKNOWN, f"{log_dir / JSONL} holds no events", hint=f"read {log}", exit_code=None
        )
    last = events[-1]
    ts = float(last.get("ts") or 0)
    order = {p: i for i, p in enumerate(PHASES)}
    reached = max((str(e.get("phase")) for e in events), key=lambda p: order.get(p, -1))
    at = f"{at_utc(ts)}, {human_age(o.clock() - ts)} ago"
    fails = [e for e in events if e.get("event") == "fail"]
    lines = _error_lines(log)
    tail = ("\nlast error lines of boot.log:\n" + "\n".join(f"  {line}" for line in lines)) if lines else ""
    if fails:
        d = fails[-1].get("detail") or {}
        code = d.get("code")
        ec = errors.lookup(code) if isinstance(code, (int, str)) else None
        code_int = ec.code if ec is not None else (code if isinstance(code, int) else None)
        exit_name = ec.name if ec is not None else (str(d.get("name")) if d.get("name") else None)
        meaning = f"\nexplain {code_int}: {ec.meaning}" if ec is not None else ""
        detail = (
            f"exited {code_int} ({exit_name}) in phase {fails[-1].get('phase')} at {at}: "
            f"{d.get('error', '?')}{meaning}{tail}"
        )
        hint = str(d.get("hint") or (ec.todo if ec else "read boot.log"))
        hint += f" (`bootstrap explain {code_int}`)"
        superseded = last_ok > ts
        if superseded:
            detail += "\n(a later boot on this volume reached ready)"
        return Check(
            name,
            Status.DEGRADED if superseded else Status.BROKEN,
            detail,
            hint=hint,
            exit_code=code_int,
            exit_name=exit_name,
        )
    ready = [e for e in events if e.get("phase") == "ready"]
    if ready:
        jobs = sum(1 for e in events if e.get("phase") == "job" and e.get("event") == "end")
        return Check(
            name,
            Status.OK,
            f"reached ready at {at_utc(float(ready[-1].get('ts') or 0))} ({jobs} jobs since); last event {at}",
            exit_code=None,
            exit_name=None,
        )
    if last.get("event") in ("end", "skip") and last.get("phase") in ("env", "weights"):
        plan = vol.plan_path(name)
        try:
            exec_ts = plan.stat().st_mtime
        except OSError:
            exec_ts = 0.0
        if exec_ts >= ts - 1:
            python = "<env>/bin/python"
            with contextlib.suppress(OSError, ValueError):
                python = json.loads(plan.read_text()).get("python") or python
            return Check(
                name,
                Status.BROKEN,
                f"bootstrap finished {reached} at {at} and started the worker, which died before its "
                f"first event (no exit code was logged){tail}",
                hint=f"run the worker by hand to see its error: PYTHONPATH={ctx.settings.app_dir} "
                f"{python} -m worker --plan {plan}",
                exit_code=None,
                exit_name=None,
            )
        return Check(
            name,
            Status.OK,
            f"stopped after phase {reached} at {at} (a `bootstrap prepare` or `run --until {reached}`): exit 0",
            exit_code=0,
            exit_name="OK",
        )
    return Check(
        name,
        Status.UNKNOWN,
        f"last event: {last.get('phase')} {last.get('event')} at {at}; nothing logged after it: still "
        f"running, or killed (SIGKILL, the OOM killer, the platform stopping it){tail}",
        hint=f"if no worker is running it was killed during {last.get('phase')}: read {log}; the next boot "
        "resumes or redoes that work",
        exit_code=None,
        exit_name=None,
    )


# -- settings ---------------------------------------------------------------------------------
