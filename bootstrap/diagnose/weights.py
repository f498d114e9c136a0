"""Section ``weights``: every selected manifest entry (files and repos, each repo file) verified or why
not; the HF cache's snapshots; what quarantine holds."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from bootstrap.diagnose.context import Context
from bootstrap.diagnose.fmt import dir_size, file_size, human_bytes
from bootstrap.diagnose.model import Check, Status
from bootstrap.errors import BootstrapError
from bootstrap.manifest import ModelFile, ModelRepo, load_all
from bootstrap.urls import scrub_passwords
from bootstrap.volume import Volume
from bootstrap.weights import why_unverified
from bootstrap.weights.inventory import FileState, cache_snapshots, entry_files


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


def _matches(q: Quarantined, f: ModelFile | ModelRepo) -> bool:
    dests = {f.dest, f.published_dest}
    if q.dest is not None:
        return q.dest in dests
    return any(q.path.name.startswith(d.replace("/", "__") + ".") for d in dests)


def _verified_detail(entry: ModelFile | ModelRepo, states: list[FileState]) -> str:
    """One line for a verified entry, then for a repo one line per file."""
    where = " in place from the HF cache" if any(st.in_hf_cache for st in states) else ""
    if isinstance(entry, ModelFile):
        size = states[0].size if states else None
        size_text = f", {human_bytes(size)}" if isinstance(size, int) else ""
        return f"verified{size_text} ({entry.format}){where}"
    total = sum(st.size for st in states if isinstance(st.size, int))
    lines = [f"verified repo, {len(states)} file(s), {human_bytes(total)}{where}"]
    lines += [f"ok {st.path}" for st in states]
    return "\n".join(lines)


def _unverified_hint(entry: ModelFile | ModelRepo, manifest: Path, quarantined_copies: bool) -> str:
    if quarantined_copies:
        return (
            "the source served a file that failed verification (see the quarantined copy): fix "
            f"the source in {manifest} or its credentials (HF_TOKEN, AWS_*), or set "
            "BOOTSTRAP_MIRROR to a good copy; then `bootstrap prepare` fetches it again"
        )
    return (
        "run `bootstrap prepare` to fetch and verify it (check the source's reachability and "
        "credentials: HF_TOKEN, AWS_*), or set BOOTSTRAP_MIRROR"
    )


def _entry_check(ctx: Context, vol: Volume, entry: ModelFile | ModelRepo, copies: list[Quarantined]) -> Check:
    """One manifest entry: verified (each repo file listed), or why not with a hint."""
    s = ctx.settings
    why = why_unverified(vol, entry)
    _, states = entry_files(vol, entry)
    name = entry.published_dest
    if why is None:
        extra = f"; {len(copies)} earlier bad copies in quarantine" if copies else ""
        return Check(name, Status.OK, _verified_detail(entry, states) + extra)
    optional = s.is_optional(entry.capability)
    status = Status.DEGRADED if optional else Status.BROKEN
    role = f"optional capability {entry.capability}" if optional else f"required by {entry.capability}"
    kind = "repo " if isinstance(entry, ModelRepo) else ""
    lines = [f"{kind}{why} ({role}); source {scrub_passwords(entry.source)}"]
    if isinstance(entry, ModelRepo):
        lines += [f"{st.problem or 'ok'}: {st.path}" for st in states]
    for q in copies[-3:]:
        kept = str(q.path) if q.present else f"{q.path.name} (discarded)"
        lines.append(f"quarantined copy: {kept}" + (f": {q.reason}" if q.reason else ""))
    hint = _unverified_hint(entry, s.manifest, bool(copies))
    if optional:
        hint += f"; the worker starts without {entry.capability} meanwhile"
    else:
        hint += f"; until then boots exit 13, or list {entry.capability} in BOOTSTRAP_OPTIONAL to start without it"
    return Check(name, status, "\n".join(lines), hint=hint)


def _cache_check(ctx: Context, vol: Volume) -> Check:
    """The Hugging Face cache read in place (SPEC §3 BOOTSTRAP_HF_CACHE) and its snapshots."""
    root, snaps = cache_snapshots(ctx.settings, vol)
    if root is None:
        configured = ctx.settings.hf_cache
        if configured is not None:
            return Check(
                "hf_cache",
                Status.DEGRADED,
                f"BOOTSTRAP_HF_CACHE={configured} is not a directory",
                hint="point BOOTSTRAP_HF_CACHE at the cache's hub directory (holding models--ORG--NAME), "
                "or unset it; [[repo]] entries are fetched instead",
            )
        return Check(
            "hf_cache", Status.OK, f"none (no BOOTSTRAP_HF_CACHE, no {vol.root}/huggingface-cache/hub)"
        )
    lines = [f"{root}: {len(snaps)} snapshot(s), read in place, never written"]
    lines += [
        f"{sn.repo}@{sn.revision} ({sn.kind}): {sn.files} file(s), {human_bytes(sn.bytes)} at {sn.path}"
        for sn in snaps
    ]
    return Check("hf_cache", Status.OK, "\n".join(lines))


def check_weights(ctx: Context) -> list[Check]:
    s = ctx.settings
    try:
        manifest = load_all(s.manifest)
    except BootstrapError as err:
        return [Check("manifest", Status.BROKEN, err.message, hint=err.hint)]
    entries = manifest.selected(s.extras)
    caps = ", ".join(s.extras) or "none"
    total = len(manifest.files) + len(manifest.repos)
    checks = [
        Check(
            "manifest",
            Status.OK,
            f"{s.manifest}: {len(entries)} of {total} entries (files and repos) for capabilities {caps}",
        )
    ]
    vol = ctx.volume
    if vol is None:
        return checks + ctx.no_volume()
    quarantine = quarantined(vol)
    claimed: set[Path] = set()
    for entry in entries:
        copies = [q for q in quarantine if _matches(q, entry)]
        claimed.update(q.path for q in copies)
        checks.append(_entry_check(ctx, vol, entry, copies))
    checks.append(_cache_check(ctx, vol))
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
