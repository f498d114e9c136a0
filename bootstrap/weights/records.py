"""The ``.verified`` records, the warm-boot check, publishing and quarantine (SPEC §5, §6).

A file on the volume is trusted only when ``models/.verified/<dest>.json`` exists and the file
still has the recorded size and passes the format sniff — checks that read a KiB per file, so a
warm boot costs no network and no hashing of gigabytes (FAILURES F13, F16).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.atomic import write_json_atomic
from bootstrap.manifest import ModelFile, ModelRepo
from bootstrap.volume import Volume
from bootstrap.weights.verify import format_for, sniff_problem


def verified_record_path(volume: Volume, dest: str) -> Path:
    """Where the record of ``dest`` (a file, or a zip's unpack directory) lives."""
    return volume.verified / f"{dest}.json"


def read_record(volume: Volume, dest: str) -> dict[str, Any] | None:
    try:
        data = json.loads(verified_record_path(volume, dest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def why_unverified(volume: Volume, f: ModelFile | ModelRepo) -> str | None:
    """Why ``f`` (a file or a repo) is not usable as it is, or None when it is.

    Usable: its record exists, and every recorded file is there (on the volume, or at the
    record's ``location`` in the HF cache) with the recorded size and passes the format sniff.
    No hashing, no network.
    """
    if isinstance(f, ModelRepo):
        return _why_repo_unverified(volume, f)
    record_path = verified_record_path(volume, f.published_dest)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "not fetched yet (no .verified record)"
    except (OSError, ValueError):
        return "its .verified record is unreadable"
    if not isinstance(record, dict):
        return "its .verified record is unreadable"
    # A manifest that now names other bytes (a new revision, a pinned sha256) fetches again.
    if record.get("manifest_source") not in (None, f.source):
        return "the manifest names another source than the verified copy came from"
    pinned = record.get("zip", {}).get("sha256") if f.format == "zip" else record.get("sha256")
    if f.sha256 and pinned != f.sha256:
        return f"the manifest pins sha256 {f.sha256}, the verified copy has {pinned}"
    target = Path(record["location"]) if record.get("location") else volume.models / f.published_dest
    if f.format == "zip":
        files = record.get("files")
        if not isinstance(files, list) or not files:
            return "its .verified record lists no files"
        for item in files:
            p = target / str(item.get("path", ""))
            why = _check_one(p, item.get("size"), format_for(p.name))
            if why:
                return why
        return None
    return _check_one(target, record.get("size"), f.format)


def _why_repo_unverified(volume: Volume, r: ModelRepo) -> str | None:
    record = read_record(volume, r.dest)
    if record is None:
        return "not fetched yet (no readable .verified record)"
    if record.get("manifest_source") != r.source:
        return "the manifest names another source or revision than the verified copy came from"
    if record.get("include") != list(r.include):
        return "the manifest's include globs changed since the copy was verified"
    files = record.get("files")
    if not isinstance(files, list) or not files:
        return "its .verified record lists no files"
    if r.files and sorted(str(i.get("path")) for i in files) != sorted(r.files):
        return "the manifest's files list changed since the copy was verified"
    root = Path(record["location"]) if record.get("location") else volume.models / r.dest
    for item in files:
        why = repo_file_problem(root, item)
        if why:
            return why
    return None


def repo_file_problem(root: Path, item: dict[str, Any]) -> str | None:
    """Why one recorded file of a repo is not as recorded (size, and the sniff of its format;
    a small non-LFS file of no known format is checked by size, its content was hashed once)."""
    rel = str(item.get("path", ""))
    fmt = format_for(rel)
    if fmt == "raw" and not item.get("lfs"):
        try:
            size = (root / rel).stat().st_size
        except OSError:
            return f"{root / rel} is missing"
        return (
            None
            if size == item.get("size")
            else f"{root / rel} is {size} bytes, but {item.get('size')} were verified"
        )
    return _check_one(root / rel, item.get("size"), fmt)


def _check_one(path: Path, size: object, fmt: str) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as err:
        return f"{path} is unreadable: {err.strerror or err}"
    if st.st_size != size:
        return f"{path} is {st.st_size} bytes, but {size} were verified"
    why = sniff_problem(path, fmt)
    if why:
        return f"{path} fails the {fmt} sniff: {why}"
    return None


def write_record(volume: Volume, dest: str, record: dict[str, Any]) -> Path:
    """Write the record of ``dest`` (temp name, fsync, rename) — after the file it describes."""
    path = verified_record_path(volume, dest)
    stamped = {**record, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return write_json_atomic(path, stamped, indent=2)


def quarantine(volume: Volume, path: Path, dest: str, reason: str, **facts: Any) -> Path:
    """Move a bad file or directory to ``quarantine/`` with its reason beside it.

    Names are ``<dest with / as __>.<UTC stamp>.<8 hex>``, with the reason in ``<name>.json`` beside it, so gc can sort by age and diagnose
    can match them to their manifest entry.
    """
    volume.quarantine.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{dest.replace('/', '__')}.{stamp}.{uuid.uuid4().hex[:8]}"
    target = volume.quarantine / name
    try:
        path.rename(target)
    except OSError:
        # Another filesystem, or it vanished: never leave a bad file where it could be trusted.
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        target = volume.quarantine / f"{name}.discarded"
    reason_path = volume.quarantine / f"{name}.json"
    with contextlib.suppress(OSError):
        write_json_atomic(reason_path, {"dest": dest, "reason": reason, "at": stamp, **facts}, indent=2)
    return target


@dataclass
class FileOutcome:
    """Where one verified entry is, and what it cost to get it there."""

    path: str
    fetched: bool
    source: str | None = None
    received: int = 0
    resumed: int = 0


def located(volume: Volume, dest: str) -> Path:
    """Where a verified entry is: its record's ``location`` (the HF cache), else ``models/<dest>``."""
    record = read_record(volume, dest) or {}
    return Path(record["location"]) if record.get("location") else volume.models / dest
