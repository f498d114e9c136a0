"""RunPod's cached models: a Hugging Face cache tree read in place (SPEC §3 ``BOOTSTRAP_HF_CACHE``, §6).

The cache is ``<root>/models--ORG--NAME/snapshots/<commit>/<path>``, each path usually a symlink
into ``../../blobs/<id>`` where the id is the file's LFS sha256 or its git blob id. On RunPod it
is a separate mount: nothing here ever writes, links, renames or deletes inside it. A snapshot
at the manifest's pinned commit is verified once (every file hashed against its blob id where
the cache names one, sizes, format checks), recorded in ``models/.verified/<dest>.json`` with its
``location``, and from then on checked by size and sniff like any verified file.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.manifest import ModelFile
from bootstrap.settings import Settings
from bootstrap.urls import parse_hf, scheme_of
from bootstrap.volume import Volume
from bootstrap.weights.records import write_record
from bootstrap.weights.verify import BadFile, check_format, format_for

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")


def cache_root(settings: Settings, volume: Volume) -> Path | None:
    """``BOOTSTRAP_HF_CACHE``, else ``<volume>/huggingface-cache/hub`` when it exists, else None."""
    root = settings.hf_cache or volume.root / "huggingface-cache" / "hub"
    return root if root.is_dir() else None


def _hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob id) of a file, in one read."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(usedforsecurity=False)
    blob.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            sha.update(chunk)
            blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest()


def check_cached(
    path: Path, *, size: int | None = None, sha256: str | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """Verify one cached file: ({size, sha256, lfs}, None) or (None, why not)."""
    try:
        st = path.stat()
    except OSError as err:
        return None, f"{path} is unreadable: {err.strerror or err}"
    if size and st.st_size != size:
        return None, f"{path} is {st.st_size} bytes, the manifest says {size}"
    sha, blob = _hashes(path)
    named = path.readlink().name if path.is_symlink() else ""
    if _HEX64.fullmatch(named) and named != sha:
        return None, f"{path}: its sha256 {sha} is not its blob's name {named}"
    if _HEX40.fullmatch(named) and named != blob:
        return None, f"{path}: its git blob id {blob} is not its blob's name {named}"
    if sha256 and sha != sha256:
        return None, f"{path}: its sha256 {sha} is not the manifest's {sha256}"
    fmt = format_for(path.name)
    try:
        check_format(path, fmt)
    except BadFile as err:
        return None, f"{path}: {err}"
    return {"size": st.st_size, "sha256": sha, "lfs": bool(_HEX64.fullmatch(named))}, None


def verify_snapshot(
    snap: Path, wants: Callable[[str], bool], files: list[str]
) -> tuple[list[dict[str, Any]], str | None]:
    """Every wanted file of a snapshot verified: (listing, None), or ([], why it cannot be used).

    ``files`` (the manifest's explicit list) must all be there; else ``include`` resolves against
    the snapshot itself, with no request.
    """
    found = sorted(
        p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    chosen = [p for p in found if wants(p)]
    missing = [p for p in files if p not in found]
    if missing:
        return [], f"{len(missing)} listed files are missing (first {missing[0]})"
    if not chosen:
        return [], "it holds no file the entry wants"
    listing = []
    for rel in chosen:
        item, why = check_cached(snap / rel)
        if why is not None:
            return [], why
        assert item is not None
        listing.append({"path": rel, **item})
    return listing, None


def use_cached_file(settings: Settings, volume: Volume, f: ModelFile, owner: str) -> str | None:
    """A ``[[file]]`` with an ``hf://`` source found verified in the cache: its path, recorded."""
    root = cache_root(settings, volume)
    if root is None or scheme_of(f.source) != "hf" or f.format == "zip":
        return None
    ref = parse_hf(f.source)
    path = root / ref.cache_dir_name / "snapshots" / ref.revision / ref.path
    if not path.is_file():
        return None
    item, why = check_cached(path, size=f.size or None, sha256=f.sha256 or None)
    if why is not None or item is None:
        return None
    if f.format != format_for(path.name):
        try:
            check_format(path, f.format)
        except BadFile:
            return None
    write_record(
        volume,
        f.dest,
        {
            "dest": f.dest,
            "source": f"hf-cache:{path}",
            "manifest_source": f.source,
            "location": str(path),
            "size": item["size"],
            "sha256": item["sha256"],
            "sha256_from": "computed",
            "format": f.format,
            "worker": owner,
        },
    )
    return str(path)


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of the cache, for ``diagnose``."""

    repo: str
    kind: str
    revision: str
    path: Path
    files: int
    bytes: int


def snapshots(root: Path) -> list[Snapshot]:
    """Every snapshot in a cache tree (read only; sizes follow the symlinks into ``blobs/``)."""
    out = []
    for repo_dir in sorted(root.glob("*--*")):
        kind, _, name = repo_dir.name.partition("--")
        for snap in sorted((repo_dir / "snapshots").glob("*")):
            files = [p for p in snap.rglob("*") if p.is_file()]
            size = 0
            for p in files:
                with contextlib.suppress(OSError):
                    size += p.stat().st_size
            out.append(Snapshot(name.replace("--", "/"), kind, snap.name, snap, len(files), size))
    return out


def inside(path: Path, root: Path | None) -> bool:
    """Is ``path`` inside the cache tree ``root`` (``gc`` never deletes there)?"""
    if root is None:
        return False
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
