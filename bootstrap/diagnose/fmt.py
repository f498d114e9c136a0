"""Sizes, ages and times as a report shows them; bounded directory sizes; a mount's filesystem type."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bootstrap.timeline import JSONL
from bootstrap.volume import mount_point


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def at_utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def dir_size(path: Path, deadline: float) -> tuple[int, bool]:
    """Bytes under ``path`` (hardlinks once) and whether the count finished before ``deadline``."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        if time.monotonic() > deadline:
            return total, False
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total, True


def size_text(size: tuple[int, bool], budget_s: float) -> str:
    n, complete = size
    return (
        human_bytes(n) if complete else f"at least {human_bytes(n)} (counting stopped after {budget_s:g} s)"
    )


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (``fuse.mfsmount`` on RunPod)."""
    try:
        target = str(mount_point(path))
        best = ""
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1].replace("\\040", " ") == target:
                best = parts[2]
        return best or "unknown"
    except OSError:
        return "unknown"


def jsonl_mtime(path: Path) -> float:
    """When a worker's log directory last got an event (0 when it has none)."""
    try:
        return (path / JSONL).stat().st_mtime
    except OSError:
        return 0.0
