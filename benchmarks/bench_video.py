"""Video face swap: this pipeline (ffmpeg pipes) against the naive recipe, and memory vs length.

In one run, on the same clip and the same loaded models (fixture models by default):

1. **throughput**: frames/s of ``faceswap_video`` (fetch from loopback, decode → swap → encode
   through pipes, audio muxed in the same pass, base64 result) against the recipe the seed
   workers used: extract every frame to PNG with ffmpeg, read/swap/write each PNG, re-encode the
   PNGs with ffmpeg, remux the source's audio (target ≥ 2×). Each side runs ``--repeat`` times;
   the median counts.
2. **memory**: peak RSS (sampled every 20 ms) of a fresh worker process during one job on a
   short and on a long clip of the same 1080p picture (``--short`` / ``--long`` seconds), and
   of its ffmpeg children together (target: flat in the clip's length).

    python -m uv run python benchmarks/bench_video.py [--size 1920x1080] [--seconds 2] [--repeat 3]
        [--short 2] [--long 8] [--models DIR]

``--models DIR``: a directory laid out by the manifest's dest names (e.g.
``<volume>/.bootstrap/models``) for real InsightFace figures; with the fixture models the
detector costs about the same per frame at any size, so the ratio shows what the plumbing costs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402

from bootstrap.plan import Plan  # noqa: E402
from bootstrap.settings import Settings  # noqa: E402
from bootstrap.timeline import Timeline  # noqa: E402
from tests.fixture_models import (  # noqa: E402
    BUFFALO_DEST,
    INSWAPPER_DEST,
    ImageServer,
    b64,
    encode,
    picture,
    write_models_dir,
)
from tests.fixture_video import Clip, Face, make_clip  # noqa: E402
from worker.handler import Worker  # noqa: E402
from worker.lifecycle import Lifecycle  # noqa: E402
from worker.pipelines import faceswap, video  # noqa: E402
from worker.pipelines.base import LoadContext  # noqa: E402

SOURCE = b64(encode(picture(200, 200, [(60, 60, 100)])))


def _clip(path: Path, w: int, h: int, seconds: float) -> Path:
    side = h // 3
    return make_clip(
        path, Clip(w, h, fps=24, seconds=seconds, faces=(Face(w // 4, h // 3, side, dx=w / 10),))
    )


def naive(pipe: faceswap.FaceSwap, clip: Path, work: Path, source_face: Any) -> int:
    """The seed recipe: PNG per frame out, swap, PNG per frame back, encode, remux audio."""
    frames_in, frames_out = work / "in", work / "out"
    frames_in.mkdir()
    frames_out.mkdir()
    run = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y"]
    subprocess.run([*run, "-i", str(clip), "-vsync", "0", str(frames_in / "%06d.png")], check=True)
    names = sorted(frames_in.iterdir())
    for name in names:
        img = cv2.imread(str(name))
        for face in pipe.detect(img):
            pipe.swap(img, face, source_face)
        cv2.imwrite(str(frames_out / name.name), img)
    silent = work / "silent.mp4"
    subprocess.run(
        [*run, "-framerate", "24", "-i", str(frames_out / "%06d.png"), "-c:v", "libx264", "-preset", "veryfast",
         "-crf", "20", "-pix_fmt", "yuv420p", str(silent)],
        check=True,
    )  # fmt: skip
    subprocess.run(
        [*run, "-i", str(silent), "-i", str(clip), "-map", "0:v", "-map", "1:a?", "-c", "copy", str(work / "final.mp4")],
        check=True,
    )  # fmt: skip
    return len(names)


_RSS_SCRIPT = textwrap.dedent(
    """
    import asyncio, io, json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from bootstrap.plan import Plan
    from bootstrap.settings import Settings
    from bootstrap.timeline import Timeline
    from worker.handler import Worker
    from worker.lifecycle import Lifecycle
    from worker.pipelines import video
    from worker.pipelines.base import LoadContext
    models, url, source, tmp = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    s = Settings.from_env({"WORKER_ALLOW_PRIVATE_URLS": "1"})
    w = Worker(plan=Plan(worker_id="b", volume="/x", app_dir="."), timeline=Timeline("b", stream=io.StringIO()), lifecycle=Lifecycle())
    w.pipelines["video"] = video.load(LoadContext(settings=s, models=models, extra={"tmp_dir": tmp}))
    w.capabilities["video"] = {"status": "ok", "reason": None}
    import psutil, threading
    me = psutil.Process()
    loaded = me.memory_info().rss // 1024
    peaks = {"self": loaded, "children": 0}
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peaks["self"] = max(peaks["self"], me.memory_info().rss // 1024)
            kids = 0
            for c in me.children(recursive=True):
                try:
                    kids += c.memory_info().rss // 1024
                except psutil.Error:
                    pass
            peaks["children"] = max(peaks["children"], kids)
            stop.wait(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = asyncio.run(w.handle({"id": "b", "input": {"task": "faceswap_video", "source_image": source, "video_url": url, "output": "base64", "crf": 45}}))
    stop.set()
    sampler.join()
    assert out.get("success"), {k: v for k, v in out.items() if k != "video_base64"}
    print(json.dumps({"frames": out["frames"], "loaded_kb": loaded, "peak_kb": peaks["self"],
                      "child_kb": peaks["children"], "result_bytes": len(out["video_base64"])}))
    """
)


def peak_rss(models: dict[str, str], url: str, tmp: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(REPO), json.dumps(models), url, SOURCE, tmp],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of the throughput clip")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--short", type=float, default=2.0, help="short clip for the memory figure (s)")
    ap.add_argument("--long", type=float, default=8.0, help="long clip for the memory figure (s)")
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--part", choices=("both", "speed", "memory"), default="both")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.models is None:
            models = write_models_dir(tmp / "models")
            label = "fixture models"
        else:
            models = {d: str(args.models / d) for d in (BUFFALO_DEST, INSWAPPER_DEST)}
            label = f"models from {args.models}"
        settings = Settings.from_env({"WORKER_ALLOW_PRIVATE_URLS": "1"})
        ctx = LoadContext(settings=settings, models=models, extra={"tmp_dir": str(tmp)})
        pipe = video.load(ctx)
        worker = Worker(
            plan=Plan(worker_id="b", volume="/x", app_dir="."),
            timeline=Timeline("b", stream=io.StringIO()),
            lifecycle=Lifecycle(),
        )
        worker.pipelines["video"] = pipe
        worker.capabilities["video"] = {"status": "ok", "reason": None}
        server = ImageServer()
        try:
            clip = _clip(tmp / "clip.mp4", w, h, args.seconds)
            url = server.add("/clip.mp4", clip.read_bytes(), headers={"Content-Type": "video/mp4"})
            src = wio_decode_source(pipe)
            job = {
                "id": "b",
                "input": {
                    "task": "faceswap_video",
                    "source_image": SOURCE,
                    "video_url": url,
                    "output": "base64",
                },
            }
            ours, theirs, frames = [], [], 0
            if args.part != "memory":
                asyncio.run(worker.handle(job))  # warm both code paths' allocations once
            for i in range(args.repeat if args.part != "memory" else 0):
                t0 = time.perf_counter()
                out = asyncio.run(worker.handle(job))
                ours.append(out["frames"] / (time.perf_counter() - t0))
                work = tmp / f"naive-{i}"
                work.mkdir()
                t0 = time.perf_counter()
                frames = naive(pipe.faces, clip, work, src)
                theirs.append(frames / (time.perf_counter() - t0))
                subprocess.run(["rm", "-rf", str(work)], check=True)
            if ours:
                print(
                    f"video face swap, {label}, {w}x{h} @24 fps, {args.seconds:g} s = {frames} frames, {args.repeat} runs each"
                )
                print(
                    f"  this pipeline (pipes):      {statistics.median(ours):7.2f} frames/s  (runs: {', '.join(f'{x:.2f}' for x in ours)})"
                )
                print(
                    f"  naive PNG-per-frame recipe: {statistics.median(theirs):7.2f} frames/s  (runs: {', '.join(f'{x:.2f}' for x in theirs)})"
                )
                print(f"  ratio: {statistics.median(ours) / statistics.median(theirs):.2f}x (target >= 2x)")

            rows = []
            for seconds in (args.short, args.long) if args.part != "speed" else ():
                c = _clip(tmp / f"rss-{seconds:g}.mp4", w, h, seconds)
                u = server.add(f"/rss-{seconds:g}.mp4", c.read_bytes(), headers={"Content-Type": "video/mp4"})
                rows.append((seconds, peak_rss(models, u, str(tmp))))
            print(
                f"RSS of a fresh worker process during one {w}x{h} job, sampled every 20 ms (crf 45: the base64 result stays small):"
            )
            for seconds, r in rows:
                print(
                    f"  {seconds:5g} s = {r['frames']:5d} frames: worker {r['peak_kb'] / 1024:7.1f} MiB "
                    f"(after load {r['loaded_kb'] / 1024:.1f} MiB), its ffmpeg children together {r['child_kb'] / 1024:6.1f} MiB, "
                    f"result {r['result_bytes'] / 1e6:.1f} MB base64"
                )
            if not rows:
                return
            (s_sec, s), (l_sec, lg) = rows
            growth = (lg["peak_kb"] - lg["loaded_kb"]) - (s["peak_kb"] - s["loaded_kb"])
            print(
                f"  growth from {s_sec:g} s to {l_sec:g} s: worker {growth / 1024:+.1f} MiB over load "
                f"(of which the larger base64 result ~{(lg['result_bytes'] - s['result_bytes']) * 1.75 / 2**20:.1f} MiB), "
                f"ffmpeg {(lg['child_kb'] - s['child_kb']) / 1024:+.1f} MiB"
            )
        finally:
            server.close()


def wio_decode_source(pipe: video.FaceSwapVideo) -> Any:
    from worker import fetch as wfetch
    from worker import io as wio

    img = wio.decode_image(
        wfetch.decode_base64(SOURCE, 10**7, "source"), max_pixels=10**8, max_side=None, what="source"
    )
    face = pipe.faces.detect(img.bgr)[0]
    pipe.faces.embed(img.bgr, face)
    return face


if __name__ == "__main__":
    main()
