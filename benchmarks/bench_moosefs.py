"""MooseFS (the network volume's filesystem, the `tests.moosefs` fixture) vs local disk.

    python benchmarks/bench_moosefs.py [--work DIR] [--repeat 3] [--skip-fast]

Prints, from one run on this machine (root, /dev/fuse and Debian's MooseFS packages needed):

1. env cold build with a warm uv cache (``bootstrap run --until weights`` on an empty volume
   whose ``.bootstrap/uv-cache`` holds the face-swap wheels; env phase ms and its steps):
   MooseFS / local (target ≤ 1.5×);
2. warm boot to ready of the face-swap worker (``bootstrap run`` serving the local API, from
   spawn to the ``ready`` event; median of ``--repeat``): MooseFS / local (target ≤ 1.3×);
3. the ``import`` phase after ``drop_caches``: MooseFS / local (target ≤ 1.3×);
4. 4 workers on two hosts (2 on host A, 2 on host B) cold at once vs one cold worker, on
   MooseFS: wall ratio (target ≤ 1.3×) and bytes the weight server sent (target 1.0×).

Then the prototypes of `bootstrap.fastfs`, each measured the same way:

- fast env build: ``uv sync`` without bytecode, then the bytecode compiled by many threads in
  two processes (`fastfs.compile_tree`), smoke test, READY, rename — on both filesystems;
- boot with prefetch: the files the worker's imports read (recorded once with
  `fastfs.imported_files`) read by 32 threads while bootstrap runs its checks.

The weights are the fixture ONNX models under the real manifest's dest names, served as
``BOOTSTRAP_MIRROR`` by a loopback server that counts bytes. The uv cache on MooseFS holds
only the archives the face-swap env links (copied once, untimed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bootstrap import fastfs  # noqa: E402
from bootstrap.env import find_uv  # noqa: E402
from tests import moosefs as mfs  # noqa: E402
from tests.fixture_models import INSWAPPER_DEST, buffalo_zip, swapper  # noqa: E402
from tests.helpers import SHARED_UV_CACHE, base_environ, free_port, seed_uv_cache  # noqa: E402
from tests.httpserver import FaultServer  # noqa: E402

EXTRAS = ("faceswap",)


def say(msg: str) -> None:
    print(msg, flush=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mirror_dir(root: Path) -> Path:
    (root / "insightface" / "models").mkdir(parents=True, exist_ok=True)
    (root / "insightface" / "models" / "buffalo_l.zip").write_bytes(buffalo_zip())
    (root / INSWAPPER_DEST).write_bytes(swapper())
    return root


def environ(volume: Path, worker: str, mirror: str, **extra: str) -> dict[str, str]:
    return base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS=",".join(EXTRAS),
        BOOTSTRAP_MIRROR=mirror,
        BOOTSTRAP_MIN_FREE_GB="0",
        BOOTSTRAP_WORKER_ID=worker,
        BOOTSTRAP_LOG_FORMAT="json",
        BOOTSTRAP_LEASE_TTL_S="10",
        **extra,
    )


def events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict) and "phase" in item:
                out.append(item)
    return out


def phase_ms(evs: list[dict[str, Any]], phase: str) -> float:
    for e in evs:
        if e.get("phase") == phase and e.get("event") == "end":
            return float(e.get("ms") or 0.0)
    return float("nan")


def cold(volume: Path, worker: str, mirror: str, argv_prefix: list[str] | None = None) -> dict[str, Any]:
    """One cold ``run --until weights``: wall, env ms, the env's READY steps."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [*(argv_prefix or []), sys.executable, "-m", "bootstrap", "run", "--until", "weights"],
        env=environ(volume, worker, mirror),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"cold boot failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    evs = events(proc.stdout)
    env_end = next(e for e in evs if e["phase"] == "env" and e["event"] == "end")
    ready = json.loads((volume / ".bootstrap" / "envs" / env_end["detail"]["key"] / "READY").read_text())
    return {
        "wall": wall,
        "env_ms": phase_ms(evs, "env"),
        "steps": ready.get("steps_ms", {}),
        "key": env_end["detail"]["key"],
    }


def to_ready(
    volume: Path, worker: str, mirror: str, *, prefetch: list[str] | None = None
) -> tuple[float, float, float]:
    """Spawn a boot serving the local API; (seconds to the ``ready`` event, import ms, prefetch s)."""
    port = free_port()
    env = environ(volume, worker, mirror, BOOTSTRAP_SERVE_API=f"127.0.0.1:{port}")
    pre_s = [0.0]

    def run_prefetch() -> None:
        t = time.monotonic()
        fastfs.prefetch(prefetch or [])
        pre_s[0] = time.monotonic() - t

    t0 = time.monotonic()
    helper = threading.Thread(target=run_prefetch) if prefetch else None
    if helper is not None:
        helper.start()  # as bootstrap would: in parallel with its own checks
    proc = subprocess.Popen(
        [sys.executable, "-m", "bootstrap", "run"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: list[dict[str, Any]] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            seen += events(line)
            if seen and seen[-1].get("phase") == "ready":
                break
        wall = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        proc.stdout.close()
        if helper is not None:
            helper.join()
    if not seen or seen[-1].get("phase") != "ready":
        raise SystemExit(f"boot never got ready: {seen[-5:]}")
    return wall, phase_ms(seen, "import"), pre_s[0]


def uv_cache_subset(local_env: Path, dst: Path) -> tuple[int, float]:
    """Copy into ``dst`` the shared uv cache minus the archives ``local_env`` does not use."""
    site = next((local_env / "lib").glob("python3*/site-packages"))
    wanted = {p.name for p in site.glob("*.dist-info")}
    dst.mkdir(parents=True)
    t0 = time.monotonic()
    for entry in SHARED_UV_CACHE.iterdir():
        if entry.name != "archive-v0":
            subprocess.run(["cp", "-a", str(entry), str(dst / entry.name)], check=True)
    (dst / "archive-v0").mkdir()
    n = 0
    for arch in (SHARED_UV_CACHE / "archive-v0").iterdir():
        if {p.name for p in arch.glob("*.dist-info")} & wanted:
            subprocess.run(["cp", "-a", str(arch), str(dst / "archive-v0" / arch.name)], check=True)
            n += 1
    return n, time.monotonic() - t0


def fast_build(volume: Path, cache: Path, procs: int, threads: int) -> dict[str, float]:
    """The prototype env build: uv sync without bytecode, threaded compile, smoke, READY, rename."""
    uv = find_uv()
    envs = volume / ".bootstrap" / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    tmp = envs / f".tmp-fast-{uuid.uuid4().hex[:8]}"
    env = base_environ(UV_CACHE_DIR=str(cache), UV_PROJECT_ENVIRONMENT=str(tmp), UV_NO_PROGRESS="1")
    steps: dict[str, float] = {}

    def step(name: str, cmd: list[str], **kw: Any) -> None:
        t = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed: {proc.stderr[-3000:]}")
        steps[name] = round((time.monotonic() - t) * 1000)

    t0 = time.monotonic()
    step("venv", [uv, "venv", "--quiet", "--relocatable", "--python", sys.executable, str(tmp)], env=env)
    sync = [uv, "sync", "--frozen", "--no-install-project", "--no-dev", "--link-mode", "hardlink"]
    step("sync", [*sync, *[a for e in EXTRAS for a in ("--extra", e)]], env=env, cwd=REPO)
    py = str(tmp / "bin" / "python")
    step(
        "compile",
        [py, str(REPO / "bootstrap" / "fastfs.py"), "compile", str(tmp / "lib"), str(threads), str(procs)],
    )
    smoke_env = {**env, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    smoke_env.pop("VIRTUAL_ENV", None)
    step("smoke", [py, "-m", "worker.smoke", "--project", str(REPO), *EXTRAS], env=smoke_env, cwd=tmp)
    t = time.monotonic()
    os.sync()
    (tmp / "READY").write_text("{}")
    os.rename(tmp, envs / f"fast-{uuid.uuid4().hex[:8]}")
    steps["publish"] = round((time.monotonic() - t) * 1000)
    steps["total"] = round((time.monotonic() - t0) * 1000)
    return steps


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


@contextlib.contextmanager
def fixture(work: Path) -> Iterator[mfs.MooseFS]:
    reason = mfs.unavailable_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    with mfs.running(work / "moosefs") as fs:
        yield fs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-moosefs"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-fast", action="store_true")
    args = ap.parse_args()
    work: Path = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    say(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}")
    with FaultServer(mirror_dir(work / "mirror")) as srv, fixture(work) as fs:
        mirror = srv.url
        local = work / "local" / "vol"
        local.mkdir(parents=True)
        seed_uv_cache(local, EXTRAS)
        # 1. cold, local
        srv.reset_log()
        lc = cold(local, "cold-local", mirror)
        one_local_bytes = srv.bytes_sent()
        say(
            f"[1] local   cold: env {lc['env_ms'] / 1000:6.1f} s  wall {lc['wall']:6.1f} s  steps {lc['steps']}"
        )
        # the MooseFS uv cache: the archives the face-swap env links, copied once (untimed)
        cache = fs.a / "uv-cache"
        n, secs = uv_cache_subset(local / ".bootstrap" / "envs" / lc["key"], cache)
        say(f"    (uv cache onto MooseFS: {n} archives in {secs:.0f} s, untimed)")

        def mfs_volume(name: str) -> dict[str, Path]:
            (fs.a / name / ".bootstrap").mkdir(parents=True)
            (fs.a / name / ".bootstrap" / "uv-cache").symlink_to(cache)
            return {h: m / name for h, m in fs.mounts.items()}

        v1 = mfs_volume("v1")
        srv.reset_log()
        mc = cold(v1["host-a"], "cold-mfs", mirror, fs.host("host-a").argv([], REPO))
        one_bytes = srv.bytes_sent()
        say(
            f"[1] MooseFS cold: env {mc['env_ms'] / 1000:6.1f} s  wall {mc['wall']:6.1f} s  steps {mc['steps']}"
        )
        say(f"[1] env cold build MooseFS/local: {ratio(mc['env_ms'], lc['env_ms'])}  (target <= 1.5x)")

        # 2. warm boot to ready (page cache warm), 3. import phase after drop_caches
        warm: dict[str, list[tuple[float, float, float]]] = {"local": [], "mfs": []}
        dropped: dict[str, list[tuple[float, float, float]]] = {"local": [], "mfs": [], "mfs+prefetch": []}
        vols = {"local": local, "mfs": v1["host-a"]}
        for name, vol in vols.items():
            to_ready(vol, f"warmup-{name}", mirror)
        env_dir = v1["host-a"] / ".bootstrap" / "envs" / mc["key"]
        plan = subprocess.run(
            [str(env_dir / "bin" / "python"), "-c",
             "import json; from worker.smoke import plan_imports; print(json.dumps(plan_imports(['faceswap'], None)[0]))"],
            env={**base_environ(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        modules = [*json.loads(plan.stdout.splitlines()[-1]), "worker.main", "runpod"]
        recorded = fastfs.imported_files(
            env_dir / "bin" / "python", modules, under=env_dir, pythonpath=str(REPO)
        )
        say(f"    (prefetch list: {len(recorded)} files the worker's imports read, recorded once)")
        for _ in range(args.repeat):
            for name, vol in vols.items():
                warm[name].append(to_ready(vol, f"warm-{name}", mirror))
            for name, vol in vols.items():
                drop_caches()
                dropped[name].append(to_ready(vol, f"cold-cache-{name}", mirror))
            drop_caches()
            dropped["mfs+prefetch"].append(to_ready(vols["mfs"], "prefetch", mirror, prefetch=recorded))

        def med(rows: list[tuple[float, float, float]], i: int) -> float:
            return statistics.median(r[i] for r in rows)

        for name in ("local", "mfs"):
            say(
                f"[2] {name:7s} warm boot to ready: {med(warm[name], 0):5.2f} s  (import {med(warm[name], 1):6.0f} ms)"
            )
        say(
            f"[2] warm boot to ready MooseFS/local: {ratio(med(warm['mfs'], 0), med(warm['local'], 0))}  (target <= 1.3x)"
        )
        for name, rows in dropped.items():
            extra = f", prefetch {med(rows, 2):.2f} s in parallel" if name.endswith("prefetch") else ""
            say(
                f"[3] {name:12s} after drop_caches: import {med(rows, 1):6.0f} ms, ready {med(rows, 0):5.2f} s{extra}"
            )
        say(
            f"[3] import after drop_caches MooseFS/local: {ratio(med(dropped['mfs'], 1), med(dropped['local'], 1))}"
            f"; with prefetch: {ratio(med(dropped['mfs+prefetch'], 1), med(dropped['local'], 1))}  (target <= 1.3x)"
        )

        # 4. four workers on two hosts, cold at once
        v4 = mfs_volume("v4")
        srv.reset_log()
        t0 = time.monotonic()
        procs = []
        for i in range(4):
            host = mfs.HOSTS[i % 2]
            procs.append(
                fs.host(host).popen(
                    [sys.executable, "-m", "bootstrap", "run", "--until", "weights"],
                    environ(v4[host], f"c{i}", mirror),
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        codes = [p.wait() for p in procs]
        four = time.monotonic() - t0
        four_bytes = srv.bytes_sent()
        if any(codes):
            raise SystemExit(f"a concurrent cold boot failed: {codes}")
        say(
            f"[4] 4 workers on 2 hosts cold at once: {four:6.1f} s vs one {mc['wall']:6.1f} s = {ratio(four, mc['wall'])} (target <= 1.3x)"
        )
        say(
            f"[4] bytes sent: {four_bytes} vs one {one_bytes} = {ratio(four_bytes, one_bytes)} (target 1.0x); local one: {one_local_bytes}"
        )

        if not args.skip_fast:
            lcache = local / ".bootstrap" / "uv-cache"
            for threads, procs_n in ((1, 1), (32, 2)):
                lf = fast_build(local, lcache, procs_n, threads)
                mf = fast_build(fs.a / "v1", cache, procs_n, threads)
                say(f"[fast] sync --no-compile + compile {procs_n}x{threads} threads: local {lf}")
                say(f"[fast]                                    MooseFS {mf}")
                say(
                    f"[fast] MooseFS/local {ratio(mf['total'], lf['total'])}; vs product on MooseFS {ratio(mf['total'], mc['env_ms'])}"
                )
            # the other design: build on local disk, publish by one streaming copy + rename
            t = time.monotonic()
            tmp = fs.a / "v1" / ".bootstrap" / "envs" / f".tmp-copy-{uuid.uuid4().hex[:8]}"
            nfiles, nbytes = fastfs.copy_tree(local / ".bootstrap" / "envs" / lc["key"], tmp)
            os.sync()
            os.rename(tmp, tmp.with_name(f"copied-{uuid.uuid4().hex[:8]}"))
            copy_s = time.monotonic() - t
            say(
                f"[copy] publish the local env by streaming copy + rename: {nfiles} files, "
                f"{nbytes / 1e9:.2f} GB in {copy_s:.1f} s; local build + copy = "
                f"{lc['env_ms'] / 1000 + copy_s:.1f} s vs product on MooseFS {mc['env_ms'] / 1000:.1f} s"
            )
    say(f"load at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
