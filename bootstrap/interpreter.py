"""The interpreter an environment is built from: the image's own, or one uv manages on the volume.

``BOOTSTRAP_PYTHON=system`` (default) uses the interpreter running bootstrap (the image's).
``BOOTSTRAP_PYTHON=managed`` runs ``uv python install`` into ``<volume>/.bootstrap/python/`` so
environments no longer depend on the image's Python (FAILURES F11).

A venv records its interpreter by absolute path (``pyvenv.cfg`` ``home`` and the ``bin/python``
symlink). The same volume is mounted at ``/workspace`` in a pod and at ``/runpod-volume`` in
serverless, so an env made from ``/workspace/.bootstrap/python/…`` would break in serverless.
We therefore reference a managed interpreter through a stable alias, a symlink
``/tmp/bootstrap-volume/<volume-id>`` → the volume root, recreated at every boot before the env
is used. ``<volume-id>`` is a random id stored once on the volume (``.bootstrap/volume-id``), so
two volumes never share an alias and every mount point of one volume gives the same paths. The
alias lives on container disk (``/tmp`` exists and is writable in every image, and is the same
path in the pod and in serverless). The env key records the interpreter path relative to the
volume root, so both mounts give the same key.

The download itself (``uv python install``) was not exercised in this project's tests: it needs
uv's Python downloads (GitHub) or ``UV_PYTHON_INSTALL_MIRROR``, unreachable here. The tests cover
the commands given to uv, the key and the layout, with an interpreter placed where uv puts one.
"""

# ruff: noqa: PTH115, PTH211 - rename/link/symlink of whole trees read clearer at the os level, as elsewhere in bootstrap
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.atomic import write_temp
from bootstrap.childenv import child_environ
from bootstrap.errors import EnvBuildError
from bootstrap.settings import Settings
from bootstrap.volume import POD_VOLUME, RUNPOD_VOLUME, Volume

#: Where the stable aliases of volume roots live (container disk, same path everywhere).
ALIAS_ROOT = Path("/tmp/bootstrap-volume")  # noqa: S108 - a fixed path is the point: it must be the same in every container

_IDENTITY = (
    "import json, platform, sys, sysconfig;"
    "print(json.dumps({'implementation': sys.implementation.name, 'version': platform.python_version(),"
    "'abi': str(sysconfig.get_config_var('SOABI'))}))"
)


@dataclass(frozen=True)
class Interpreter:
    """An interpreter to build envs from, and what the env key records of it."""

    #: the path handed to ``uv venv --python`` (through the volume alias when managed)
    executable: Path
    implementation: str
    version: str
    abi: str
    #: absolute real path (system) or path relative to the volume root (managed)
    key_path: str
    managed: bool = False

    def identity(self) -> dict[str, str]:
        """The ``python`` part of the env key inputs."""
        return {
            "implementation": self.implementation,
            "version": self.version,
            "abi": self.abi,
            "path": self.key_path,
        }


def system_interpreter() -> Interpreter:
    """The image's interpreter: the base interpreter of the Python running bootstrap."""
    base = getattr(sys, "_base_executable", sys.executable)
    return Interpreter(
        executable=Path(os.path.realpath(base)),
        implementation=sys.implementation.name,
        version=platform.python_version(),
        abi=str(sysconfig.get_config_var("SOABI")),
        key_path=os.path.realpath(base),
    )


def managed_request(settings: Settings) -> str:
    """The version uv is asked for: ``.python-version`` in the project, else the image's minor."""
    pin = settings.project_dir / ".python-version"
    with contextlib.suppress(OSError):
        for line in pin.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                return line.strip()
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def install_command(uv: str, volume: Volume, request: str) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for ``uv python install`` into the volume's ``python/``."""
    argv = [uv, "python", "install", "--install-dir", str(volume.python), "--no-bin", request]
    env = {"UV_PYTHON_INSTALL_DIR": str(volume.python), "UV_PYTHON_DOWNLOADS": "manual"}
    return argv, env


def _version_tuple(name: str) -> tuple[int, ...]:
    m = re.match(r"[a-z]+-(\d+)\.(\d+)\.(\d+)", name)
    return tuple(int(x) for x in m.groups()) if m else (0,)


def find_managed(volume_root: Path, request: str) -> Path | None:
    """The newest uv-managed CPython under ``<root>/.bootstrap/python`` matching ``request``.

    uv lays installs out as ``cpython-3.11.7-linux-x86_64-gnu/bin/python3.11``; we read that
    layout directly (no uv call), so diagnose can use it without side effects.
    """
    base = Volume(volume_root, "").python
    if not base.is_dir():
        return None
    want = tuple(int(x) for x in re.findall(r"\d+", request)[:3])
    found: list[tuple[tuple[int, ...], Path]] = []
    for d in base.iterdir():
        if not d.name.startswith("cpython-") or "+" in d.name:  # no free-threaded/debug builds
            continue
        ver = _version_tuple(d.name)
        if ver[: len(want)] != want:
            continue
        exe = d / "bin" / f"python{ver[0]}.{ver[1]}" if len(ver) >= 2 else d / "bin" / "python3"
        if exe.exists():
            found.append((ver, exe))
    if not found:
        return None
    return max(found)[1]


def volume_id(volume_root: Path) -> str:
    """The volume's random id, created once (unique temp name, then link: first writer wins)."""
    path = Volume(volume_root, "").id_file
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, uuid.uuid4().hex[:16], stem=path.name)
    try:
        os.link(tmp, path)  # fails if another worker created it first: theirs counts
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text(encoding="utf-8").strip()


def ensure_alias(volume_root: Path, alias_root: Path = ALIAS_ROOT) -> Path:
    """Point ``<alias_root>/<volume-id>`` at ``volume_root`` (atomically replaced if it differs)."""
    alias = alias_root / volume_id(volume_root)
    target = str(volume_root.resolve())
    with contextlib.suppress(OSError):
        if os.readlink(alias) == target:
            return alias
    alias_root.mkdir(parents=True, exist_ok=True)
    tmp = alias_root / f".{alias.name}.{uuid.uuid4().hex[:8]}"
    os.symlink(target, tmp)
    os.replace(tmp, alias)  # one rename: a concurrent boot sees the old or the new link, never none
    return alias


def probe(executable: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Implementation, full version and ABI, asked of the interpreter itself."""
    env = child_environ(environ or {})
    proc = subprocess.run(
        [str(executable), "-I", "-c", _IDENTITY],
        env=env or None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise EnvBuildError(
            f"the interpreter {executable} does not run: {proc.stderr.strip()[-500:]}",
            hint="remove it (rm -rf its directory under .bootstrap/python) and boot again",
        )
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return data if isinstance(data, dict) else {}


def managed_interpreter(
    volume_root: Path, request: str, *, alias_root: Path = ALIAS_ROOT
) -> Interpreter | None:
    """The managed interpreter already on the volume (None if not installed), via the alias."""
    exe = find_managed(volume_root, request)
    if exe is None:
        return None
    rel = os.path.relpath(exe, volume_root)
    alias = ensure_alias(volume_root, alias_root)
    info = probe(exe)
    return Interpreter(
        executable=alias / rel,
        implementation=str(info.get("implementation")),
        version=str(info.get("version")),
        abi=str(info.get("abi")),
        key_path=rel,
        managed=True,
    )


def volume_root_guess(settings: Settings) -> Path | None:
    """The volume root without side effects (for diagnose): set, or a mounted default."""
    if settings.volume is not None:
        return settings.volume
    for p in (RUNPOD_VOLUME, POD_VOLUME):
        if os.path.ismount(p):
            return p
    return None
