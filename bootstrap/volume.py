"""Phase ``preflight``: find the volume, prove it is writable, check free space (SPEC §3, §5).

Also the volume's layout (`Volume`) and the disk-space check every writer uses before it
writes (`require_free`), so "bytes needed and free, on which filesystem" is said one way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bootstrap.atomic import fsync_dir as fsync_dir  # re-exported: the weights import it from here
from bootstrap.errors import InsufficientDiskError, VolumeError, format_bytes
from bootstrap.settings import (
    CONTAINER_DISK_MIN_FREE,
    MIN_FREE_GB,
    REQUIRE_VOLUME,
    VOLUME,
    Settings,
)

RUNPOD_VOLUME = Path("/runpod-volume")
POD_VOLUME = Path("/workspace")
LAYOUT_DIR = ".bootstrap"
#: a worker's timeline events and its boot log for people, in ``logs/<worker-id>/``
JSONL = "boot.jsonl"
TEXT = "boot.log"


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


DiskUsageFn = Callable[[Path], DiskUsage]


def disk_usage(path: Path) -> DiskUsage:
    """Free space as an unprivileged writer sees it (``f_bavail``), on ``path``'s filesystem."""
    st = os.statvfs(path)
    return DiskUsage(
        st.f_blocks * st.f_frsize,
        (st.f_blocks - st.f_bfree) * st.f_frsize,
        st.f_bavail * st.f_frsize,
    )


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (for messages)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


#: filesystems worth naming in a report, by mount type (FUSE mounts also by their source)
_FS_NAMES = {"fuse.mfs": "MooseFS", "fuse.mfsmount": "MooseFS", "mfs": "MooseFS", "nfs": "NFS", "nfs4": "NFS"}


@dataclass(frozen=True)
class FileSystem:
    """The mount holding a path, as ``/proc/self/mountinfo`` tells it."""

    mount_point: Path
    #: the kernel's type: ``fuse`` for MooseFS's ``mfsmount`` (RunPod's network volume), ``ext4``…
    type: str
    #: what was mounted: ``mfs#<master>:<port>`` for MooseFS, a device, ``overlay``…
    source: str

    @property
    def name(self) -> str:
        """A human name: ``MooseFS`` for an ``mfsmount`` (type ``fuse``, source ``mfs#…``), else the type."""
        if self.type.startswith("fuse") and self.source.startswith("mfs#"):
            return "MooseFS"
        return _FS_NAMES.get(self.type, self.type or "unknown")

    def describe(self) -> str:
        """E.g. ``MooseFS (fuse, mfs#10.0.0.1:9421) at /runpod-volume``."""
        kind = self.name if self.name == self.type else f"{self.name} ({self.type}, {self.source})"
        return f"{kind} at {self.mount_point}"


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> FileSystem:
    """The filesystem holding ``path``: the longest mount point above it (the last one mounted,
    when several share it). ``type`` is ``unknown`` when mountinfo cannot be read."""
    target = path.resolve()
    best: FileSystem | None = None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return FileSystem(mount_point(path), "unknown", "")
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mnt = Path(_unescape_mountinfo(fields[4]))
        if target != mnt and mnt not in target.parents:
            continue
        if best is None or len(mnt.parts) >= len(best.mount_point.parts):
            best = FileSystem(mnt, _unescape_mountinfo(tail[0]), _unescape_mountinfo(tail[1]))
    return best or FileSystem(mount_point(path), "unknown", "")


@dataclass(frozen=True)
class Volume:
    """The volume root and the layout of SPEC §5 beneath it."""

    root: Path
    #: how it was found: "BOOTSTRAP_VOLUME", "/runpod-volume", "/workspace" or "./.volume"
    how: str
    #: True when falling back to container disk (``./.volume``)
    degraded: bool = False

    @property
    def base(self) -> Path:
        return self.root / LAYOUT_DIR

    @property
    def envs(self) -> Path:
        return self.base / "envs"

    @property
    def uv_cache(self) -> Path:
        return self.base / "uv-cache"

    @property
    def python(self) -> Path:
        return self.base / "python"

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def verified(self) -> Path:
        return self.models / ".verified"

    @property
    def quarantine(self) -> Path:
        return self.base / "quarantine"

    @property
    def leases(self) -> Path:
        return self.base / "leases"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def id_file(self) -> Path:
        """The volume's random id (the path-independent name its managed interpreters are reached by)."""
        return self.base / "volume-id"

    def log_dir(self, worker_id: str) -> Path:
        return self.logs / worker_id

    def events(self, worker_id: str) -> Path:
        """A worker's timeline events (``logs/<worker-id>/boot.jsonl``)."""
        return self.log_dir(worker_id) / JSONL

    def boot_log(self, worker_id: str) -> Path:
        """A worker's boot log for people (``logs/<worker-id>/boot.log``)."""
        return self.log_dir(worker_id) / TEXT

    def env(self, key: str) -> Path:
        """The environment published under ``key`` (usable only while it holds ``READY``)."""
        return self.envs / key

    def plan_path(self, worker_id: str) -> Path:
        return self.state / f"{worker_id}.json"

    def make_layout(self) -> None:
        for d in (
            self.envs,
            self.uv_cache,
            self.models,
            self.verified,
            self.quarantine,
            self.leases,
            self.logs,
            self.state,
        ):
            d.mkdir(parents=True, exist_ok=True)


def resolve_volume(
    settings: Settings,
    *,
    allow_local: bool = False,
    is_mount: Callable[[Path], bool] = lambda p: os.path.ismount(p),
    cwd: Path | None = None,
) -> Volume:
    """Find the volume exactly as SPEC §3 says.

    1. ``BOOTSTRAP_VOLUME`` when set: it need not be a mount point, but must be a directory
       (``serve``, with ``allow_local``, creates it when it does not exist).
    2. ``/runpod-volume`` when it is a mount point (serverless).
    3. ``/workspace`` when it is a mount point (a pod).
    4. ``./.volume`` — for ``serve`` (``allow_local``), and for ``run`` only when the volume is
       not required; it is container disk, so the boot is marked degraded.
    """
    if settings.volume is not None:
        root = settings.volume.expanduser()
        if allow_local and not root.exists():
            # `serve` is a local run: a named directory that does not exist yet is made. `run`
            # never does this: a missing mount must not silently become container disk.
            try:
                root.mkdir(parents=True)
            except OSError as err:
                raise VolumeError(
                    f"{VOLUME}={settings.volume} does not exist and cannot be created: {err.strerror or err}",
                    hint=f"point {VOLUME} at a writable directory",
                ) from None
        if not root.is_dir():
            raise VolumeError(
                f"{VOLUME}={settings.volume} does not exist or is not a directory",
                hint=f"create it, or point {VOLUME} at the network volume's mount (usually /runpod-volume)",
            )
        return Volume(root.resolve(), VOLUME)
    if is_mount(RUNPOD_VOLUME):
        return Volume(RUNPOD_VOLUME, str(RUNPOD_VOLUME))
    if is_mount(POD_VOLUME):
        return Volume(POD_VOLUME, str(POD_VOLUME))
    if allow_local or not settings.require_volume:
        root = (cwd or Path.cwd()) / ".volume"
        root.mkdir(parents=True, exist_ok=True)
        return Volume(root.resolve(), "./.volume", degraded=not allow_local)
    raise VolumeError(
        f"no network volume: neither {RUNPOD_VOLUME} nor {POD_VOLUME} is a mount point",
        hint=(
            "attach a network volume to the endpoint (Endpoint → Advanced → Network Volume), or set "
            f"{VOLUME} to a writable directory; {REQUIRE_VOLUME}=0 lets the worker run on container disk"
        ),
    )


def require_free(
    path: Path,
    needed: int,
    reserve: int,
    *,
    what: str,
    usage: DiskUsageFn = disk_usage,
    setting: str = MIN_FREE_GB,
) -> DiskUsage:
    """Raise `InsufficientDiskError` unless ``needed + reserve`` bytes are free on ``path``'s filesystem."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    du = usage(probe)
    if du.free < needed + reserve:
        short = needed + reserve - du.free
        raise InsufficientDiskError(
            f"not enough space for {what} on {mount_point(probe)} (holding {path}): "
            f"needs {format_bytes(needed)} plus a reserve of {format_bytes(reserve)}, "
            f"but only {format_bytes(du.free)} is free",
            hint=(
                f"grow that filesystem by {short / 1e9:.2f} GB, free space with `bootstrap gc`, "
                f"or lower {setting}"
            ),
        )
    return du


def write_probe(base: Path) -> float:
    """Write, fsync, read back, rename and delete a small file under ``base``; return ms taken."""
    t0 = time.monotonic()
    payload = uuid.uuid4().bytes * 256  # 4 KiB
    tmp = base / f".probe-{uuid.uuid4().hex}.tmp"
    final = tmp.with_suffix(".done")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if final.read_bytes() != payload:
            raise VolumeError(
                f"the volume at {base} returned different bytes than were written",
                hint="the volume is unhealthy: detach and reattach it, or use another volume",
            )
    finally:
        for p in (tmp, final):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return (time.monotonic() - t0) * 1000


def preflight(
    settings: Settings,
    volume: Volume,
    *,
    usage: DiskUsageFn = disk_usage,
    root_fs: Path = Path("/"),
) -> dict[str, Any]:
    """Prove the volume writable (a real write probe) and check free space on it and on ``/``."""
    try:
        volume.make_layout()
        probe_ms = write_probe(volume.base)
    except VolumeError:
        raise
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise InsufficientDiskError(
                f"the volume at {volume.root} is full: writing a 4 KiB probe failed ({err.strerror})",
                hint=f"grow the volume or free space with `bootstrap gc`; {format_bytes(usage(volume.root).free)} is free",
            ) from err
        raise VolumeError(
            f"the volume at {volume.root} is not writable: {err.strerror or err} ({type(err).__name__})",
            hint="attach the network volume read-write, or set BOOTSTRAP_VOLUME to a writable directory",
        ) from err
    vol = require_free(volume.base, 0, settings.min_free_bytes, what="the volume's reserve", usage=usage)
    root = require_free(
        root_fs,
        0,
        CONTAINER_DISK_MIN_FREE,
        what="the container disk",
        usage=usage,
        setting="the container disk size",
    )
    return {
        "volume": str(volume.root),
        "found_by": volume.how,
        "degraded": volume.degraded,
        "free_bytes": vol.free,
        "root_free_bytes": root.free,
        "probe_ms": round(probe_ms, 1),
    }


def tree_size(path: Path) -> int:
    """Bytes used by the files under ``path`` (hardlinked files counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
    return total


def remove_tree(path: Path) -> None:
    """Remove a directory tree, tolerating files that vanish under us (another gc)."""
    shutil.rmtree(path, ignore_errors=True)
