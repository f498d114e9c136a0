"""`bootstrap diagnose` on a healthy warm volume: how long one full report takes (target < 2 s).

The volume is made warm by the product itself: a seeded uv cache, then `bootstrap prepare`
builds the environment (face-swap extras by default) and fetches and verifies a small ONNX model
from a ``file://`` source. Then, interleaved so drift hits both alike, it times
`bootstrap diagnose --json` (every section: a volume write/speed probe, the env's Python run
twice — identity and the onnxruntime session probe — sizes, leases, weights, last boot) and
`bootstrap explain 0` (the floor: an interpreter plus importing bootstrap's CLI), and the same
diagnose on a broken variant (a required model missing: exit 3), and prints the medians, the
ratio to the floor and each section's own time from one in-process run.

    python -m uv run python benchmarks/bench_diagnose.py [--repeat 7] [--extras faceswap]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bootstrap import diagnose as dg  # noqa: E402
from bootstrap.settings import Settings  # noqa: E402
from tests.helpers import base_environ, seed_uv_cache  # noqa: E402
from worker.gpu_probe import PROBE_MODEL  # noqa: E402

#: A valid 69-byte ONNX model (one Identity node), the same diagnose's GPU probe uses.
MODEL = base64.b64decode(PROBE_MODEL)


def timed(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in ok:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return elapsed, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--extras", default="faceswap")
    args = ap.parse_args()
    extras = tuple(e for e in args.extras.split(",") if e)
    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp) / "vol"
        volume.mkdir()
        model = Path(tmp) / "src" / "probe.onnx"
        model.parent.mkdir()
        model.write_bytes(MODEL)
        manifest = Path(tmp) / "models.toml"
        cap = extras[0] if extras else "none"
        manifest.write_text(
            f'[[file]]\ndest = "bench/probe.onnx"\nsource = "{model.as_uri()}"\nsize = {len(MODEL)}\n'
            f'format = "onnx"\ncapability = "{cap}"\n'
        )
        seed_uv_cache(volume, extras)
        env = base_environ(
            BOOTSTRAP_VOLUME=str(volume),
            BOOTSTRAP_EXTRAS=args.extras,
            BOOTSTRAP_MANIFEST=str(manifest),
            BOOTSTRAP_WORKER_ID="bench",
            BOOTSTRAP_LOG_FORMAT="json",
        )
        boot = [sys.executable, "-m", "bootstrap"]
        prepare_s, _ = timed([*boot, "prepare"], env)
        _, out = timed([*boot, "diagnose", "--json"], env)
        report = json.loads(out)
        if report["status"] == "broken":
            raise SystemExit(f"the warm volume is not healthy:\n{json.dumps(report, indent=2)[:4000]}")
        # The same volume seen with a manifest that also lists a required model it does not hold.
        broken_manifest = Path(tmp) / "broken.toml"
        broken_manifest.write_text(
            manifest.read_text()
            + f'\n[[file]]\ndest = "bench/missing.onnx"\nsource = "{(Path(tmp) / "nowhere.onnx").as_uri()}"\n'
            f'format = "onnx"\ncapability = "{cap}"\n'
        )
        broken_env = {**env, "BOOTSTRAP_MANIFEST": str(broken_manifest)}
        runs, floor, broken = [], [], []
        for _ in range(args.repeat):
            runs.append(timed([*boot, "diagnose", "--json"], env)[0])
            floor.append(timed([*boot, "explain", "0"], env)[0])
            broken.append(timed([*boot, "diagnose", "--json"], broken_env, ok=(3,))[0])
        t0 = time.perf_counter()
        inproc = dg.collect(Settings.from_env(env))
        inproc_s = time.perf_counter() - t0
    med, base = statistics.median(runs), statistics.median(floor)
    print(
        f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, extras={args.extras or '(base)'}"
    )
    print(f"warm volume made by `bootstrap prepare` (env build + 1 verified model): {prepare_s:6.2f} s")
    print(f"report status on it: {report['status']}  (gpu section: {inproc.section('gpu').status})")
    print(
        f"`bootstrap diagnose --json` median of {args.repeat}: {med * 1000:8.1f} ms "
        f"(min {min(runs) * 1000:.1f}, max {max(runs) * 1000:.1f})  target < 2000 ms: "
        f"{'met' if med < 2 else 'MISSED'}"
    )
    print(
        f"`bootstrap diagnose --json` on the same volume with a required model missing (exit 3): "
        f"median {statistics.median(broken) * 1000:.1f} ms"
    )
    print(f"`bootstrap explain 0` (interpreter + CLI import floor): {base * 1000:8.1f} ms")
    print(f"ratio diagnose / floor: {med / base:.1f}x")
    print(f"in-process collect(): {inproc_s * 1000:.1f} ms; per section (run in parallel threads):")
    for s in inproc.sections:
        print(f"  {s.name:<10} {s.ms:8.1f} ms  {s.status}")


if __name__ == "__main__":
    main()
