"""The env key (SPEC §5: what an environment depends on), the READY record and ``pyvenv.cfg``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bootstrap import interpreter as interp
from bootstrap.errors import EnvBuildError
from bootstrap.settings import Settings
from bootstrap.volume import Volume

LAYOUT_VERSION = 2
READY = "READY"
FAILED_PREFIX = ".failed-"
#: a degraded env is reused this long before a boot tries the full set of extras again
RETRY_FULL_AFTER_S = 600.0


def find_uv() -> str:
    """The uv binary: the one the ``uv`` Python package ships (the pinned version), else PATH's."""
    with contextlib.suppress(Exception):  # not installed as a package: look on PATH
        from uv import find_uv_bin  # type: ignore[import-not-found,unused-ignore]

        return str(find_uv_bin())
    found = shutil.which("uv")
    if found:
        return found
    raise EnvBuildError("uv is not installed", hint="pip install uv (the image installs it)")


def interpreter_identity() -> dict[str, str]:
    """What the key records of the image's interpreter (the one running bootstrap)."""
    return interp.system_interpreter().identity()


def resolve_interpreter(settings: Settings, volume_root: Path | None) -> interp.Interpreter | None:
    """The interpreter envs are built from; None when managed and not installed yet."""
    if settings.python != "managed":
        return interp.system_interpreter()
    if volume_root is None:
        return None
    return interp.managed_interpreter(volume_root, interp.managed_request(settings))


def _libc() -> str:
    name, version = platform.libc_ver()
    return f"{name}-{version}" if name else "unknown"


def key_inputs(
    settings: Settings,
    extras: tuple[str, ...],
    *,
    python: interp.Interpreter | None = None,
) -> dict[str, Any]:
    """Everything an env depends on (SPEC §5): uv.lock, extras, interpreter, platform, libc, layout.

    For ``BOOTSTRAP_PYTHON=managed`` the interpreter is the one on the volume (its path relative
    to the volume root); if none is installed yet the identity says so, and no env matches.
    """
    lock = settings.project_dir / "uv.lock"
    try:
        lock_hash = hashlib.sha256(lock.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise EnvBuildError(
            f"{lock} is missing", hint="run `uv lock` in the project and commit uv.lock"
        ) from None
    if python is None:
        python = resolve_interpreter(settings, interp.volume_root_guess(settings))
    identity = (
        python.identity()
        if python is not None
        else {
            "implementation": "cpython",
            "version": f"{interp.managed_request(settings)} (not installed)",
            "abi": "unknown",
            "path": "",
        }
    )
    return {
        "layout": LAYOUT_VERSION,
        "uv_lock": lock_hash,
        "extras": sorted(extras),
        "python": identity,
        "platform": f"{sys.platform}-{platform.machine()}",
        "libc": _libc(),
    }


def env_key(inputs: dict[str, Any]) -> str:
    """A short, stable hash of the key inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def env_python(env_dir: Path) -> Path:
    """The interpreter of an environment (a relocatable venv: ``bin/python``)."""
    return env_dir / "bin" / "python"


def is_ready(path: Path) -> bool:
    """True when ``path`` is a published environment (READY is written last, before the rename)."""
    return (path / READY).is_file()


def read_ready(path: Path) -> dict[str, Any] | None:
    """The READY record of an env, or None."""
    try:
        data = json.loads((path / READY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pyvenv_home(env_dir: Path) -> str | None:
    """``home`` from an env's ``pyvenv.cfg``."""
    try:
        for line in (env_dir / "pyvenv.cfg").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "home":
                return value.strip()
    except OSError:
        return None
    return None


# -- disk estimate ------------------------------------------------------------------------------


def env_problem(path: Path, python: interp.Interpreter) -> str | None:
    """None when the env can run: its ``bin/python`` is there and ``pyvenv.cfg`` home is the
    interpreter's directory; else what is wrong (a READY env with a problem is set aside)."""
    exe = env_python(path)
    if not exe.exists():  # follows the link: a dangling bin/python is missing too
        return f"{exe} is missing: the environment is damaged"
    home = pyvenv_home(path)
    want = str(python.executable.parent)
    if home is None:
        return f"{path}/pyvenv.cfg has no home"
    if home != want and os.path.realpath(home) != os.path.realpath(want):
        return f"{path}/pyvenv.cfg home is {home}, expected {want}"
    if not Path(home).is_dir():
        return f"{path}/pyvenv.cfg home {home} does not exist"
    return None


# -- the failure record of a degraded build ---------------------------------------------------


def failure_path(volume: Volume, full_key: str) -> Path:
    return volume.envs / f"{FAILED_PREFIX}{full_key}.json"


def read_failure(volume: Volume, full_key: str) -> dict[str, Any] | None:
    """``envs/.failed-<key>.json``: the full set of extras failed and a degraded env was published."""
    try:
        record = json.loads(failure_path(volume, full_key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recent_failure(volume: Volume, full_key: str) -> dict[str, Any] | None:
    """The failure record while it is younger than `RETRY_FULL_AFTER_S` (then the full set is retried)."""
    record = read_failure(volume, full_key)
    if record is None or time.time() - float(record.get("at", 0)) > RETRY_FULL_AFTER_S:
        return None
    return record
