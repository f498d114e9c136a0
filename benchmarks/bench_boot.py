"""Warm boot overhead: `bootstrap run --until weights` on a warm volume vs a bare Python start.

Prints, from one run on this machine: the median wall time of a warm `run --until weights`
(preflight, env reuse, weights check — everything bootstrap does before exec-ing the worker)
and of `python -c "import filelock, psutil"` (the floor: an interpreter plus bootstrap's
dependencies), and their ratio (target ≤ 1.5×). Each warm boot runs inside a network namespace
with no network at all (`unshare --net`, root only), which proves it makes zero network calls.

    python -m uv run python benchmarks/bench_boot.py [--repeat 15] [--extras ""]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import base_environ, seed_uv_cache  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--extras", default="")
    args = ap.parse_args()
    offline = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []
    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp) / "vol"
        volume.mkdir()
        extras = tuple(e for e in args.extras.split(",") if e)
        seed_uv_cache(volume, extras)
        env = base_environ(
            BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS=args.extras, BOOTSTRAP_LOG_FORMAT="json"
        )
        boot = [sys.executable, "-m", "bootstrap", "run", "--until", "weights"]
        cold = timed(boot, env)  # builds the env once
        bare = [sys.executable, "-c", "import filelock, psutil"]
        warm_runs, bare_runs = [], []
        for _ in range(args.repeat):  # interleaved, so drift hits both alike
            warm_runs.append(timed(offline + boot, env))
            bare_runs.append(timed(bare, env))
    warm, floor = statistics.median(warm_runs), statistics.median(bare_runs)
    print(
        f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, extras={args.extras or '(base)'}"
    )
    print(f"cold boot (env build with a seeded uv cache): {cold * 1000:8.1f} ms")
    print(
        f"warm `run --until weights` median of {args.repeat}:  {warm * 1000:8.1f} ms"
        f"{'  (no network namespace: zero network calls proven)' if offline else '  (unshare unavailable: network not blocked)'}"
    )
    print(f"bare `python -c 'import filelock, psutil'`:      {floor * 1000:8.1f} ms")
    print(f"ratio warm boot / bare python: {warm / floor:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
