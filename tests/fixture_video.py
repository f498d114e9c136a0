"""Small videos made by ffmpeg itself for the video tests.

A dark, moving test pattern (``testsrc2`` dimmed far below the fixture detector's brightness
threshold, so the pattern itself is never a face) with one or more bright fixture 'faces'
(`tests.fixture_models.picture` squares, as PNG files) overlaid for part of the clip, and a
sine tone as the audio. Options give 24/30 fps, a variable frame rate, a rotation tag and odd
sizes; every clip is a few dozen frames, so a test encodes it in well under a second.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.fixture_models import encode, picture


@dataclass(frozen=True)
class Face:
    """A square 'face' of ``side`` px moving from (x, y) by (dx, dy) px per second, shown in [t0, t1)."""

    x: int
    y: int
    side: int
    dx: float = 0.0
    dy: float = 0.0
    t0: float = 0.0
    t1: float = 1e9
    colour: int = 0  # index into fixture_models.FACE_COLOURS


@dataclass(frozen=True)
class Clip:
    width: int = 320
    height: int = 240
    fps: int = 24
    seconds: float = 2.0
    faces: tuple[Face, ...] = (Face(120, 70, 90, t0=0.5),)
    audio: str | None = "aac"  # None, or an audio codec (aac, libopus, pcm_s16le, libmp3lame)
    vfr: bool = False
    rotate: int = 0
    container: str = "mp4"
    extra: tuple[str, ...] = field(default_factory=tuple)


def face_png(path: Path, side: int, colour: int) -> Path:
    from tests.fixture_models import FACE_COLOURS

    img = picture(side, side, [])
    img[:, :] = FACE_COLOURS[colour % len(FACE_COLOURS)]
    path.write_bytes(encode(img))
    return path


def make_clip(path: Path, clip: Clip) -> Path:
    """Render ``clip`` to ``path`` with ffmpeg (real encoders: libx264 + the audio codec)."""
    args = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y"]
    args += [
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=s={clip.width}x{clip.height}:r={clip.fps}:d={clip.seconds},lutrgb=r=val/6:g=val/6:b=val/6",
    ]
    for i, face in enumerate(clip.faces):
        args += [
            "-loop",
            "1",
            "-i",
            str(face_png(path.with_name(f"{path.stem}-face{i}.png"), face.side, face.colour)),
        ]
    n_inputs = 1 + len(clip.faces)
    if clip.audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={clip.seconds}"]
    chain = []
    last = "[0:v]"
    for i, face in enumerate(clip.faces):
        out = f"[v{i}]"
        chain.append(
            f"{last}[{i + 1}:v]overlay=x='{face.x}+{face.dx}*t':y='{face.y}+{face.dy}*t':"
            f"enable='between(t,{face.t0},{min(face.t1, 1e6)})':shortest=1{out}"
        )
        last = out
    if clip.vfr:
        # every frame of the first half second, then every third: timestamps with gaps
        chain.append(f"{last}select='lt(t\\,0.5)+not(mod(n\\,3))'[vv]")
        last = "[vv]"
    if not chain:
        chain.append(f"{last}null[vv]")
        last = "[vv]"
    args += ["-filter_complex", ";".join(chain), "-map", last]
    if clip.audio:
        args += ["-map", f"{n_inputs}:a", "-c:a", clip.audio]
    args += [
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv444p" if (clip.width % 2 or clip.height % 2) else "yuv420p",
    ]
    if clip.vfr:
        args += ["-fps_mode", "vfr"]
    target = path.with_name(path.stem + "-unrotated" + path.suffix) if clip.rotate else path
    args += ["-t", str(clip.seconds), *clip.extra, "-f", clip.container, str(target)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    if clip.rotate:
        # ffmpeg 5.1 writes a display matrix from the rotate tag only when stream-copying
        proc = subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-y",
                "-i",
                str(target),
                "-c",
                "copy",
                "-metadata:s:v:0",
                f"rotate={clip.rotate}",
                str(path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        target.unlink()
    return path


def ffprobe(path: Path, *, count: bool = True) -> dict[str, Any]:
    args = ["ffprobe", "-v", "error", "-print_format", "json", "-show_streams", "-show_format"]
    if count:
        args.append("-count_frames")
    proc = subprocess.run([*args, str(path)], capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def video_stream(info: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in info["streams"] if s["codec_type"] == "video")


def audio_stream(info: dict[str, Any]) -> dict[str, Any] | None:
    return next((s for s in info["streams"] if s["codec_type"] == "audio"), None)


def frames(path: Path, *, width: int, height: int, upright: bool = True) -> np.ndarray:
    """Every frame of ``path`` as RGB (N×H×W×3), decoded by ffmpeg (display orientation)."""
    args = ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24"]
    if not upright:
        args.insert(4, "-noautorotate")
    args += ["-fps_mode", "passthrough", "pipe:1"]
    proc = subprocess.run(args, capture_output=True, check=True)
    data = np.frombuffer(proc.stdout, dtype=np.uint8)
    return data.reshape(-1, height, width, 3)
