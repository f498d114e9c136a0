"""Settings (SPEC §3): read once, at the entry point, into one frozen object.

Nothing in this project reads ``os.environ`` anywhere else; code takes a `Settings` (or the
values it needs) as an argument, so tests hand in their own environment instead of patching.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bootstrap.errors import ConfigError

# Names of the variables, beside the object that reads them.
VOLUME = "BOOTSTRAP_VOLUME"
REQUIRE_VOLUME = "BOOTSTRAP_REQUIRE_VOLUME"
EXTRAS = "BOOTSTRAP_EXTRAS"
OPTIONAL = "BOOTSTRAP_OPTIONAL"
MANIFEST = "BOOTSTRAP_MANIFEST"
MIRROR = "BOOTSTRAP_MIRROR"
HF_CACHE = "BOOTSTRAP_HF_CACHE"
MIN_FREE_GB = "BOOTSTRAP_MIN_FREE_GB"
LOCK_TIMEOUT_S = "BOOTSTRAP_LOCK_TIMEOUT_S"
LEASE_TTL_S = "BOOTSTRAP_LEASE_TTL_S"
PHASE_BUDGET_S = "BOOTSTRAP_PHASE_BUDGET_S"
ON_FATAL = "BOOTSTRAP_ON_FATAL"
FATAL_GRACE_S = "BOOTSTRAP_FATAL_GRACE_S"
LOG_FORMAT = "BOOTSTRAP_LOG_FORMAT"
PYTHON = "BOOTSTRAP_PYTHON"
WORKER_ID = "BOOTSTRAP_WORKER_ID"
SERVE_API = "BOOTSTRAP_SERVE_API"
REQUIRE_GPU = "BOOTSTRAP_REQUIRE_GPU"
LOCKS = "BOOTSTRAP_LOCKS"
DEBUG = "BOOTSTRAP_DEBUG"
APP_DIR = "BOOTSTRAP_APP_DIR"
PROJECT_DIR = "BOOTSTRAP_PROJECT_DIR"
WORKER_CONCURRENCY = "WORKER_CONCURRENCY"
WORKER_MAX_INPUT_MB = "WORKER_MAX_INPUT_MB"
WORKER_MAX_PIXELS = "WORKER_MAX_PIXELS"
WORKER_ALLOW_PRIVATE_URLS = "WORKER_ALLOW_PRIVATE_URLS"
#: set by `bootstrap run` for the worker it execs: the path of its plan (not a user setting)
PLAN = "BOOTSTRAP_PLAN"
#: read by the weights phase (hf:// and s3:// sources) and by the worker's uploads (BUCKET_*)
HF_TOKEN = "HF_TOKEN"  # noqa: S105 - the variable's name, not a secret
HF_ENDPOINT = "HF_ENDPOINT"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
AWS_ENDPOINT_URL_S3 = "AWS_ENDPOINT_URL_S3"
BUCKET_ENDPOINT_URL = "BUCKET_ENDPOINT_URL"
BUCKET_ACCESS_KEY_ID = "BUCKET_ACCESS_KEY_ID"
BUCKET_SECRET_ACCESS_KEY = "BUCKET_SECRET_ACCESS_KEY"  # noqa: S105 - the variable's name, not a secret
BUCKET_NAME = "BUCKET_NAME"
BUCKET_REGION = "BUCKET_REGION"
WORKER_MAX_FACES = "WORKER_MAX_FACES"
WORKER_S3_BUCKETS = "WORKER_S3_BUCKETS"
WORKER_PRESIGN_TTL_S = "WORKER_PRESIGN_TTL_S"
#: SigV4 presigned URLs live at most 7 days.
PRESIGN_TTL_MAX_S = 7 * 24 * 3600
WORKER_MAX_VIDEO_S = "WORKER_MAX_VIDEO_S"
WORKER_MAX_RESULT_MB = "WORKER_MAX_RESULT_MB"
WORKER_MAX_VIDEO_MB = "WORKER_MAX_VIDEO_MB"
WORKER_WEBHOOK_SECRET = "WORKER_WEBHOOK_SECRET"  # noqa: S105 - the variable's name, not a secret
WORKER_ANIMATE_OFFLOAD = "WORKER_ANIMATE_OFFLOAD"
WORKER_ANIMATE_MAX_FRAMES = "WORKER_ANIMATE_MAX_FRAMES"
WORKER_MAX_AUDIO_S = "WORKER_MAX_AUDIO_S"
WORKER_MAX_TEXT_CHARS = "WORKER_MAX_TEXT_CHARS"

PHASES_WITH_BUDGET = ("preflight", "env", "weights", "warm")
DEFAULT_BUDGETS: Mapping[str, float] = {"preflight": 60, "env": 1800, "weights": 1800, "warm": 600}
CONTAINER_DISK_MIN_FREE = 10**9  # `/` must keep 1 GB (SPEC §3)

#: Every variable `Settings` reads, for `diagnose` and the README.
KNOWN = (
    VOLUME, REQUIRE_VOLUME, EXTRAS, OPTIONAL, MANIFEST, MIRROR, HF_CACHE, MIN_FREE_GB, LOCK_TIMEOUT_S,
    LEASE_TTL_S, PHASE_BUDGET_S, ON_FATAL, FATAL_GRACE_S, LOG_FORMAT, PYTHON, WORKER_ID,
    SERVE_API, REQUIRE_GPU, LOCKS, DEBUG, APP_DIR, PROJECT_DIR, WORKER_CONCURRENCY,
    WORKER_MAX_INPUT_MB, WORKER_MAX_PIXELS, WORKER_ALLOW_PRIVATE_URLS, WORKER_MAX_FACES,
    WORKER_S3_BUCKETS, WORKER_PRESIGN_TTL_S,
    WORKER_MAX_VIDEO_S, WORKER_MAX_VIDEO_MB, WORKER_WEBHOOK_SECRET, WORKER_MAX_RESULT_MB,
    WORKER_ANIMATE_OFFLOAD, WORKER_ANIMATE_MAX_FRAMES,
    WORKER_MAX_AUDIO_S, WORKER_MAX_TEXT_CHARS,
)  # fmt: skip

_SECRET_WORDS = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True for any variable whose name says token, secret, key or password."""
    return bool(_SECRET_WORDS.search(name))


def redact(name: str, value: str | None) -> str:
    """What may be shown of a variable: secrets only as set/unset and length."""
    if value is None:
        return "unset"
    if is_secret_name(name):
        return f"set ({len(value)} chars)" if value else "set (empty)"
    return value


def default_app_dir() -> Path:
    """The directory holding `worker/`, `pyproject.toml` and `uv.lock` (beside `bootstrap/`)."""
    return Path(__file__).resolve().parent.parent


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean", hint=f"set {name} to 1 or 0")


def _number(environ: Mapping[str, str], name: str, default: float, *, minimum: float = 0) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not a number", hint=f"set {name} to a number, e.g. {default:g}"
        ) from None
    if not math.isfinite(value) or value < minimum:  # nan and inf are not numbers of anything
        raise ConfigError(
            f"{name}={raw!r} must be a finite number of at least {minimum:g}",
            hint=f"set {name} to a number ≥ {minimum:g}, e.g. {default:g}",
        )
    return value


def _choice(environ: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(
            f"{name}={raw!r} is not one of {', '.join(choices)}",
            hint=f"set {name} to one of: {', '.join(choices)}",
        )
    return raw


def _names(environ: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    raw = environ.get(name)
    if raw is None:
        raw = default
    out: list[str] = []
    for part in raw.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", part):
            raise ConfigError(
                f"{name} holds {part!r}, which is not a capability name",
                hint=f"{name} is a comma list such as 'faceswap,video'",
            )
        if part not in out:
            out.append(part)
    return tuple(out)


def _buckets(environ: Mapping[str, str]) -> tuple[str, ...]:
    """``WORKER_S3_BUCKETS``: a comma list of bucket names (checked as such at a job's parsing)."""
    out: list[str] = []
    for part in environ.get(WORKER_S3_BUCKETS, "").split(","):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return tuple(out)


def _presign_ttl(environ: Mapping[str, str]) -> int:
    seconds = _number(environ, WORKER_PRESIGN_TTL_S, 86400, minimum=1)
    if seconds > PRESIGN_TTL_MAX_S or seconds == float("inf"):
        raise ConfigError(
            f"{WORKER_PRESIGN_TTL_S}={environ.get(WORKER_PRESIGN_TTL_S)!r} is longer than S3 allows",
            hint=f"set {WORKER_PRESIGN_TTL_S} to at most {PRESIGN_TTL_MAX_S} (7 days); the default is 86400",
        )
    return int(seconds)


def parse_budgets(raw: str | None) -> dict[str, float]:
    """``"env=60,weights=120"`` over the defaults; naming one phase overrides only that one."""
    budgets = dict(DEFAULT_BUDGETS)
    if not raw or not raw.strip():
        return budgets
    for part in raw.split(","):
        if not part.strip():
            continue
        phase, sep, value = part.partition("=")
        phase = phase.strip()
        if not sep or phase not in DEFAULT_BUDGETS:
            raise ConfigError(
                f"{PHASE_BUDGET_S} has {part.strip()!r}",
                hint=f"use PHASE=SECONDS pairs with PHASE one of {', '.join(PHASES_WITH_BUDGET)}, e.g. env=1200,weights=900",
            )
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(
                f"{PHASE_BUDGET_S}: {value!r} is not a number of seconds", hint="e.g. env=1200"
            ) from None
        if not math.isfinite(seconds) or seconds <= 0:  # nan compares false: never "> 0" by accident
            raise ConfigError(
                f"{PHASE_BUDGET_S}: budget for {phase} must be a finite, positive number of seconds, not {value.strip()!r}",
                hint="e.g. env=1200",
            )
        budgets[phase] = seconds
    return budgets


def parse_host_port(raw: str, name: str = SERVE_API) -> tuple[str, int]:
    host, sep, port = raw.strip().rpartition(":")
    if not sep:
        host, port = raw.strip(), "8000"
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={raw!r} is not HOST:PORT", hint=f"set {name} like 127.0.0.1:8000")
    return host, int(port)


def _text(environ: Mapping[str, str], name: str) -> str | None:
    return (environ.get(name) or "").strip() or None


@dataclass(frozen=True)
class Bucket:
    """RunPod's job bucket (``BUCKET_*``): where the worker uploads job outputs."""

    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    name: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Bucket:
        return cls(
            endpoint_url=_text(environ, BUCKET_ENDPOINT_URL),
            access_key_id=_text(environ, BUCKET_ACCESS_KEY_ID),
            secret_access_key=_text(environ, BUCKET_SECRET_ACCESS_KEY),
            name=_text(environ, BUCKET_NAME),
            region=_text(environ, BUCKET_REGION),
        )


@dataclass(frozen=True)
class Settings:
    """Every setting of SPEC §3, typed. Build it with `Settings.from_env`."""

    volume: Path | None
    require_volume: bool
    extras: tuple[str, ...]
    optional: frozenset[str]
    manifest: Path
    mirror: str | None
    #: a Hugging Face cache read in place (SPEC §3); None: ``<volume>/huggingface-cache/hub`` when it
    #: exists (`bootstrap.weights.hfcache.cache_root` resolves that, where the volume is known)
    hf_cache: Path | None
    min_free_bytes: int
    lock_timeout_s: float
    lease_ttl_s: float
    phase_budget_s: Mapping[str, float]
    on_fatal: str
    fatal_grace_s: float
    log_format: str
    python: str
    worker_id: str
    serve_api: tuple[str, int] | None
    require_gpu: bool
    locks: bool
    debug: bool
    app_dir: Path
    project_dir: Path
    worker_concurrency: int
    worker_max_input_bytes: int
    worker_max_pixels: int
    worker_allow_private_urls: bool
    #: most faces one picture swaps when target_index is 0 (the largest first)
    worker_max_faces: int
    #: buckets a job's s3.bucket may name besides BUCKET_NAME (empty: BUCKET_NAME only)
    worker_s3_buckets: tuple[str, ...]
    worker_presign_ttl_s: int
    worker_max_video_s: float
    worker_max_video_bytes: int
    #: largest base64 result a job returns inline; larger asks for output "s3" (RESULT_TOO_LARGE)
    worker_max_result_bytes: int
    #: HMAC key of the worker's own webhooks (SPEC §11); None: sent unsigned
    worker_webhook_secret: str | None = field(repr=False)
    #: speech: longest audio input (seconds) and longest text (characters) a job may carry
    worker_max_audio_s: float
    worker_max_text_chars: int
    on_runpod: bool
    #: model CPU offload for `animate` on a GPU too small to hold the pipeline
    worker_animate_offload: bool = False
    #: most driving-video frames (at the job's fps) one `animate` job generates
    worker_animate_max_frames: int = 385
    #: the hub's token for hf:// weights (never logged, never handed to the worker)
    hf_token: str | None = field(default=None, repr=False)
    hf_endpoint: str = HF_DEFAULT_ENDPOINT
    #: the S3 endpoint of s3:// weights (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL)
    aws_endpoint_url: str | None = None
    bucket: Bucket = field(default_factory=Bucket)
    #: where each value came from: "env" or "default" (for diagnose)
    sources: Mapping[str, str] = field(default_factory=dict)
    #: the environment it was read from, for passing on to child processes
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read every setting from ``environ`` (default: the process environment), once."""
        env = dict(os.environ if environ is None else environ)
        on_runpod = bool(env.get("RUNPOD_POD_ID"))
        app_dir = Path(env[APP_DIR]).resolve() if env.get(APP_DIR) else default_app_dir()
        project_dir = Path(env[PROJECT_DIR]).resolve() if env.get(PROJECT_DIR) else app_dir
        manifest_raw = env.get(MANIFEST, "").strip() or "worker/models.toml"
        manifest = Path(manifest_raw)
        if not manifest.is_absolute():
            manifest = app_dir / manifest
        volume_raw = env.get(VOLUME, "").strip()
        serve_raw = env.get(SERVE_API, "").strip()
        worker_id = (env.get(WORKER_ID) or env.get("RUNPOD_POD_ID") or socket.gethostname()).strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", worker_id):
            raise ConfigError(
                f"{WORKER_ID}={worker_id!r} cannot name a log directory",
                hint="use letters, digits, '.', '_' and '-'",
            )
        extras = _names(env, EXTRAS, "faceswap")
        values: dict[str, object] = {
            "volume": Path(volume_raw) if volume_raw else None,
            "require_volume": _bool(env, REQUIRE_VOLUME, on_runpod),
            "extras": extras,
            "optional": frozenset(_names(env, OPTIONAL, "")),
            "manifest": manifest,
            "mirror": env.get(MIRROR, "").strip() or None,
            "hf_cache": Path(raw_cache) if (raw_cache := env.get(HF_CACHE, "").strip()) else None,
            "min_free_bytes": int(_number(env, MIN_FREE_GB, 2.0) * 1e9),
            "lock_timeout_s": _number(env, LOCK_TIMEOUT_S, 900.0),
            "lease_ttl_s": _number(env, LEASE_TTL_S, 30.0, minimum=1),
            "phase_budget_s": parse_budgets(env.get(PHASE_BUDGET_S)),
            "on_fatal": _choice(env, ON_FATAL, "exit", ("exit", "serve-error")),
            "fatal_grace_s": _number(env, FATAL_GRACE_S, 600.0),
            "log_format": _choice(
                env,
                LOG_FORMAT,
                "json" if env.get("RUNPOD_ENDPOINT_ID") else "text",
                ("json", "text"),
            ),
            "python": _choice(env, PYTHON, "system", ("system", "managed")),
            "worker_id": worker_id,
            "serve_api": parse_host_port(serve_raw) if serve_raw else None,
            "require_gpu": _bool(env, REQUIRE_GPU, False),
            "locks": _choice(env, LOCKS, "on", ("on", "off")) == "on",
            "debug": _bool(env, DEBUG, False),
            "app_dir": app_dir,
            "project_dir": project_dir,
            "worker_concurrency": int(_number(env, WORKER_CONCURRENCY, 1, minimum=1)),
            "worker_max_input_bytes": int(_number(env, WORKER_MAX_INPUT_MB, 25, minimum=0) * 1024 * 1024),
            "worker_max_pixels": int(_number(env, WORKER_MAX_PIXELS, 40_000_000, minimum=1)),
            "worker_allow_private_urls": _bool(env, WORKER_ALLOW_PRIVATE_URLS, False),
            "worker_max_faces": int(_number(env, WORKER_MAX_FACES, 20, minimum=1)),
            "worker_s3_buckets": _buckets(env),
            "worker_presign_ttl_s": _presign_ttl(env),
            "worker_max_video_s": _number(env, WORKER_MAX_VIDEO_S, 600.0, minimum=1),
            "worker_max_video_bytes": int(_number(env, WORKER_MAX_VIDEO_MB, 500, minimum=0) * 1024 * 1024),
            "worker_max_result_bytes": int(_number(env, WORKER_MAX_RESULT_MB, 15, minimum=0) * 1024 * 1024),
            "worker_webhook_secret": env.get(WORKER_WEBHOOK_SECRET) or None,
            "worker_max_audio_s": _number(env, WORKER_MAX_AUDIO_S, 600.0, minimum=1),
            "worker_max_text_chars": int(_number(env, WORKER_MAX_TEXT_CHARS, 5000, minimum=1)),
            "on_runpod": on_runpod,
            "worker_animate_offload": _bool(env, WORKER_ANIMATE_OFFLOAD, False),
            "worker_animate_max_frames": int(_number(env, WORKER_ANIMATE_MAX_FRAMES, 385, minimum=2)),
            "hf_token": _text(env, HF_TOKEN),
            "hf_endpoint": _text(env, HF_ENDPOINT) or HF_DEFAULT_ENDPOINT,
            "aws_endpoint_url": _text(env, AWS_ENDPOINT_URL_S3) or _text(env, AWS_ENDPOINT_URL),
            "bucket": Bucket.from_env(env),
        }
        values.update(overrides)
        sources = {name: ("env" if env.get(name, "").strip() else "default") for name in KNOWN}
        return cls(sources=sources, environ=env, **values)  # type: ignore[arg-type]

    @property
    def stale_after_s(self) -> float:
        """How long an unchanged leftover's writer is presumed alive (`bootstrap.lease.stale_after_s`)."""
        from bootstrap.lease import stale_after_s

        return stale_after_s(self.lease_ttl_s)

    def budget(self, phase: str) -> float | None:
        return self.phase_budget_s.get(phase)

    def is_optional(self, capability: str) -> bool:
        return capability in self.optional

    def shown(self) -> list[tuple[str, str, str]]:
        """(name, value, source) for every known setting, secrets redacted."""
        rows = [(n, redact(n, self.environ.get(n)), self.sources.get(n, "default")) for n in KNOWN]
        extra = sorted(
            n
            for n in self.environ
            if n.startswith(("RUNPOD_", "HF_", "AWS_", "BUCKET_", "UV_")) and n not in KNOWN
        )
        rows += [(n, redact(n, self.environ.get(n)), "env") for n in extra]
        return rows
