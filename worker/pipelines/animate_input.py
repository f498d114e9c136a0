"""The ``animate`` job's fields, parsed and checked before any download (SPEC §10 "Animate"),
and the pipeline's segment arithmetic they are checked against."""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from worker import output as wout
from worker.errors import JobError

MODES = ("animate", "replace")
DEFAULT_FPS = 16
DEFAULT_SEGMENT = 77
MAX_SIDE = 1920
MAX_PROMPT_CHARS = 5000


@dataclass(frozen=True)
class Ref:
    kind: str  # "url" | "base64"
    value: str
    field: str


@dataclass(frozen=True)
class Request:
    mode: str
    image: Ref
    video: Ref
    pose_video: Ref | None
    face_video: Ref | None
    mask_video: Ref | None
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    height: int
    width: int
    fps: float
    segment_frame_length: int
    output: wout.Output


def _ref(job: dict[str, Any], url_key: str, b64_key: str | None, *, required: bool) -> Ref | None:
    keys = [url_key] + ([b64_key] if b64_key else [])
    given = [k for k in keys if job.get(k) is not None]
    if len(given) > 1:
        raise JobError("INVALID_INPUT", f"give one of {' and '.join(keys)}, not both")
    if not given:
        if required:
            raise JobError("INVALID_INPUT", f"{' or '.join(keys)} is required")
        return None
    key = given[0]
    value = job[key]
    if not isinstance(value, str) or not value.strip():
        raise JobError("INVALID_INPUT", f"{key} must be a non-empty string")
    return Ref("url" if key.endswith("_url") else "base64", value.strip(), key)


def _int(job: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = job.get(key, default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise JobError("INVALID_INPUT", f"{key} must be an integer")
    if not lo <= value <= hi:
        raise JobError("INVALID_INPUT", f"{key} must be between {lo} and {hi}, not {value}")
    return value


def _float(job: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = job.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise JobError("INVALID_INPUT", f"{key} must be a number")
    if not lo <= float(value) <= hi:
        raise JobError("INVALID_INPUT", f"{key} must be between {lo:g} and {hi:g}, not {value}")
    return float(value)


def _text(job: dict[str, Any], key: str) -> str:
    value = job.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise JobError("INVALID_INPUT", f"{key} must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise JobError("INVALID_INPUT", f"{key} is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
    return value


def parse_input(job: Any, allowed_buckets: Collection[str] = frozenset()) -> Request:
    """Validate a job's input; every problem is INVALID_INPUT naming the field."""
    if not isinstance(job, dict):
        raise JobError("INVALID_INPUT", "the job's input must be a JSON object")
    mode = job.get("mode", "animate")
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        raise JobError("INVALID_INPUT", f"mode must be 'animate' or 'replace', not {mode!r}")
    mode = mode.strip().lower()
    image = _ref(job, "image_url", "image", required=True)
    video = _ref(job, "video_url", "video", required=True)
    assert image is not None and video is not None
    pose_video = _ref(job, "pose_video_url", None, required=False)
    face_video = _ref(job, "face_video_url", None, required=False)
    mask_video = _ref(job, "mask_video_url", None, required=False)
    if mask_video is not None and mode != "replace":
        raise JobError("INVALID_INPUT", "mask_video_url is only used with mode 'replace'")
    height = _int(job, "height", 480, 16, MAX_SIDE)
    width = _int(job, "width", 832, 16, MAX_SIDE)
    for key, value in (("height", height), ("width", width)):
        if value % 16:
            raise JobError(
                "INVALID_INPUT",
                f"{key} must be a multiple of 16, not {value} (try {max(16, round(value / 16) * 16)})",
            )
    segment = _int(job, "segment_frame_length", DEFAULT_SEGMENT, 5, 321)
    if (segment - 1) % 4:
        raise JobError(
            "INVALID_INPUT",
            f"segment_frame_length must be 4k+1 (5, 9, …, 77, 81), not {segment}: the VAE packs 4 frames per latent",
        )
    seed = job.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    else:
        seed = _int(job, "seed", 0, 0, 2**63 - 1)
    # video outputs default to S3 (SPEC §10); the rules of output and s3 are the picture task's
    output = wout.parse_output({"output": "s3", **job}, allowed_buckets)
    return Request(
        mode=mode,
        image=image,
        video=video,
        pose_video=pose_video,
        face_video=face_video,
        mask_video=mask_video,
        prompt=_text(job, "prompt"),
        negative_prompt=_text(job, "negative_prompt"),
        steps=_int(job, "steps", 20, 1, 100),
        guidance_scale=_float(job, "guidance_scale", 1.0, 0.0, 20.0),
        seed=seed,
        height=height,
        width=width,
        fps=_float(job, "fps", DEFAULT_FPS, 1.0, 60.0),
        segment_frame_length=segment,
        output=output,
    )


def segments_for(frames: int, segment: int, prev: int = 1) -> int:
    """How many segments the pipeline runs for ``frames`` (its own arithmetic)."""
    effective = segment - prev
    rest = (frames - prev) % effective
    target = frames + (0 if rest == 0 else effective - rest)
    return target // effective
