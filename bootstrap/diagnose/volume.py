"""Section ``volume``: found, mounted, laid out, writable, free space, speed; the container disk."""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from pathlib import Path

from bootstrap.diagnose.context import Context, ProbeTimeout, with_timeout
from bootstrap.diagnose.fmt import fs_type, human_bytes
from bootstrap.diagnose.model import Check, Status
from bootstrap.errors import InsufficientDiskError, VolumeError
from bootstrap.settings import CONTAINER_DISK_MIN_FREE, MIN_FREE_GB
from bootstrap.volume import Volume, filesystem, mount_point, require_free


def _write_probe(directory: Path, nbytes: int) -> tuple[float, float]:
    """Write, fsync, drop from cache, read back and delete one unique temp file; (write s, read s)."""
    # A unique name, removed in `finally`: the only thing diagnose ever writes.
    path = directory / f".diagnose-{uuid.uuid4().hex}.tmp"
    payload = os.urandom(min(nbytes, 1 << 20)) * max(1, nbytes >> 20)
    try:
        t0 = time.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        t1 = time.monotonic()
        got = path.read_bytes()
        t2 = time.monotonic()
        if got != payload:
            raise VolumeError(
                f"the volume at {directory} returned different bytes than were written",
                hint="the volume is unhealthy: detach and reattach it, or use another volume",
            )
        return t1 - t0, t2 - t1
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _probe_failure(err: OSError, root: Path, free: int | None) -> Check:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free_text = f"; {human_bytes(free)} free" if free is not None else ""
        return Check(
            "writable",
            Status.BROKEN,
            f"the volume at {root} is full: a 4 KiB write failed ({err.strerror}){free_text}",
            hint="grow the volume, or free space with `bootstrap gc` (lists what it removes with --dry-run)",
        )
    return Check(
        "writable",
        Status.BROKEN,
        f"the volume at {root} is not writable: {err.strerror or err} (errno {err.errno})",
        hint="attach the network volume read-write, or set BOOTSTRAP_VOLUME to a writable directory",
    )


def check_volume(ctx: Context) -> list[Check]:
    o = ctx.options
    checks: list[Check] = []
    assert ctx.volume_problem is not None
    checks.append(ctx.volume_problem)
    vol = ctx.volume
    if vol is not None:
        checks += _volume_checks(ctx, vol)
    try:
        require_free(
            o.root_fs, 0, CONTAINER_DISK_MIN_FREE, what="the container disk", usage=o.usage,
            setting="the container disk size",
        )  # fmt: skip
        du = o.usage(o.root_fs)
        checks.append(
            Check(
                "container_disk",
                Status.OK,
                f"{human_bytes(du.free)} free of {human_bytes(du.total)} on {o.root_fs}",
            )
        )
    except InsufficientDiskError as err:
        checks.append(Check("container_disk", Status.BROKEN, err.message, hint=err.hint))
    return checks


def _filesystem_check(ctx: Context, vol: Volume) -> Check:
    """The filesystem holding the volume, named (MooseFS on RunPod) from the mount table."""
    o = ctx.options
    try:
        fs = with_timeout(
            lambda: filesystem(vol.root, o.mountinfo), o.probe_timeout_s, "resolving the volume"
        )
    except ProbeTimeout as err:
        return Check(
            "filesystem", Status.UNKNOWN, str(err), hint="the volume is not answering; see `writable`"
        )
    return Check("filesystem", Status.OK, fs.describe())


def _volume_checks(ctx: Context, vol: Volume) -> list[Check]:
    o, s = ctx.options, ctx.settings
    checks: list[Check] = []
    is_mount = os.path.ismount(vol.root)
    fstype = fs_type(vol.root)
    if is_mount:
        checks.append(Check("mount", Status.OK, f"{vol.root} is a mount point ({fstype})"))
    elif vol.how == "./.volume":
        checks.append(
            Check(
                "mount",
                Status.DEGRADED,
                f"{vol.root} is a directory on {mount_point(vol.root)} ({fstype}): container disk",
                hint="attach a network volume so envs and weights survive the worker",
            )
        )
    else:
        checks.append(
            Check(
                "mount",
                Status.OK,
                f"{vol.root} is a directory on {mount_point(vol.root)} ({fstype}), not a mount point "
                "(allowed: BOOTSTRAP_VOLUME names it)",
            )
        )
    checks.append(_filesystem_check(ctx, vol))
    if vol.base.is_dir():
        present = sorted(p.name for p in vol.base.iterdir())
        checks.append(Check("layout", Status.OK, f"{vol.base} holds {', '.join(present) or 'nothing yet'}"))
    else:
        checks.append(
            Check("layout", Status.OK, f"empty volume: no {vol.base.name}/ yet (the first boot lays it out)")
        )
    probe_dir = vol.base if vol.base.is_dir() else vol.root
    free: int | None = None
    try:
        free = o.usage(probe_dir).free
    except OSError:
        free = None
    writable = False
    try:
        with_timeout(lambda: _write_probe(probe_dir, 4096), o.probe_timeout_s, "a 4 KiB write probe")
        writable = True
        checks.append(
            Check("writable", Status.OK, f"a 4 KiB probe in {probe_dir} was written, read back and removed")
        )
    except ProbeTimeout as err:
        checks.append(
            Check(
                "writable",
                Status.BROKEN,
                f"the volume at {vol.root} is hanging: {err}",
                hint="the network volume is not answering: restart the pod or terminate the worker; "
                "a boot on it would hang the same way",
            )
        )
    except VolumeError as err:
        checks.append(Check("writable", Status.BROKEN, err.message, hint=err.hint))
    except OSError as err:
        checks.append(_probe_failure(err, vol.root, free))
    try:
        du = require_free(probe_dir, 0, s.min_free_bytes, what="the volume's reserve", usage=o.usage)
        if du.free == 0:
            checks.append(
                Check(
                    "free_space",
                    Status.BROKEN,
                    f"no free space at all on {mount_point(probe_dir)} (holding {vol.root})",
                    hint="grow the volume, or free space with `bootstrap gc`",
                )
            )
        else:
            checks.append(
                Check(
                    "free_space",
                    Status.OK,
                    f"{human_bytes(du.free)} free of {human_bytes(du.total)} on {mount_point(probe_dir)}; "
                    f"reserve {MIN_FREE_GB}={s.min_free_bytes / 1e9:g}",
                )
            )
    except InsufficientDiskError as err:
        checks.append(Check("free_space", Status.BROKEN, err.message, hint=err.hint))
    except OSError as err:
        checks.append(
            Check("free_space", Status.UNKNOWN, f"statvfs failed: {err}", hint="check the mount with `df -h`")
        )
    checks.append(_speed_check(ctx, probe_dir, writable, free))
    return checks


# -- env --------------------------------------------------------------------------------------


def _speed_check(ctx: Context, probe_dir: Path, writable: bool, free: int | None) -> Check:
    """Write and read a probe of ``speed_probe_bytes``: a slow volume makes every cold boot slow."""
    o = ctx.options
    nbytes = o.speed_probe_bytes
    if not writable:
        return Check(
            "speed", Status.UNKNOWN, "not measured: the volume is not writable", hint="see `writable`"
        )
    if free is not None and free < 8 * nbytes:
        return Check(
            "speed",
            Status.UNKNOWN,
            f"not measured: only {human_bytes(free)} free",
            hint="free space first (see free_space)",
        )
    try:
        w, r = with_timeout(
            lambda: _write_probe(probe_dir, nbytes),
            o.probe_timeout_s,
            f"a {human_bytes(nbytes)} speed probe",
        )
        wr, rr = nbytes / max(w, 1e-6), nbytes / max(r, 1e-6)
        text = f"write {human_bytes(wr)}/s (fsynced), read {human_bytes(rr)}/s, {human_bytes(nbytes)} probe"
        if wr < 5e6:
            return Check(
                "speed",
                Status.DEGRADED,
                text + ": very slow",
                hint="the volume is slow right now: cold boots will take long; fill it with "
                "`bootstrap prepare` before scaling out, or use a volume in the workers' data centre",
            )
        return Check("speed", Status.OK, text)
    except ProbeTimeout as err:
        return Check(
            "speed",
            Status.DEGRADED,
            str(err),
            hint="the volume is very slow or stalling: cold boots will exceed their budgets",
        )
    except OSError as err:
        return Check("speed", Status.UNKNOWN, f"probe failed: {err}", hint="see `writable`")
