"""Leftovers of builders in ``envs/``: temp dirs, their ``.builder`` heartbeat, trash.

The surface `bootstrap gc` and `bootstrap diagnose` use to tell a live build from a dead one.
"""

from __future__ import annotations

# ruff: noqa: PTH104 - rename of whole trees reads clearer at the os level, as elsewhere in bootstrap
import contextlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bootstrap import lease as leases
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume, remove_tree

TMP_PREFIX = ".tmp-"
BROKEN_PREFIX = ".broken-"
BUILDER_FILE = ".builder"
TRASH = "trash-"


@contextlib.contextmanager
def builder_heartbeat(tmp: Path, settings: Settings) -> Iterator[None]:
    """Write ``.builder`` (host, pid, worker) and touch it every TTL/3 while we build."""
    marker = tmp / BUILDER_FILE
    marker.write_text(
        json.dumps(leases.owner_record(worker=settings.worker_id)),
        encoding="utf-8",
    )
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(0.5, settings.lease_ttl_s / 3)):
            with contextlib.suppress(OSError):
                os.utime(marker)

    thread = threading.Thread(target=beat, name="env-builder-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _host() -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname())


def tmp_name(key: str) -> str:
    """``.tmp-<key16>-<host>-<pid>-<rand>``: unique, and names its builder even before ``.builder`` exists."""
    return f"{TMP_PREFIX}{key[:16]}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def parse_tmp_name(name: str) -> dict[str, Any]:
    """key prefix, host and pid from a temp dir's name (empty for trash and foreign names)."""
    body = name[len(TMP_PREFIX) :]
    if not name.startswith(TMP_PREFIX) or body.startswith(TRASH) or len(body) < 18:
        return {}
    parts = body[17:].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return {}
    return {"key": body[:16], "host": parts[0], "pid": int(parts[1])}


def leftover_is_dead(tmp: Path, stale_after_s: float, now: float | None = None) -> bool:
    """A temp dir whose builder is gone: a dead pid on this host, or no heartbeat for a while.

    Trash (``.tmp-trash-*``) is always dead: it is only ever being deleted.
    """
    if tmp.name.startswith(TMP_PREFIX + TRASH):
        return True
    marker = tmp / BUILDER_FILE
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        mtime = marker.stat().st_mtime
    except (OSError, ValueError):
        try:
            mtime = tmp.stat().st_mtime
        except OSError:
            return False
        named = parse_tmp_name(tmp.name)
        same_host = named.get("host") == _host()
        info = {"host": socket.gethostname(), "pid": named["pid"]} if same_host else {}
    return leases.writer_is_dead(info if isinstance(info, dict) else {}, mtime, stale_after_s, now)


def clean_leftovers(volume: Volume, timeline: Timeline | None, stale_after_s: float) -> list[Path]:
    """Remove temp dirs of dead builders in ``envs/`` (renamed aside first, then deleted)."""
    removed: list[Path] = []
    if not volume.envs.is_dir():
        return removed
    for p in volume.envs.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir() and leftover_is_dead(p, stale_after_s):
            discard(p)
            removed.append(p)
            if timeline is not None:
                timeline.log(f"removed a dead builder's leftover {p.name}")
    return removed


def discard(path: Path) -> None:
    """Rename out of the way (a trash name nobody reuses), then delete."""
    trash = path.with_name(f"{TMP_PREFIX}{TRASH}{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    remove_tree(trash)


# -- reuse --------------------------------------------------------------------------------------
