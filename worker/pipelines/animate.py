"""The ``animate`` task: Wan2.2-Animate (diffusers' ``WanAnimatePipeline``) on a character
picture and a driving video (SPEC §10 "Animate")::

    {"task": "animate", "image_url" | "image", "video_url" | "video", "mode": "animate",
     "prompt": "", "negative_prompt": "", "steps": 20, "guidance_scale": 1.0, "seed": 0,
     "height": 480, "width": 832, "fps": 16, "segment_frame_length": 77,
     "pose_video_url", "face_video_url", "mask_video_url", "output": "s3", "s3": {…}}

`load` (warm-load, once):

1. the pipeline directory and the preprocessing models come only from the plan (F3);
2. device and dtype from `worker.torchdev` (bf16 on GPUs that have it, fp16 on older ones,
   fp32 on CPU); the memory the pipeline needs (its safetensors headers at that dtype, plus
   working memory) is checked against the GPU: too small is model CPU offload with
   ``WORKER_ANIMATE_OFFLOAD=1``, else exit 16 (GPU) with the numbers when ``animate`` is
   required, or the capability unavailable with the numbers when it is optional;
3. a warm-up run of every stage (pose, face crops, one denoising step, the VAE, the encoder).

A job (`Animate.run`):

1. parse and check every field (SPEC codes) before any download;
2. fetch the picture and the driving video; ffprobe it (NOT_A_VIDEO, VIDEO_TOO_LONG over
   ``WORKER_MAX_VIDEO_S`` or over ``WORKER_ANIMATE_MAX_FRAMES`` frames at ``fps``);
3. decode the driving video sampled at ``fps``, scaled to cover ``width``×``height`` and cropped
   (one ffmpeg pipe, no frame files); per frame: the person and its whole-body key points
   (`worker.pose`), the pose frame, the face crop (the face-swap detector when loaded, else the
   face key points), for ``replace`` the person mask and the background (frame outside the mask);
   or the given ``pose_video_url``/``face_video_url``/``mask_video_url`` instead;
4. generate: the pipeline's own segments of ``segment_frame_length`` frames, each conditioned on
   the last frame of the previous one; it returns exactly as many frames as the driving video
   has (no seam in frame count); progress after every denoising step, naming the segment;
5. encode at ``fps`` with the driving video's audio over the same duration; upload (S3, the
   default) or return base64.

CUDA out-of-memory and CUDA errors (and a host allocation failure) are `WorkerFault(refresh=True)`:
RunPod replaces the worker.

The ffmpeg helpers `_probe`, `_decode_frames`, `_encode_video` and `_upload_video` are local
stand-ins for the shared video I/O module (decode/encode pipes, encoder choice, multipart S3):
swap them for it at merge.
"""

from __future__ import annotations

import base64
import gc
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bootstrap.errors import GpuError
from worker import fetch as wfetch
from worker import io as wio
from worker import jobctx, pose, torchdev
from worker import output as wout
from worker.errors import JobError
from worker.pipelines.base import LoadContext, Stages

NAME = "animate"
#: manifest dests (worker/models.toml): the diffusers pipeline and Wan2.2's preprocessing models
PIPELINE_DEST = "animate/Wan2.2-Animate-14B-Diffusers"
PREPROCESS_DEST = "animate/Wan2.2-Animate-14B-preprocess"
DETECTOR_PATH = "process_checkpoint/det/yolov10m.onnx"
POSE_PATH = "process_checkpoint/pose2d/vitpose_h_wholebody.onnx/end2end.onnx"
#: the components WanAnimatePipeline loads (model_index.json of the diffusers repo)
COMPONENTS = ("transformer", "text_encoder", "image_encoder", "vae")
MODES = ("animate", "replace")
DEFAULT_FPS = 16
DEFAULT_SEGMENT = 77
MAX_SIDE = 1920
MAX_PROMPT_CHARS = 5000
CRF = 20
ENCODER = "libx264"
Progress = Callable[[dict[str, Any]], None]


# -- input -------------------------------------------------------------------------------------


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


def job_progress(job: jobctx.JobContext) -> Progress:
    """The running job's reporter (``job`` ``progress`` events, the SDK's ``progress_update``):
    throttled by the job context, except the last denoising step, which always goes out."""

    def report(detail: dict[str, Any]) -> None:
        job.progress(detail, final=detail.get("stage") == "generate" and detail.get("percent") == 100.0)

    return report


def segments_for(frames: int, segment: int, prev: int = 1) -> int:
    """How many segments the pipeline runs for ``frames`` (its own arithmetic)."""
    effective = segment - prev
    rest = (frames - prev) % effective
    target = frames + (0 if rest == 0 else effective - rest)
    return target // effective


# -- video I/O (local stand-ins for the shared video module) -----------------------------------


@dataclass(frozen=True)
class VideoInfo:
    duration: float
    fps: float
    width: int
    height: int
    audio: bool


def _probe(path: Path, what: str) -> VideoInfo:
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


def _decode_frames(
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


def _encode_video(
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


# -- memory ------------------------------------------------------------------------------------

_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_bytes(path: Path, float_bytes: int) -> int:
    """Bytes the tensors of one safetensors file take once loaded with floats at ``float_bytes``
    each (read from its JSON header; no tensor data is touched)."""
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        numel = math.prod(int(d) for d in meta["shape"])
        dtype = meta["dtype"]
        total += numel * (float_bytes if dtype in _FLOAT_DTYPES else _OTHER_DTYPES.get(dtype, 4))
    return total


def component_bytes(model_dir: Path, float_bytes: int) -> dict[str, int]:
    """Per pipeline component, the bytes its weights take at the load dtype."""
    out: dict[str, int] = {}
    for comp in COMPONENTS:
        files = sorted((model_dir / comp).glob("*.safetensors"))
        out[comp] = sum(safetensors_bytes(f, float_bytes) for f in files)
    return out


def working_bytes(weights: int) -> int:
    """Activation and VAE-decode headroom on top of the weights: 15% of them, at least 256 MiB."""
    return max(256 * 1024**2, int(weights * 0.15))


def _background(frames: np.ndarray, masks: list[np.ndarray]) -> list[np.ndarray]:
    """The driving frames with the person (mask > 127) blacked out: what ``replace`` keeps."""
    return [np.where(m[..., None] > 127, 0, f).astype(np.uint8) for f, m in zip(frames, masks, strict=True)]


def _model_dir(ctx: LoadContext, dest: str) -> Path:
    """A model directory from the plan: a ``[[repo]]`` dest, or the common parent of
    ``[[file]]`` dests under it."""
    if dest in ctx.models:
        return Path(ctx.models[dest])
    prefix = dest.rstrip("/") + "/"
    for key, path in ctx.models.items():
        if key.startswith(prefix):
            rel = key[len(prefix) :]
            return Path(path[: len(path) - len(rel)].rstrip("/"))
    return Path(ctx.model_path(dest))  # raises, naming what the plan has


# -- the pipeline ------------------------------------------------------------------------------


class Animate:
    """The loaded pipeline: WanAnimatePipeline on the probed device plus the pose models."""

    name = NAME

    def __init__(self, ctx: LoadContext) -> None:
        import torch
        from diffusers import WanAnimatePipeline

        self.settings = settings = ctx.settings
        self.ctx = ctx
        self.max_video_bytes = settings.worker_max_video_bytes
        self.max_video_s = settings.worker_max_video_s
        self.max_result_bytes = settings.worker_max_result_bytes
        self.max_frames = settings.worker_animate_max_frames
        self.image_policy = wfetch.FetchPolicy(
            max_bytes=settings.worker_max_input_bytes,
            allow_private=settings.worker_allow_private_urls,
            timeout_s=float(ctx.extra.get("fetch_timeout_s", wfetch.FETCH_TIMEOUT_S)),
        )
        self.video_policy = wfetch.FetchPolicy(
            max_bytes=self.max_video_bytes,
            allow_private=settings.worker_allow_private_urls,
            timeout_s=float(ctx.extra.get("video_fetch_timeout_s", 300.0)),
        )
        self.uploader = wout.Uploader.from_settings(settings)

        model_dir = _model_dir(ctx, PIPELINE_DEST)
        if not (model_dir / "model_index.json").is_file():
            found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
            raise FileNotFoundError(
                f"expected a diffusers pipeline (model_index.json) at {model_dir}, found {', '.join(found) or 'nothing'}"
            )
        pre_dir = _model_dir(ctx, PREPROCESS_DEST)
        self.pose = pose.PoseModels(pre_dir / DETECTOR_PATH, pre_dir / POSE_PATH)

        self.dev = ctx.extra.get("torch_device") or torchdev.probe()
        dtype = self.dev.dtype()
        comp = component_bytes(model_dir, torch.tensor([], dtype=dtype).element_size())
        weights = sum(comp.values())
        work = working_bytes(weights)
        free = ctx.extra["free_memory"] if "free_memory" in ctx.extra else torchdev.free_memory(self.dev)
        self.memory = torchdev.memory_plan(
            self.dev,
            need=weights + work,
            largest=max(comp.values()) + work,
            free=free,
            offload_allowed=settings.worker_animate_offload,
            what="Wan2.2-Animate",
        )
        if self.memory.action == "refuse":
            if settings.is_optional(NAME):
                # main marks an optional capability unavailable with this message
                raise RuntimeError(self.memory.message)
            raise GpuError(
                self.memory.message,
                hint="use a GPU with more memory (see docs/animate.md), set WORKER_ANIMATE_OFFLOAD=1, "
                "or list animate in BOOTSTRAP_OPTIONAL to serve the other capabilities",
            )
        self.pipe = WanAnimatePipeline.from_pretrained(str(model_dir), dtype=dtype)  # type: ignore[no-untyped-call]
        if self.memory.action == "offload":
            self.pipe.enable_model_cpu_offload(device=self.dev.device)
        else:
            self.pipe.to(self.dev.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.face_size = int(self.pipe.transformer.config.motion_encoder_size)
        self.temporal = int(self.pipe.vae_scale_factor_temporal)
        if ctx.extra.get("warm_up", True):
            self.warm_up()

    # -- device ------------------------------------------------------------------------------

    def device(self) -> dict[str, Any]:
        info = pose.describe(self.pose)
        info["gpu"] = self.dev.name if self.dev.cuda else info.get("gpu")
        info["torch"] = self.dev.describe()
        info["memory"] = {"action": self.memory.action, "need": self.memory.need, "have": self.memory.have}
        return info

    # -- stages ------------------------------------------------------------------------------

    def _face_detector(self) -> Any:
        """The warm-loaded face-swap pipeline when the worker hands it over, else None."""
        pipes = self.ctx.extra.get("pipelines")
        faceswap = pipes.get("faceswap") if isinstance(pipes, dict) else None
        return faceswap if faceswap is not None and hasattr(faceswap, "_detect") else None

    def preprocess(
        self, frames: np.ndarray, mode: str, progress: Progress | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None, dict[str, int]]:
        """Pose frames, face crops and (replace) person masks for RGB ``frames``."""
        n, h, w = frames.shape[:3]
        faceswap = self._face_detector()
        poses: list[np.ndarray] = []
        faces: list[np.ndarray] = []
        masks: list[np.ndarray] | None = [] if mode == "replace" else None
        last_box: tuple[int, int, int, int] | None = None
        stats = {"people": 0, "faces": 0}
        for i in range(n):
            rgb = frames[i]
            person = self.pose.person(rgb)
            stats["people"] += person is not None
            poses.append(pose.draw_pose(person, h, w))
            box = None
            if faceswap is not None:
                found = faceswap._detect(np.ascontiguousarray(rgb[:, :, ::-1]))
                if found:
                    f = max(found, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
                    x0, y0, x1, y1 = (float(v) for v in f.bbox[:4])
                    box = pose.square_box((x0, y0, x1, y1), h, w, grow=1.3)
            if box is None:
                box = pose.face_box_from_keypoints(person, h, w)
            if box is not None:
                stats["faces"] += 1
                last_box = box
            faces.append(pose.crop(rgb, box or last_box, self.face_size))
            if masks is not None:
                masks.append(pose.person_mask(person, h, w))
            if progress is not None and (i + 1) % 16 == 0:
                progress({"stage": "preprocess", "frames": i + 1, "total": n})
        return poses, faces, masks, stats

    def generate(
        self,
        image: np.ndarray,
        poses: list[np.ndarray],
        faces: list[np.ndarray],
        background: list[np.ndarray] | None,
        masks: list[np.ndarray] | None,
        *,
        mode: str,
        prompt: str,
        negative_prompt: str,
        steps: int,
        guidance_scale: float,
        seed: int,
        height: int,
        width: int,
        segment_frame_length: int,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Run the pipeline; (N, H, W, 3) uint8 RGB, N = len(poses)."""
        import torch
        from PIL import Image

        segments = segments_for(len(poses), segment_frame_length)
        done = [0]

        def on_step(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            done[0] += 1
            if progress is not None:
                progress(
                    {
                        "stage": "generate",
                        "segment": (done[0] - 1) // steps + 1,
                        "segments": segments,
                        "step": i + 1,
                        "steps": steps,
                        "percent": round(100 * done[0] / (steps * segments), 1),
                    }
                )
            return {}

        out = self.pipe(
            image=Image.fromarray(image),
            pose_video=[Image.fromarray(p) for p in poses],
            face_video=[Image.fromarray(f) for f in faces],
            background_video=[Image.fromarray(b) for b in background] if background is not None else None,
            mask_video=[Image.fromarray(m, "L") for m in masks] if masks is not None else None,
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            height=height,
            width=width,
            segment_frame_length=segment_frame_length,
            num_inference_steps=steps,
            mode=mode,
            prev_segment_conditioning_frames=1,
            guidance_scale=guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="np",
            callback_on_step_end=on_step,
        )
        video = np.asarray(out.frames[0], dtype=np.float32)
        result: np.ndarray = (np.clip(video, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return result

    # -- warm-up -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Every stage once on generated frames: pose, crops, one denoising step over one
        segment in each mode, the VAE, and the encoder, so the first job pays no first-touch."""
        size = int(self.ctx.extra.get("warm_up_size", 64))
        frames = np.zeros((5, size, size, 3), dtype=np.uint8)
        frames[:, size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = (200, 170, 140)
        image = frames[0].copy()
        for mode in MODES:
            poses, faces, masks, _ = self.preprocess(frames, mode)
            background = _background(frames, masks) if masks else None
            video = self.generate(
                image, poses, faces, background, masks, mode=mode, prompt="warm-up", negative_prompt="",
                steps=1, guidance_scale=1.0, seed=0, height=size, width=size, segment_frame_length=5,
            )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="animate-warm-") as tmp:
            _encode_video(video, DEFAULT_FPS, Path(tmp) / "warm.mp4", audio_from=None)
        self._free()

    def _free(self) -> None:
        gc.collect()
        if self.dev.cuda:
            import torch

            torch.cuda.empty_cache()

    # -- a job -------------------------------------------------------------------------------

    def _bytes(self, ref: Ref, policy: wfetch.FetchPolicy, max_bytes: int) -> bytes:
        if ref.kind == "url":
            return wfetch.fetch_url(ref.value, policy)
        return wfetch.decode_base64(ref.value, max_bytes, ref.field)

    def _fetch_video(self, ref: Ref, tmp: Path, name: str) -> Path:
        try:
            data = self._bytes(ref, self.video_policy, self.max_video_bytes)
        except JobError as err:
            if err.code == "INPUT_TOO_LARGE":
                raise JobError(
                    "VIDEO_TOO_LARGE", err.message.replace("WORKER_MAX_INPUT_MB", "WORKER_MAX_VIDEO_MB")
                ) from None
            raise
        path = tmp / name
        path.write_bytes(data)
        return path

    def _conditioning(
        self, ref: Ref, tmp: Path, req: Request, n: int, *, size: tuple[int, int], gray: bool = False
    ) -> np.ndarray:
        """A given pose/face/mask video sampled like the driving video, cut to its ``n`` frames."""
        path = self._fetch_video(ref, tmp, ref.field + ".mp4")
        _probe(path, ref.field)
        frames = _decode_frames(path, req.fps, size[0], size[1], what=ref.field, gray=gray)
        if frames.shape[0] < n:
            raise JobError(
                "INVALID_INPUT",
                f"{ref.field} has {frames.shape[0]} frames at {req.fps:g} fps; the driving video has {n}",
            )
        return frames[:n]

    def run(self, job_input: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:  # noqa: C901 - the job's stages in order; TODO split per stage
        """Animate the picture with the driving video; see the module docstring."""
        req = parse_input(job_input, self.uploader.allowed_buckets)
        if req.output.kind == "s3":
            self.uploader.check(req.output)  # missing credentials fail before any download or model run
        if progress is None:  # through the worker: the job's own context reports it
            progress = job_progress(jobctx.current())
        t = Stages()
        tmp = Path(tempfile.mkdtemp(prefix="animate-job-"))
        try:
            with t.stage("fetch"):
                image_bytes = self._bytes(req.image, self.image_policy, self.settings.worker_max_input_bytes)
                image = wio.decode_image(
                    image_bytes,
                    max_pixels=self.settings.worker_max_pixels,
                    max_side=MAX_SIDE,
                    what="the image",
                )
                del image_bytes
                video_path = self._fetch_video(req.video, tmp, "driving")
                info = _probe(video_path, "the driving video")
            if info.duration > self.max_video_s:
                raise JobError(
                    "VIDEO_TOO_LONG",
                    f"the driving video is {info.duration:.1f} s; the limit is {self.max_video_s:g} s (WORKER_MAX_VIDEO_S)",
                )
            expected = round(info.duration * req.fps)
            if expected > self.max_frames:
                raise JobError(
                    "VIDEO_TOO_LONG",
                    f"the driving video is {info.duration:.1f} s, {expected} frames at {req.fps:g} fps; the limit is "
                    f"{self.max_frames} frames per job (WORKER_ANIMATE_MAX_FRAMES): trim it, lower fps, or split the job",
                )
            with t.stage("preprocess"):
                frames = _decode_frames(video_path, req.fps, req.width, req.height, what="the driving video")
                n = int(frames.shape[0])
                if n > self.max_frames:
                    raise JobError(
                        "VIDEO_TOO_LONG",
                        f"the driving video gives {n} frames at {req.fps:g} fps; the limit is {self.max_frames} (WORKER_ANIMATE_MAX_FRAMES)",
                    )
                if n < 2:
                    raise JobError(
                        "INVALID_INPUT",
                        f"the driving video gives {n} frame at {req.fps:g} fps; at least 2 are needed",
                    )
                given_pose = given_face = given_mask = None
                if req.pose_video is not None:
                    given_pose = self._conditioning(req.pose_video, tmp, req, n, size=(req.width, req.height))
                if req.face_video is not None:
                    given_face = self._conditioning(
                        req.face_video, tmp, req, n, size=(self.face_size, self.face_size)
                    )
                if req.mask_video is not None:
                    given_mask = self._conditioning(
                        req.mask_video, tmp, req, n, size=(req.width, req.height), gray=True
                    )
                need_own = (
                    given_pose is None or given_face is None or (req.mode == "replace" and given_mask is None)
                )
                stats: dict[str, int] = {}
                if need_own:
                    poses, faces, masks, stats = self.preprocess(frames, req.mode, progress)
                else:
                    poses, faces, masks = [], [], None
                if given_pose is not None:
                    poses = list(given_pose)
                if given_face is not None:
                    faces = list(given_face)
                if given_mask is not None:
                    masks = [np.where(m > 127, 255, 0).astype(np.uint8) for m in given_mask]
                background = None
                if req.mode == "replace":
                    assert masks is not None
                    background = _background(frames, masks)
                else:
                    masks = None
                character = np.ascontiguousarray(image.bgr[:, :, ::-1])
            with t.stage("generate"):
                video = self.generate(
                    character,
                    poses,
                    faces,
                    background,
                    masks,
                    mode=req.mode,
                    prompt=req.prompt,
                    negative_prompt=req.negative_prompt,
                    steps=req.steps,
                    guidance_scale=req.guidance_scale,
                    seed=req.seed,
                    height=req.height,
                    width=req.width,
                    segment_frame_length=req.segment_frame_length,
                    progress=progress,
                )
            if video.shape[0] != n:  # the pipeline's contract; a seam would show here
                raise RuntimeError(f"the pipeline returned {video.shape[0]} frames for {n} driving frames")
            with t.stage("encode"):
                out_path = tmp / "out.mp4"
                _encode_video(video, req.fps, out_path, audio_from=video_path if info.audio else None)
            out: dict[str, Any] = {"success": True}
            if req.output.kind == "s3":
                with t.stage("upload"), open(out_path, "rb") as fh:
                    out.update(
                        self.uploader.upload_file(
                            fh, ext="mp4", content_type="video/mp4", target=req.output, prefix=NAME
                        )
                    )
            else:
                size = out_path.stat().st_size
                if size > self.max_result_bytes:
                    raise JobError(
                        "RESULT_TOO_LARGE",
                        f"the video is {size} bytes; base64 results are limited to {self.max_result_bytes} bytes "
                        "(WORKER_MAX_RESULT_MB): send output 's3'",
                    )
                with t.stage("encode"):
                    out["video_base64"] = base64.b64encode(out_path.read_bytes()).decode("ascii")
                    out["format"] = "mp4"
            out.update(
                {
                    "mode": req.mode,
                    "frames": n,
                    "fps": float(req.fps),
                    "duration_s": round(n / req.fps, 3),
                    "width": req.width,
                    "height": req.height,
                    "segments": segments_for(n, req.segment_frame_length),
                    "audio": info.audio,
                    "seed": req.seed,
                    "encoder": ENCODER,
                    "ms": t.ms,
                }
            )
            if stats:
                out["detected"] = stats
            return out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self._free()


def load(ctx: LoadContext) -> Animate:
    """Warm-load Wan2.2-Animate from the plan's model paths (see the module docstring)."""
    return Animate(ctx)


__all__ = ["NAME", "Animate", "load", "parse_input", "segments_for"]
