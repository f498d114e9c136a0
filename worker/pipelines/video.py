"""The ``faceswap_video`` task (capability ``video``, which needs ``faceswap``; SPEC §10 "Video").

::

    {"task": "faceswap_video", "source_url" | "source_image", "video_url",
     "source_index": 1, "target_index": 0, "max_side": null, "crf": 20, "codec": "h264",
     "output": "s3", "s3": {"bucket", "prefix"}, "deadline_s": 3600, "webhook": "https://…"}

`load` (warm-load) reuses the warm-loaded face-swap pipeline (or loads one), checks that
ffmpeg and ffprobe run, and picks the encoder per codec by a one-frame trial encode
(`worker.media.decide_encoders`): NVENC when it really works here, libx264/libx265 otherwise.

A job, in order:

1. parse the input (every problem INVALID_INPUT naming the field); with ``output: "s3"`` the
   bucket credentials are checked before anything is fetched;
2. the source picture: fetched, decoded, its face found and embedded (as in ``faceswap``);
3. the video: streamed into an anonymous file on the container disk (the disk check runs once
   the response's headers are in; ``WORKER_MAX_VIDEO_MB`` → VIDEO_TOO_LARGE), then its
   container's metadata read (ffprobe) and checked — ``WORKER_MAX_VIDEO_S`` → VIDEO_TOO_LONG,
   frame size over ``WORKER_MAX_PIXELS`` → VIDEO_TOO_LARGE — before a frame is decoded; a
   second disk check counts the output;
4. decode → swap → encode: one ffmpeg decodes to raw frames on a pipe (a reader thread), frames
   are swapped in batches with the warm-loaded models, a writer thread feeds the encoding
   ffmpeg, which muxes the source's audio in the same pass (copied when MP4 carries its codec);
   queues between the stages are bounded, so memory does not grow with the video's length;
5. faces: ``target_index`` 0 swaps every face of a frame, the largest ``WORKER_MAX_FACES``
   first; N picks in each frame the face most like (by embedding) the N-th face, left to
   right, of the first frame with at least N faces — frames before that one, and frames where
   no face is like it, pass unchanged; frames without faces pass unchanged;
6. the output: uploaded (multipart) with a presigned URL, or inline base64 when small enough.

Progress goes out every few seconds (`worker.jobctx`). Cancellation and the job deadline are
checked between frames; every ffmpeg is killed and reaped and every temporary file is gone when
the job ends, however it ends (`worker.media`).
"""

from __future__ import annotations

import base64
import contextlib
import queue
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from bootstrap.settings import CONTAINER_DISK_MIN_FREE
from worker import children as wchildren
from worker import fetch as wfetch
from worker import io as wio
from worker import jobctx, media
from worker import output as wout
from worker.errors import JobError
from worker.pipelines import faceswap
from worker.pipelines.base import LoadContext, Stages

NAME = "video"
TASK = "faceswap_video"
CODECS = ("h264", "hevc")
DEFAULT_CRF = 20
DEFAULT_DEADLINE_S = 3600
VIDEO_FETCH_TIMEOUT_S = 900.0
#: frames swapped per batch, and the depth of the queues around the swap stage
BATCH = 8
#: cosine similarity a face needs to the followed face (ArcFace embeddings, normalised)
FOLLOW_THRESHOLD = 0.3


@dataclass(frozen=True)
class VideoRequest:
    source: faceswap.ImageRef
    video_url: str
    source_index: int
    target_index: int
    max_side: int | None
    crf: int
    codec: str
    output: wout.Output
    deadline_s: int


def _int(job: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = job.get(key, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise JobError("INVALID_INPUT", f"{key} must be an integer")
    if not lo <= value <= hi:
        raise JobError("INVALID_INPUT", f"{key} must be between {lo} and {hi}")
    return value


def parse_input(job: Any, allowed_buckets: Collection[str] = frozenset()) -> VideoRequest:
    """Validate a ``faceswap_video`` input; every problem is INVALID_INPUT naming the field."""
    if not isinstance(job, dict):
        raise JobError("INVALID_INPUT", "the job's input must be a JSON object")
    source = faceswap._image_ref(job, "source")
    url = job.get("video_url")
    if not isinstance(url, str) or not url.strip():
        raise JobError("INVALID_INPUT", "video_url must be a non-empty URL string")
    codec = job.get("codec", "h264")
    if not isinstance(codec, str) or codec.strip().lower() not in CODECS:
        raise JobError("INVALID_INPUT", "codec must be 'h264' or 'hevc'")
    # video defaults to S3 (SPEC §10); the rules of output and s3 are the picture task's
    output = wout.parse_output({"output": "s3", **job}, allowed_buckets)
    source_index = _int(job, "source_index", 1, 1, 1000)
    target_index = _int(job, "target_index", 0, 0, 1000)
    crf = _int(job, "crf", DEFAULT_CRF, 0, 51)
    deadline = _int(job, "deadline_s", DEFAULT_DEADLINE_S, 1, 86400)
    max_side = _int(job, "max_side", None, 16, 16384)
    assert source_index is not None and target_index is not None and crf is not None and deadline is not None
    return VideoRequest(
        source=source,
        video_url=url.strip(),
        source_index=source_index,
        target_index=target_index,
        max_side=max_side,
        crf=crf,
        codec=codec.strip().lower(),
        output=output,
        deadline_s=deadline,
    )


@dataclass
class _Follow:
    """Which faces of a frame to swap: every face, or the one person followed by embedding."""

    target_index: int
    max_faces: int
    reference: np.ndarray | None = None
    seen_enough: bool = False

    def pick(self, pipe: faceswap.FaceSwap, frame: np.ndarray, faces: list[Any]) -> list[Any]:
        if not faces:
            return []
        if self.target_index == 0:
            by_size = sorted(faces, key=lambda f: -float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
            return by_size[: self.max_faces]
        if self.reference is None:
            if len(faces) < self.target_index:
                return []
            face = faces[self.target_index - 1]
            self.reference = pipe.embed(frame, face)
            self.seen_enough = True
            return [face]
        best, best_sim = None, -1.0
        for face in faces:
            sim = float(np.dot(pipe.embed(frame, face), self.reference))
            if sim > best_sim:
                best, best_sim = face, sim
        return [best] if best is not None and best_sim >= FOLLOW_THRESHOLD else []


_END = object()


class FaceSwapVideo:
    """The loaded ``video`` pipeline: the face-swap models, ffmpeg, and the chosen encoders."""

    name = NAME

    def __init__(self, ctx: LoadContext, swapper: faceswap.FaceSwap | None = None) -> None:
        self.settings = ctx.settings
        self.faces = swapper or ctx.extra.get("pipelines", {}).get("faceswap") or faceswap.load(ctx)
        self.uploader = wout.Uploader.from_settings(self.settings)
        self.tools = media.Tools.find()
        self.versions = self.tools.versions()
        self.choice = media.decide_encoders(self.tools)
        self.tmp_dir: str | None = ctx.extra.get("tmp_dir")
        self.disk_reserve = int(ctx.extra.get("disk_reserve", CONTAINER_DISK_MIN_FREE))
        self.policy = wfetch.FetchPolicy(
            max_bytes=self.settings.worker_max_video_bytes,
            allow_private=self.settings.worker_allow_private_urls,
            timeout_s=float(ctx.extra.get("video_fetch_timeout_s", VIDEO_FETCH_TIMEOUT_S)),
        )
        self.max_faces = self.settings.worker_max_faces
        self.max_result_bytes = self.settings.worker_max_result_bytes

    def device(self) -> dict[str, Any]:
        info = self.faces.device()
        info["encoder"] = self.choice.encoders["h264"]
        info["encoders"] = dict(self.choice.encoders)
        if self.choice.reasons:
            why = "; ".join(
                f"{codec}: {self.choice.encoders[codec]} because {r}"
                for codec, r in self.choice.reasons.items()
            )
            info["encoder_fallback"] = why
            info["fallback"] = "; ".join(x for x in (info.get("fallback"), f"video encoders: {why}") if x)
        return info

    # -- a job -------------------------------------------------------------------------------

    def _source_face(self, req: VideoRequest) -> Any:
        data = self.faces.fetch(req.source)
        src = wio.decode_image(
            data, max_pixels=self.settings.worker_max_pixels, max_side=None, what="the source image"
        )
        faces = self.faces.detect(src.bgr)
        if not faces:
            raise JobError("NO_FACE_IN_SOURCE", "no face found in the source image")
        if req.source_index > len(faces):
            raise JobError(
                "FACE_INDEX_OUT_OF_RANGE",
                f"source_index is {req.source_index} but the source image has {len(faces)} face(s)",
            )
        face = faces[req.source_index - 1]
        self.faces.embed(src.bgr, face)
        return face

    def run(self, job_input: dict[str, Any]) -> dict[str, Any]:
        """Swap the source face into every frame of the video; see the module docstring."""
        req = parse_input(job_input, self.uploader.allowed_buckets)
        if req.output.kind == "s3":
            self.uploader.check(req.output)
        job = jobctx.current()
        job.set_deadline(req.deadline_s)
        t = Stages()
        with t.stage("fetch"):
            source_face = self._source_face(req)
            job.check()
        with media.temp_file(self.tmp_dir) as video_file, media.temp_file(self.tmp_dir) as out_file:
            with t.stage("fetch"):

                def fits(length: int | None) -> None:
                    media.check_disk(self.tmp_dir, length or 0, self.disk_reserve)

                wfetch.fetch_to_file(
                    req.video_url,
                    self.policy,
                    video_file,
                    max_bytes=self.settings.worker_max_video_bytes,
                    before_body=fits,
                    check=job.check,
                )
            src = media.fd_path(video_file)
            fds = (video_file.fileno(), out_file.fileno())
            with t.stage("probe"):
                info = media.probe(self.tools, src, pass_fds=fds)
                media.check_limits(
                    info, max_s=self.settings.worker_max_video_s, max_pixels=self.settings.worker_max_pixels
                )
                size = media.frame_size(info, req.max_side)
                media.check_disk(self.tmp_dir, media.estimate_output_bytes(info, size), self.disk_reserve)
            encoder = self.choice.encoders[req.codec]
            with wchildren.job_children() as children:
                swapped, frames = self._transcode(
                    req, info, size, src, media.fd_path(out_file), fds, encoder, children, source_face, job, t
                )
            if frames.get("swapped", 0) == 0:
                if req.target_index > 0 and not frames.get("indexed"):
                    raise JobError(
                        "FACE_INDEX_OUT_OF_RANGE",
                        f"target_index is {req.target_index} but no frame has that many faces",
                    )
                raise JobError("NO_FACE_IN_VIDEO", "no face found in any frame of the video")
            size_out = out_file.seek(0, 2)
            out: dict[str, Any] = {"success": True}
            if req.output.kind == "s3":
                with t.stage("upload"):
                    out.update(
                        self.uploader.upload_file(
                            out_file,
                            ext="mp4",
                            content_type="video/mp4",
                            target=req.output,
                            prefix="faceswap-video",
                        )
                    )
            else:
                if size_out > self.max_result_bytes:
                    raise JobError(
                        "RESULT_TOO_LARGE",
                        f"the video is {size_out} bytes encoded; base64 results are limited to "
                        f"{self.max_result_bytes} bytes: send output 's3'",
                    )
                out_file.seek(0)
                out["video_base64"] = base64.b64encode(out_file.read()).decode("ascii")
                out["format"] = "mp4"
        out.update(
            {
                "frames": swapped.frames_written,
                "fps": round(float(info.fps), 3),
                "duration_s": round(swapped.frames_written / float(info.fps), 3),
                "width": size[0] + size[0] % 2,
                "height": size[1] + size[1] % 2,
                "audio": swapped.audio is not None,
                "audio_mode": swapped.audio,
                "vfr_input": info.vfr,
                "faces_swapped": frames["swapped"],
                "encoder": encoder,
                "ms": t.ms,
            }
        )
        return out

    def _transcode(  # noqa: C901 - decode → swap → encode threads and their teardown; TODO split
        self,
        req: VideoRequest,
        info: media.VideoInfo,
        size: tuple[int, int],
        src: str,
        dst: str,
        fds: tuple[int, ...],
        encoder_name: str,
        children: wchildren.Children,
        source_face: Any,
        job: jobctx.JobContext,
        t: Stages,
    ) -> tuple[media.Encoder, dict[str, int]]:
        """decode → swap (this thread, in batches) → encode; see the module docstring, step 4."""
        decoder = media.start_decoder(children, self.tools, src, size, pass_fds=fds)
        encoder = media.start_encoder(
            children,
            self.tools,
            dst,
            size,
            info.fps,
            encoder=encoder_name,
            crf=req.crf,
            audio_from=src if info.audio_codec else None,
            audio_codec=info.audio_codec,
            pass_fds=fds,
        )
        decoded: queue.Queue[Any] = queue.Queue(maxsize=2 * BATCH)
        encoded: queue.Queue[Any] = queue.Queue(maxsize=2 * BATCH)
        errors: list[BaseException] = []

        def read() -> None:
            try:
                while (frame := decoder.read()) is not None:
                    decoded.put(frame)
            except BaseException as err:
                errors.append(err)
            finally:
                decoded.put(_END)

        def write() -> None:
            try:
                while (frame := encoded.get()) is not _END:
                    encoder.write(frame)
            except BaseException as err:
                errors.append(err)
                while encoded.get() is not _END:  # keep draining so the swap stage never blocks
                    pass

        reader = threading.Thread(target=read, name="video-decode", daemon=True)
        writer = threading.Thread(target=write, name="video-encode", daemon=True)
        reader.start()
        writer.start()
        follow = _Follow(req.target_index, self.max_faces)
        counts = {"swapped": 0, "indexed": 0}
        started = time.monotonic()
        done = 0
        ended = False
        try:
            with t.stage("swap"):
                while not ended:
                    batch: list[np.ndarray] = []
                    while len(batch) < BATCH:
                        try:
                            item = decoded.get(timeout=0.5)
                        except queue.Empty:
                            job.check()  # a stalled decoder still meets the deadline
                            continue
                        if item is _END:
                            ended = True
                            break
                        batch.append(item)
                    for frame in batch:
                        job.check()
                        faces = self.faces.detect(frame)
                        chosen = follow.pick(self.faces, frame, faces)
                        for face in chosen:
                            self.faces.swap(frame, face, source_face)
                        if chosen:
                            counts["swapped"] += 1
                        encoded.put(frame)
                    done += len(batch)
                    if errors:
                        break
                    fps, eta = media.progress_eta(done, info.frames, started)
                    job.progress(
                        {"frames": done, "total": info.frames, "fps": round(fps, 2), "eta_s": _round(eta)},
                        final=ended,
                    )
            encoded.put(_END)
            writer.join()
            reader.join()
            if errors:
                raise errors[0]
            decoder.finish(info.frames, info.frames_exact)
            with t.stage("encode"):
                encoder.finish()
        except BaseException:
            children.kill_all()  # unblocks both threads (EOF / broken pipe)
            _stop(reader, decoded, writer, encoded)
            raise
        counts["indexed"] = int(follow.seen_enough)
        return encoder, counts


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _stop(
    reader: threading.Thread, decoded: queue.Queue[Any], writer: threading.Thread, encoded: queue.Queue[Any]
) -> None:
    """After the children are killed: let both threads see the end, within 10 s."""
    deadline = time.monotonic() + 10
    while (reader.is_alive() or writer.is_alive()) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            while True:
                decoded.get_nowait()
        with contextlib.suppress(queue.Full):
            encoded.put_nowait(_END)
        reader.join(0.05)
        writer.join(0.05)


def load(ctx: LoadContext) -> FaceSwapVideo:
    """Warm-load the video pipeline (see the module docstring)."""
    return FaceSwapVideo(ctx)


__all__ = ["NAME", "TASK", "FaceSwapVideo", "load", "parse_input"]
