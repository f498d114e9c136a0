"""Video plumbing shared by the video tasks (``faceswap_video``, and ``animate`` after it).

Frames never touch the disk one file at a time: ffmpeg decodes the input into raw BGR frames
on a pipe, the pipeline works on them in memory, and a second ffmpeg encodes the frames it gets
on its stdin, muxing the source's audio in the same pass. Command lines are built with
ffmpeg-python; the processes are started here, so every child

- dies with the worker: ``PR_SET_PDEATHSIG`` = SIGKILL, set in the child before ``exec`` (a
  worker SIGKILLed mid-job leaves no ffmpeg behind). The kernel ties it to the *thread* that
  started the child, which is the job's thread, alive for as long as the job;
- is killed and reaped when the job ends in any way (`Children.kill_all`: cancellation, the job
  deadline, an error) — both in `worker.children`;
- reads only what it is given: ``-protocol_whitelist file`` (no network, no ``concat:``) and
  ``-format_whitelist`` of real video containers (no HLS/concat playlists that would open
  other files or URLs, no ``tty`` text, no single images).

Temporary files are anonymous (`tempfile.TemporaryFile`: ``O_TMPFILE`` where the filesystem has
it, else unlinked at once) on the container disk; ffmpeg reaches them as ``/dev/fd/N``. They
have no name to leak: the kernel frees their space when the last process holding them ends, so
even a SIGKILLed worker leaves nothing in the temp directory. A disk check before the job
(`check_disk`) counts them.

Variable frame rate: frames are decoded with ``-fps_mode passthrough`` (none duplicated or
dropped) and encoded at the source's *average* rate, so a VFR input comes out constant frame
rate with the same frame count and duration (timestamps are not carried; audio stays in sync on
average). Rotation: ffmpeg applies the display matrix while decoding, so frames are upright and
the output plays the same way, with no rotation tag. Odd widths and heights are padded by one
black pixel (4:2:0 video needs even sizes).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Any, cast

import numpy as np

from worker.children import Child, Children
from worker.encoders import (
    EncoderChoice,
    Tools,
    Trial,
    choose_encoder,
    decide_encoders,
    encoder_args,
    nvenc_failure_reason,
    trial_encode,
)
from worker.errors import JobError, WorkerFault

#: Demuxers a job's video may be read with (ffmpeg's short names).
DEMUXERS = (
    "mov",
    "matroska",
    "webm",
    "avi",
    "flv",
    "mpegts",
    "mpeg",
    "ogg",
    "asf",
    "mxf",
    "gif",
    "nut",
    "ivf",
    "h264",
    "hevc",
    "m4v",
    "dv",
)
INPUT_GUARDS = {"protocol_whitelist": "file", "format_whitelist": ",".join(DEMUXERS)}
#: Audio codecs an MP4 carries as they are; anything else is re-encoded to AAC.
MP4_AUDIO = frozenset({"aac", "mp3", "ac3", "eac3", "opus", "alac", "flac"})
PROBE_TIMEOUT_S = 30.0

# -- probing ----------------------------------------------------------------------------------


def _fraction(text: Any) -> Fraction | None:
    try:
        value = Fraction(str(text))
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value and value >= 0 else None  # not NaN


@dataclass(frozen=True)
class VideoInfo:
    """What ffprobe says about a container, before a frame is decoded."""

    format: str
    size: int
    duration_s: float
    width: int  # as stored
    height: int
    rotation: int  # 0, 90, 180, 270 (display)
    fps: Fraction  # average rate
    vfr: bool
    frames: int  # from the container, else estimated from duration × fps
    frames_exact: bool
    video_codec: str
    audio_codec: str | None
    audio_duration_s: float | None

    @property
    def display_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def _rotation(stream: dict[str, Any]) -> int:
    raw: Any = (stream.get("tags") or {}).get("rotate")
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            raw = side["rotation"]
    try:
        value = float(str(raw))
    except ValueError:
        return 0
    if value != value:  # NaN
        return 0
    # ffprobe's display-matrix rotation is counter-clockwise and may be negative.
    deg = round(value) % 360
    return min((0, 90, 180, 270), key=lambda r: abs(r - deg))


def probe(
    tools: Tools, path: str, *, pass_fds: Sequence[int] = (), timeout: float = PROBE_TIMEOUT_S
) -> VideoInfo:
    """The container's metadata (ffprobe, restricted to real video demuxers); NOT_A_VIDEO otherwise."""
    args = [
        tools.ffprobe,
        "-hide_banner",
        "-v",
        "error",
        "-protocol_whitelist",
        INPUT_GUARDS["protocol_whitelist"],
        "-format_whitelist",
        INPUT_GUARDS["format_whitelist"],
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
        path,
    ]
    try:
        proc = subprocess.run(
            args, capture_output=True, timeout=timeout, check=False, pass_fds=tuple(pass_fds), close_fds=True
        )
    except subprocess.TimeoutExpired:
        raise JobError(
            "NOT_A_VIDEO", f"reading the video's metadata took longer than {timeout:g} s"
        ) from None
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    why = err[-1][:300] if err else f"ffprobe exited with {proc.returncode}"
    why = why.replace(path + ": ", "")
    try:
        data = json.loads(proc.stdout or b"{}")
    except ValueError:
        data = {}
    fmt = data.get("format") or {}
    streams = data.get("streams") or []
    if proc.returncode != 0 or not fmt:
        raise JobError("NOT_A_VIDEO", f"the input is not a video ffmpeg can read: {why}")
    video = next(
        (
            s
            for s in streams
            if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")
        ),
        None,
    )
    if video is None:
        raise JobError("NOT_A_VIDEO", f"the input ({fmt.get('format_name')}) has no video stream")
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    if width <= 0 or height <= 0:
        raise JobError("NOT_A_VIDEO", "the video stream has no picture size")
    avg = _fraction(video.get("avg_frame_rate"))
    real = _fraction(video.get("r_frame_rate"))
    fps = avg or real
    if fps is None or fps > 1000:
        raise JobError(
            "NOT_A_VIDEO", f"the video stream has no usable frame rate ({video.get('avg_frame_rate')})"
        )
    duration = _float(fmt.get("duration")) or _float(video.get("duration"))
    nb = video.get("nb_frames")
    frames_exact = str(nb).isdigit() and int(str(nb)) > 0
    if duration is None and frames_exact:
        duration = int(str(nb)) / float(fps)
    if duration is None:
        raise JobError("NOT_A_VIDEO", "the container does not say how long the video is")
    frames = int(str(nb)) if frames_exact else max(1, round(duration * float(fps)))
    vfr = bool(avg and real and abs(float(avg) - float(real)) > 0.01 * float(real))
    return VideoInfo(
        format=str(fmt.get("format_name", "")),
        size=int(_float(fmt.get("size")) or 0),
        duration_s=duration,
        width=width,
        height=height,
        rotation=_rotation(video),
        fps=fps.limit_denominator(1_000_000),
        vfr=vfr,
        frames=frames,
        frames_exact=frames_exact,
        video_codec=str(video.get("codec_name", "")),
        audio_codec=str(audio.get("codec_name")) if audio else None,
        audio_duration_s=(_float(audio.get("duration")) or duration) if audio else None,
    )


def check_limits(info: VideoInfo, *, max_s: float, max_pixels: int) -> None:
    """VIDEO_TOO_LONG / VIDEO_TOO_LARGE from the metadata alone (before decoding)."""
    if info.duration_s > max_s:
        raise JobError(
            "VIDEO_TOO_LONG",
            f"the video is {info.duration_s:.1f} s long; the limit is {max_s:g} s (WORKER_MAX_VIDEO_S)",
        )
    if info.frames > max_s * 240:
        raise JobError(
            "VIDEO_TOO_LONG",
            f"the video has about {info.frames} frames; the limit is {int(max_s * 240)} (WORKER_MAX_VIDEO_S at 240 fps)",
        )
    if info.width * info.height > max_pixels:
        raise JobError(
            "VIDEO_TOO_LARGE",
            f"the video's frames are {info.width}×{info.height} = {info.width * info.height} pixels; "
            f"the limit is {max_pixels} (WORKER_MAX_PIXELS)",
        )


# -- geometry ---------------------------------------------------------------------------------


def frame_size(info: VideoInfo, max_side: int | None) -> tuple[int, int]:
    """(width, height) of the decoded, upright frames, scaled down to ``max_side``."""
    w, h = info.display_size
    if max_side is not None and max(w, h) > max_side:
        factor = max_side / max(w, h)
        w, h = max(2, round(w * factor / 2) * 2), max(2, round(h * factor / 2) * 2)
    return w, h


# -- temp files and disk ----------------------------------------------------------------------


def temp_file(root: str | None) -> IO[bytes]:
    """An anonymous read-write file on the container disk (no name: see the module docstring)."""
    return tempfile.TemporaryFile(dir=root)


def fd_path(f: IO[bytes]) -> str:
    return f"/dev/fd/{f.fileno()}"


def check_disk(root: str | None, needed: int, reserve: int) -> None:
    """A WorkerFault naming the numbers when ``needed`` bytes plus ``reserve`` do not fit."""
    where = root or tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if needed + reserve > free:
        raise WorkerFault(
            f"the job's temporary files need about {needed / 1e9:.2f} GB ({needed} bytes) on {where}, "
            f"plus {reserve / 1e9:.2f} GB kept free, but only {free / 1e9:.2f} GB ({free} bytes) is free: "
            "give the endpoint a larger container disk, or send a shorter or smaller video"
        )


def estimate_output_bytes(info: VideoInfo, size: tuple[int, int]) -> int:
    """A generous bound on the encoded output: ~0.3 bit per pixel, or 1.5× the input."""
    pixels = size[0] * size[1] * info.frames
    return int(max(pixels * 0.3 / 8, info.size * 1.5)) + 1_000_000


# -- decode and encode ------------------------------------------------------------------------


@dataclass
class Decoder:
    """Raw BGR frames of the input's first video stream, read from ffmpeg's stdout."""

    child: Child
    width: int
    height: int
    frames_read: int = 0

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * 3

    def read(self) -> np.ndarray | None:
        """The next frame (H×W×3 uint8), or None at the end of the stream."""
        stdout = self.child.proc.stdout
        assert stdout is not None
        buf = bytearray(self.frame_bytes)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = cast(io.BufferedReader, stdout).readinto(view[got:])
            if not n:
                break
            got += n
        if got == 0:
            return None
        if got < len(buf):
            return None  # a partial frame: the stream ended inside it (reported by `finish`)
        self.frames_read += 1
        return np.frombuffer(buf, dtype=np.uint8).reshape(self.height, self.width, 3)

    def finish(self, expected: int, exact: bool) -> None:
        """After the last frame: a decoder that failed is NOT_A_VIDEO at the frame it reached."""
        rc = self.child.wait()
        err = self.child.stderr.text()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        short = exact and self.frames_read < expected - max(1, expected // 100)
        if rc != 0 or (short and lines) or self.frames_read == 0:
            last = lines[-1][:300] if lines else f"ffmpeg exited with {rc}"
            raise JobError(
                "NOT_A_VIDEO",
                f"the video could not be decoded past frame {self.frames_read} "
                f"(of {'' if exact else 'about '}{expected}): {last}",
            )


def start_decoder(
    children: Children,
    tools: Tools,
    source: str,
    size: tuple[int, int],
    *,
    pass_fds: Sequence[int] = (),
    input_format: str | None = None,
) -> Decoder:
    """ffmpeg reading ``source`` → raw bgr24 frames of ``size`` on a pipe, every frame kept."""
    import ffmpeg

    width, height = size
    stream = ffmpeg.input(source, **INPUT_GUARDS)
    stream = stream.video.filter("scale", width, height, flags="bicubic")
    out = ffmpeg.output(
        stream, "pipe:", format="rawvideo", pix_fmt="bgr24", fps_mode="passthrough", sn=None, dn=None
    )
    args = [tools.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-xerror", *out.get_args()]
    child = children.spawn(args, "decoder", stdout=subprocess.PIPE, pass_fds=pass_fds)
    return Decoder(child, width, height)


@dataclass
class Encoder:
    """ffmpeg encoding raw bgr24 frames from its stdin (and muxing the source's audio)."""

    child: Child
    encoder: str
    audio: str | None  # "copy" | "aac" | None
    frames_written: int = 0

    def write(self, frame: np.ndarray) -> None:
        stdin = self.child.proc.stdin
        assert stdin is not None
        try:
            stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, ValueError, OSError):
            rc = self.child.wait(10)
            raise WorkerFault(
                f"the encoder ({self.encoder}) stopped after {self.frames_written} frames (exit {rc}): "
                f"{self._last_error()}"
            ) from None
        self.frames_written += 1

    def _last_error(self) -> str:
        lines = [ln for ln in self.child.stderr.text().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no message"

    def finish(self, timeout: float | None = None) -> None:
        stdin = self.child.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()
        rc = self.child.wait(timeout)
        if rc != 0:
            raise WorkerFault(f"the encoder ({self.encoder}) failed (exit {rc}): {self._last_error()}")


def start_encoder(
    children: Children,
    tools: Tools,
    output: str,
    size: tuple[int, int],
    fps: Fraction,
    *,
    encoder: str,
    crf: int,
    audio_from: str | None = None,
    audio_codec: str | None = None,
    pass_fds: Sequence[int] = (),
    container: str = "mp4",
) -> Encoder:
    """ffmpeg: raw frames on stdin (+ the first audio stream of ``audio_from``) → ``output``.

    Audio is copied when the container carries its codec, else re-encoded to AAC; odd sizes are
    padded to even ones; ``+faststart`` puts the index first so players can start at once.
    """
    import ffmpeg

    width, height = size
    rate = f"{fps.numerator}/{fps.denominator}"
    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="bgr24", s=f"{width}x{height}", r=rate).video
    if width % 2 or height % 2:
        video = video.filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2")
    streams = [video]
    audio_mode: str | None = None
    extra: dict[str, Any] = {}
    if audio_from is not None and audio_codec is not None:
        streams.append(ffmpeg.input(audio_from, **INPUT_GUARDS).audio)
        audio_mode = "copy" if audio_codec in MP4_AUDIO else "aac"
        extra["c:a"] = "copy" if audio_mode == "copy" else "aac"
        if audio_mode == "aac":
            extra["b:a"] = "192k"
    out = ffmpeg.output(
        *streams,
        output,
        format=container,
        pix_fmt="yuv420p",
        movflags="+faststart",
        **{"c:v": encoder},
        **extra,
    )
    args = [tools.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y", *out.get_args()]
    # Encoder options go right before the output (ffmpeg-python has no place for repeated keys).
    args[-1:-1] = encoder_args(encoder, crf)
    child = children.spawn(args, "encoder", stdin=subprocess.PIPE, pass_fds=pass_fds)
    return Encoder(child, encoder, audio_mode)


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Streams:
    """What ffprobe says of an encoded output (for tests and the result)."""

    frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    audio_codec: str | None
    audio_duration_s: float | None


def inspect_output(tools: Tools, path: str, *, pass_fds: Sequence[int] = ()) -> Streams:
    """Count the output's frames (decoding it) and read its streams."""
    args = [
        tools.ffprobe,
        "-v",
        "error",
        "-count_frames",
        "-print_format",
        "json",
        "-show_streams",
        "-show_format",
        path,
    ]
    proc = subprocess.run(args, capture_output=True, timeout=300, check=True, pass_fds=tuple(pass_fds))
    data = json.loads(proc.stdout)
    v = next(s for s in data["streams"] if s["codec_type"] == "video")
    a = next((s for s in data["streams"] if s["codec_type"] == "audio"), None)
    fps = _fraction(v.get("avg_frame_rate")) or Fraction(0)
    return Streams(
        frames=int(v.get("nb_read_frames") or 0),
        fps=float(fps),
        width=int(v["width"]),
        height=int(v["height"]),
        duration_s=float(data["format"].get("duration") or 0),
        audio_codec=a.get("codec_name") if a else None,
        audio_duration_s=_float(a.get("duration")) if a else None,
    )


def progress_eta(
    done: int, total: int, started: float, now: float | None = None
) -> tuple[float, float | None]:
    """(frames per second so far, seconds left or None)."""
    elapsed = max(1e-6, (now if now is not None else time.monotonic()) - started)
    fps = done / elapsed
    if fps <= 0 or total <= done:
        return fps, (0.0 if total <= done else None)
    return fps, (total - done) / fps


__all__ = [
    "Decoder",
    "Encoder",
    "EncoderChoice",
    "Tools",
    "Trial",
    "VideoInfo",
    "check_disk",
    "check_limits",
    "choose_encoder",
    "decide_encoders",
    "frame_size",
    "nvenc_failure_reason",
    "probe",
    "start_decoder",
    "start_encoder",
    "temp_file",
    "trial_encode",
]
