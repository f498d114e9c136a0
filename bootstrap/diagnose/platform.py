"""Section ``platform``: RunPod or not, the worker id, where the volume is mounted."""

from __future__ import annotations

import os

from bootstrap import interpreter as interp
from bootstrap.diagnose.context import Context
from bootstrap.diagnose.model import Check, Status
from bootstrap.settings import redact
from bootstrap.volume import POD_VOLUME, RUNPOD_VOLUME, Volume


def check_platform(ctx: Context) -> list[Check]:
    s = ctx.settings
    env = s.environ
    runpod = sorted(n for n in env if n.startswith("RUNPOD_"))
    shown = ", ".join(f"{n}={redact(n, env[n])}" for n in runpod) or "no RUNPOD_* variables"
    if env.get("RUNPOD_ENDPOINT_ID"):
        kind = "a RunPod serverless worker"
    elif env.get("RUNPOD_POD_ID"):
        kind = "a RunPod pod"
    else:
        kind = "not on RunPod (no RUNPOD_POD_ID)"
    checks = [Check("runpod", Status.OK, f"{kind}: {shown}")]
    if env.get("BOOTSTRAP_WORKER_ID"):
        how = "BOOTSTRAP_WORKER_ID"
    elif env.get("RUNPOD_POD_ID"):
        how = "RUNPOD_POD_ID"
    else:
        how = "the hostname"
    checks.append(Check("worker_id", Status.OK, f"{s.worker_id} (from {how}); logs at logs/{s.worker_id}/"))
    mounted = [str(p) for p in (RUNPOD_VOLUME, POD_VOLUME) if os.path.ismount(p)]
    where = (
        ", ".join(mounted) + " mounted" if mounted else f"neither {RUNPOD_VOLUME} nor {POD_VOLUME} is mounted"
    )
    vol = ctx.volume
    status, hint = Status.OK, None
    if vol is None:
        detail = f"{where}; no volume in use"
    elif vol.root == POD_VOLUME:
        detail = (
            f"{where}; this is a pod's view ({POD_VOLUME}): serverless workers see the same volume at "
            f"{RUNPOD_VOLUME}, and what bootstrap writes is valid at both paths"
        )
    elif vol.root == RUNPOD_VOLUME:
        detail = f"{where}; the serverless mount path"
    else:
        detail = f"{where}; using {vol.root} (found by {vol.how})"
    if vol is not None:
        detail += _volume_identity(vol)
    if vol is not None and env.get("RUNPOD_ENDPOINT_ID") and vol.root == POD_VOLUME:
        status = Status.DEGRADED
        hint = f"a serverless worker normally sees the volume at {RUNPOD_VOLUME}: check the endpoint's network volume"
    checks.append(Check("mount_path", status, detail, hint=hint))
    return checks


def _volume_identity(vol: Volume) -> str:
    """The volume's id and the path-independent alias managed interpreters are reached by."""
    try:
        vid = vol.id_file.read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    alias = interp.ALIAS_ROOT / vid
    target = os.path.realpath(alias) if alias.is_symlink() else None
    via = f"; alias {alias} → {target}" if target else ""
    return f"; volume id {vid} (the same at /workspace and /runpod-volume){via}"


# -- volume -----------------------------------------------------------------------------------
