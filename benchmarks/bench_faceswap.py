"""Face-swap warm-load proof: the first job against the median of the next 20, and time per stage.

Loads the pipeline the way the worker does (``faceswap.load`` with the plan's model paths, the
warm-up swap included), then sends 21 identical jobs whose images come from a loopback HTTP
server, so fetch, decode, detect, swap and encode all run. Prints, from one run on this machine:

- load time (sessions + warm-up), first-job latency, median of the next 20, their ratio
  (target ≤ 1.2×), per round and the median over rounds (each round loads afresh, as a new
  worker would; one first job is one sample, so a busy machine needs several rounds);
- the baseline this project replaces, measured in the same run: a job that loads the models
  itself (FAILURES F10), as a ratio to the warm median;
- per stage: the first job's ms and the median of the next 20.

With the fixture models (default) the model stages say little about real inference; fetch,
decode and encode are what our own code costs. ``--models DIR`` takes a directory laid out by
the manifest's dest names (``insightface/models/buffalo_l/…``, ``insightface/models/inswapper_128.onnx``),
e.g. ``<volume>/.bootstrap/models`` after ``bootstrap prepare``, for real figures.

    python -m uv run python benchmarks/bench_faceswap.py [--jobs 20] [--rounds 5] [--models DIR] [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bootstrap.settings import Settings  # noqa: E402
from tests.fixture_models import BUFFALO_DEST, INSWAPPER_DEST, ImageServer, encode, picture, write_models_dir  # noqa: E402

STAGES = ("fetch", "decode", "detect", "swap", "encode")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20, help="jobs after the first")
    ap.add_argument("--models", type=Path, default=None, help="a models directory laid out by dest")
    ap.add_argument("--size", type=int, default=1024, help="target picture width (height 3/4 of it)")
    ap.add_argument(
        "--rounds", type=int, default=5, help="fresh loads, each with its first job and the next ones"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.models is None:
            models = write_models_dir(Path(tmp) / "models")
            label = "fixture models"
        else:
            models = {d: str(args.models / d) for d in (BUFFALO_DEST, INSWAPPER_DEST)}
            label = f"models from {args.models}"
        server = ImageServer()
        w, h = args.size, args.size * 3 // 4
        side = w // 6
        faces = [
            (w // 8, h // 3, side),
            (w // 2 - side // 2, h // 3, side),
            (w - w // 8 - side, h // 3, side),
        ]
        job: dict[str, Any] = {
            "source_url": server.add("/source.png", encode(picture(512, 512, [(156, 156, 200)]))),
            "target_url": server.add("/target.jpg", encode(picture(w, h, faces), "JPEG", quality=92)),
            "output_format": "jpeg",
        }
        settings = Settings.from_env({"WORKER_ALLOW_PRIVATE_URLS": "1"})

        t0 = time.perf_counter()
        from worker.pipelines import faceswap
        from worker.pipelines.base import LoadContext

        import_s = time.perf_counter() - t0
        ctx = LoadContext(settings=settings, models=models)
        loads, firsts, medians, baselines = [], [], [], []
        first_stages: list[dict[str, float]] = []
        rest_stages: list[dict[str, float]] = []
        for _ in range(args.rounds):  # each round: a fresh warm-loaded pipeline, as a new worker
            t0 = time.perf_counter()
            pipe = faceswap.load(ctx)
            loads.append((time.perf_counter() - t0) * 1000)

            def timed_job(p: Any) -> tuple[float, dict[str, float]]:
                t = time.perf_counter()
                out = p.run(job)
                assert out["success"] is True and out["swapped"] == 3, out
                return (time.perf_counter() - t) * 1000, out["ms"]

            ms, stages = timed_job(pipe)
            firsts.append(ms)
            first_stages.append(stages)
            rest = [timed_job(pipe) for _ in range(args.jobs)]
            medians.append(statistics.median(m for m, _ in rest))
            rest_stages += [s for _, s in rest]
            # The baseline: models loaded inside the job (no warm-up), as the workers this
            # project replaces did.
            t0 = time.perf_counter()
            cold = faceswap.load(LoadContext(settings=settings, models=models, extra={"warm_up": False}))
            timed_job(cold)
            baselines.append((time.perf_counter() - t0) * 1000)
            del cold
        server.close()

    ratios = [f / m for f, m in zip(firsts, medians, strict=True)]
    warm = statistics.median(medians)
    print(
        f"machine: {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), python {sys.version.split()[0]}, {label}, target {w}×{h}, 3 faces"
    )
    print(f"device: {pipe.device()['providers']}; {args.rounds} rounds of a fresh load, 1 + {args.jobs} jobs")
    print(f"import pipeline module:            {import_s * 1000:8.1f} ms")
    print(f"load (sessions + warm-up swap):    {statistics.median(loads):8.1f} ms (median)")
    print(f"first job:                         {statistics.median(firsts):8.1f} ms (median)")
    print(f"median of the next {args.jobs:2d} jobs:       {warm:8.1f} ms")
    print(f"first / median, per round:         {' '.join(f'{r:.2f}' for r in ratios)}")
    print(f"first / median, median of rounds:  {statistics.median(ratios):8.2f} x   (target <= 1.2x)")
    print(
        f"baseline, load inside the job:     {statistics.median(baselines):8.1f} ms = {statistics.median(baselines) / warm:.1f}x the warm median"
    )
    print("stage      first job   median of next (ms)")
    for stage in STAGES:
        first = statistics.median(s.get(stage, 0.0) for s in first_stages)
        med = statistics.median(s.get(stage, 0.0) for s in rest_stages)
        print(f"{stage:<9} {first:9.1f}   {med:9.1f}")


if __name__ == "__main__":
    main()
