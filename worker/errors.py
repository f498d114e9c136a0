"""How a job can fail (SPEC §10).

- `JobError`: the job's own input is at fault → ``{"success": false, "code", "message"}``.
- `WorkerFault`: the worker or its operator is at fault (capability unavailable, credentials
  missing, out of memory) → a RunPod error ``{"error": …}``; with ``refresh`` the SDK is asked
  to replace the worker because the process state may be damaged (CUDA OOM, a CUDA error).
"""

from __future__ import annotations

from typing import Any

JOB_CODES = (
    "INVALID_INPUT",
    "UNKNOWN_TASK",
    "URL_NOT_ALLOWED",
    "FETCH_FAILED",
    "INPUT_TOO_LARGE",
    "NOT_AN_IMAGE",
    "IMAGE_TOO_LARGE",
    "NO_FACE_IN_SOURCE",
    "NO_FACE_IN_TARGET",
    "FACE_INDEX_OUT_OF_RANGE",
    # faceswap_video (SPEC §10 "Video")
    "NOT_A_VIDEO",
    "VIDEO_TOO_LONG",
    "VIDEO_TOO_LARGE",
    "NO_FACE_IN_VIDEO",
    # a base64 result over WORKER_MAX_RESULT_MB: ask for output "s3"
    "RESULT_TOO_LARGE",
    # speech (SPEC §10 "Speech")
    "NOT_AUDIO",
    "AUDIO_TOO_LONG",
    "TEXT_TOO_LONG",
    "UNSUPPORTED_LANGUAGE",
)


class JobError(Exception):
    def __init__(self, code: str, message: str) -> None:
        assert code in JOB_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message

    def output(self) -> dict[str, Any]:
        return {"success": False, "code": self.code, "message": self.message}


class WorkerFault(Exception):
    def __init__(self, message: str, *, refresh: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.refresh = refresh

    def output(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.refresh:
            out["refresh_worker"] = True
        return out
