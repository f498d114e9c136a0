"""Section ``settings``: every setting with its value (effective for defaults) and where it came from."""

from __future__ import annotations

from bootstrap.diagnose.context import Context
from bootstrap.diagnose.model import Check, Status
from bootstrap.settings import Settings, is_secret_name, redact


def _effective(s: Settings) -> dict[str, str]:
    """What a defaulted setting resolves to, so "default" rows show a value, not "unset"."""
    budgets = ",".join(f"{k}={v:g}" for k, v in s.phase_budget_s.items())
    return {
        "BOOTSTRAP_VOLUME": str(s.volume) if s.volume else "auto (/runpod-volume, /workspace, ./.volume)",
        "BOOTSTRAP_REQUIRE_VOLUME": str(int(s.require_volume)),
        "BOOTSTRAP_EXTRAS": ",".join(s.extras) or "(none)",
        "BOOTSTRAP_OPTIONAL": ",".join(sorted(s.optional)) or "(none)",
        "BOOTSTRAP_MANIFEST": str(s.manifest),
        "BOOTSTRAP_MIN_FREE_GB": f"{s.min_free_bytes / 1e9:g}",
        "BOOTSTRAP_LOCK_TIMEOUT_S": f"{s.lock_timeout_s:g}",
        "BOOTSTRAP_LEASE_TTL_S": f"{s.lease_ttl_s:g}",
        "BOOTSTRAP_PHASE_BUDGET_S": budgets,
        "BOOTSTRAP_ON_FATAL": s.on_fatal,
        "BOOTSTRAP_FATAL_GRACE_S": f"{s.fatal_grace_s:g}",
        "BOOTSTRAP_LOG_FORMAT": s.log_format,
        "BOOTSTRAP_PYTHON": s.python,
        "BOOTSTRAP_WORKER_ID": s.worker_id,
        "BOOTSTRAP_REQUIRE_GPU": str(int(s.require_gpu)),
        "BOOTSTRAP_LOCKS": "on" if s.locks else "off",
        "BOOTSTRAP_DEBUG": str(int(s.debug)),
        "BOOTSTRAP_APP_DIR": str(s.app_dir),
        "BOOTSTRAP_PROJECT_DIR": str(s.project_dir),
        "WORKER_CONCURRENCY": str(s.worker_concurrency),
        "WORKER_MAX_INPUT_MB": f"{s.worker_max_input_bytes / 1024 / 1024:g}",
        "WORKER_MAX_PIXELS": str(s.worker_max_pixels),
        "WORKER_ALLOW_PRIVATE_URLS": str(int(s.worker_allow_private_urls)),
        "WORKER_MAX_FACES": str(s.worker_max_faces),
        "WORKER_S3_BUCKETS": ",".join(s.worker_s3_buckets) or "(only BUCKET_NAME)",
        "WORKER_PRESIGN_TTL_S": str(s.worker_presign_ttl_s),
        "WORKER_MAX_VIDEO_S": f"{s.worker_max_video_s:g}",
        "WORKER_MAX_VIDEO_MB": f"{s.worker_max_video_bytes / 1024 / 1024:g}",
        "WORKER_MAX_RESULT_MB": f"{s.worker_max_result_bytes / 1024 / 1024:g}",
        "WORKER_MAX_AUDIO_S": f"{s.worker_max_audio_s:g}",
        "WORKER_MAX_TEXT_CHARS": str(s.worker_max_text_chars),
        "WORKER_ANIMATE_OFFLOAD": str(int(s.worker_animate_offload)),
        "WORKER_ANIMATE_MAX_FRAMES": str(s.worker_animate_max_frames),
    }


def check_settings(ctx: Context) -> list[Check]:
    s = ctx.settings
    checks: list[Check] = []
    shown = s.shown()
    names = {n for n, _v, _s in shown}
    effective = _effective(s)
    for name, value, source in shown:
        if source == "default" and not is_secret_name(name) and name in effective:
            value = effective[name]
        status, hint = Status.OK, None
        if name == "BOOTSTRAP_LOCKS" and not s.locks:
            status = Status.DEGRADED
            hint = "locks off is a test switch: every worker does all the work itself; unset BOOTSTRAP_LOCKS"
        checks.append(Check(name, status, f"{value} ({source})", hint=hint))
    for name in sorted(n for n in s.environ if is_secret_name(n) and n not in names):
        checks.append(Check(name, Status.OK, f"{redact(name, s.environ[name])} (env)"))
    return checks
