"""Small fixture projects and a local wheelhouse for env tests: fast, and no registry needed.

`make_wheel` writes a real wheel (zip with dist-info, RECORD and entry points) by hand;
`fixture_project` writes a project (pyproject.toml with capabilities as extras and a
``[tool.bootstrap.smoke]`` table naming what each capability imports) and locks it with uv
against the wheelhouse only (``no-index`` + ``find-links``).

Capabilities of the default fixture:

- base: ``alpha`` (with a console script ``alpha-cli``)
- ``calc``: ``beta`` (depends on alpha) — installs and imports
- ``broken``: ``gamma`` whose wheel file is replaced by garbage after locking — uv cannot install it
- ``noimport``: ``delta`` whose import fails like a missing system library (F5)
- ``big``: ``bulk`` carrying an incompressible payload (for the disk check)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

from tests.helpers import base_environ


def make_wheel(
    wheelhouse: Path,
    name: str,
    version: str,
    files: dict[str, str | bytes],
    *,
    deps: tuple[str, ...] = (),
    scripts: dict[str, str] | None = None,
) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` into ``wheelhouse``."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {d}\n" for d in deps
    )
    entries: dict[str, str | bytes] = dict(files)
    entries[f"{info}/METADATA"] = meta
    entries[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: envkit\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if scripts:
        entries[f"{info}/entry_points.txt"] = "[console_scripts]\n" + "".join(
            f"{k} = {v}\n" for k, v in scripts.items()
        )
    record = []
    for path, content in entries.items():
        data = content.encode() if isinstance(content, str) else content
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    entries[f"{info}/RECORD"] = "\n".join(record) + "\n"
    out = wheelhouse / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, content in entries.items():
            zf.writestr(path, content)
    return out


def make_wheelhouse(wheelhouse: Path, *, big_bytes: int = 3_000_000, seed: int = 7) -> Path:
    """The fixture wheels (see the module docstring)."""
    make_wheel(
        wheelhouse,
        "alpha",
        "1.0",
        {
            "alpha/__init__.py": "VERSION = '1.0'\n\ndef main():\n    print('alpha-cli ok')\n",
            "alpha/__main__.py": "from alpha import main\nmain()\n",
        },
        scripts={"alpha-cli": "alpha:main"},
    )
    make_wheel(
        wheelhouse,
        "alpha",
        "2.0",
        {
            "alpha/__init__.py": "VERSION = '2.0'\n\ndef main():\n    print('alpha-cli ok')\n",
            "alpha/__main__.py": "from alpha import main\nmain()\n",
        },
        scripts={"alpha-cli": "alpha:main"},
    )
    make_wheel(
        wheelhouse,
        "beta",
        "1.0",
        {
            "beta/__init__.py": "import alpha\nVALUE = 42\n",
            **{f"beta/mod{i}.py": f"X = {i}\n" * 50 for i in range(20)},
        },
        deps=("alpha",),
    )
    make_wheel(wheelhouse, "gamma", "1.0", {"gamma/__init__.py": "OK = True\n"})
    make_wheel(
        wheelhouse,
        "delta",
        "1.0",
        {
            "delta/__init__.py": "raise ImportError('libGL.so.1: cannot open shared object file: No such file or directory')\n"
        },
    )
    payload = random.Random(seed).randbytes(big_bytes)
    make_wheel(wheelhouse, "bulk", "1.0", {"bulk/__init__.py": "", "bulk/data.bin": payload})
    return wheelhouse


PYPROJECT = """\
[project]
name = "fixture-worker"
version = "0"
requires-python = ">=3.11"
dependencies = ["alpha{alpha_pin}"]

[project.optional-dependencies]
calc = ["beta"]
broken = ["gamma"]
noimport = ["delta"]
big = ["bulk"]

[tool.uv]
no-index = true
find-links = ["{wheelhouse}"]

[tool.bootstrap.smoke]
base = ["alpha"]
calc = ["beta", "beta.mod3"]
broken = ["gamma"]
noimport = ["delta"]
big = ["bulk"]
"""


def lock_project(project: Path) -> None:
    """``uv lock`` the fixture project against its wheelhouse only."""
    env = base_environ(UV_CACHE_DIR=str(project / ".uv-lock-cache"))
    subprocess.run(["uv", "lock", "--quiet"], cwd=project, env=env, check=True, capture_output=True)
    shutil.rmtree(project / ".uv-lock-cache", ignore_errors=True)


def fixture_project(
    root: Path, *, alpha_pin: str = "==1.0", break_gamma: bool = True, name: str = "project"
) -> Path:
    """A locked fixture project under ``root/<name>`` with its wheelhouse in ``root/wheels``."""
    wheelhouse = root / "wheels"
    if not wheelhouse.exists():
        make_wheelhouse(wheelhouse)
    project = root / name
    project.mkdir(parents=True, exist_ok=True)
    (project / "pyproject.toml").write_text(PYPROJECT.format(wheelhouse=wheelhouse, alpha_pin=alpha_pin))
    gamma = wheelhouse / "gamma-1.0-py3-none-any.whl"
    good = root / "gamma-good.whl"
    if not good.exists():
        shutil.copy2(gamma, good)
    shutil.copy2(good, gamma)  # uv lock reads the wheel's metadata
    lock_project(project)
    if break_gamma:
        # An uninstallable dependency: the lock names the wheel, but its bytes are garbage.
        gamma.write_bytes(b"this is not a zip file\n" * 10)
    return project


def env_environ(volume: Path, project: Path, **overrides: str) -> dict[str, str]:
    """The environment of a fixture boot: fixture project, its smoke table, no registry."""
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_PROJECT_DIR=str(project),
        BOOTSTRAP_EXTRAS="calc",
        BOOTSTRAP_MIN_FREE_GB="0",
        BOOTSTRAP_LOG_FORMAT="json",
        BOOTSTRAP_LEASE_TTL_S="5",
        BOOTSTRAP_LOCK_TIMEOUT_S="120",
        UV_OFFLINE="1",
    )
    env.update(overrides)
    return env


def published_envs(volume: Path) -> list[Path]:
    """Every published env dir (not temp, trash or records)."""
    envs = volume / ".bootstrap" / "envs"
    return (
        sorted(p for p in envs.iterdir() if p.is_dir() and not p.name.startswith("."))
        if envs.is_dir()
        else []
    )


def leftovers(volume: Path) -> list[Path]:
    envs = volume / ".bootstrap" / "envs"
    return sorted(p for p in envs.iterdir() if p.name.startswith(".tmp-")) if envs.is_dir() else []


def check_env_works(env_dir: Path, extras: tuple[str, ...] = ("calc",)) -> None:
    """The env's python, console script and ``python -m`` all work after the rename."""
    py = env_dir / "bin" / "python"
    mods = ["alpha", *(["beta"] if "calc" in extras else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-c", "import " + ",".join(mods)], check=True, env=env, capture_output=True)
    out = subprocess.run(
        [str(env_dir / "bin" / "alpha-cli")], check=True, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "alpha-cli ok", out
    out = subprocess.run([str(py), "-m", "alpha"], check=True, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "alpha-cli ok", out


def env_events(stdout: str) -> list[dict[str, Any]]:
    """The ``env`` phase's timeline events from a boot's JSON stdout."""
    out = []
    for line in stdout.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("phase") == "env":
            out.append(item)
    return out


def env_end(stdout: str) -> dict[str, Any]:
    ends = [e for e in env_events(stdout) if e["event"] == "end"]
    assert len(ends) == 1, stdout[-3000:]
    return dict(ends[0]["detail"])
