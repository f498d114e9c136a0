"""How much disk an environment will take: from uv.lock, before anything is installed."""

from __future__ import annotations

import contextlib
import platform
import sys
import tomllib
from pathlib import Path
from typing import Any

#: installed bytes per wheel byte: unzipped files plus bytecode (wheels compress about 2-3x)
INSTALL_FACTOR = 3.0


def _platform_tags() -> tuple[str, ...]:
    """Substrings a wheel's platform tag must contain to install here."""
    machine = platform.machine().lower()
    if sys.platform.startswith("linux"):
        libc = "musllinux" if platform.libc_ver()[0] != "glibc" else "manylinux"
        return (f"{libc}", "linux")
    if sys.platform == "darwin":
        return ("macosx",)
    if sys.platform == "win32":
        return ("win",)
    return (machine,)


def _wheel_fits(filename: str) -> bool:
    parts = filename.removesuffix(".whl").split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    machine = platform.machine().lower()
    if plat != "any" and (machine not in plat or not plat.startswith(_platform_tags())):
        return False
    cp = f"cp{sys.version_info.major}{sys.version_info.minor}"
    pys = py.split(".")
    if not any(p in (cp, f"py{sys.version_info.major}", "py2.py3") for p in pys) and not (
        abi == "abi3" and any(p.startswith("cp3") for p in pys)
    ):
        return False
    return abi in ("none", "abi3") or cp in abi


def _lock_graph(lock: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    packages = {str(p.get("name")): p for p in lock.get("package", [])}
    root = next(
        (
            p
            for p in lock.get("package", [])
            if "virtual" in p.get("source", {}) or "editable" in p.get("source", {})
        ),
        None,
    )
    return packages, root


def estimate_install_bytes(lock_path: Path, extras: tuple[str, ...]) -> tuple[int, int]:
    """(estimated installed bytes, number of packages) for the project's base plus ``extras``.

    Walks uv.lock from the project's dependencies and the extras' (ignoring markers, so a
    package behind a marker for another platform counts: an overestimate is the safe side), and
    sums for each the size of the wheel that fits this platform (the lock's ``size``, else the
    local file's), times `INSTALL_FACTOR`.
    """
    lock = tomllib.loads(lock_path.read_text(encoding="utf-8"))
    packages, root = _lock_graph(lock)
    todo: list[str] = []
    if root is not None:
        todo += [str(d["name"]) for d in root.get("dependencies", [])]
        for extra in extras:
            todo += [str(d["name"]) for d in root.get("optional-dependencies", {}).get(extra, [])]
    seen: set[str] = set()
    total = 0
    while todo:
        name = todo.pop()
        if name in seen or name not in packages:
            continue
        seen.add(name)
        pkg = packages[name]
        todo += [str(d["name"]) for d in pkg.get("dependencies", [])]
        for deps in pkg.get("optional-dependencies", {}).values():  # any extra of a dependency
            todo += [str(d["name"]) for d in deps]
        wheels = pkg.get("wheels", [])
        size = 0
        for wheel in wheels:
            ref = str(wheel.get("url") or wheel.get("path") or wheel.get("filename") or "")
            if _wheel_fits(ref.rsplit("/", 1)[-1]):
                size = int(wheel.get("size") or 0)
                if not size and wheel.get("path"):
                    with contextlib.suppress(OSError):
                        size = _lock_relative(lock_path, str(wheel["path"])).stat().st_size
                break
        if not size and "sdist" in pkg:
            size = int(pkg["sdist"].get("size") or 0)
        total += size
    return int(total * INSTALL_FACTOR), len(seen)


def _lock_relative(lock_path: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else lock_path.parent / p
