"""The ``faceswap`` task: InsightFace ``buffalo_l`` (detection + recognition) with ``inswapper_128``.

Compatible with existing face-swap workers' clients (SPEC §10)::

    {"source_url" | "source_image", "target_url" | "target_image",
     "source_index": 1, "target_index": 0, "output_format": "png", "output": "base64",
     "max_side": null, "s3": {"bucket", "prefix"}}

Faces are numbered from 1, left to right; ``target_index`` 0 swaps every face of the target, at
most ``WORKER_MAX_FACES`` of them, the largest first (``faces.target`` then exceeds ``swapped``).

`load` runs once, before the first job (warm-load, FAILURES F10):

1. model paths come only from the plan (``ctx.model_path``), never from InsightFace's own
   download; missing files are named with what was found instead (F3);
2. sessions are created with CUDA first when onnxruntime offers it, then the providers really
   in use are read back; a worker that requires the GPU stops with exit 16 if onnxruntime fell
   back to CPU (F15);
3. only the detection and recognition models of ``buffalo_l`` get a session (the landmark and
   gender/age models are never loaded);
4. a warm-up swap on a generated picture runs every session at the shapes jobs use, the
   job's own paste-back and every encoder, so the first job costs what the hundredth does.

A job (`FaceSwap.run`) goes fetch → decode → detect → swap → encode (→ upload), timing each
stage into the result's ``ms``. Problems with the job's input are `JobError`s with SPEC §10's
codes; CUDA out-of-memory and CUDA errors are classified by the handler (one place,
`worker.device.classify_runtime_error`) so RunPod replaces the worker.
"""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import tempfile
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bootstrap.errors import GpuError
from worker import device
from worker import fetch as wfetch
from worker import io as wio
from worker import output as wout
from worker.errors import JobError
from worker.pipelines.base import LoadContext, Stages

# The smoke test imports this module: a broken onnxruntime/opencv install fails the env build.
_PROBLEMS = device.distribution_problems()
if _PROBLEMS:
    raise ImportError("faceswap dependencies are broken: " + "; ".join(_PROBLEMS))

import cv2  # noqa: E402 - after the distribution check, whose message is clearer
import onnxruntime  # noqa: E402
from insightface.app import FaceAnalysis  # noqa: E402
from insightface.app.common import Face  # noqa: E402
from insightface.model_zoo import model_zoo  # noqa: E402
from insightface.utils import face_align  # noqa: E402

NAME = "faceswap"
BUFFALO_DEST = "insightface/models/buffalo_l"
INSWAPPER_DEST = "insightface/models/inswapper_128.onnx"
#: The buffalo_l files the pipeline loads: task → file name.
BUFFALO_NEEDED = {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx"}
DET_SIZE = (640, 640)
DET_THRESH = 0.5


@dataclass(frozen=True)
class ImageRef:
    kind: str  # "url" | "base64"
    value: str
    what: str  # "source" | "target"


@dataclass(frozen=True)
class Request:
    source: ImageRef
    target: ImageRef
    source_index: int
    target_index: int
    output_format: str
    output: wout.Output
    max_side: int | None


def _image_ref(job: dict[str, Any], what: str) -> ImageRef:
    url, b64 = job.get(f"{what}_url"), job.get(f"{what}_image")
    given = [k for k, v in ((f"{what}_url", url), (f"{what}_image", b64)) if v is not None]
    if len(given) != 1:
        raise JobError(
            "INVALID_INPUT",
            f"give exactly one of {what}_url and {what}_image"
            + (" (both were given)" if len(given) == 2 else " (neither was given)"),
        )
    key = given[0]
    value = job[key]
    if not isinstance(value, str) or not value.strip():
        raise JobError("INVALID_INPUT", f"{key} must be a non-empty string")
    return ImageRef("url" if key.endswith("_url") else "base64", value.strip(), what)


def _int(job: dict[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    value = job.get(key, default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise JobError("INVALID_INPUT", f"{key} must be an integer")
    if value < minimum:
        raise JobError("INVALID_INPUT", f"{key} must be at least {minimum}")
    if value > 1_000_000:
        raise JobError("INVALID_INPUT", f"{key} is too large")
    return value


def parse_input(job: Any, allowed_buckets: Collection[str] = frozenset()) -> Request:
    """Validate a job's input; every problem is INVALID_INPUT naming the field.

    ``allowed_buckets``: the buckets ``s3.bucket`` may name (`worker.output.Uploader.allowed_buckets`).
    """
    if not isinstance(job, dict):
        raise JobError("INVALID_INPUT", "the job's input must be a JSON object")
    source = _image_ref(job, "source")
    target = _image_ref(job, "target")
    source_index = _int(job, "source_index", 1, 1)
    target_index = _int(job, "target_index", 0, 0)
    max_side = _int(job, "max_side", None, 16)
    fmt = job.get("output_format", "png")
    if not isinstance(fmt, str) or fmt.strip().lower() not in wio.OUTPUT_FORMATS:
        raise JobError("INVALID_INPUT", "output_format must be one of png, jpeg, webp")
    output = wout.parse_output(job, allowed_buckets)
    assert source_index is not None and target_index is not None
    return Request(
        source=source,
        target=target,
        source_index=source_index,
        target_index=target_index,
        output_format="jpeg" if fmt.strip().lower() == "jpg" else fmt.strip().lower(),
        output=output,
        max_side=max_side,
    )


def _check_index(faces: list[Face], index: int, what: str) -> None:
    """The one face-index check, for source and target alike: no face is NO_FACE_IN_<WHAT>; an
    index (from 1, left to right; 0 for every face) past the last face is FACE_INDEX_OUT_OF_RANGE."""
    if not faces:
        raise JobError(f"NO_FACE_IN_{what.upper()}", f"no face found in the {what} image")
    if index > len(faces):
        raise JobError(
            "FACE_INDEX_OUT_OF_RANGE",
            f"{what}_index is {index} but the {what} image has {len(faces)} face(s)",
        )


def _largest(faces: list[Face], limit: int) -> list[Face]:
    """At most ``limit`` faces, the largest boxes first chosen, kept in left-to-right order:
    what ``target_index`` 0 swaps, so one job's swap loop is bounded (WORKER_MAX_FACES)."""
    if len(faces) <= limit:
        return list(faces)

    def area(face: Face) -> float:
        x0, y0, x1, y1 = (float(v) for v in face.bbox[:4])
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)

    keep = set(sorted(range(len(faces)), key=lambda i: (-area(faces[i]), i))[:limit])
    return [face for i, face in enumerate(faces) if i in keep]


def _check_files(ctx: LoadContext) -> tuple[Path, Path]:
    """The buffalo_l directory and the swapper path from the plan, every needed file present."""
    buffalo = Path(ctx.model_path(BUFFALO_DEST))
    swapper = Path(ctx.model_path(INSWAPPER_DEST))
    if not buffalo.is_dir():
        raise FileNotFoundError(
            f"expected the unpacked buffalo_l directory at {buffalo}, found nothing there"
        )
    found = sorted(p.name for p in buffalo.iterdir())
    missing = [f for f in BUFFALO_NEEDED.values() if not (buffalo / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"buffalo_l at {buffalo} lacks {', '.join(missing)} (found: {', '.join(found) or 'nothing'})"
        )
    if not swapper.is_file():
        raise FileNotFoundError(f"expected inswapper_128.onnx at {swapper}, found nothing there")
    return buffalo, swapper


def _warmup_image() -> np.ndarray:
    """A 1280×1024 picture with one bright 'face' on a dark, slightly noisy background: as large
    as a typical job's, so its detector letterbox, paste-back and codec buffers are mapped."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 40, size=(1024, 1280, 3), dtype=np.uint8)
    img[384:640, 512:768] = (90, 170, 230)
    return img


def _template_face(img: np.ndarray) -> Face:
    """A face in the middle of ``img`` with ArcFace's 5-point layout: warms recognition and the
    swapper whatever the detector finds in a generated picture."""
    h, w = img.shape[:2]
    side = min(h, w) / 2
    x0, y0 = (w - side) / 2, (h - side) / 2
    tpl = np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
        dtype=np.float32,
    )
    kps = tpl / 112.0 * side + np.array([x0, y0], dtype=np.float32)
    return Face(bbox=np.array([x0, y0, x0 + side, y0 + side], dtype=np.float32), kps=kps, det_score=1.0)


class FaceSwap:
    """The loaded pipeline: FaceAnalysis (detection + recognition) and the INSwapper."""

    name = NAME

    def __init__(self, ctx: LoadContext) -> None:
        settings = ctx.settings
        self.settings = settings
        self.policy = wfetch.FetchPolicy(
            max_bytes=settings.worker_max_input_bytes,
            allow_private=settings.worker_allow_private_urls,
            timeout_s=float(ctx.extra.get("fetch_timeout_s", wfetch.FETCH_TIMEOUT_S)),
        )
        self.uploader = wout.Uploader.from_settings(settings)
        buffalo, swapper_path = _check_files(ctx)
        available = list(onnxruntime.get_available_providers())
        self.requested = device.requested_providers(available)
        # FaceAnalysis loads every *.onnx of a directory; hand it a private view holding only the
        # files it needs, so the landmark and gender/age models never get a session.
        view = Path(tempfile.mkdtemp(prefix="faceswap-buffalo_l-"))
        weakref.finalize(self, shutil.rmtree, view, ignore_errors=True)
        for name in BUFFALO_NEEDED.values():
            (view / name).symlink_to(buffalo / name)
        # INSwapper prints its input shape; keep stdout for the timeline's JSON lines.
        with contextlib.redirect_stdout(io.StringIO()):
            self.app = FaceAnalysis(
                name=str(view),
                allowed_modules=list(BUFFALO_NEEDED),
                providers=self.requested,
            )
            self.app.prepare(ctx_id=0, det_thresh=DET_THRESH, det_size=DET_SIZE)
            self.swapper = model_zoo.get_model(str(swapper_path), providers=self.requested)
        if type(self.swapper).__name__ != "INSwapper":
            raise RuntimeError(
                f"{swapper_path} is not an inswapper model (InsightFace routed it as {type(self.swapper).__name__})"
            )
        missing_tasks = set(BUFFALO_NEEDED) - set(self.app.models)
        if missing_tasks:
            raise RuntimeError(
                f"buffalo_l at {buffalo}: no {', '.join(sorted(missing_tasks))} model was recognized"
            )
        self.detector = self.app.det_model
        self.recognizer = self.app.models["recognition"]
        self._device = self._check_device(available)
        if ctx.extra.get("warm_up", True):  # off only for the benchmark's cold baseline
            self.warm_up()

    # -- device ------------------------------------------------------------------------------

    def _sessions(self) -> list[Any]:
        return [self.detector.session, self.recognizer.session, self.swapper.session]

    def _check_device(self, available: list[str]) -> dict[str, Any]:
        actual: list[str] = []
        for session in self._sessions():
            for p in session.get_providers():
                if p not in actual:
                    actual.append(p)
        on_gpu = all(device.CUDA in s.get_providers() for s in self._sessions())
        if not on_gpu and device.CUDA in actual:
            actual.remove(device.CUDA)  # a model that is not on the GPU makes the worker a CPU worker
        info = device.describe(self.requested, actual, available)
        if self.settings.require_gpu and not on_gpu:
            why = info.get("fallback") or (
                f"this onnxruntime offers no CUDA provider (available: {', '.join(available)})"
            )
            raise GpuError(
                f"BOOTSTRAP_REQUIRE_GPU=1 but the face-swap models run on {', '.join(actual) or 'nothing'}: {why}",
                hint="pick a GPU whose driver supports the wheels' CUDA version (`bootstrap diagnose`, gpu section), "
                "or set BOOTSTRAP_REQUIRE_GPU=0 to allow CPU",
            )
        return info

    def device(self) -> dict[str, Any]:
        return dict(self._device)

    # -- warm-up -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """A whole job on a generated, job-sized picture, in every format, twice over.

        Internal logic: sessions are first run at the shapes jobs use (the detector's fixed-size
        session is even built then), and the codecs, the paste-back and the allocator see
        buffers of a real job's size, so a job reuses memory already mapped instead of paying
        first-touch costs (measured: without this the first job took 2-3x the next ones).
        """
        img = _warmup_image()
        face = _template_face(img)
        for fmt in ("jpeg", "png", "webp"):
            data = wio.encode_image(img, None, fmt)
            decoded = wio.decode_image(
                data, max_pixels=img.shape[0] * img.shape[1], max_side=None, what="warm-up"
            )
            self._detect(decoded.bgr)
            self.recognizer.get(decoded.bgr, face)
            out = decoded.bgr.copy()
            self._swap_into(out, face, face)
            base64.b64encode(wio.encode_image(out, None, fmt))

    # -- a job -------------------------------------------------------------------------------

    def _detect(self, img: np.ndarray) -> list[Face]:
        """Faces left to right (then top to bottom), without embeddings."""
        h, w = img.shape[:2]
        # SCRFD letterboxes into DET_SIZE; a picture so thin that one side would shrink to 0 px
        # (3000×2) makes OpenCV's resize fail, and can hold no face anyway.
        det_w, det_h = DET_SIZE
        ratio = h / w
        short_side = int(det_h / ratio) if ratio > det_h / det_w else int(det_w * ratio)
        if short_side < 1:
            return []
        bboxes, kpss = self.detector.detect(img, max_num=0, metric="default")
        faces = []
        for i in range(bboxes.shape[0]):
            kps = kpss[i] if kpss is not None else None
            faces.append(Face(bbox=bboxes[i, 0:4], kps=kps, det_score=float(bboxes[i, 4])))
        faces.sort(key=lambda f: (float(f.bbox[0]), float(f.bbox[1])))
        return faces

    def _swap_into(self, img: np.ndarray, face: Face, source: Face) -> None:
        """Swap one face in place, pasting back within the face's own region only.

        INSwapper's paste-back warps and blurs masks the size of the whole picture, three times
        per face; on the region its 128×128 crop maps to (plus the blur's reach) the result is
        the same, and a 12-megapixel photo no longer costs a 12-megapixel warp per face.
        """
        size = self.swapper.input_size[0]
        m = face_align.estimate_norm(np.asarray(face.kps, dtype=np.float64), size)
        if not np.isfinite(m).all() or abs(np.linalg.det(m[:, :2])) < 1e-12:
            return  # degenerate key points: no alignment, nothing to swap
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
        inverse = cv2.invertAffineTransform(m)
        footprint = corners @ inverse.T
        h, w = img.shape[:2]
        margin = 8
        x0 = max(0, int(np.floor(footprint[:, 0].min())) - margin)
        y0 = max(0, int(np.floor(footprint[:, 1].min())) - margin)
        x1 = min(w, int(np.ceil(footprint[:, 0].max())) + margin)
        y1 = min(h, int(np.ceil(footprint[:, 1].max())) + margin)
        if x1 - x0 < 2 or y1 - y0 < 2:  # the face's crop lies outside the picture
            return
        # INSwapper's paste-back needs some of its warped mask (values > 20) inside the picture,
        # else it fails on an empty array: a face at the very edge, or a few pixels in size.
        local_inverse = inverse - np.array([[0, 0, x0], [0, 0, y0]], dtype=np.float64)
        probe = cv2.warpAffine(
            np.full((size, size), 255, dtype=np.float32), local_inverse, (x1 - x0, y1 - y0), borderValue=0.0
        )
        if not (probe > 20).any():
            return
        shift = np.array([x0, y0], dtype=np.float32)
        local = Face(
            bbox=np.asarray(face.bbox) - np.concatenate([shift, shift]),
            kps=np.asarray(face.kps) - shift,
            det_score=face.det_score,
        )
        region = np.ascontiguousarray(img[y0:y1, x0:x1])
        img[y0:y1, x0:x1] = self.swapper.get(region, local, source, paste_back=True)

    # -- reused per frame by the video pipeline (worker.pipelines.video) -----------------------

    def detect(self, img: np.ndarray) -> list[Face]:
        """Faces of a BGR picture, left to right, without embeddings."""
        return self._detect(img)

    def embed(self, img: np.ndarray, face: Face) -> np.ndarray:
        """The face's normalised identity embedding (also stored on ``face``)."""
        self.recognizer.get(img, face)
        return np.asarray(face.normed_embedding)

    def swap(self, img: np.ndarray, face: Face, source: Face) -> None:
        """Swap ``source`` into ``face`` of ``img``, in place."""
        self._swap_into(img, face, source)

    def fetch(self, ref: ImageRef) -> bytes:
        """An input picture's bytes (URL within the fetch policy, or base64)."""
        return self._bytes(ref)

    def _bytes(self, ref: ImageRef) -> bytes:
        if ref.kind == "url":
            return wfetch.fetch_url(ref.value, self.policy)
        return wfetch.decode_base64(ref.value, self.settings.worker_max_input_bytes, f"{ref.what}_image")

    def run(self, job_input: dict[str, Any]) -> dict[str, Any]:
        """Swap the source face onto the target's face(s); see the module docstring."""
        req = parse_input(job_input, self.uploader.allowed_buckets)
        if req.output.kind == "s3":
            self.uploader.check(req.output)  # missing credentials fail before any download or model run
        t = Stages()
        with t.stage("fetch"):
            src_bytes = self._bytes(req.source)
            dst_bytes = self._bytes(req.target)
        with t.stage("decode"):
            pixels, side = self.settings.worker_max_pixels, req.max_side
            src = wio.decode_image(src_bytes, max_pixels=pixels, max_side=side, what="the source image")
            del src_bytes
            dst = wio.decode_image(dst_bytes, max_pixels=pixels, max_side=side, what="the target image")
            del dst_bytes
        with t.stage("detect"):
            src_faces = self._detect(src.bgr)
            _check_index(src_faces, req.source_index, "source")
            source_face = src_faces[req.source_index - 1]
            self.recognizer.get(src.bgr, source_face)
            dst_faces = self._detect(dst.bgr)
            _check_index(dst_faces, req.target_index, "target")
        chosen = (
            _largest(dst_faces, self.settings.worker_max_faces)
            if req.target_index == 0
            else [dst_faces[req.target_index - 1]]
        )
        with t.stage("swap"):
            result = dst.bgr.copy()
            for face in chosen:
                self._swap_into(result, face, source_face)
        with t.stage("encode"):
            data = wio.encode_image(result, dst.alpha, req.output_format)
        out: dict[str, Any] = {"success": True}
        if req.output.kind == "s3":
            fmt = wio.OUTPUT_FORMATS[req.output_format]
            with t.stage("upload"):
                out.update(
                    self.uploader.upload(
                        data,
                        ext=wout.EXTENSIONS[fmt],
                        content_type=wout.CONTENT_TYPES[fmt],
                        target=req.output,
                        prefix=NAME,
                    )
                )
        else:
            with t.stage("encode"):
                out["image_base64"] = base64.b64encode(data).decode("ascii")
        out["faces"] = {"source": len(src_faces), "target": len(dst_faces)}
        out["swapped"] = len(chosen)
        out["ms"] = t.ms
        return out


def load(ctx: LoadContext) -> FaceSwap:
    """Warm-load the face-swap pipeline from the plan's model paths (see the module docstring)."""
    return FaceSwap(ctx)


__all__ = ["NAME", "FaceSwap", "ImageRef", "load", "parse_input"]
