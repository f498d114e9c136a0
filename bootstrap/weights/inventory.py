"""What is on the volume (and in the HF cache) for ``gc`` and ``diagnose``: data, never printed.

- `model_garbage`: what ``gc`` may remove under ``models/`` — dead writers' staging and old
  copies always; with ``--models``, verified entries the manifest no longer lists and repos
  recorded at another source or revision than the manifest pins. Nothing inside the HF cache
  is ever returned: a cached entry gives up only its record.
- `entry_files`: each file of a manifest entry as ``diagnose``'s weights section shows it.
- `cache_snapshots`: the HF cache's snapshots (`bootstrap.weights.hfcache.snapshots`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from bootstrap.manifest import ModelFile, ModelRepo, load_all
from bootstrap.settings import Settings
from bootstrap.volume import Volume, tree_size
from bootstrap.weights.hfcache import Snapshot, cache_root, inside, snapshots
from bootstrap.weights.records import read_record, repo_file_problem, why_unverified
from bootstrap.weights.repo import STAGE_SUFFIX
from bootstrap.weights.transfer import owner_alive


@dataclass(frozen=True)
class Garbage:
    #: "model" (a verified file or directory), "model-record", "leftover" (staging, old copy)
    kind: str
    path: Path
    size: int
    reason: str


def _size(path: Path) -> int:
    try:
        return tree_size(path) if path.is_dir() else path.stat().st_blocks * 512
    except OSError:
        return 0


def _leftovers(volume: Volume, ttl_s: float) -> list[Garbage]:
    out: list[Garbage] = []
    if not volume.models.is_dir():
        return out
    for p in volume.models.rglob(f".*{STAGE_SUFFIX}"):
        try:
            header = json.loads((p / "header.json").read_text(encoding="utf-8"))
            mtime = (p / "header.json").stat().st_mtime
        except (OSError, ValueError):
            header = {}
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue
        if not owner_alive(header if isinstance(header, dict) else {}, ttl_s, mtime):
            out.append(Garbage("leftover", p, _size(p), "a dead worker's repo staging directory"))
    for p in volume.models.rglob(".*.old"):
        with contextlib.suppress(OSError):
            if not owner_alive({}, ttl_s, p.stat().st_mtime):
                out.append(Garbage("leftover", p, _size(p), "a replaced repo copy left by a dead worker"))
    return out


def model_garbage(settings: Settings, volume: Volume, *, models: bool) -> list[Garbage]:
    """What ``gc`` may remove under ``models/`` (never a path inside the HF cache)."""
    out = _leftovers(volume, settings.lease_ttl_s)
    if not models or not volume.verified.is_dir():
        return out
    manifest = load_all(settings.manifest)
    listed: dict[str, ModelFile | ModelRepo] = {f.published_dest: f for f in manifest.files}
    listed.update({f.dest: f for f in manifest.files})
    listed.update({r.dest: r for r in manifest.repos})
    cache = cache_root(settings, volume)
    for record_path in sorted(volume.verified.rglob("*.json")):
        dest = record_path.relative_to(volume.verified).as_posix().removesuffix(".json")
        record = read_record(volume, dest) or {}
        entry = listed.get(dest)
        if entry is None:
            reason = f"not in {settings.manifest.name}"
        elif isinstance(entry, ModelRepo) and record.get("manifest_source") not in (None, entry.source):
            reason = f"an old revision: the manifest now pins {entry.source}"
        else:
            continue
        location = Path(record["location"]) if record.get("location") else volume.models / dest
        if not inside(location, cache) and not record.get("location"):
            out.append(Garbage("model", location, _size(location), reason))
        out.append(Garbage("model-record", record_path, _size(record_path), f"record of {dest}"))
    return out


def remove_garbage(item: Garbage, settings: Settings, volume: Volume) -> bool:
    """Remove one `Garbage` (refusing, as a last guard, anything inside the HF cache)."""
    if inside(item.path, cache_root(settings, volume)):
        return False
    if item.path.is_dir() and not item.path.is_symlink():
        shutil.rmtree(item.path, ignore_errors=True)
    else:
        item.path.unlink(missing_ok=True)
    return not item.path.exists()


@dataclass(frozen=True)
class FileState:
    """One file of a manifest entry, for ``diagnose``."""

    path: Path
    size: int | None
    #: None when present with its recorded size and sniff, else why not
    problem: str | None
    in_hf_cache: bool


def entry_files(volume: Volume, entry: ModelFile | ModelRepo) -> tuple[str | None, list[FileState]]:
    """(why the entry is unverified or None, each recorded file's state)."""
    why = why_unverified(volume, entry)
    record = read_record(volume, entry.published_dest) or {}
    location = Path(record["location"]) if record.get("location") else volume.models / entry.published_dest
    cached = bool(record.get("location"))
    states: list[FileState] = []
    items = record.get("files")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                states.append(
                    FileState(
                        location / str(item.get("path", "")),
                        item.get("size"),
                        repo_file_problem(location, item),
                        cached,
                    )
                )
    elif record:
        states.append(FileState(location, record.get("size"), why, cached))
    return why, states


def cache_snapshots(settings: Settings, volume: Volume) -> tuple[Path | None, list[Snapshot]]:
    """The HF cache in use (or None) and its snapshots."""
    root = cache_root(settings, volume)
    return root, snapshots(root) if root is not None else []
