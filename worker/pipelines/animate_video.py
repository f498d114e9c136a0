"""The ``animate`` job's video I/O through ffmpeg: probe, decode sampled at a frame rate and
scaled to cover the output size (one pipe, no frame files), encode with the driving audio.

These are local stand-ins for the shared video module (`worker.media`: decode/encode pipes,
encoder choice, multipart S3); animate keeps them until it moves onto that module.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.errors import JobError

ENCODER = "libx264"
CRF = 20


@dataclass(frozen=True)
class VideoInfo:
    duration: float
    fps: float
    width: int
    height: int
    audio: bool


def probe(path: Path, what: str) -> VideoInfo:
    """ffprobe's view of ``path``; anything without a decodable video stream is NOT_A_VIDEO."""
    proc = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        info = json.loads(proc.stdout or "{}")
    except ValueError:
        info = {}
    streams = info.get("streams") or []
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    if proc.returncode != 0 or video is None:
        why = (proc.stderr or "").strip().splitlines()[-1:] or ["no video stream"]
        raise JobError("NOT_A_VIDEO", f"{what} is not a video ffmpeg can read: {why[0][:200]}")
    try:
        duration = float(video.get("duration") or info.get("format", {}).get("duration") or 0)
        num, _, den = str(video.get("avg_frame_rate") or video.get("r_frame_rate") or "0/1").partition("/")
        rate = float(num) / float(den or 1) if float(den or 1) else 0.0
        width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    except (TypeError, ValueError):
        raise JobError("NOT_A_VIDEO", f"{what} has an unreadable video stream") from None
    if duration <= 0 or width <= 0 or height <= 0:
        raise JobError("NOT_A_VIDEO", f"{what} has no frames (duration {duration:g} s, {width}×{height})")
    return VideoInfo(duration, rate, width, height, any(s.get("codec_type") == "audio" for s in streams))


def decode_frames(
    path: Path, fps: float, width: int, height: int, *, what: str, gray: bool = False
) -> np.ndarray:
    """Frames sampled at ``fps``, scaled to cover ``width``×``height`` and centre-cropped,
    through one ffmpeg pipe: (N, H, W, 3) RGB or (N, H, W) grey uint8."""
    vf = (
        f"fps={fps:g},scale={width}:{height}:force_original_aspect_ratio=increase:flags=bicubic,"
        f"crop={width}:{height},setsar=1"
    )
    pix, channels = ("gray", 1) if gray else ("rgb24", 3)
    proc = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-nostdin",
            "-i",
            str(path),
            "-an",
            "-vf",
            vf,
            "-pix_fmt",
            pix,
            "-f",
            "rawvideo",
            "-",
        ],
        capture_output=True,
        timeout=1800,
        check=False,
    )
    frame = width * height * channels
    if proc.returncode != 0 or len(proc.stdout) < frame:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no frames"]
        raise JobError("NOT_A_VIDEO", f"{what} could not be decoded: {err[0][:200]}")
    n = len(proc.stdout) // frame
    arr = np.frombuffer(proc.stdout, dtype=np.uint8, count=n * frame)
    return arr.reshape((n, height, width) if gray else (n, height, width, 3))


def encode_video(
    frames: np.ndarray, fps: float, out: Path, *, audio_from: Path | None, crf: int = CRF
) -> None:
    """H.264 mp4 at ``fps`` from (N, H, W, 3) RGB frames through a pipe; the audio of
    ``audio_from`` (when it has one) over the same duration."""
    n, h, w = frames.shape[:3]
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    cmd += ["-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "-"]
    if audio_from is not None:
        cmd += ["-i", str(audio_from), "-map", "0:v:0", "-map", "1:a:0?", "-c:a", "aac", "-b:a", "128k"]
    cmd += ["-c:v", ENCODER, "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p"]
    cmd += ["-t", f"{n / fps:.6f}", "-movflags", "+faststart", str(out)]
    proc = subprocess.run(
        cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True, timeout=1800, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"ffmpeg could not encode the output: {proc.stderr.decode('utf-8', 'replace')[-500:]}"
        )
