"""Section ``weights``: every selected model file verified or why not; what quarantine holds."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from bootstrap.diagnose.context import Context
from bootstrap.diagnose.fmt import dir_size, file_size, human_bytes
from bootstrap.diagnose.model import Check, Status
from bootstrap.errors import BootstrapError
from bootstrap.manifest import ModelFile, load_manifest, selected
from bootstrap.volume import Volume
from bootstrap.weights import why_unverified


@dataclass(frozen=True)
class Quarantined:
    """One file or directory the fetcher moved to ``quarantine/``, with its recorded reason."""

    path: Path
    dest: str | None
    reason: str | None
    present: bool


def quarantined(vol: Volume, limit: int = 2000) -> list[Quarantined]:
    """What ``quarantine/`` holds: ``<dest with / as __>.<stamp>.<hex>`` beside ``<name>.json``."""
    if not vol.quarantine.is_dir():
        return []
    entries = sorted(vol.quarantine.iterdir())[:limit]
    names = {p.name for p in entries}
    out: list[Quarantined] = []
    for p in entries:
        if p.name.endswith(".json"):
            stem = p.name.removesuffix(".json")
            try:
                data = json.loads(p.read_text(encoding="utf-8", errors="replace"))
            except (OSError, ValueError):
                data = {}
            data = data if isinstance(data, dict) else {}
            reason = str(data["reason"])[:300] if data.get("reason") else None
            dest = str(data["dest"]) if data.get("dest") else None
            out.append(Quarantined(vol.quarantine / stem, dest, reason, stem in names))
        elif f"{p.name}.json" not in names and not p.name.endswith(".discarded"):
            out.append(Quarantined(p, None, None, True))
    return out


def _matches(q: Quarantined, f: ModelFile) -> bool:
    dests = {f.dest, f.published_dest}
    if q.dest is not None:
        return q.dest in dests
    return any(q.path.name.startswith(d.replace("/", "__") + ".") for d in dests)


def check_weights(ctx: Context) -> list[Check]:
    s = ctx.settings
    try:
        every = load_manifest(s.manifest)
    except BootstrapError as err:
        return [Check("manifest", Status.BROKEN, err.message, hint=err.hint)]
    files = selected(every, s.extras)
    caps = ", ".join(s.extras) or "none"
    checks = [
        Check(
            "manifest", Status.OK, f"{s.manifest}: {len(files)} of {len(every)} files for capabilities {caps}"
        )
    ]
    vol = ctx.volume
    if vol is None:
        return checks + ctx.no_volume()
    quarantine = quarantined(vol)
    claimed: set[Path] = set()
    for f in files:
        copies = [q for q in quarantine if _matches(q, f)]
        claimed.update(q.path for q in copies)
        why = why_unverified(vol, f)
        target = vol.models / f.published_dest
        if why is None:
            extra = f"; {len(copies)} earlier bad copies in quarantine" if copies else ""
            size = target.stat().st_size if target.is_file() else None
            size_text = f", {human_bytes(size)}" if size is not None else ""
            checks.append(Check(f.published_dest, Status.OK, f"verified{size_text} ({f.format}){extra}"))
            continue
        optional = s.is_optional(f.capability)
        status = Status.DEGRADED if optional else Status.BROKEN
        role = f"optional capability {f.capability}" if optional else f"required by {f.capability}"
        lines = [f"{why} ({role}); source {f.source}"]
        for q in copies[-3:]:
            kept = str(q.path) if q.present else f"{q.path.name} (discarded)"
            lines.append(f"quarantined copy: {kept}" + (f": {q.reason}" if q.reason else ""))
        if copies:
            hint = (
                "the source served a file that failed verification (see the quarantined copy): fix "
                f"the source in {s.manifest} or its credentials (HF_TOKEN, AWS_*), or set "
                "BOOTSTRAP_MIRROR to a good copy; then `bootstrap prepare` fetches it again"
            )
        else:
            hint = (
                "run `bootstrap prepare` to fetch and verify it (check the source's reachability and "
                "credentials: HF_TOKEN, AWS_*), or set BOOTSTRAP_MIRROR"
            )
        if optional:
            hint += f"; the worker starts without {f.capability} meanwhile"
        else:
            hint += f"; until then boots exit 13, or list {f.capability} in BOOTSTRAP_OPTIONAL to start without it"
        checks.append(Check(f.published_dest, status, "\n".join(lines), hint=hint))
    if quarantine:
        deadline = time.monotonic() + ctx.options.size_budget_s
        size = sum(
            dir_size(q.path, deadline)[0] if q.path.is_dir() else file_size(q.path) for q in quarantine
        )
        other = len([q for q in quarantine if q.path not in claimed])
        checks.append(
            Check(
                "quarantine",
                Status.OK,
                f"{len(quarantine)} file(s), {human_bytes(size)} in {vol.quarantine}"
                + (f" ({other} not of this manifest)" if other else "")
                + "; kept for a look, `bootstrap gc` removes old ones",
            )
        )
    else:
        checks.append(Check("quarantine", Status.OK, "empty"))
    return checks


# -- gpu --------------------------------------------------------------------------------------
