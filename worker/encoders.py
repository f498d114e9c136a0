"""ffmpeg as found on PATH, and which video encoder to use: standard library only.

Kept apart from `worker.media` (which needs numpy) so `bootstrap diagnose`, running before any
environment exists, asks the same questions the video pipeline asks at warm-load: do ffmpeg and
ffprobe run, and does NVENC really encode here (Debian's ffmpeg lists it on machines without any
GPU, so only a one-frame trial encode tells)?
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"

# -- tools ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    """Where ffmpeg and ffprobe are (Debian's, on PATH in the image)."""

    ffmpeg: str = FFMPEG
    ffprobe: str = FFPROBE

    @classmethod
    def find(cls, path: str | None = None) -> Tools:
        """Both binaries from ``path`` (default: PATH), or a RuntimeError naming the missing one
        and the fix."""
        found = {name: shutil.which(name, path=path) for name in (FFMPEG, FFPROBE)}
        missing = [name for name, path in found.items() if path is None]
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} not found on PATH: the video capability needs Debian's ffmpeg "
                "package in the image (Dockerfile.runpod: apt-get install ffmpeg)"
            )
        return cls(ffmpeg=str(found[FFMPEG]), ffprobe=str(found[FFPROBE]))

    def versions(self) -> dict[str, str]:
        """First line of ``-version`` of each (raises when one does not run)."""
        out = {}
        for name, exe in (("ffmpeg", self.ffmpeg), ("ffprobe", self.ffprobe)):
            proc = subprocess.run(
                [exe, "-hide_banner", "-version"], capture_output=True, timeout=30, check=False
            )
            first = proc.stdout.decode(errors="replace").splitlines()[:1]
            if proc.returncode != 0 or not first:
                raise RuntimeError(f"{exe} -version failed with {proc.returncode}: {proc.stderr[-300:]!r}")
            match = re.match(r"\S+ version (\S+)", first[0])
            out[name] = match.group(1) if match else first[0]
        return out

    def encoders(self) -> set[str]:
        """Encoder names this build lists (listing is not having: see `choose_encoder`)."""
        proc = subprocess.run(
            [self.ffmpeg, "-hide_banner", "-encoders"], capture_output=True, timeout=30, check=False
        )
        names = set()
        for line in proc.stdout.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and re.fullmatch(r"[VAS.][F.][S.][X.][B.][D.]", parts[0]):
                names.add(parts[1])
        return names


# -- encoder choice ---------------------------------------------------------------------------

#: codec → (GPU encoder, CPU encoder)
ENCODERS = {"h264": ("h264_nvenc", "libx264"), "hevc": ("hevc_nvenc", "libx265")}

_NVENC_REASONS = (
    (re.compile(r"Cannot load libcuda\.so"), "no NVIDIA driver in this container (libcuda.so.1 not found)"),
    (
        re.compile(r"Cannot load libnvidia-encode\.so"),
        "the driver's NVENC library is not mounted: start the container with "
        "NVIDIA_DRIVER_CAPABILITIES including 'video'",
    ),
    (
        re.compile(r"minimum required Nvidia driver", re.I),
        "the NVIDIA driver is too old for this ffmpeg's NVENC",
    ),
    (re.compile(r"No capable devices found|no NVENC capable devices", re.I), "the GPU has no NVENC encoder"),
    (
        re.compile(r"OpenEncodeSessionEx failed: out of memory|incompatible client key", re.I),
        "the GPU refused another NVENC session (session limit or out of memory)",
    ),
    (re.compile(r"cuInit\(0\) failed|CUDA_ERROR", re.I), "CUDA could not be initialised for NVENC"),
)


def nvenc_failure_reason(stderr: str, returncode: int) -> str:
    """Why a trial NVENC encode failed, in words, from ffmpeg's stderr."""
    for pattern, reason in _NVENC_REASONS:
        if pattern.search(stderr):
            return reason
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return f"the trial encode failed (exit {returncode}): {lines[-1][:200] if lines else 'no output'}"


@dataclass(frozen=True)
class Trial:
    encoder: str
    ok: bool
    returncode: int
    stderr: str


def trial_encode(tools: Tools, encoder: str, timeout: float = 60.0) -> Trial:
    """Encode one generated frame with ``encoder`` to nowhere: does it really work here?"""
    args = [
        tools.ffmpeg,
        "-hide_banner",
        "-nostdin",
        "-v",
        "error",
        "-f",
        "lavfi",
        "-i",
        "color=c=gray:s=256x256:r=25",
        "-frames:v",
        "1",
        "-pix_fmt",
        "yuv420p",
        "-c:v",
        encoder,
        "-f",
        "null",
        "-",
    ]
    try:
        proc = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Trial(encoder, False, -1, f"the trial encode did not finish in {timeout:g} s")
    return Trial(encoder, proc.returncode == 0, proc.returncode, proc.stderr.decode(errors="replace"))


@dataclass(frozen=True)
class EncoderChoice:
    """The encoder per codec and, for a CPU one, why the GPU's is not used."""

    encoders: dict[str, str]
    reasons: dict[str, str]

    def describe(self) -> dict[str, Any]:
        return {
            "h264": self.encoders["h264"],
            "hevc": self.encoders["hevc"],
            **({"reasons": self.reasons} if self.reasons else {}),
        }


def choose_encoder(codec: str, listed: set[str], trial: Trial | None) -> tuple[str, str | None]:
    """(encoder, reason the GPU one is not used or None) for ``codec``.

    The GPU encoder is taken only when the build lists it *and* a one-frame trial with it
    worked; Debian's ffmpeg lists NVENC on machines without any GPU.
    """
    gpu, cpu = ENCODERS[codec]
    if gpu not in listed:
        return cpu, f"this ffmpeg build has no {gpu}"
    if trial is None:
        return cpu, f"{gpu} was not tried"
    if not trial.ok:
        return cpu, f"{gpu}: {nvenc_failure_reason(trial.stderr, trial.returncode)}"
    return gpu, None


def decide_encoders(tools: Tools) -> EncoderChoice:
    """Warm-load: list the encoders, run the trials, decide per codec."""
    listed = tools.encoders()
    encoders: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for codec, (gpu, cpu) in ENCODERS.items():
        if cpu not in listed and gpu not in listed:
            raise RuntimeError(f"this ffmpeg has neither {gpu} nor {cpu}")
        trial = trial_encode(tools, gpu) if gpu in listed else None
        enc, why = choose_encoder(codec, listed, trial)
        if enc == cpu and cpu not in listed:
            raise RuntimeError(f"this ffmpeg has no {cpu} and {why}")
        encoders[codec] = enc
        if why:
            reasons[codec] = why
    return EncoderChoice(encoders, reasons)


def encoder_args(encoder: str, crf: int) -> list[str]:
    """Quality options per encoder: ``crf`` means the same scale (lower is better) for each."""
    if encoder == "libx264":
        return ["-preset", "veryfast", "-crf", str(crf)]
    if encoder == "libx265":
        return ["-preset", "fast", "-crf", str(crf), "-tag:v", "hvc1", "-x265-params", "log-level=error"]
    if encoder in ("h264_nvenc", "hevc_nvenc"):
        out = ["-preset", "p4", "-rc", "vbr", "-cq", str(crf), "-b:v", "0"]
        return [*out, "-tag:v", "hvc1"] if encoder == "hevc_nvenc" else out
    raise ValueError(f"unknown encoder {encoder}")
