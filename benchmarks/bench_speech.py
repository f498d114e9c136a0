"""Speech benchmarks, every figure against a baseline measured in the same run.

1. import + warm-load: ``import worker.pipelines.speech`` (f5_tts, transformers, torch,
   torchaudio) in a fresh interpreter, then ``load`` with the tiny weights (warm-up included);
2. synthesis real-time factor of the tiny F5 on this CPU (seconds of compute per second of
   audio; < 1 is faster than real time);
3. first job ÷ median of the next 10 (target ≤ 1.2×), each job with a new reference voice so
   none is served from the voice cache;
4. safetensors: ``load_file`` (mmap) vs one ``read()`` + ``safetensors.torch.load(bytes)``, each
   followed by touching every tensor, on a local directory and on every ``--dir`` given (point
   one at a MooseFS mount to see the network case); the file's pages are dropped from the page
   cache (posix_fadvise DONTNEED) before each cold read.

    .venv/bin/python -m benchmarks.bench_speech [--dir /mnt/moosefs/scratch] [--mb 256]
"""

from __future__ import annotations

import argparse
import base64
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

print = functools.partial(print, flush=True)  # figures appear as they are measured

REPO = Path(__file__).resolve().parent.parent


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_safetensors(directory: Path, mb: int) -> dict[str, float]:
    import safetensors.torch
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-speech-{os.getpid()}.safetensors"
    n = mb * 1024 * 1024 // 4 // 64
    state = {f"t{i}": torch.randn(n // 64 if n >= 64 else 1, 64) for i in range(64)}
    safetensors.torch.save_file(state, str(path))
    del state

    def touch(sd: dict[str, torch.Tensor]) -> float:
        return float(sum(float(t.sum()) for t in sd.values()))

    out: dict[str, list[float]] = {"mmap": [], "read": []}
    try:
        for _ in range(3):
            for how in ("mmap", "read"):
                _drop(path)
                t0 = time.perf_counter()
                if how == "mmap":
                    sd = safetensors.torch.load_file(str(path))
                else:
                    with open(path, "rb") as f:
                        sd = safetensors.torch.load(f.read())
                touch(sd)
                out[how].append(time.perf_counter() - t0)
                del sd
    finally:
        path.unlink(missing_ok=True)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", action="append", default=[], help="also measure safetensors here")
    ap.add_argument("--mb", type=int, default=256)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import worker.pipelines.speech"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare_s = time.perf_counter() - t0
    print(
        f"import worker.pipelines.speech (fresh interpreter): {import_s:.1f} s (bare interpreter {bare_s:.2f} s)"
    )

    from bootstrap.settings import Settings
    from tests import fixture_speech as fx
    from worker.pipelines import speech
    from worker.pipelines.base import LoadContext

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        fx.build(root)
        build_s = time.perf_counter() - t0
        dests = (speech.F5_CKPT_DEST, speech.F5_VOCAB_DEST, speech.VOCOS_DEST, speech.WHISPER_DEST)
        ctx = LoadContext(settings=Settings.from_env({}), models={d: str(root / d) for d in dests})
        t0 = time.perf_counter()
        cold = speech.load(LoadContext(settings=ctx.settings, models=ctx.models, extra={"warm_up": False}))
        load_s = time.perf_counter() - t0
        del cold
        t0 = time.perf_counter()
        pipe = speech.load(ctx)
        warm_load_s = time.perf_counter() - t0
        print(
            f"tiny weights: build {build_s:.1f} s; load without warm-up {load_s:.2f} s, "
            f"with warm-up {warm_load_s:.2f} s"
        )

        # synthesis real-time factor
        voice = speech.Voice(fx.tone(3.0), None, "This is a test voice.")
        text = "Hello there. This sentence is spoken by a tiny model to measure speed."
        pipe._synthesize(voice, text, 1.0, 0, 32)
        times, seconds = [], []
        for i in range(3):
            t0 = time.perf_counter()
            wave = pipe._synthesize(voice, text, 1.0, i, 32)
            times.append(time.perf_counter() - t0)
            seconds.append(len(wave) / speech.SAMPLE_RATE)
        rtf = statistics.median(t / s for t, s in zip(times, seconds, strict=True))
        print(
            f"synthesis (tiny F5, 32 steps, CPU): {statistics.median(seconds):.2f} s of audio in "
            f"{statistics.median(times):.2f} s → real-time factor {rtf:.2f}"
        )

        # first job vs the next ten, a fresh voice each
        fresh = speech.load(ctx)
        jobs = []
        for i in range(11):
            ref = base64.b64encode(fx.wav_bytes(fx.tone(3.0, seed=100 + i), 24000)).decode()
            job = {
                "task": "tts",
                "text": "Hello there, how are you?",
                "ref_audio": ref,
                "ref_text": "a voice",
                "seed": i,
            }
            t0 = time.perf_counter()
            out = fresh.run(job)
            jobs.append(time.perf_counter() - t0)
            assert out["success"], out
        first, rest = jobs[0], statistics.median(jobs[1:])
        print(
            f"tts first job {first * 1000:.0f} ms ÷ median of next 10 {rest * 1000:.0f} ms = {first / rest:.2f}× (target ≤ 1.2×)"
        )
        tr = []
        for i in range(11):
            clip = base64.b64encode(fx.wav_bytes(fx.tone(5.0, 16000, seed=200 + i), 16000)).decode()
            t0 = time.perf_counter()
            fresh.run({"task": "transcribe", "audio": clip})
            tr.append(time.perf_counter() - t0)
        print(
            f"transcribe first job {tr[0] * 1000:.0f} ms ÷ median of next 10 {statistics.median(tr[1:]) * 1000:.0f} ms "
            f"= {tr[0] / statistics.median(tr[1:]):.2f}×"
        )

    dirs = [Path(tempfile.gettempdir()) / "bench-speech-local", *map(Path, args.dir)]
    for d in dirs:
        r = bench_safetensors(d, args.mb)
        fs = speech.filesystem_type(str(d)) or "?"
        choice = "read" if speech.on_network_fs(str(d)) else "mmap"
        print(
            f"safetensors {args.mb} MB on {d} ({fs}): mmap {r['mmap']:.2f} s, read+load {r['read']:.2f} s "
            f"→ read/mmap {r['read'] / r['mmap']:.2f}; the pipeline uses {choice} here"
        )


if __name__ == "__main__":
    main()
