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

The job's fields are parsed in `worker.pipelines.animate_input`; its ffmpeg I/O is
`worker.pipelines.animate_video` (local stand-ins for `worker.media`).
"""

from __future__ import annotations

import base64
import gc
import json
import math
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bootstrap.errors import GpuError
from worker import fetch as wfetch
from worker import io as wio
from worker import jobctx, pose, torchdev
from worker import output as wout
from worker.errors import JobError
from worker.pipelines import animate_video
from worker.pipelines.animate_input import (
    DEFAULT_FPS,
    MAX_SIDE,
    MODES,
    Ref,
    Request,
    parse_input,
    segments_for,
)
from worker.pipelines.base import LoadContext, Stages

NAME = "animate"
#: manifest dests (worker/models.toml): the diffusers pipeline and Wan2.2's preprocessing models
PIPELINE_DEST = "animate/Wan2.2-Animate-14B-Diffusers"
PREPROCESS_DEST = "animate/Wan2.2-Animate-14B-preprocess"
DETECTOR_PATH = "process_checkpoint/det/yolov10m.onnx"
POSE_PATH = "process_checkpoint/pose2d/vitpose_h_wholebody.onnx/end2end.onnx"
#: the components WanAnimatePipeline loads (model_index.json of the diffusers repo)
COMPONENTS = ("transformer", "text_encoder", "image_encoder", "vae")
Progress = Callable[[dict[str, Any]], None]


def job_progress(job: jobctx.JobContext) -> Progress:
    """The running job's reporter (``job`` ``progress`` events, the SDK's ``progress_update``):
    throttled by the job context, except the last denoising step, which always goes out.

    Every report is also where the job stops: cancelled (RunPod cancelled it, the SDK cancelled
    its task) → `jobctx.JobCancelled`, past its deadline → `WorkerFault`, raised from the
    pipeline's step callback, so a cancelled job costs at most one more denoising step."""

    def report(detail: dict[str, Any]) -> None:
        job.check()
        job.progress(detail, final=detail.get("stage") == "generate" and detail.get("percent") == 100.0)

    return report


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
            animate_video.encode_video(video, DEFAULT_FPS, Path(tmp) / "warm.mp4", audio_from=None)
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
        animate_video.probe(path, ref.field)
        frames = animate_video.decode_frames(path, req.fps, size[0], size[1], what=ref.field, gray=gray)
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
                info = animate_video.probe(video_path, "the driving video")
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
                frames = animate_video.decode_frames(
                    video_path, req.fps, req.width, req.height, what="the driving video"
                )
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
                animate_video.encode_video(
                    video, req.fps, out_path, audio_from=video_path if info.audio else None
                )
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
                    "encoder": animate_video.ENCODER,
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
