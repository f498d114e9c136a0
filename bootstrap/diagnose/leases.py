"""Section ``leases``: who holds each lease, for what, and whether its holder is gone."""

from __future__ import annotations

from bootstrap.diagnose.context import Context
from bootstrap.diagnose.fmt import human_age
from bootstrap.diagnose.model import Check, Status
from bootstrap.errors import BootstrapError
from bootstrap.lease import holder_dead_here, list_leases
from bootstrap.manifest import load_manifest
from bootstrap.settings import LEASE_TTL_S
from bootstrap.weights import lease_name


def check_leases(ctx: Context) -> list[Check]:
    if ctx.volume is None:
        return ctx.no_volume()
    s, o = ctx.settings, ctx.options
    found = list_leases(ctx.volume.leases)
    if not found:
        return [Check("held", Status.OK, "no leases held")]
    what = _lease_subjects(ctx)
    checks = []
    for path, record, age in found:
        name = path.name.removesuffix(".lease")
        rec = record or {}
        owner = rec.get("owner", "?")
        host, pid = rec.get("host", "?"), rec.get("pid", "?")
        started = rec.get("started")
        held_for = f", held {human_age(o.clock() - started)}" if isinstance(started, (int, float)) else ""
        subject = f" (for {what[name]})" if name in what else ""
        who = f"{owner} (pid {pid} on host {host}){held_for}, renewed {human_age(age)} ago{subject}"
        if record is None:
            who = f"an unreadable record, last changed {human_age(age)} ago"
        dead_here = holder_dead_here(record)
        if age >= s.lease_ttl_s or dead_here:
            why = (
                f"pid {pid} is not running on this host"
                if dead_here
                else f"not renewed for {human_age(age)}, longer than {LEASE_TTL_S}={s.lease_ttl_s:g} s"
            )
            checks.append(
                Check(
                    name,
                    Status.BROKEN,
                    f"stale: held by {who}; {why}: its holder died without releasing it",
                    hint=f"the next worker that needs it takes it over after {s.lease_ttl_s:g} s without "
                    f"change ({LEASE_TTL_S}); to clear it now: rm {path}",
                )
            )
        else:
            checks.append(Check(name, Status.OK, f"held by {who}"))
    return checks


def _lease_subjects(ctx: Context) -> dict[str, str]:
    """Lease name → what it guards, for the names this image would use (``file-<sha256>`` is opaque)."""
    out: dict[str, str] = {}
    if ctx.key is not None:
        out[f"env-{ctx.key}"] = "this image's environment"
    try:
        for f in load_manifest(ctx.settings.manifest):
            out[lease_name(f.dest)] = f.dest
    except BootstrapError:
        pass
    return out


# -- weights ----------------------------------------------------------------------------------
