"""Audio in and out for the speech capability: decode any common container to mono float32 at
a wanted rate (with the length limit checked before decoding), encode wav/flac/mp3/ogg, and
trim a long reference voice at a pause.

libsndfile (through ``soundfile``) reads and writes WAV, FLAC, OGG/Vorbis and MP3 itself; other
containers (m4a/AAC, webm/Opus, …) go through ``ffmpeg`` when it is on PATH (the image carries
Debian's). Nothing here imports torch.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from worker.errors import JobError

#: output_format → (soundfile format, subtype)
OUTPUT_FORMATS: dict[str, tuple[str, str | None]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "ogg": ("OGG", "VORBIS"),
}
FFMPEG_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] at ``rate`` Hz."""

    samples: np.ndarray
    rate: int

    @property
    def duration_s(self) -> float:
        return float(len(self.samples)) / float(self.rate)


def _too_long(what: str, seconds: float, max_s: float) -> JobError:
    return JobError(
        "AUDIO_TOO_LONG",
        f"{what} is {seconds:.1f} s long; the limit is {max_s:g} s (WORKER_MAX_AUDIO_S)",
    )


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling (polyphase, from scipy) of mono float32 samples."""
    if rate == target or len(samples) == 0:
        return samples.astype(np.float32, copy=False)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    out: np.ndarray = resample_poly(samples, target // g, rate // g).astype(np.float32)
    return out


def _decode_soundfile(data: bytes, what: str, max_s: float) -> tuple[np.ndarray, int] | None:
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = int(f.samplerate)
            if rate <= 0:
                return None
            if f.frames > 0 and f.frames / rate > max_s:
                raise _too_long(what, f.frames / rate, max_s)
            # frames can be unknown (-1 or huge) for some streams: read at most the limit + 1 s
            limit = int((max_s + 1) * rate)
            raw = f.read(frames=limit, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError):
        return None
    return raw.mean(axis=1).astype(np.float32), rate


def _decode_ffmpeg(data: bytes, what: str, max_s: float, rate: int) -> np.ndarray | None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", "pipe:0",
           "-t", f"{max_s + 1:g}", "-vn", "-ac", "1", "-ar", str(rate), "-f", "f32le", "pipe:1"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 or not proc.stdout:
        return None
    usable = len(proc.stdout) // 4 * 4
    return np.frombuffer(proc.stdout[:usable], dtype=np.float32).copy()


def decode(data: bytes, *, rate: int, max_s: float, what: str) -> Audio:
    """Decode ``data`` to mono float32 at ``rate`` Hz.

    Internal logic:

    1. libsndfile (WAV, FLAC, OGG, MP3…): its header gives the length, checked against
       ``max_s`` before any sample is decoded;
    2. otherwise ffmpeg (m4a, webm…), cut at ``max_s`` + 1 s so a long file costs little;
    3. neither can read it, or it holds no samples → NOT_AUDIO; longer than ``max_s`` →
       AUDIO_TOO_LONG; silence is fine (it is still audio).
    """
    got = _decode_soundfile(data, what, max_s)
    if got is not None:
        samples, src_rate = got
        samples = resample(samples, src_rate, rate)
    else:
        decoded = _decode_ffmpeg(data, what, max_s, rate)
        if decoded is None:
            raise JobError(
                "NOT_AUDIO",
                f"{what} is not audio in a format this worker reads (wav, flac, ogg, mp3"
                + (", or anything ffmpeg reads" if shutil.which("ffmpeg") else "")
                + ")",
            )
        samples = decoded
    if samples.size == 0:
        raise JobError("NOT_AUDIO", f"{what} holds no audio samples")
    if not np.isfinite(samples).all():
        raise JobError("NOT_AUDIO", f"{what} holds samples that are not numbers (NaN or infinite)")
    audio = Audio(np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False), rate)
    if audio.duration_s > max_s:
        raise _too_long(what, audio.duration_s, max_s)
    return audio


def encode(samples: np.ndarray, rate: int, output_format: str) -> bytes:
    """``samples`` (mono float32) as wav (16-bit PCM), flac, mp3 or ogg (Vorbis) bytes."""
    fmt, subtype = OUTPUT_FORMATS[output_format]
    buf = io.BytesIO()
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    sf.write(buf, clipped, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@dataclass(frozen=True)
class Trim:
    """How a reference clip was cut: its length before and after, and whether at a pause."""

    from_s: float
    to_s: float
    at_pause: bool

    def output(self) -> dict[str, object]:
        return {"from_s": round(self.from_s, 2), "to_s": round(self.to_s, 2), "at_pause": self.at_pause}


def _frame_db(samples: np.ndarray, frame: int) -> np.ndarray:
    n = len(samples) // frame
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    frames = samples[: n * frame].astype(np.float64).reshape(n, frame)
    rms = np.sqrt(np.mean(frames**2, axis=1)) + 1e-10
    return np.asarray(20 * np.log10(rms), dtype=np.float64)


def trim_reference(audio: Audio, *, max_s: float = 12.0, min_s: float = 3.0) -> tuple[Audio, Trim | None]:
    """Cut a reference longer than ``max_s`` at its last pause between ``min_s`` and ``max_s``.

    A pause is a run of ≥ 150 ms (then ≥ 60 ms) of 20 ms frames 30 dB below the clip's loudest
    frame; the cut falls in the pause's middle. Without one, the clip is cut at ``max_s``
    (``at_pause`` false). Leading and trailing silence is dropped either way, as F5-TTS's own
    preprocessing does.
    """
    frame = max(1, audio.rate // 50)  # 20 ms
    db = _frame_db(audio.samples, frame)
    samples = audio.samples
    if db.size:
        loud = db > db.max() - 40
        if loud.any():
            first, last = int(np.argmax(loud)), int(len(loud) - 1 - np.argmax(loud[::-1]))
            samples = samples[max(0, first - 1) * frame : (last + 2) * frame]
    if len(samples) / audio.rate <= max_s:
        return Audio(samples, audio.rate), None
    db = _frame_db(samples, frame)
    quiet = db < db.max() - 30
    lo, hi = int(min_s * 50), min(len(quiet), int(max_s * 50))
    for run_frames in (8, 3):  # ≥ 150 ms, then ≥ 60 ms
        best: int | None = None
        i = lo
        while i < hi:
            if quiet[i]:
                j = i
                while j < hi and quiet[j]:
                    j += 1
                if j - i >= run_frames:
                    best = (i + j) // 2
                i = j
            else:
                i += 1
        if best is not None:
            cut = samples[: best * frame]
            return Audio(cut, audio.rate), Trim(audio.duration_s, len(cut) / audio.rate, True)
    cut = samples[: int(max_s * audio.rate)]
    return Audio(cut, audio.rate), Trim(audio.duration_s, len(cut) / audio.rate, False)
