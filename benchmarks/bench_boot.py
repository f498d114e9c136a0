"""Warm boot overhead: `bootstrap run --until weights` on a warm volume vs a bare Python start.

Prints, from one run on this machine: the median wall time of a warm `run --until weights`
(preflight, env reuse, weights check — everything bootstrap does before exec-ing the worker)
and of `python -c "import filelock, psutil"` (the floor: an interpreter plus bootstrap's
dependencies), and their ratio (target ≤ 1.5×). Each warm boot runs inside a network namespace
with no network at all (`unshare --net`, root only), which proves it makes zero network calls.

Both sides run on the interpreter the image's boot uses, not the dev venv's (whose start pays
for torch's and friends' ``.pth`` files): a venv holding only the ``bootstrap`` dependency group,
installed as the image installs it (``uv pip install --compile-bytecode``), with the source
compiled as the image compiles it. The dev venv's floor is printed beside it, and what the warm
boot spends importing (``-X importtime``) and what the fetcher it no longer imports would cost.

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


def image_python(where: Path) -> str:
    """A venv like the image's system Python: the ``bootstrap`` group only, compiled."""
    uv = [sys.executable, "-m", "uv"]
    reqs = where / "requirements.txt"
    run = dict(check=True, cwd=REPO, capture_output=True, text=True)
    subprocess.run(
        [*uv, "export", "--frozen", "--only-group", "bootstrap", "--no-hashes", "--no-emit-project",
         "-o", str(reqs)], **run,
    )  # fmt: skip
    subprocess.run([*uv, "venv", "--python", sys.executable, str(where / "venv")], **run)
    py = str(where / "venv" / "bin" / "python")
    subprocess.run(
        [*uv, "pip", "install", "--python", py, "--compile-bytecode", "-r", str(reqs)], **run
    )  # the uv cache the dev venv filled: no download
    subprocess.run([py, "-m", "compileall", "-q", str(REPO / "bootstrap")], **run)
    return py


def import_ms(py: str, env: dict[str, str], cmd: list[str]) -> tuple[float, float]:
    """(all imports, bootstrap's own modules) in ms, from one ``-X importtime`` run of ``cmd``."""
    proc = subprocess.run(
        [py, "-X", "importtime", *cmd], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    total = ours = 0.0
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            self_us, _, name = line[len("import time:") :].split("|")
            if not self_us.strip().isdigit():
                continue
            total += int(self_us) / 1000
            if name.strip().startswith("bootstrap"):
                ours += int(self_us) / 1000
    return total, ours


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--extras", default="")
    args = ap.parse_args()
    offline = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []
    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp) / "vol"
        volume.mkdir()
        py = image_python(Path(tmp))
        extras = tuple(e for e in args.extras.split(",") if e)
        seed_uv_cache(volume, extras)
        env = base_environ(
            BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS=args.extras, BOOTSTRAP_LOG_FORMAT="json"
        )
        argv = ["-m", "bootstrap", "run", "--until", "weights"]
        boot = [py, *argv]
        cold = timed(boot, env)  # builds the env once
        bare = [py, "-c", "import filelock, psutil"]
        dev_bare = [sys.executable, "-c", "import filelock, psutil"]
        warm_runs, bare_runs, dev_runs = [], [], []
        for _ in range(args.repeat):  # interleaved, so drift hits all alike
            warm_runs.append(timed(offline + boot, env))
            bare_runs.append(timed(bare, env))
            dev_runs.append(timed(dev_bare, env))
        imports, ours = import_ms(py, env, argv)
        fetcher, _ = import_ms(
            py, env, ["-c", "import bootstrap.run, bootstrap.weights.fetch, bootstrap.weights.repo"]
        )
        base, _ = import_ms(py, env, ["-c", "import bootstrap.run"])
    warm, floor = statistics.median(warm_runs), statistics.median(bare_runs)
    print(
        f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
        f"python {sys.version.split()[0]}, extras={args.extras or '(base)'}"
    )
    print(f"cold boot (env build with a seeded uv cache): {cold * 1000:8.1f} ms")
    print(
        f"warm `run --until weights` median of {args.repeat}:  {warm * 1000:8.1f} ms"
        f"{'  (no network namespace: zero network calls proven)' if offline else '  (unshare unavailable: network not blocked)'}"
    )
    print(f"bare `python -c 'import filelock, psutil'`:      {floor * 1000:8.1f} ms  (image-like venv)")
    print(f"  the same in the dev venv:                    {statistics.median(dev_runs) * 1000:8.1f} ms")
    print(
        f"warm boot's imports (-X importtime, one run): {imports:8.1f} ms, of which bootstrap's own "
        f"modules {ours:.1f} ms; importing the fetcher too would add {fetcher - base:.1f} ms"
    )
    print(f"ratio warm boot / bare python: {warm / floor:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
