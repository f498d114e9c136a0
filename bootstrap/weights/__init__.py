"""Phase ``weights``: the manifest's files, verified, on the volume (SPEC §6).

First version: fetches nothing and trusts nothing — a file without its ``.verified`` record
(or no longer matching it) counts as missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bootstrap.errors import WeightsError
from bootstrap.manifest import ModelFile, load_manifest, selected
from bootstrap.plan import Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume


def verified_record_path(volume: Volume, dest: str) -> Path:
    return volume.verified / f"{dest}.json"


def check_verified(volume: Volume, f: ModelFile) -> str | None:
    """Why ``f`` is not usable as it is on the volume, or None when it is."""
    record_path = verified_record_path(volume, f.published_dest)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "not fetched yet (no .verified record)"
    except ValueError:
        return "its .verified record is unreadable"
    target = volume.models / f.published_dest
    if f.format == "zip":
        for item in record.get("files", []):
            p = target / item["path"]
            if not p.is_file() or p.stat().st_size != item["size"]:
                return f"{p} is missing or changed size since it was verified"
        return None
    if not target.is_file():
        return f"{target} is missing"
    if target.stat().st_size != record.get("size"):
        return f"{target} changed size since it was verified"
    return None


def ensure_weights(
    settings: Settings, volume: Volume, timeline: Timeline, plan: Plan, detail: dict[str, Any]
) -> None:
    files = selected(load_manifest(settings.manifest), settings.extras)
    missing: list[str] = []
    for f in files:
        why = check_verified(volume, f)
        if why is None:
            plan.models[f.published_dest] = str(volume.models / f.published_dest)
            continue
        if settings.is_optional(f.capability):
            plan.degrade(f.capability, f"{f.published_dest}: {why}")
        else:
            missing.append(f"{f.published_dest}: {why}")
    detail["files"] = len(files)
    detail["ready"] = len(plan.models)
    if missing:
        raise WeightsError("required model files are not on the volume: " + "; ".join(missing))
