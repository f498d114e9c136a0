"""What every section reads (`Context`), the collector's limits (`Options`) and probe timeouts."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.childenv import child_environ
from bootstrap.diagnose.model import Check, Status
from bootstrap.env import is_ready, read_failure
from bootstrap.errors import BootstrapError, VolumeError
from bootstrap.settings import Settings
from bootstrap.volume import DiskUsageFn, Volume, disk_usage, resolve_volume


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
    #: the mount table `bootstrap.volume.filesystem` reads to name the volume's filesystem
    mountinfo: Path = Path("/proc/self/mountinfo")
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


def probe_environ(settings: Settings) -> dict[str, str]:
    """The environment of diagnose's probes: a child's, without any secret."""
    return child_environ(settings.environ, secrets=False)


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
        final = self.volume.env(self.key)
        if is_ready(final):
            return final
        failure = read_failure(self.volume, self.key)
        if failure is not None and failure.get("published_key"):
            held = self.volume.envs / str(failure["published_key"])
            if is_ready(held):
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
