"""Exit codes and the errors that carry them.

RunPod shows only "worker exited with exit code N", so every code names its cause (SPEC §4).
The table below is the single source: `bootstrap explain`, the README and the timeline's
`fail` events all read it.

Error tree::

    BootstrapError(Exception)           message + hint + exit code
    ├── ConfigError                     2  CONFIG
    ├── VolumeError                     10 VOLUME
    ├── InsufficientDiskError(OSError)  11 DISK
    ├── EnvBuildError                   12 ENV
    ├── WeightsError                    13 WEIGHTS
    ├── LockTimeoutError(TimeoutError)  14 LOCK
    ├── WarmLoadError                   15 WARM
    ├── GpuError                        16 GPU
    └── BudgetError(TimeoutError)       17 BUDGET
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExitCode:
    code: int
    name: str
    meaning: str
    todo: str


EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(0, "OK", "success", "nothing to do"),
    ExitCode(
        1,
        "INTERNAL",
        "a bug: an unexpected exception (the traceback is in the boot log)",
        "read logs/<worker-id>/boot.log on the volume, rerun with BOOTSTRAP_DEBUG=1, and report it",
    ),
    ExitCode(
        2,
        "CONFIG",
        "bad settings, manifest or template",
        "fix the setting named in the error; `bootstrap diagnose` lists every setting and its source",
    ),
    ExitCode(
        10,
        "VOLUME",
        "the network volume is missing, not a mount point where one is required, or not writable",
        "attach a network volume to the endpoint (it mounts at /runpod-volume), or set "
        "BOOTSTRAP_VOLUME to a writable directory; BOOTSTRAP_REQUIRE_VOLUME=0 allows container disk",
    ),
    ExitCode(
        11,
        "DISK",
        "not enough free space; the message gives bytes needed and free, and on which filesystem",
        "grow the volume (or the container disk for /), remove old environments with "
        "`bootstrap gc`, or lower BOOTSTRAP_MIN_FREE_GB",
    ),
    ExitCode(
        12,
        "ENV",
        "the Python environment could not be built (uv's own error is kept in the boot log)",
        "read uv's error in the boot log; list the capability in BOOTSTRAP_OPTIONAL to start "
        "without it, or fix the dependency in pyproject.toml and `uv lock`",
    ),
    ExitCode(
        13,
        "WEIGHTS",
        "a required model could not be fetched or failed verification",
        "check the model's source and credentials (HF_TOKEN, AWS_*), or fill the volume from a pod "
        "with `bootstrap prepare`; `bootstrap diagnose` shows each file and any quarantined copy",
    ),
    ExitCode(
        14,
        "LOCK",
        "waited longer than BOOTSTRAP_LOCK_TIMEOUT_S for another worker's build or download",
        "see who holds the lease with `bootstrap diagnose`; raise BOOTSTRAP_LOCK_TIMEOUT_S, or "
        "fill the volume once with `bootstrap prepare` before scaling out",
    ),
    ExitCode(
        15,
        "WARM",
        "the worker failed to import or to load a required model",
        "read the warm phase's error in the boot log (it names expected and found paths); "
        "`bootstrap diagnose` checks the env and the weights",
    ),
    ExitCode(
        16,
        "GPU",
        "a GPU was required and is unusable (no device, CUDA init failed, driver too old for the "
        "wheels, or onnxruntime fell back to CPU)",
        "pick a GPU type whose driver supports the wheels' CUDA version, check `bootstrap diagnose` "
        "(gpu section), or set BOOTSTRAP_REQUIRE_GPU=0 to allow CPU",
    ),
    ExitCode(
        17,
        "BUDGET",
        "a phase ran past its budget (BOOTSTRAP_PHASE_BUDGET_S)",
        "fill the volume before deploying with `bootstrap prepare`, raise the phase's budget, and "
        "raise the endpoint's init timeout (RUNPOD_INIT_TIMEOUT)",
    ),
)

#: Codes a RunPod user sees that are not bootstrap's own (SPEC §4): `bootstrap explain` names them too.
OTHER_CODES: tuple[ExitCode, ...] = (
    ExitCode(
        3,
        "BROKEN",
        "`bootstrap diagnose` found something broken (it exits 0 when nothing is, 1 for its own bug)",
        "read the broken checks of `bootstrap diagnose`: each says what to do",
    ),
    ExitCode(
        130,
        "SIGINT",
        "stopped by SIGINT (Ctrl-C in a pod shell): 128 + 2",
        "nothing is wrong with the worker; run it again (a boot resumes or redoes the interrupted work)",
    ),
    ExitCode(
        137,
        "SIGKILL",
        "killed by SIGKILL (128 + 9): on RunPod almost always the container's memory limit (the OOM "
        "killer), else the platform stopping a worker that ignored SIGTERM",
        "pick a GPU type or container with more RAM, lower WORKER_CONCURRENCY or the job's size "
        "limits (WORKER_MAX_PIXELS, WORKER_MAX_INPUT_MB); the boot log's last phase shows where it died",
    ),
    ExitCode(
        139,
        "SIGSEGV",
        "a crash in native code (SIGSEGV, 128 + 11): a CUDA, onnxruntime or torch library, or a "
        "driver that does not match the wheels",
        "run `bootstrap diagnose` (gpu section: driver and wheel CUDA versions); the worker's stderr "
        "holds the native traceback (faulthandler)",
    ),
    ExitCode(
        143,
        "SIGTERM",
        "stopped by SIGTERM (128 + 15): the platform scaling the worker down or replacing it",
        "nothing is wrong if the endpoint scaled down; if it happens during boots, raise the "
        "endpoint's init timeout (RUNPOD_INIT_TIMEOUT) or fill the volume with `bootstrap prepare`",
    ),
)

BY_CODE: dict[int, ExitCode] = {e.code: e for e in EXIT_CODES}
BY_NAME: dict[str, ExitCode] = {e.name: e for e in EXIT_CODES}
#: every code `bootstrap explain` knows: bootstrap's own and the others a user sees
EXPLAINED: dict[int, ExitCode] = {e.code: e for e in (*EXIT_CODES, *OTHER_CODES)}
_EXPLAINED_BY_NAME: dict[str, ExitCode] = {e.name: e for e in EXPLAINED.values()}

OK = 0
INTERNAL = 1
CONFIG = 2
VOLUME = 10
DISK = 11
ENV = 12
WEIGHTS = 13
LOCK = 14
WARM = 15
GPU = 16
BUDGET = 17


def lookup(code_or_name: str | int) -> ExitCode | None:
    """An exit code by number (``13``, ``"13"``, ``137``) or name (``"WEIGHTS"``, any case)."""
    if isinstance(code_or_name, int):
        return EXPLAINED.get(code_or_name)
    text = code_or_name.strip()
    if text.lstrip("-").isdigit():
        return EXPLAINED.get(int(text))
    return _EXPLAINED_BY_NAME.get(text.upper())


class BootstrapError(Exception):
    """An error the user can act on: a message, a hint saying what to do, and an exit code."""

    exit_code: int = INTERNAL

    def __init__(self, message: str, *, hint: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code
        self.hint = hint or BY_CODE[self.exit_code].todo

    @property
    def name(self) -> str:
        return BY_CODE[self.exit_code].name

    def as_detail(self) -> dict[str, Any]:
        """The `detail` of a timeline `fail` event (SPEC §7)."""
        return {"code": self.exit_code, "name": self.name, "error": self.message, "hint": self.hint}


class ConfigError(BootstrapError):
    exit_code = CONFIG


class VolumeError(BootstrapError):
    exit_code = VOLUME


class InsufficientDiskError(BootstrapError, OSError):
    exit_code = DISK


class EnvBuildError(BootstrapError):
    exit_code = ENV


class WeightsError(BootstrapError):
    exit_code = WEIGHTS


class LockTimeoutError(BootstrapError, TimeoutError):
    exit_code = LOCK


class WarmLoadError(BootstrapError):
    exit_code = WARM


class GpuError(BootstrapError):
    exit_code = GPU


class BudgetError(BootstrapError, TimeoutError):
    exit_code = BUDGET


def format_bytes(n: float) -> str:
    """``3.20 GB (3200000000 bytes)``: GB as 10**9 bytes, as the settings use."""
    return f"{n / 1e9:.2f} GB ({int(n)} bytes)"
