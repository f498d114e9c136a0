"""Cloning a READY env by hard links: a new build starts from the closest published one.

A published env is never modified: files an installer may rewrite become private copies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from bootstrap.env.key import READY, read_ready
from bootstrap.env.leftovers import BUILDER_FILE
from bootstrap.errors import EnvBuildError
from bootstrap.volume import Volume

#: files of a ``*.dist-info`` an installer writes (the rest is the wheel's own, never rewritten)
INSTALLER_WRITES = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "uv_cache.json")


def site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python*/site-packages"))
    return found[0] if found else env / "lib" / "site-packages"


def closest_ready(volume: Volume, inputs: dict[str, Any]) -> Path | None:
    """The READY env with the same interpreter, platform and layout: most extras in common, newest."""
    best: tuple[int, float] | None = None
    found: Path | None = None
    if not volume.envs.is_dir():
        return None
    for p in volume.envs.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        rec = read_ready(p)
        if rec is None:
            continue
        theirs = rec.get("inputs") or {}
        if any(theirs.get(k) != inputs.get(k) for k in ("python", "platform", "libc", "layout")):
            continue
        common = len(set(theirs.get("extras") or []) & set(inputs.get("extras") or []))
        score = (common, float(rec.get("built_at") or 0))
        if best is None or score > best:
            best, found = score, p
    return found


def _private_copy(path: Path) -> None:
    """Replace a hard link by a private copy (temp name + rename; the other link is untouched)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.copy")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)


def clone(src: Path, dst: Path) -> None:
    """Copy ``src`` into ``dst`` with hard links, then make private copies of what may be rewritten.

    A published env is never modified: uv replaces a package by unlinking its files and linking
    new ones, which leaves the other link (in ``src``) untouched; everything uv could open for
    writing in place — ``bin/``, ``pyvenv.cfg``, the top of site-packages (``*.pth``) and the
    installer-written files of every ``*.dist-info`` — becomes a private copy here.
    """
    entries = [str(e) for e in sorted(src.iterdir()) if e.name not in (READY, BUILDER_FILE)]
    # cp (C) links ~20k files in well under a second; a Python walk takes several.
    proc = subprocess.run(
        ["cp", "-a", "--link", *entries, str(dst)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise EnvBuildError(f"cloning {src} failed: {proc.stderr.strip()[-1000:]}")
    site = site_packages(dst)
    for dirpath, dirnames, filenames in os.walk(dst):
        here = Path(dirpath)
        if here == site:  # below site-packages only the metadata an installer writes is copied
            for dist in dirnames:
                if dist.endswith(".dist-info"):
                    for name in INSTALLER_WRITES:
                        if (here / dist / name).is_file():
                            _private_copy(here / dist / name)
            dirnames[:] = []
        for name in filenames:
            path = here / name
            if path.is_symlink() or (here == dst and name == BUILDER_FILE):
                continue
            _private_copy(path)


def new_distributions(before: Path, after: Path) -> list[Path]:
    """``*.dist-info`` dirs in ``after``'s site-packages that ``before``'s does not have."""
    old = {p.name for p in site_packages(before).glob("*.dist-info")}
    return sorted(p for p in site_packages(after).glob("*.dist-info") if p.name not in old)
