"""Animate warm-load proof: warm-load time, the first job against the next ones, time per stage.

Loads ``animate`` the way the worker does (``animate.load`` with the plan's model paths, the
warm-up run included), then sends identical jobs whose picture and driving video come from a
loopback HTTP server, so fetch, preprocess (decode, pose, face crops), generate, encode all run
(``output: base64``: no S3 upload here; the upload stage is timed by the S3 tests' server only).
Prints, from one run on this machine:

- warm-load time (pipeline + pose models + warm-up) and the same load without the warm-up
  (the baseline: what a worker that loads lazily pays before its first job, FAILURES F10);
- the first job's latency, the median of the next ones, their ratio (target ≤ 1.2×);
- per stage: the first job's ms and the median of the next ones, and each stage's share.

With the tiny fixture pipeline (default) generation says nothing about real inference; the
split shows what our own preprocessing and encoding cost around it. ``--models DIR`` takes a
directory laid out by the manifest's dest names (``animate/Wan2.2-Animate-14B-Diffusers``,
``animate/Wan2.2-Animate-14B-preprocess``), e.g. ``<volume>/.bootstrap/models`` after
``bootstrap prepare``, for real figures on a GPU.

    python -m uv run python benchmarks/bench_animate.py [--jobs 5] [--seconds 2] [--size 64x96] [--steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bootstrap.settings import Settings  # noqa: E402
from tests import fixture_wan  # noqa: E402
from tests.fixture_models import ImageServer, encode, picture  # noqa: E402

STAGES = ("fetch", "preprocess", "generate", "encode")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5, help="jobs after the first")
    ap.add_argument("--models", type=Path, default=None, help="a models directory laid out by dest")
    ap.add_argument("--seconds", type=float, default=2.0, help="driving video length")
    ap.add_argument("--size", default="64x96", help="output HEIGHTxWIDTH (multiples of 16)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--segment", type=int, default=17, help="segment_frame_length")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    height, width = (int(v) for v in args.size.lower().split("x"))

    from worker.pipelines import animate
    from worker.pipelines.base import LoadContext

    with tempfile.TemporaryDirectory() as tmp:
        if args.models is None:
            t0 = time.perf_counter()
            models = fixture_wan.build_models(Path(tmp) / "models")
            print(f"built the tiny pipeline in {time.perf_counter() - t0:.1f} s")
            label = "tiny fixture pipeline"
        else:
            models = {d: str(args.models / d) for d in (animate.PIPELINE_DEST, animate.PREPROCESS_DEST)}
            label = f"models from {args.models}"
        settings = Settings.from_env({"HF_HUB_OFFLINE": "1", "WORKER_ALLOW_PRIVATE_URLS": "1"})
        clip = fixture_wan.driving_video(Path(tmp) / "drive.mp4", seconds=args.seconds, size=(320, 240))
        server = ImageServer()
        image_url = server.add("/char.png", encode(picture(256, 256, [(90, 60, 80)])))
        video_url = server.add("/drive.mp4", clip.read_bytes(), headers={"Content-Type": "video/mp4"})
        job: dict[str, Any] = {
            "task": "animate",
            "image_url": image_url,
            "video_url": video_url,
            "steps": args.steps,
            "height": height,
            "width": width,
            "segment_frame_length": args.segment,
            "seed": 1,
            "output": "base64",
        }

        t0 = time.perf_counter()
        cold = animate.load(LoadContext(settings=settings, models=models, extra={"warm_up": False}))
        cold_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        cold.run(job)
        cold_first = time.perf_counter() - t0
        del cold

        t0 = time.perf_counter()
        pipe = animate.load(LoadContext(settings=settings, models=models))
        load_s = time.perf_counter() - t0
        walls: list[float] = []
        stages: list[dict[str, float]] = []
        out: dict[str, Any] = {}
        for _ in range(args.jobs + 1):
            t0 = time.perf_counter()
            out = pipe.run(job)
            walls.append(time.perf_counter() - t0)
            stages.append(out["ms"])
        server.close()

    first, rest = walls[0], statistics.median(walls[1:])
    print(
        f"\nanimate, {label}, CPU torch {pipe.dev.torch_version} ({pipe.dev.device}, {pipe.dev.dtype_name})"
    )
    print(
        f"job: {out['frames']} frames {width}x{height} at {out['fps']:g} fps, {out['segments']} segment(s), "
        f"{args.steps} steps, {args.seconds:g} s driving video"
    )
    print(f"warm-load (pipeline + pose models + warm-up): {load_s:.2f} s")
    print(f"baseline, load without warm-up: {cold_load:.2f} s, then its first job {cold_first:.2f} s")
    print(
        f"first job {first:.2f} s, median of next {args.jobs}: {rest:.2f} s -> first/next = {first / rest:.2f}x"
    )
    print(f"baseline first job / warm next = {cold_first / rest:.2f}x")
    print("\nstage        first ms   median next ms   share of next")
    med = {s: statistics.median(st.get(s, 0.0) for st in stages[1:]) for s in STAGES}
    total = sum(med.values()) or 1.0
    for s in STAGES:
        print(f"{s:<12} {stages[0].get(s, 0.0):>8.1f}   {med[s]:>14.1f}   {100 * med[s] / total:>12.1f}%")
    print("upload       (not measured: output base64)")


if __name__ == "__main__":
    main()
