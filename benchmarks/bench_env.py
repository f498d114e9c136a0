"""Benchmark of phase env: this project's build vs the common network-volume recipe.

    uv run python benchmarks/bench_env.py [--extras faceswap] [--work DIR]

Prints, in one run on the same wheel set (bytecode and the import smoke test included on both
sides; PyPI is used once to fill the caches, never inside a timed step):

1. cold build: ``bootstrap run --until env`` on an empty volume with a warm uv cache, vs
   ``python -m venv`` + ``pip install`` from a local wheelhouse of the same wheels;
2. rebuild after a one-package lock change (one package pinned to another version), warm cache:
   this project (clones the previous env by hard links) vs the cold build; both ``--repeat``
   times (medians), and with ``--before REV`` the same for REV's code, interleaved;
3. warm reuse: a boot whose env is READY, its env phase and the whole command, vs the cold build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import base_environ, seed_uv_cache  # noqa: E402

#: the package whose version the "one-package change" moves (small, pure Python, in every set)
CHANGED = ("certifi", "2025.8.3")


def timed(cmd: list[str], **kw: object) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0, proc


def env_ms(stdout: str) -> float:
    for line in stdout.splitlines():
        if '"phase": "env"' in line and '"event": "end"' in line:
            return float(json.loads(line)["ms"])
    return float("nan")


def boot(
    volume: Path, project: Path, extras: str, worker: str, code: Path = REPO
) -> tuple[float, float, dict[str, object]]:
    """One ``bootstrap run --until env``, by the code in ``code`` (``--before``: an export)."""
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_PROJECT_DIR=str(project),
        BOOTSTRAP_EXTRAS=extras,
        BOOTSTRAP_MIN_FREE_GB="0",
        BOOTSTRAP_WORKER_ID=worker,
        BOOTSTRAP_APP_DIR=str(code),
    )
    wall, proc = timed([sys.executable, "-m", "bootstrap", "run", "--until", "env"], env=env, cwd=code)
    detail = next(
        json.loads(x)["detail"]
        for x in proc.stdout.splitlines()
        if '"phase": "env"' in x and '"event": "end"' in x
    )
    return wall, env_ms(proc.stdout), detail


def project_copy(dst: Path, pin: tuple[str, str] | None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")
    shutil.copy2(REPO / "uv.lock", dst / "uv.lock")
    if pin is not None:
        text = (dst / "pyproject.toml").read_text()
        text = text.replace('    "pillow>=10.0",\n]', f'    "pillow>=10.0",\n    "{pin[0]}=={pin[1]}",\n]', 1)
        (dst / "pyproject.toml").write_text(text)
        subprocess.run(["uv", "lock", "--quiet"], cwd=dst, env=base_environ(), check=True)
    return dst


def lock_versions(lock: Path) -> dict[str, str]:
    return {p["name"]: p.get("version", "") for p in tomllib.loads(lock.read_text())["package"]}


def warm_cache(project: Path, extras: tuple[str, ...], cache: Path) -> None:
    scratch = cache.parent / "scratch-env"
    cmd = ["uv", "sync", "--frozen", "--no-install-project", "--no-dev"] + [
        a for e in extras for a in ("--extra", e)
    ]
    env = base_environ(UV_CACHE_DIR=str(cache), UV_PROJECT_ENVIRONMENT=str(scratch))
    subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    shutil.rmtree(scratch, ignore_errors=True)


def pip_baseline(work: Path, extras: tuple[str, ...]) -> float:
    """``python -m venv`` + ``pip install`` (bytecode by default) + the same smoke test."""
    req = work / "requirements.txt"
    cmd = ["uv", "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--no-header"]
    cmd += [a for e in extras for a in ("--extra", e)]
    req.write_text(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    wheels = work / "wheelhouse"
    marker = wheels / f".done-{hash(req.read_text()) & 0xFFFFFFFF:x}"
    if not marker.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                getattr(sys, "_base_executable", sys.executable),
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary",
                ":all:",
                "-d",
                str(wheels),
                "-r",
                str(req),
            ],
            check=True,
        )
        marker.touch()
    venv = work / "pip-venv"
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    t0 = time.monotonic()
    timed([base, "-m", "venv", str(venv)])
    timed(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--find-links",
            str(wheels),
            "-r",
            str(req),
        ]
    )
    smoke_env = base_environ(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    timed([str(venv / "bin" / "python"), "-m", "worker.smoke", *extras], env=smoke_env)
    took = time.monotonic() - t0
    shutil.rmtree(venv, ignore_errors=True)
    return took


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def export(rev: str, work: Path) -> Path:
    """REV's ``bootstrap`` and ``worker`` in ``work/code-REV`` (for ``--before``)."""
    dest = work / f"code-{rev}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "bootstrap", "worker"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extras", default="faceswap")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "volume-worker-bench" / "env")
    ap.add_argument("--skip-pip", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="cold builds and rebuilds each (medians)")
    ap.add_argument("--before", metavar="REV", help="the same with REV's bootstrap and worker (git archive)")
    args = ap.parse_args()
    extras = tuple(e for e in args.extras.split(",") if e)
    work: Path = args.work
    shutil.rmtree(work / "run", ignore_errors=True)
    run = work / "run"
    p1 = project_copy(run / "p1", None)
    p2 = project_copy(run / "p2", CHANGED)
    v1, v2 = lock_versions(p1 / "uv.lock"), lock_versions(p2 / "uv.lock")
    diff = sorted(n for n in set(v1) | set(v2) if v1.get(n) != v2.get(n))
    print(
        f"wheel set: extras {args.extras or '(base)'}; one-package change: {diff} "
        f"({v1.get(CHANGED[0])} -> {v2.get(CHANGED[0])})"
    )

    vol = run / "volume"
    vol.mkdir()
    seed_uv_cache(vol, extras)
    warm_cache(p2, extras, vol / ".bootstrap" / "uv-cache")  # the changed package too: a warm cache
    envs = vol / ".bootstrap" / "envs"
    codes = [("now", REPO)] + ([(args.before, export(args.before, work))] if args.before else [])
    print(f"# median of {args.repeat}, interleaved; {load()}")

    cold: dict[str, list[float]] = {name: [] for name, _ in codes}
    rebuild: dict[str, list[float]] = {name: [] for name, _ in codes}
    steps: dict[str, object] = {}
    for i in range(args.repeat):
        for name, code in codes:
            shutil.rmtree(envs, ignore_errors=True)
            wall, _, d1 = boot(vol, p1, args.extras, f"cold-{name}-{i}", code)
            assert d1["reused"] is False
            cold[name].append(wall)
            re_wall, _, d2 = boot(vol, p2, args.extras, f"rebuild-{name}-{i}", code)
            ready = json.loads((envs / str(d2["key"]) / "READY").read_text())
            assert ready.get("cloned_from"), ready
            rebuild[name].append(re_wall)
            steps[name] = ready.get("steps_ms")
    for name, _ in codes:
        c, r = median(cold[name]), median(rebuild[name])
        print(
            f"[{name}] cold build (this project):        {c:7.2f} s  [{min(cold[name]):.2f}–{max(cold[name]):.2f}]"
        )
        print(
            f"[{name}] rebuild after one-package change: {r:7.2f} s  [{min(rebuild[name]):.2f}–{max(rebuild[name]):.2f}]"
            f"  steps of the last (ms): {steps[name]}"
        )
        print(f"[{name}]   -> rebuild / cold = {r / c:.2f}")
    print(f"# {load()}")
    if not args.skip_pip:
        pip_s = pip_baseline(work, extras)
        print(f"cold build (python -m venv + pip):   {pip_s:7.2f} s")
        print(f"  -> this project is {pip_s / median(cold['now']):.1f}x faster than the pip recipe")
    warm_wall, warm_env, d3 = boot(vol, p2, args.extras, "warm")
    assert d3["reused"] is True
    print(f"warm reuse:                          {warm_wall:7.2f} s  (env phase {warm_env:.1f} ms)")
    print(f"  -> warm / cold = {warm_wall / median(cold['now']):.3f}")
    shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
