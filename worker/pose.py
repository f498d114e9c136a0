"""Pose preprocessing for ``animate``: a person detector and a whole-body pose model (ONNX).

The models are the ones Wan2.2's own preprocessing (``wan/modules/animate/preprocess``) runs,
from the ``process_checkpoint`` folder of ``Wan-AI/Wan2.2-Animate-14B``:

- YOLOv10m person detector: ``images`` [1,3,640,640] (RGB / 255, letterboxed with grey 114)
  → [1,300,6] rows of x1, y1, x2, y2, score, class (COCO: 0 is a person), in letterbox pixels;
- ViTPose-H whole-body: [1,3,256,192] (RGB, ImageNet mean/std, the person's box widened by
  1.25 at 3:4) → [1,133,64,48] heatmaps of the COCO-WholeBody key points: 0-16 body, 17-22 feet,
  23-90 face (68), 91-111 left hand, 112-132 right hand.

What is built from them, per frame (documented equivalents of Wan2.2's own steps):

- the pose frame: limbs, hands and face points drawn on black, as Wan's ``draw_aapose`` does
  (without its retargeting to the character's proportions);
- the face box: the face key points' box made square and enlarged 1.5×, as Wan's
  ``get_face_bboxes`` does — used when no face detector is at hand (the face-swap detector is
  preferred, see `worker.pipelines.animate`);
- for ``replace``: the person mask. Wan2.2 prompts SAM2 with the key points; here the mask is
  the detector's person box grown by 10% (plus the key points' hull), a documented equivalent.

onnxruntime sessions take CUDA first when offered, CPU otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime

from worker import device

DET_SIZE = 640
POSE_H, POSE_W = 256, 192
HEAT_H, HEAT_W = 64, 48
NUM_KEYPOINTS = 133
PERSON_CLASS = 0
DET_THRESH = 0.3
KP_THRESH = 0.3
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# COCO body limbs (0-based key point indices) and one colour per limb, as OpenPose draws them.
BODY_LIMBS = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip
FOOT_LIMBS = ((15, 17), (15, 18), (15, 19), (16, 20), (16, 21), (16, 22))
# a hand's 21 points: wrist, then 4 per finger
HAND_LIMBS = tuple((0, 4 * f + 1) for f in range(5)) + tuple(
    (4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(1, 4)
)
FACE = range(23, 91)
LEFT_HAND, RIGHT_HAND = 91, 112


def _colour(i: int, n: int) -> tuple[int, int, int]:
    hsv = np.array([[[int(180 * i / max(n, 1)), 255, 255]]], dtype=np.uint8)
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


@dataclass(frozen=True)
class Person:
    """One person in a frame: box (x0, y0, x1, y1), detector score, key points (133, 3)."""

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray


class PoseModels:
    """The person detector and the pose model, loaded once."""

    def __init__(self, detector: Path, pose: Path) -> None:
        for path in (detector, pose):
            if not path.is_file():
                found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
                raise FileNotFoundError(
                    f"expected {path.name} at {path}, found {', '.join(found) or 'nothing'} there"
                )
        available = list(onnxruntime.get_available_providers())
        self.requested = device.requested_providers(available)
        self.detector = onnxruntime.InferenceSession(str(detector), providers=self.requested)
        self.pose = onnxruntime.InferenceSession(str(pose), providers=self.requested)
        self._check_shapes()
        self.available = available

    def _check_shapes(self) -> None:
        det_in = self.detector.get_inputs()[0].shape
        pose_in = self.pose.get_inputs()[0].shape
        pose_out = self.pose.get_outputs()[0].shape
        if list(det_in[1:]) != [3, DET_SIZE, DET_SIZE]:
            raise RuntimeError(f"the person detector takes {det_in}, not [1, 3, 640, 640] (YOLOv10)")
        if list(pose_in[1:]) != [3, POSE_H, POSE_W] or list(pose_out[1:]) != [NUM_KEYPOINTS, HEAT_H, HEAT_W]:
            raise RuntimeError(
                f"the pose model maps {pose_in} → {pose_out}, not [1,3,256,192] → [1,133,64,48] (ViTPose whole-body)"
            )

    def providers(self) -> list[str]:
        actual: list[str] = []
        for s in (self.detector, self.pose):
            for p in s.get_providers():
                if p not in actual:
                    actual.append(p)
        return actual

    # -- detection ---------------------------------------------------------------------------

    def detect(self, rgb: np.ndarray) -> tuple[tuple[float, float, float, float], float] | None:
        """The most confident person's box in ``rgb`` (H, W, 3 uint8), or None."""
        h, w = rgb.shape[:2]
        scale = DET_SIZE / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        canvas = np.full((DET_SIZE, DET_SIZE, 3), 114, dtype=np.uint8)
        top, left = (DET_SIZE - nh) // 2, (DET_SIZE - nw) // 2
        canvas[top : top + nh, left : left + nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        blob = canvas.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
        name = self.detector.get_inputs()[0].name
        rows = np.asarray(self.detector.run(None, {name: blob})[0]).reshape(-1, 6)
        rows = rows[(rows[:, 5].round() == PERSON_CLASS) & (rows[:, 4] >= DET_THRESH)]
        if rows.shape[0] == 0:
            return None
        best = rows[int(np.argmax(rows[:, 4]))]
        x0 = float(np.clip((best[0] - left) / scale, 0, w))
        y0 = float(np.clip((best[1] - top) / scale, 0, h))
        x1 = float(np.clip((best[2] - left) / scale, 0, w))
        y1 = float(np.clip((best[3] - top) / scale, 0, h))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        return (x0, y0, x1, y1), float(best[4])

    # -- key points --------------------------------------------------------------------------

    def keypoints(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """133 × (x, y, confidence) in frame pixels for the person in ``box``."""
        x0, y0, x1, y1 = box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        bw, bh = (x1 - x0) * 1.25, (y1 - y0) * 1.25
        aspect = POSE_W / POSE_H
        if bw / bh > aspect:
            bh = bw / aspect
        else:
            bw = bh * aspect
        # frame → model input: scale to 192×256 around the box centre
        sx, sy = POSE_W / bw, POSE_H / bh
        m = np.array([[sx, 0, POSE_W / 2 - sx * cx], [0, sy, POSE_H / 2 - sy * cy]], dtype=np.float32)
        crop = cv2.warpAffine(rgb, m, (POSE_W, POSE_H), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
        blob = ((crop.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
        name = self.pose.get_inputs()[0].name
        heat = np.asarray(self.pose.run(None, {name: blob.astype(np.float32)})[0])[0]
        flat = heat.reshape(NUM_KEYPOINTS, -1)
        idx = flat.argmax(axis=1)
        conf = flat[np.arange(NUM_KEYPOINTS), idx]
        hy, hx = np.divmod(idx, HEAT_W)
        # heatmap cell centre → model input pixels → frame pixels
        px = (hx.astype(np.float32) + 0.5) * (POSE_W / HEAT_W)
        py = (hy.astype(np.float32) + 0.5) * (POSE_H / HEAT_H)
        fx = (px - m[0, 2]) / sx
        fy = (py - m[1, 2]) / sy
        return np.stack([fx, fy, conf.astype(np.float32)], axis=1)

    def person(self, rgb: np.ndarray) -> Person | None:
        found = self.detect(rgb)
        if found is None:
            return None
        box, score = found
        return Person(box=box, score=score, keypoints=self.keypoints(rgb, box))


# -- what the pipeline is fed ------------------------------------------------------------------


def draw_pose(person: Person | None, height: int, width: int) -> np.ndarray:
    """The pose frame: body, feet and hands as coloured limbs, face points as white dots."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if person is None:
        return canvas
    kp = person.keypoints
    thick = max(1, round(min(height, width) / 120))

    def ok(i: int) -> bool:
        x, y, c = kp[i]
        return bool(c >= KP_THRESH and np.isfinite(x) and np.isfinite(y))

    def pt(i: int) -> tuple[int, int]:
        return round(float(kp[i, 0])), round(float(kp[i, 1]))

    for n, (a, b) in enumerate(BODY_LIMBS + FOOT_LIMBS):
        if ok(a) and ok(b):
            cv2.line(canvas, pt(a), pt(b), _colour(n, len(BODY_LIMBS) + len(FOOT_LIMBS)), thick, cv2.LINE_AA)
    for base in (LEFT_HAND, RIGHT_HAND):
        for n, (a, b) in enumerate(HAND_LIMBS):
            if ok(base + a) and ok(base + b):
                cv2.line(canvas, pt(base + a), pt(base + b), _colour(n, len(HAND_LIMBS)), max(1, thick // 2))
    for i in FACE:
        if ok(i):
            cv2.circle(canvas, pt(i), max(1, thick // 2), (255, 255, 255), -1)
    for i in range(17):
        if ok(i):
            cv2.circle(canvas, pt(i), thick + 1, _colour(i, 17), -1)
    return canvas


def face_box_from_keypoints(
    person: Person | None, height: int, width: int
) -> tuple[int, int, int, int] | None:
    """A square box around the face key points, enlarged 1.5× (Wan's ``get_face_bboxes``)."""
    if person is None:
        return None
    face = person.keypoints[list(FACE)]
    face = face[face[:, 2] >= KP_THRESH]
    if face.shape[0] < 5:
        return None
    return square_box(
        (float(face[:, 0].min()), float(face[:, 1].min()), float(face[:, 0].max()), float(face[:, 1].max())),
        height,
        width,
        grow=1.5,
    )


def square_box(
    box: tuple[float, float, float, float], height: int, width: int, *, grow: float
) -> tuple[int, int, int, int] | None:
    """``box`` made square around its centre, scaled by ``grow``, clipped to the frame."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * grow
    if not np.isfinite(side) or side < 2:
        return None
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bx0, by0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    bx1, by1 = int(min(width, cx + side / 2)), int(min(height, cy + side / 2))
    if bx1 - bx0 < 2 or by1 - by0 < 2:
        return None
    return bx0, by0, bx1, by1


def crop(rgb: np.ndarray, box: tuple[int, int, int, int] | None, size: int) -> np.ndarray:
    """``box`` of ``rgb`` resized to ``size``², or a black frame when there is no box."""
    if box is None:
        return np.zeros((size, size, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    return cv2.resize(np.ascontiguousarray(rgb[y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_AREA)


def person_mask(person: Person | None, height: int, width: int) -> np.ndarray:
    """255 where the person is (box grown 10%, plus the key points' hull), else 0."""
    mask = np.zeros((height, width), dtype=np.uint8)
    if person is None:
        return mask
    x0, y0, x1, y1 = person.box
    gx, gy = (x1 - x0) * 0.05, (y1 - y0) * 0.05
    cv2.rectangle(
        mask,
        (int(max(0, x0 - gx)), int(max(0, y0 - gy))),
        (int(min(width - 1, x1 + gx)), int(min(height - 1, y1 + gy))),
        255,
        -1,
    )
    pts = person.keypoints[person.keypoints[:, 2] >= KP_THRESH][:, :2]
    pts = pts[np.isfinite(pts).all(axis=1)]
    if pts.shape[0] >= 3:
        hull = cv2.convexHull(np.round(pts).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 255)
    return mask


def describe(models: PoseModels) -> dict[str, Any]:
    return device.describe(models.requested, models.providers(), models.available)
