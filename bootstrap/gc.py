"""``bootstrap gc [--dry-run] [--models]``: free space on the volume without breaking a worker (SPEC §2).

What goes:

- environments no live worker used recently and no lease holds: an env is kept while a plan
  (``state/<worker>.json``, rewritten at every boot) or that worker's boot log changed within
  `KEEP_S` names it, while it was built within `KEEP_S`, while it is the env this image would
  use, or while a live ``env-<key>`` lease exists;
- temp directories of dead builders (no live lease for their key, and the builder's pid dead on
  this host or its heartbeat older than `Settings.stale_after_s`), envs set aside as broken, expired
  degradation records;
- quarantined files older than `QUARANTINE_KEEP_S`; lease files whose writer is dead (`bootstrap.lease.writer_is_dead`);
- under ``models/`` (`bootstrap.weights.inventory.model_garbage`): dead writers' repo stagings and
  replaced copies; with ``--models`` also verified files and repos (and their records) the given
  manifest does not list, and repos recorded at another revision than it pins. A volume may serve
  several endpoints, so this is opt-in. Nothing inside the HF cache is ever removed: an entry
  used from there gives up only its record.

Removal renames first (an env disappears whole: a worker sees READY or nothing), then deletes.
Exit 0 always; what could not be removed is reported.
"""

# ruff: noqa: PTH104 - rename/link/symlink of whole trees read clearer at the os level, as elsewhere in bootstrap
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bootstrap import env as envmod
from bootstrap.errors import BootstrapError
from bootstrap.lease import holder_dead_here, list_leases, writer_is_dead
from bootstrap.run import with_capability_closure
from bootstrap.settings import Settings
from bootstrap.volume import Volume, remove_tree, resolve_volume, tree_size
from bootstrap.weights.inventory import Garbage, model_garbage, remove_garbage

#: an env named by a plan or log touched within this long is in use
KEEP_S = 7 * 24 * 3600.0
#: a builder whose heartbeat is older than this is dead (it touches its marker every TTL/3)
QUARANTINE_KEEP_S = 24 * 3600.0


@dataclass
class Item:
    kind: str
    path: Path
    bytes: int
    reason: str
    #: set for what lives under ``models/``: removed by `bootstrap.weights.inventory.remove_garbage`
    garbage: Garbage | None = None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def used_env_keys(volume: Volume, now: float, keep_s: float = KEEP_S) -> dict[str, str]:
    """env key → worker id, for plans whose worker booted or logged within ``keep_s``."""
    used: dict[str, str] = {}
    if not volume.state.is_dir():
        return used
    for plan in volume.state.glob("*.json"):
        worker = plan.stem
        last = max(_mtime(plan), _mtime(volume.events(worker)))
        if now - last > keep_s:
            continue
        try:
            data = json.loads(plan.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        key = data.get("env_key") if isinstance(data, dict) else None
        if isinstance(key, str):
            used[key] = worker
    return used


def live_lease_names(volume: Volume, ttl_s: float) -> set[str]:
    """Names of leases whose file changed within the TTL (a holder renews every TTL/3) and
    whose holder, if on this host, is alive."""
    live = set()
    for path, rec, age in list_leases(volume.leases):
        if age >= ttl_s:
            continue
        if holder_dead_here(rec):
            continue
        live.add(path.name.removesuffix(".lease"))
    return live


def collect(
    settings: Settings, volume: Volume, *, models: bool = False, now: float | None = None
) -> list[Item]:
    """What gc would remove, with sizes and reasons. Reads only."""
    now = time.time() if now is None else now
    items: list[Item] = []
    live = live_lease_names(volume, settings.lease_ttl_s)
    items += _env_items(settings, volume, now, live)
    if volume.quarantine.is_dir():
        for p in sorted(volume.quarantine.iterdir()):
            if now - _mtime(p) > QUARANTINE_KEEP_S:
                items.append(
                    Item("quarantine", p, tree_size(p) if p.is_dir() else _size(p), "old quarantine")
                )
    if volume.leases.is_dir():
        for path, record, age in list_leases(volume.leases):
            # A holder rewrites its lease every TTL/3: one unchanged this long is abandoned.
            if writer_is_dead(record, now - age, settings.stale_after_s, now):
                owner = (record or {}).get("owner", "unknown")
                items.append(Item("lease", path, _size(path), f"abandoned lease of {owner}"))
        for p in volume.leases.glob(".*.tmp"):
            if writer_is_dead(None, _mtime(p), settings.stale_after_s, now):
                items.append(Item("leftover", p, _size(p), "lease temp file of a dead writer"))
    items += _model_items(settings, volume, models=models)
    return items


def _env_items(settings: Settings, volume: Volume, now: float, live: set[str]) -> list[Item]:
    """What goes in ``envs/``: dead builders' leftovers, broken envs, expired records, unused envs."""
    items: list[Item] = []
    if not volume.envs.is_dir():
        return items
    used = used_env_keys(volume, now)
    try:
        closed = with_capability_closure(settings)  # the key a boot of this image would use
        current = envmod.env_key(envmod.key_inputs(closed, closed.extras))
    except BootstrapError:
        current = ""
    for p in sorted(volume.envs.iterdir()):
        name = p.name
        if name.startswith(envmod.TMP_PREFIX):
            named = envmod.parse_tmp_name(name)
            holders = {n for n in live if n.startswith(f"env-{named.get('key', '-')}")}
            if not holders and envmod.leftover_is_dead(p, settings.stale_after_s, now):
                items.append(Item("leftover", p, tree_size(p), "temp dir of a dead builder"))
        elif name.startswith(envmod.BROKEN_PREFIX):
            items.append(Item("broken", p, tree_size(p), "env set aside as broken"))
        elif name.startswith(envmod.FAILED_PREFIX):
            if now - _mtime(p) > envmod.RETRY_FULL_AFTER_S:
                items.append(Item("record", p, _size(p), "expired degradation record"))
        elif p.is_dir() and not name.startswith("."):
            rec = envmod.read_ready(p) or {}
            built = float(rec.get("built_at") or _mtime(p))
            if name in used or name == current or f"env-{name}" in live or now - built < KEEP_S:
                continue
            items.append(Item("env", p, tree_size(p), f"no worker used it in {KEEP_S / 86400:g} days"))
    return items


def _size(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _model_items(settings: Settings, volume: Volume, *, models: bool) -> list[Item]:
    """``models/``'s garbage as `bootstrap.weights.inventory.model_garbage` finds it: files, repo
    directories and HF-cache records alike (never a path inside the HF cache)."""
    return [
        Item(g.kind, g.path, g.size, g.reason, garbage=g)
        for g in model_garbage(settings, volume, models=models)
    ]


def remove(item: Item, volume: Volume, settings: Settings) -> bool:
    """Rename aside, then delete. False if it vanished or could not be removed."""
    path = item.path
    if not path.exists() and not path.is_symlink():
        return False
    if item.garbage is not None:
        return remove_garbage(item.garbage, settings, volume)  # refuses anything in the HF cache
    if item.kind in ("env", "broken"):
        # An env disappears in one rename, so a worker sees it READY or not at all.
        trash = volume.envs / f"{envmod.TMP_PREFIX}{envmod.TRASH}{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except OSError:
            return False
        path = trash
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return not item.path.exists()


def run_gc(settings: Settings, *, dry_run: bool, models: bool, out: IO[str]) -> int:
    """List (``dry_run``) or remove what `collect` finds; always exit 0."""
    volume = resolve_volume(settings, allow_local=True)
    items = collect(settings, volume, models=models)
    total = 0
    verb = "would remove" if dry_run else "removed"
    for item in items:
        if item.kind == "env":
            rec = envmod.read_ready(item.path) or {}
            extras = ",".join(rec.get("extras") or []) or "base"
            reason = f"{item.reason}; extras {extras}"
        else:
            reason = item.reason
        # Leases are checked again right before removing: a build may have started since.
        if not dry_run and item.kind == "leftover" and item.path.parent == volume.envs:
            named = envmod.parse_tmp_name(item.path.name)
            if any(
                n.startswith(f"env-{named.get('key', '-')}")
                for n in live_lease_names(volume, settings.lease_ttl_s)
            ):
                continue
        ok = True if dry_run else remove(item, volume, settings)
        if ok:
            total += item.bytes
        print(
            f"{verb if ok else 'could not remove'} {item.kind} {item.path} ({item.bytes / 1e6:.1f} MB): {reason}",
            file=out,
        )
    print(
        f"{'would free' if dry_run else 'freed'} {total / 1e9:.2f} GB ({total} bytes) in {len(items)} item(s)",
        file=out,
    )
    return 0
