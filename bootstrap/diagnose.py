"""``bootstrap diagnose`` (SPEC §8): what is wrong on this worker or volume, and what to do.

Results are data: `collect` returns a `Report` of `Section`s, each a list of typed `Check`s
(status ``ok | degraded | broken | unknown``; anything not ok carries a ``hint``: a command to
run or a setting to change). `render_text` (for people: aligned, broken first) and
`render_json` (for scripts: ``report_version`` 1) print it; neither computes anything.

Diagnose READS and NEVER REPAIRS: it creates no directory, takes no lease and moves no file.
The only write is the volume's probe: one uniquely named temp file, removed at once.

Internal logic:

1. Find the volume as `bootstrap run` would (`resolve_volume`), but never create ``./.volume``:
   the lookup runs with "volume required" semantics and the fallback is only looked at.
2. Run every section in its own daemon thread with a deadline. A hung network volume (a stat
   that never returns) or a hung GPU (``nvidia-smi`` or CUDA init stuck) then costs one
   "did not answer" check, never a hung command. Subprocesses get their own timeouts too.
3. Checks that need the worker's packages (torch CUDA init, onnxruntime providers) run with the
   environment's own Python in a subprocess; ``bootstrap`` itself never imports them.
4. Secrets are never formatted; as a second line of defence every rendered string is scrubbed
   of the values of secret-named variables (`bootstrap.timeline.secret_values`).

The report's status is ``broken`` if any check is broken, else ``degraded`` if any is degraded,
else ``ok``: ``unknown`` (say, no GPU on a CPU machine) is shown with its hint but lowers nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap import errors
from bootstrap.env import pyvenv_home, read_ready
from bootstrap.errors import BootstrapError, InsufficientDiskError, VolumeError
from bootstrap.lease import holder_dead_here
from bootstrap.manifest import ModelFile
from bootstrap.settings import (
    CONTAINER_DISK_MIN_FREE,
    KNOWN,
    LEASE_TTL_S,
    MIN_FREE_GB,
    REQUIRE_GPU,
    Settings,
    is_secret_name,
    redact,
)
from bootstrap.timeline import JSONL, PHASES, TEXT, read_events, secret_values
from bootstrap.volume import (
    POD_VOLUME,
    RUNPOD_VOLUME,
    DiskUsageFn,
    Volume,
    disk_usage,
    mount_point,
    require_free,
    resolve_volume,
)

REPORT_VERSION = 1

#: Section names, in the order of SPEC §8 (and of the JSON report).
SECTIONS = ("platform", "volume", "env", "leases", "weights", "gpu", "last_boot", "settings")


class Status(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    BROKEN = "broken"
    UNKNOWN = "unknown"


#: Worst first: how sections and checks are ordered for people.
SEVERITY: Mapping[Status, int] = {Status.BROKEN: 3, Status.DEGRADED: 2, Status.UNKNOWN: 1, Status.OK: 0}


@dataclass(frozen=True)
class Check:
    """One finding. Anything not ok says what to do in ``hint``."""

    name: str
    status: Status
    detail: str
    hint: str | None = None
    #: last-boot checks only: the boot's exit code and its name (None when it did not exit)
    exit_code: int | None = None
    exit_name: str | None = None

    def __post_init__(self) -> None:
        if self.status is not Status.OK and not self.hint:
            raise ValueError(f"check {self.name!r} is {self.status} but says nothing to do")


@dataclass
class Section:
    name: str
    checks: list[Check] = field(default_factory=list)
    #: checks carry exit_code/exit_name (the last-boot section)
    carries_exit: bool = False
    #: wall time spent collecting it (for the benchmark; not part of the JSON contract)
    ms: float = 0.0

    @property
    def status(self) -> Status:
        if not self.checks:
            return Status.UNKNOWN
        return max((c.status for c in self.checks), key=SEVERITY.__getitem__)


@dataclass
class Report:
    sections: list[Section]
    #: diagnose's own bugs (a section that raised): the command exits 1 unless something is broken
    internal_errors: list[str] = field(default_factory=list)
    #: values never to print (secret-named variables' values)
    secrets: tuple[str, ...] = ()

    @property
    def status(self) -> Status:
        found = {c.status for s in self.sections for c in s.checks}
        if Status.BROKEN in found:
            return Status.BROKEN
        if Status.DEGRADED in found:
            return Status.DEGRADED
        return Status.OK

    def section(self, name: str) -> Section:
        return next(s for s in self.sections if s.name == name)

    @property
    def exit_code(self) -> int:
        """3 when something is broken, 1 for diagnose's own bug, else 0 (SPEC §2)."""
        if self.status is Status.BROKEN:
            return 3
        return errors.INTERNAL if self.internal_errors else 0

    def to_json(self) -> dict[str, Any]:
        """The report as SPEC §8's object, secrets scrubbed from every string."""
        sections = []
        for s in self.sections:
            checks = []
            for c in s.checks:
                item: dict[str, Any] = {
                    "name": c.name,
                    "status": str(c.status),
                    "detail": c.detail,
                    "hint": c.hint,
                }
                if s.carries_exit:
                    item["exit_code"] = c.exit_code
                    item["exit_name"] = c.exit_name
                checks.append(item)
            sections.append({"name": s.name, "status": str(s.status), "checks": checks})
        data = {"report_version": REPORT_VERSION, "status": str(self.status), "sections": sections}
        scrubbed: dict[str, Any] = _scrub_data(data, self.secrets)
        return scrubbed


@dataclass(frozen=True)
class Options:
    """Collaborators and limits, passed in so tests use real directories instead of patches."""

    #: longest wait for one filesystem probe or small subprocess
    probe_timeout_s: float = 10.0
    #: longest wait for ``nvidia-smi`` and for the env's Python initialising CUDA
    gpu_timeout_s: float = 60.0
    #: longest time spent counting environment sizes (the rest is reported as "not counted")
    size_budget_s: float = 1.5
    #: bytes of the volume's read/write speed probe
    speed_probe_bytes: int = 8 * 1024 * 1024
    #: the container disk checked beside the volume
    root_fs: Path = Path("/")
    #: where ``./.volume`` would be (the working directory of `bootstrap run`)
    cwd: Path | None = None
    usage: DiskUsageFn = disk_usage
    clock: Callable[[], float] = time.time
    #: last-boot checks for at most this many workers (newest first)
    max_workers: int = 50
    #: longest wait for any section but gpu (which gets twice gpu_timeout_s plus probe_timeout_s)
    section_timeout_s: float = 30.0


# -- helpers ----------------------------------------------------------------------------------


class ProbeTimeout(Exception):
    """A probe did not answer in time (it keeps running in a daemon thread, harmlessly)."""


def with_timeout(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; its result, its exception, or `ProbeTimeout`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:
            box["error"] = err

    t = threading.Thread(target=target, name=f"diagnose:{what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise ProbeTimeout(f"{what} did not answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


#: ``scheme://user:password@`` in a URL (a mirror, a source): the password is never shown.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^@\s/]+@")


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for value in secrets:
        if value in text:
            text = text.replace(value, "***")
    return _URL_PASSWORD.sub(r"\1:***@", text)


def _scrub_data(data: Any, secrets: Sequence[str]) -> Any:
    if isinstance(data, str):
        return _scrub(data, secrets)
    if isinstance(data, dict):
        return {k: _scrub_data(v, secrets) for k, v in data.items()}
    if isinstance(data, list):
        return [_scrub_data(v, secrets) for v in data]
    return data


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


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _dir_size(path: Path, deadline: float) -> tuple[int, bool]:
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


def _size_text(size: tuple[int, bool], budget_s: float) -> str:
    n, complete = size
    return (
        human_bytes(n) if complete else f"at least {human_bytes(n)} (counting stopped after {budget_s:g} s)"
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _fs_type(path: Path) -> str:
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


@dataclass
class Context:
    """What every section may read: settings, the volume (or why there is none), options."""

    settings: Settings
    options: Options
    volume: Volume | None
    volume_problem: Check | None
    hostname: str = field(default_factory=socket.gethostname)
    #: the env key's inputs and the key this image would use, or why there is none
    key_inputs: dict[str, Any] | None = None
    key: str | None = None
    key_error: BootstrapError | None = None

    def env_in_use(self) -> Path | None:
        """The READY env a boot would use: this key's, or the degraded one a failure record names."""
        if self.volume is None or self.key is None:
            return None
        final = self.volume.envs / self.key
        if (final / "READY").is_file():
            return final
        failure = _failure_record(self, self.key)
        if failure is not None and failure.get("published_key"):
            held = self.volume.envs / str(failure["published_key"])
            if (held / "READY").is_file():
                return held
        return None

    def no_volume(self) -> list[Check]:
        return [
            Check(
                "volume",
                Status.UNKNOWN,
                "no volume to look at",
                hint="see the volume section: attach the network volume or set BOOTSTRAP_VOLUME",
            )
        ]


# -- the volume's lookup ----------------------------------------------------------------------


def find_volume(settings: Settings, cwd: Path | None = None) -> tuple[Volume | None, Check]:
    """The volume `bootstrap run` would use, without creating ``./.volume``; and the ``found`` check."""
    strict = dataclasses.replace(settings, require_volume=True)
    try:
        vol = resolve_volume(strict, allow_local=False)
    except VolumeError as err:
        if settings.require_volume or settings.volume is not None:
            return None, Check("found", Status.BROKEN, err.message, hint=err.hint)
        local = (cwd or Path.cwd()) / ".volume"
        hint = (
            "attach a network volume (it mounts at /runpod-volume) or set BOOTSTRAP_VOLUME; "
            "on container disk every worker builds and downloads everything again"
        )
        if local.is_dir():
            return Volume(local.resolve(), "./.volume", degraded=True), Check(
                "found",
                Status.DEGRADED,
                f"no network volume: boots fall back to {local.resolve()} on container disk",
                hint=hint,
            )
        return None, Check(
            "found",
            Status.DEGRADED,
            f"no network volume: a boot would fall back to {local} on container disk (not created yet)",
            hint=hint,
        )
    return vol, Check("found", Status.OK, f"{vol.root} (found by {vol.how})")


# -- platform ---------------------------------------------------------------------------------


def check_platform(ctx: Context) -> list[Check]:
    s = ctx.settings
    env = s.environ
    runpod = sorted(n for n in env if n.startswith("RUNPOD_"))
    shown = ", ".join(f"{n}={redact(n, env[n])}" for n in runpod) or "no RUNPOD_* variables"
    if env.get("RUNPOD_ENDPOINT_ID"):
        kind = "a RunPod serverless worker"
    elif env.get("RUNPOD_POD_ID"):
        kind = "a RunPod pod"
    else:
        kind = "not on RunPod (no RUNPOD_POD_ID)"
    checks = [Check("runpod", Status.OK, f"{kind}: {shown}")]
    if env.get("BOOTSTRAP_WORKER_ID"):
        how = "BOOTSTRAP_WORKER_ID"
    elif env.get("RUNPOD_POD_ID"):
        how = "RUNPOD_POD_ID"
    else:
        how = "the hostname"
    checks.append(Check("worker_id", Status.OK, f"{s.worker_id} (from {how}); logs at logs/{s.worker_id}/"))
    mounted = [str(p) for p in (RUNPOD_VOLUME, POD_VOLUME) if os.path.ismount(p)]
    where = (
        ", ".join(mounted) + " mounted" if mounted else f"neither {RUNPOD_VOLUME} nor {POD_VOLUME} is mounted"
    )
    vol = ctx.volume
    status, hint = Status.OK, None
    if vol is None:
        detail = f"{where}; no volume in use"
    elif vol.root == POD_VOLUME:
        detail = (
            f"{where}; this is a pod's view ({POD_VOLUME}): serverless workers see the same volume at "
            f"{RUNPOD_VOLUME}, and what bootstrap writes is valid at both paths"
        )
    elif vol.root == RUNPOD_VOLUME:
        detail = f"{where}; the serverless mount path"
    else:
        detail = f"{where}; using {vol.root} (found by {vol.how})"
    if vol is not None:
        detail += _volume_identity(vol)
    if vol is not None and env.get("RUNPOD_ENDPOINT_ID") and vol.root == POD_VOLUME:
        status = Status.DEGRADED
        hint = f"a serverless worker normally sees the volume at {RUNPOD_VOLUME}: check the endpoint's network volume"
    checks.append(Check("mount_path", status, detail, hint=hint))
    return checks


def _volume_identity(vol: Volume) -> str:
    """The volume's id and the path-independent alias managed interpreters are reached by."""
    try:
        from bootstrap import interpreter as interp
    except ImportError:  # pragma: no cover - older layouts had no volume id
        return ""
    try:
        vid = (vol.base / interp.VOLUME_ID_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    alias = interp.ALIAS_ROOT / vid
    target = os.path.realpath(alias) if alias.is_symlink() else None
    via = f"; alias {alias} → {target}" if target else ""
    return f"; volume id {vid} (the same at /workspace and /runpod-volume){via}"


# -- volume -----------------------------------------------------------------------------------


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


def _volume_checks(ctx: Context, vol: Volume) -> list[Check]:
    o, s = ctx.options, ctx.settings
    checks: list[Check] = []
    is_mount = os.path.ismount(vol.root)
    fstype = _fs_type(vol.root)
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
    nbytes = o.speed_probe_bytes
    if not writable:
        checks.append(
            Check("speed", Status.UNKNOWN, "not measured: the volume is not writable", hint="see `writable`")
        )
    elif free is not None and free < 8 * nbytes:
        checks.append(
            Check(
                "speed",
                Status.UNKNOWN,
                f"not measured: only {human_bytes(free)} free",
                hint="free space first (see free_space)",
            )
        )
    else:
        try:
            w, r = with_timeout(
                lambda: _write_probe(probe_dir, nbytes),
                o.probe_timeout_s,
                f"a {human_bytes(nbytes)} speed probe",
            )
            wr, rr = nbytes / max(w, 1e-6), nbytes / max(r, 1e-6)
            text = (
                f"write {human_bytes(wr)}/s (fsynced), read {human_bytes(rr)}/s, {human_bytes(nbytes)} probe"
            )
            if wr < 5e6:
                checks.append(
                    Check(
                        "speed",
                        Status.DEGRADED,
                        text + ": very slow",
                        hint="the volume is slow right now: cold boots will take long; fill it with "
                        "`bootstrap prepare` before scaling out, or use a volume in the workers' data centre",
                    )
                )
            else:
                checks.append(Check("speed", Status.OK, text))
        except ProbeTimeout as err:
            checks.append(
                Check(
                    "speed",
                    Status.DEGRADED,
                    str(err),
                    hint="the volume is very slow or stalling: cold boots will exceed their budgets",
                )
            )
        except OSError as err:
            checks.append(Check("speed", Status.UNKNOWN, f"probe failed: {err}", hint="see `writable`"))
    return checks


# -- env --------------------------------------------------------------------------------------


_IDENTITY = (
    "import json, platform, sys, sysconfig;"
    "print(json.dumps({'implementation': sys.implementation.name, 'version': platform.python_version(),"
    "'abi': str(sysconfig.get_config_var('SOABI')), 'executable': sys.executable}))"
)


def _child_environ(settings: Settings) -> dict[str, str]:
    """The environment for probes run with the env's Python: no secrets, no virtualenv."""
    env = {k: v for k, v in settings.environ.items() if not is_secret_name(k)}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def _describe_python(p: Mapping[str, Any]) -> str:
    return f"{p.get('implementation', '?')} {p.get('version', '?')} at {p.get('path', '?')}"


def _stale_lease(ctx: Context, record: dict[str, Any] | None, age: float) -> bool:
    if age >= ctx.settings.lease_ttl_s:
        return True
    return holder_dead_here(record)


def _live_env_leases(ctx: Context) -> dict[str, dict[str, Any]]:
    """Lease name → record, for env leases whose holder looks alive."""
    from bootstrap.lease import list_leases

    assert ctx.volume is not None
    out: dict[str, dict[str, Any]] = {}
    for path, record, age in list_leases(ctx.volume.leases):
        name = path.name.removesuffix(".lease")
        if name.startswith("env-") and not _stale_lease(ctx, record, age):
            out[name] = record or {}
    return out


def check_env(ctx: Context) -> list[Check]:
    from bootstrap import env as envmod

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
            f"{key}: extras {extras}; {_describe_python(expected)}; uv.lock {str(inputs.get('uv_lock', ''))[:12]}",
        )
    )
    vol = ctx.volume
    if vol is None:
        return checks + ctx.no_volume()
    deadline = time.monotonic() + o.size_budget_s
    final = vol.envs / key
    ready = read_ready(final) if final.is_dir() else None
    entries = sorted(vol.envs.iterdir()) if vol.envs.is_dir() else []
    tmp_prefix = envmod.TMP_PREFIX
    others = [p for p in entries if p.is_dir() and p.name != key and not p.name.startswith((tmp_prefix, "."))]
    half = [p for p in entries if p.is_dir() and p.name.startswith(tmp_prefix)]
    aside = [
        p for p in entries if p.is_dir() and p.name.startswith(getattr(envmod, "BROKEN_PREFIX", ".broken-"))
    ]
    live = _live_env_leases(ctx)
    if ready is not None:
        built = ready.get("built_at")
        when = (
            f"built {_when(built)} ({human_age(o.clock() - built)} ago)"
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
                    f"this image's interpreter: {_describe_python(expected)} (no env to compare)",
                )
            )
    checks.append(_half_built_check(ctx, key, ready is not None, half, live, deadline))
    if aside:
        listed = "\n".join(f"{p.name}: {_size_text(_dir_size(p, deadline), o.size_budget_s)}" for p in aside)
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
        size = _size_text(_dir_size(p, deadline), o.size_budget_s)
        if rec is None:
            lines.append(f"{p.name}: not READY, {size}")
            continue
        py = (rec.get("inputs") or {}).get("python") or {}
        ex = ",".join(rec.get("extras") or []) or "base"
        built = rec.get("built_at")
        age = f", built {human_age(o.clock() - built)} ago" if isinstance(built, (int, float)) else ""
        lines.append(f"{p.name}: READY, {size}, extras {ex}, {_describe_python(py)}{age}")
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
    failure = _failure_record(ctx, key)
    if failure is not None:
        published = str(failure.get("published_key") or "?")
        dropped = failure.get("dropped") or {}
        names = ", ".join(sorted(map(str, dropped))) or "?"
        errors_text = "; ".join(
            f"{k}: {str(v).strip().splitlines()[-1] if str(v).strip() else v}" for k, v in dropped.items()
        )
        at = failure.get("at")
        when = f" {human_age(ctx.options.clock() - at)} ago" if isinstance(at, (int, float)) else ""
        usable = (ctx.volume.envs / published / "READY").is_file() if ctx.volume else False
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
                f"no READY environment for this image's interpreter ({_describe_python(expected)}): "
                f"envs/{p.name} holds the same lock and extras but was built for another interpreter "
                f"({_describe_python(theirs.get('python') or {})}), so this image cannot use it and will "
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
    dirs = sorted(ctx.volume.logs.iterdir(), key=_mtime, reverse=True)[: ctx.options.max_workers]
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


def _mtime(path: Path) -> float:
    try:
        return (path / JSONL).stat().st_mtime
    except OSError:
        return 0.0


def _failure_record(ctx: Context, key: str) -> dict[str, Any] | None:
    """``envs/.failed-<key>.json``: the full set of extras failed and a degraded env was published."""
    if ctx.volume is None:
        return None
    from bootstrap import env as envmod

    path = ctx.volume.envs / f"{getattr(envmod, 'FAILED_PREFIX', '.failed-')}{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
            f"(this image's interpreter: {_describe_python(expected)})",
            hint=fix,
        )
    python = final / "bin" / "python"
    try:
        proc = subprocess.run(
            [str(python), "-I", "-c", _IDENTITY],
            env=_child_environ(ctx.settings),
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
            f"says {_describe_python(expected)}",
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
    from bootstrap import env as envmod

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
        size = _size_text(_dir_size(p, deadline), o.size_budget_s)
        # The builder's own heartbeat file (``.builder``: host, pid, touched every TTL/3) is the
        # better witness where the env module writes one; the lease is the fallback.
        is_dead = getattr(envmod, "leftover_is_dead", None)
        alive = builder is not None
        if is_dead is not None:
            alive = not is_dead(p, max(60.0, 4 * ctx.settings.lease_ttl_s))
        if alive:
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


def check_leases(ctx: Context) -> list[Check]:
    from bootstrap.lease import list_leases

    if ctx.volume is None:
        return ctx.no_volume()
    s, o = ctx.settings, ctx.options
    found = list_leases(ctx.volume.leases)
    if not found:
        return [Check("held", Status.OK, "no leases held")]
    what = _lease_subjects(ctx)
    checks = []
    for path, record, age in found:
        name = path.name.removesuffix(".lease")
        rec = record or {}
        owner = rec.get("owner", "?")
        host, pid = rec.get("host", "?"), rec.get("pid", "?")
        started = rec.get("started")
        held_for = f", held {human_age(o.clock() - started)}" if isinstance(started, (int, float)) else ""
        subject = f" (for {what[name]})" if name in what else ""
        who = f"{owner} (pid {pid} on host {host}){held_for}, renewed {human_age(age)} ago{subject}"
        if record is None:
            who = f"an unreadable record, last changed {human_age(age)} ago"
        dead_here = holder_dead_here(record)
        if age >= s.lease_ttl_s or dead_here:
            why = (
                f"pid {pid} is not running on this host"
                if dead_here
                else f"not renewed for {human_age(age)}, longer than {LEASE_TTL_S}={s.lease_ttl_s:g} s"
            )
            checks.append(
                Check(
                    name,
                    Status.BROKEN,
                    f"stale: held by {who}; {why}: its holder died without releasing it",
                    hint=f"the next worker that needs it takes it over after {s.lease_ttl_s:g} s without "
                    f"change ({LEASE_TTL_S}); to clear it now: rm {path}",
                )
            )
        else:
            checks.append(Check(name, Status.OK, f"held by {who}"))
    return checks


def _lease_subjects(ctx: Context) -> dict[str, str]:
    """Lease name → what it guards, for the names this image would use (``file-<sha256>`` is opaque)."""
    out: dict[str, str] = {}
    if ctx.key is not None:
        out[f"env-{ctx.key}"] = "this image's environment"
    try:
        from bootstrap.manifest import load_manifest
        from bootstrap.weights import lease_name

        for f in load_manifest(ctx.settings.manifest):
            out[lease_name(f.dest)] = f.dest
    except (BootstrapError, ImportError):
        pass
    return out


# -- weights ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quarantined:
    """One file or directory the fetcher moved to ``quarantine/``, with its recorded reason."""

    path: Path
    dest: str | None
    reason: str | None
    present: bool


def quarantined(vol: Volume, limit: int = 2000) -> list[Quarantined]:
    """What ``quarantine/`` holds: ``<dest with / as __>.<stamp>.<hex>`` beside ``<name>.json``."""
    if not vol.quarantine.is_dir():
        return []
    entries = sorted(vol.quarantine.iterdir())[:limit]
    names = {p.name for p in entries}
    out: list[Quarantined] = []
    for p in entries:
        if p.name.endswith(".json"):
            stem = p.name.removesuffix(".json")
            try:
                data = json.loads(p.read_text(encoding="utf-8", errors="replace"))
            except (OSError, ValueError):
                data = {}
            data = data if isinstance(data, dict) else {}
            reason = str(data["reason"])[:300] if data.get("reason") else None
            dest = str(data["dest"]) if data.get("dest") else None
            out.append(Quarantined(vol.quarantine / stem, dest, reason, stem in names))
        elif f"{p.name}.json" not in names and not p.name.endswith(".discarded"):
            out.append(Quarantined(p, None, None, True))
    return out


def _matches(q: Quarantined, f: ModelFile) -> bool:
    dests = {f.dest, f.published_dest}
    if q.dest is not None:
        return q.dest in dests
    return any(q.path.name.startswith(d.replace("/", "__") + ".") for d in dests)


def check_weights(ctx: Context) -> list[Check]:
    from bootstrap.manifest import load_manifest, selected
    from bootstrap.weights import check_verified

    s = ctx.settings
    try:
        every = load_manifest(s.manifest)
    except BootstrapError as err:
        return [Check("manifest", Status.BROKEN, err.message, hint=err.hint)]
    files = selected(every, s.extras)
    caps = ", ".join(s.extras) or "none"
    checks = [
        Check(
            "manifest", Status.OK, f"{s.manifest}: {len(files)} of {len(every)} files for capabilities {caps}"
        )
    ]
    vol = ctx.volume
    if vol is None:
        return checks + ctx.no_volume()
    quarantine = quarantined(vol)
    claimed: set[Path] = set()
    for f in files:
        copies = [q for q in quarantine if _matches(q, f)]
        claimed.update(q.path for q in copies)
        why = check_verified(vol, f)
        target = vol.models / f.published_dest
        if why is None:
            extra = f"; {len(copies)} earlier bad copies in quarantine" if copies else ""
            size = target.stat().st_size if target.is_file() else None
            size_text = f", {human_bytes(size)}" if size is not None else ""
            checks.append(Check(f.published_dest, Status.OK, f"verified{size_text} ({f.format}){extra}"))
            continue
        optional = s.is_optional(f.capability)
        status = Status.DEGRADED if optional else Status.BROKEN
        role = f"optional capability {f.capability}" if optional else f"required by {f.capability}"
        lines = [f"{why} ({role}); source {f.source}"]
        for q in copies[-3:]:
            kept = str(q.path) if q.present else f"{q.path.name} (discarded)"
            lines.append(f"quarantined copy: {kept}" + (f": {q.reason}" if q.reason else ""))
        if copies:
            hint = (
                "the source served a file that failed verification (see the quarantined copy): fix "
                f"the source in {s.manifest} or its credentials (HF_TOKEN, AWS_*), or set "
                "BOOTSTRAP_MIRROR to a good copy; then `bootstrap prepare` fetches it again"
            )
        else:
            hint = (
                "run `bootstrap prepare` to fetch and verify it (check the source's reachability and "
                "credentials: HF_TOKEN, AWS_*), or set BOOTSTRAP_MIRROR"
            )
        if optional:
            hint += f"; the worker starts without {f.capability} meanwhile"
        else:
            hint += f"; until then boots exit 13, or list {f.capability} in BOOTSTRAP_OPTIONAL to start without it"
        checks.append(Check(f.published_dest, status, "\n".join(lines), hint=hint))
    if quarantine:
        deadline = time.monotonic() + ctx.options.size_budget_s
        size = sum(
            _dir_size(q.path, deadline)[0] if q.path.is_dir() else _file_size(q.path) for q in quarantine
        )
        other = len([q for q in quarantine if q.path not in claimed])
        checks.append(
            Check(
                "quarantine",
                Status.OK,
                f"{len(quarantine)} file(s), {human_bytes(size)} in {vol.quarantine}"
                + (f" ({other} not of this manifest)" if other else "")
                + "; kept for a look, `bootstrap gc` removes old ones",
            )
        )
    else:
        checks.append(Check("quarantine", Status.OK, "empty"))
    return checks


# -- gpu --------------------------------------------------------------------------------------

#: A 69-byte ONNX model (one Identity node, opset 13): a real session proves which providers work.
_PROBE_MODEL = "CAc6OwoQCgF4EgF5IghJZGVudGl0eRIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgBEgQKAggBQgQKABAN"

_GPU_PROBE = f"""
import base64, importlib.util, json, sys
out = {{}}
def err(e):
    return f"{{type(e).__name__}}: {{e}}"[:500]
if importlib.util.find_spec("torch") is not None:
    t = {{}}
    try:
        import torch
        t = {{"version": torch.__version__, "cuda": torch.version.cuda}}
        t["available"] = bool(torch.cuda.is_available())
        if t["available"]:
            torch.zeros(1).cuda()
            t["device"] = torch.cuda.get_device_name(0)
    except Exception as e:
        t["error"] = err(e)
    out["torch"] = t
if importlib.util.find_spec("onnxruntime") is not None:
    r = {{}}
    try:
        import onnxruntime as ort
        r = {{"version": ort.__version__, "available": list(ort.get_available_providers())}}
        try:
            from onnxruntime.capi import build_and_package_info as b
            r["package"] = getattr(b, "package_name", None)
            r["cuda"] = getattr(b, "cuda_version", None)
        except Exception:
            pass
        want = [p for p in ("CUDAExecutionProvider",) if p in r["available"]] + ["CPUExecutionProvider"]
        s = ort.InferenceSession(base64.b64decode("{_PROBE_MODEL}"), providers=want)
        r["session"] = list(s.get_providers())
    except Exception as e:
        r["error"] = err(e)
    out["onnxruntime"] = r
sys.stdout.write("\\n@@diagnose@@" + json.dumps(out) + "\\n")
"""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    m = re.match(r"(\d+)\.(\d+)", str(text))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _run_smi(ctx: Context, args: list[str]) -> subprocess.CompletedProcess[str]:
    smi = shutil.which("nvidia-smi", path=ctx.settings.environ.get("PATH", os.defpath))
    assert smi is not None
    return subprocess.run(
        [smi, *args],
        env=_child_environ(ctx.settings),
        capture_output=True,
        text=True,
        timeout=ctx.options.gpu_timeout_s,
        check=False,
    )


def check_gpu(ctx: Context) -> list[Check]:
    s, o = ctx.settings, ctx.options
    required = s.require_gpu
    problem = Status.BROKEN if required else Status.DEGRADED
    absent = Status.BROKEN if required else Status.UNKNOWN
    gpu_todo = errors.BY_CODE[errors.GPU].todo
    checks: list[Check] = []
    driver_cuda: tuple[int, ...] | None = None
    device = False
    if shutil.which("nvidia-smi", path=s.environ.get("PATH", os.defpath)) is None:
        checks.append(
            Check(
                "device",
                absent,
                "no NVIDIA GPU visible: nvidia-smi is not on PATH",
                hint=gpu_todo
                if required
                else "fine on a CPU machine (jobs run on CPU); on RunPod pick a GPU endpoint, and set "
                f"{REQUIRE_GPU}=1 so a worker without a usable GPU fails fast with exit 16",
            )
        )
    else:
        try:
            q = _run_smi(ctx, ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
            if q.returncode != 0:
                out = (q.stdout + q.stderr).strip().splitlines()
                checks.append(
                    Check(
                        "device",
                        problem,
                        f"nvidia-smi failed ({q.returncode}): {out[-1] if out else 'no output'}",
                        hint="the GPU driver is not answering: terminate this worker so RunPod replaces it; "
                        + gpu_todo,
                    )
                )
            else:
                devices = [line.strip() for line in q.stdout.strip().splitlines() if line.strip()]
                full = _run_smi(ctx, [])
                m = re.search(r"CUDA Version:\s*([\d.]+)", full.stdout)
                driver_cuda = _version_tuple(m.group(1)) if m else None
                device = bool(devices)
                cuda_text = f"; driver supports CUDA up to {m.group(1)}" if m else ""
                if devices:
                    checks.append(Check("device", Status.OK, "; ".join(devices) + cuda_text))
                else:
                    checks.append(Check("device", absent, "nvidia-smi lists no GPU", hint=gpu_todo))
        except subprocess.TimeoutExpired:
            checks.append(
                Check(
                    "device",
                    problem,
                    f"nvidia-smi did not answer within {o.gpu_timeout_s:g} s: the GPU or its driver is hung",
                    hint="terminate this worker (or restart the pod) so RunPod gives you another GPU; "
                    "a worker here would hang at CUDA init",
                )
            )
    checks += _gpu_env_checks(ctx, device, driver_cuda, problem, absent)
    return checks


def _gpu_env_checks(
    ctx: Context, device: bool, driver_cuda: tuple[int, ...] | None, problem: Status, absent: Status
) -> list[Check]:

    s, o = ctx.settings, ctx.options
    if ctx.volume is None:
        return ctx.no_volume()
    if ctx.key is None:
        why = ctx.key_error.message if ctx.key_error else "?"
        return [Check("env_probe", Status.UNKNOWN, f"no env key: {why}", hint="see the env section")]
    final = ctx.env_in_use()
    if final is None:
        return [
            Check(
                "env_probe",
                Status.UNKNOWN,
                "no READY environment for this image to probe torch and onnxruntime with",
                hint="run `bootstrap prepare`, then `bootstrap diagnose` again",
            )
        ]
    python = final / "bin" / "python"
    try:
        proc = subprocess.run(
            [str(python), "-I", "-c", _GPU_PROBE],
            env=_child_environ(s),
            capture_output=True,
            text=True,
            timeout=o.gpu_timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [
            Check(
                "env_probe",
                problem,
                f"importing torch/onnxruntime and initialising CUDA took longer than {o.gpu_timeout_s:g} s: "
                "CUDA init is hanging",
                hint="terminate this worker so RunPod replaces it (a hung GPU); "
                + errors.BY_CODE[errors.GPU].todo,
            )
        ]
    except OSError as err:
        return [Check("env_probe", Status.BROKEN, f"{python} cannot run: {err}", hint="see the env section")]
    marker = proc.stdout.rfind("@@diagnose@@")
    if marker < 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [
            Check(
                "env_probe",
                Status.BROKEN,
                f"the probe failed in {python}: {last}",
                hint="see the env section",
            )
        ]
    data = json.loads(proc.stdout[marker + len("@@diagnose@@") :].strip())
    stderr = _ANSI.sub("", proc.stderr)
    checks: list[Check] = []
    wheel_cuda: list[tuple[str, tuple[int, ...]]] = []
    t = data.get("torch")
    if t is None:
        checks.append(Check("torch", Status.OK, "not installed in this environment (no capability needs it)"))
    else:
        if (v := _version_tuple(t.get("cuda"))) is not None:
            wheel_cuda.append((f"torch {t.get('version')}", v))
        if t.get("available") and not t.get("error"):
            checks.append(
                Check(
                    "torch",
                    Status.OK,
                    f"torch {t.get('version')} (CUDA {t.get('cuda')}): CUDA works on {t.get('device')}",
                )
            )
        else:
            why = t.get("error") or "torch.cuda.is_available() is False"
            checks.append(
                Check(
                    "torch",
                    problem if device else absent,
                    f"torch {t.get('version', '?')} (CUDA {t.get('cuda')}): CUDA unusable: {why}",
                    hint=errors.BY_CODE[errors.GPU].todo,
                )
            )
    r = data.get("onnxruntime")
    if r is None:
        checks.append(
            Check("onnxruntime", Status.OK, "not installed in this environment (no capability needs it)")
        )
    else:
        if (v := _version_tuple(r.get("cuda"))) is not None:
            wheel_cuda.append((f"{r.get('package') or 'onnxruntime'} {r.get('version')}", v))
        session = r.get("session") or []
        head = f"{r.get('package') or 'onnxruntime'} {r.get('version', '?')}"
        if r.get("error"):
            checks.append(
                Check(
                    "onnxruntime",
                    Status.BROKEN,
                    f"{head}: a session fails: {r['error']}",
                    hint="see the env section",
                )
            )
        elif "CUDAExecutionProvider" in session:
            checks.append(Check("onnxruntime", Status.OK, f"{head}: a session runs on {', '.join(session)}"))
        else:
            reasons = [
                line.strip()
                for line in stderr.splitlines()
                if "Failed to load library" in line
                or "Require cuDNN" in line
                or "Failed to create CUDA" in line
            ]
            why = ("; ".join(reasons))[-600:] or "the CUDA provider is not available in this build"
            if device:
                detail = f"{head}: onnxruntime falls back to CPU on this GPU machine (session providers {session}): {why}"
            else:
                detail = f"{head}: CPU only here (no GPU; session providers {session}); on a GPU: {why}"
            checks.append(
                Check(
                    "onnxruntime",
                    problem if device else absent,
                    detail,
                    hint="install the CUDA/cuDNN libraries the wheel needs (or pick wheels for the "
                    f"driver's CUDA); {errors.BY_CODE[errors.GPU].todo}",
                )
            )
    if wheel_cuda:
        wants = ", ".join(f"{name} wants CUDA {'.'.join(map(str, v))}" for name, v in wheel_cuda)
        if driver_cuda is None:
            checks.append(
                Check(
                    "cuda_versions",
                    absent,
                    f"{wants}; no NVIDIA driver here to compare with",
                    hint="on RunPod, pick GPU types whose driver supports that CUDA version (the endpoint's "
                    "CUDA version filter)",
                )
            )
        else:
            too_new = [(n, v) for n, v in wheel_cuda if v > driver_cuda]
            have = ".".join(map(str, driver_cuda))
            if too_new:
                checks.append(
                    Check(
                        "cuda_versions",
                        problem,
                        f"{wants}, but the driver supports CUDA up to {have}",
                        hint="pick a GPU type whose driver supports the wheels' CUDA (the endpoint's CUDA "
                        "version filter), or pin wheels built for CUDA " + have,
                    )
                )
            else:
                checks.append(Check("cuda_versions", Status.OK, f"{wants}; the driver supports up to {have}"))
    return checks


# -- last boot --------------------------------------------------------------------------------


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
    dirs.sort(key=_mtime, reverse=True)
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
    at = f"{_when(ts)}, {human_age(o.clock() - ts)} ago"
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
            f"reached ready at {_when(float(ready[-1].get('ts') or 0))} ({jobs} jobs since); last event {at}",
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


def _effective(s: Settings) -> dict[str, str]:
    """What a defaulted setting resolves to, so "default" rows show a value, not "unset"."""
    budgets = ",".join(f"{k}={v:g}" for k, v in s.phase_budget_s.items())
    return {
        "BOOTSTRAP_VOLUME": str(s.volume) if s.volume else "auto (/runpod-volume, /workspace, ./.volume)",
        "BOOTSTRAP_REQUIRE_VOLUME": str(int(s.require_volume)),
        "BOOTSTRAP_EXTRAS": ",".join(s.extras) or "(none)",
        "BOOTSTRAP_OPTIONAL": ",".join(sorted(s.optional)) or "(none)",
        "BOOTSTRAP_MANIFEST": str(s.manifest),
        "BOOTSTRAP_MIN_FREE_GB": f"{s.min_free_bytes / 1e9:g}",
        "BOOTSTRAP_LOCK_TIMEOUT_S": f"{s.lock_timeout_s:g}",
        "BOOTSTRAP_LEASE_TTL_S": f"{s.lease_ttl_s:g}",
        "BOOTSTRAP_PHASE_BUDGET_S": budgets,
        "BOOTSTRAP_ON_FATAL": s.on_fatal,
        "BOOTSTRAP_FATAL_GRACE_S": f"{s.fatal_grace_s:g}",
        "BOOTSTRAP_LOG_FORMAT": s.log_format,
        "BOOTSTRAP_PYTHON": s.python,
        "BOOTSTRAP_WORKER_ID": s.worker_id,
        "BOOTSTRAP_REQUIRE_GPU": str(int(s.require_gpu)),
        "BOOTSTRAP_LOCKS": "on" if s.locks else "off",
        "BOOTSTRAP_DEBUG": str(int(s.debug)),
        "BOOTSTRAP_APP_DIR": str(s.app_dir),
        "BOOTSTRAP_PROJECT_DIR": str(s.project_dir),
        "WORKER_CONCURRENCY": str(s.worker_concurrency),
        "WORKER_MAX_INPUT_MB": f"{s.worker_max_input_bytes / 1024 / 1024:g}",
        "WORKER_MAX_PIXELS": str(s.worker_max_pixels),
        "WORKER_ALLOW_PRIVATE_URLS": str(int(s.worker_allow_private_urls)),
        "WORKER_MAX_AUDIO_S": f"{s.worker_max_audio_s:g}",
        "WORKER_MAX_TEXT_CHARS": str(s.worker_max_text_chars),
    }


def check_settings(ctx: Context) -> list[Check]:
    s = ctx.settings
    checks: list[Check] = []
    shown = s.shown()
    names = {n for n, _v, _s in shown}
    effective = _effective(s)
    for name, value, source in shown:
        if source == "default" and not is_secret_name(name) and name in effective:
            value = effective[name]
        status, hint = Status.OK, None
        if name == "BOOTSTRAP_LOCKS" and not s.locks:
            status = Status.DEGRADED
            hint = "locks off is a test switch: every worker does all the work itself; unset BOOTSTRAP_LOCKS"
        checks.append(Check(name, status, f"{value} ({source})", hint=hint))
    for name in sorted(n for n in s.environ if is_secret_name(n) and n not in names):
        checks.append(Check(name, Status.OK, f"{redact(name, s.environ[name])} (env)"))
    return checks


# -- running it all ---------------------------------------------------------------------------

SectionFn = Callable[[Context], list[Check]]

SECTION_FNS: Mapping[str, SectionFn] = {
    "platform": check_platform,
    "volume": check_volume,
    "env": check_env,
    "leases": check_leases,
    "weights": check_weights,
    "gpu": check_gpu,
    "last_boot": check_last_boot,
    "settings": check_settings,
}


def _section_deadline(name: str, o: Options) -> float:
    if name == "gpu":
        return 2 * o.gpu_timeout_s + o.probe_timeout_s
    return o.section_timeout_s


def collect(
    settings: Settings,
    options: Options | None = None,
    *,
    config_problem: Check | None = None,
    only: Iterable[str] = SECTIONS,
    debug: bool = False,
) -> Report:
    """Run every section (each in its own thread, each with a deadline) into a `Report`.

    ``config_problem`` is a broken settings check when the real settings could not be read
    (the report then runs on the settings that could).
    """
    o = options or Options()
    wanted = [n for n in SECTIONS if n in set(only)]
    report = Report(sections=[], secrets=secret_values(settings.environ))
    try:
        volume, found = with_timeout(
            lambda: find_volume(settings, o.cwd), o.probe_timeout_s, "the volume's lookup"
        )
    except ProbeTimeout as err:
        volume, found = (
            None,
            Check(
                "found",
                Status.BROKEN,
                f"{err}: a mount point is hanging",
                hint="the network volume is not answering: restart the pod or terminate the worker",
            ),
        )
    except BootstrapError as err:
        volume, found = None, Check("found", Status.BROKEN, err.message, hint=err.hint)
    ctx = Context(settings=settings, options=o, volume=volume, volume_problem=found)
    # The key once, here, before any thread: sysconfig's lazy first read is not thread-safe
    # (a racing reader saw SOABI as None and computed another key).
    from bootstrap import env as envmod

    try:
        ctx.key_inputs = with_timeout(
            lambda: envmod.key_inputs(settings, settings.extras), o.probe_timeout_s, "the env key's inputs"
        )
        ctx.key = envmod.env_key(ctx.key_inputs)
    except BootstrapError as err:
        ctx.key_error = err
    except ProbeTimeout as err:  # a managed interpreter on a hung volume
        ctx.key_error = BootstrapError(
            str(err), hint="the volume or its interpreter is hanging: see the volume section"
        )
    results: dict[str, Section] = {}
    threads: dict[str, threading.Thread] = {}
    lock = threading.Lock()

    def run(name: str) -> None:
        t0 = time.monotonic()
        try:
            checks = SECTION_FNS[name](ctx)
        except Exception as err:
            tb = traceback.format_exc()
            with lock:
                report.internal_errors.append(f"{name}: {type(err).__name__}: {err}")
                if debug:
                    print(tb, file=__import__("sys").stderr)
            checks = [
                Check(
                    "diagnose",
                    Status.UNKNOWN,
                    f"diagnose failed on this section: {type(err).__name__}: {err}",
                    hint="a bug in diagnose: rerun with BOOTSTRAP_DEBUG=1 for the traceback and report it",
                )
            ]
        with lock:
            results[name] = Section(
                name, checks, carries_exit=name == "last_boot", ms=(time.monotonic() - t0) * 1000
            )

    for name in wanted:
        threads[name] = threading.Thread(target=run, args=(name,), name=f"diagnose:{name}", daemon=True)
        threads[name].start()
    start = time.monotonic()
    for name in wanted:
        threads[name].join(max(0.0, start + _section_deadline(name, o) - time.monotonic()))
    for name in wanted:
        with lock:
            section = results.get(name)
        if section is None:
            section = Section(
                name,
                [
                    Check(
                        "answer",
                        Status.BROKEN,
                        f"the {name} checks did not finish within {_section_deadline(name, o):g} s: "
                        "something they read is hanging",
                        hint="a hung network volume or GPU: restart the pod or terminate the worker",
                        exit_code=None,
                    )
                ],
                carries_exit=name == "last_boot",
            )
        if name == "settings" and config_problem is not None:
            section.checks.insert(0, config_problem)
        report.sections.append(section)
    return report


def settings_or_problem(environ: Mapping[str, str]) -> tuple[Settings, Check | None]:
    """Settings from ``environ``; if a variable is bad, a broken check for it and settings without it.

    Diagnose must report a bad setting, not stop on it: each variable the error names is
    dropped (so its default applies) until the rest reads cleanly.
    """
    env = dict(environ)
    problems: list[BootstrapError] = []
    for _ in range(len(KNOWN) + 1):
        try:
            settings = Settings.from_env(env)
        except BootstrapError as err:
            problems.append(err)
            named = [n for n in KNOWN if n in err.message and n in env]
            if not named:
                break
            for n in named:
                env.pop(n)
            continue
        if not problems:
            return settings, None
        text = "; ".join(p.message for p in problems)
        return settings, Check(
            "config",
            Status.BROKEN,
            f"{text} (boots exit 2; this report uses the default instead)",
            hint="; ".join(p.hint for p in problems),
        )
    raise problems[-1]


# -- rendering --------------------------------------------------------------------------------


def render_json(report: Report) -> str:
    """The SPEC §8 JSON object (``report_version`` 1), one line per call site's choice: indented."""
    return json.dumps(report.to_json(), indent=2, ensure_ascii=False)


def render_text(report: Report) -> str:
    """For people: sections and checks broken first, aligned columns, hints under each check."""
    counts = {st: 0 for st in Status}
    for s in report.sections:
        for c in s.checks:
            counts[c.status] += 1
    summary = ", ".join(
        f"{counts[st]} {st}" for st in (Status.BROKEN, Status.DEGRADED, Status.UNKNOWN) if counts[st]
    )
    lines = [f"bootstrap diagnose: {report.status.upper()}" + (f" ({summary})" if summary else "")]
    order = {n: i for i, n in enumerate(SECTIONS)}
    sections = sorted(report.sections, key=lambda s: (-SEVERITY[s.status], order.get(s.name, 99)))
    width = max((len(c.name) for s in sections for c in s.checks), default=8)
    width = min(max(width, 8), 40)
    pad = " " * (2 + 9 + 1 + width + 2)
    for s in sections:
        lines.append("")
        lines.append(f"{s.name.replace('_', ' ')}: {s.status}")
        checks = sorted(s.checks, key=lambda c: -SEVERITY[c.status])
        for c in checks:
            detail = c.detail.splitlines() or [""]
            name = c.name if len(c.name) <= width else c.name[: width - 1] + "…"
            lines.append(f"  {c.status!s:<9} {name:<{width}}  {detail[0]}")
            lines += [pad + d for d in detail[1:]]
            if c.hint:
                lines.append(pad + "→ " + c.hint)
    if report.internal_errors:
        lines.append("")
        lines.append("diagnose itself failed on: " + "; ".join(report.internal_errors))
    return _scrub("\n".join(lines), report.secrets)


def run_diagnose(as_json: bool, environ: Mapping[str, str], *, stream: Any = None) -> int:
    """`bootstrap diagnose [--json]`: print the report; 0, 3 when something is broken, 1 for a bug.

    ``environ`` is the process environment, handed in by the CLI (the entry point).
    """
    import sys

    out = stream if stream is not None else sys.stdout
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is not None:  # a non-UTF-8 terminal must not turn "→" into exit 1
        reconfigure(errors="replace")
    settings, problem = settings_or_problem(environ)
    report = collect(settings, config_problem=problem, debug=settings.debug)
    out.write((render_json(report) if as_json else render_text(report)) + "\n")
    out.flush()
    return report.exit_code
