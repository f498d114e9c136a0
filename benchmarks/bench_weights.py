"""Benchmark: the weights fetcher vs curl, aria2c and huggingface_hub, all against one loopback server.

    uv run python benchmarks/bench_weights.py [--size-mb 1024] [--capped-mb 256] [--cap-mbps 40]
        [--rss-gb 4] [--dir /tmp/bench-weights] [--volume-on tmpfs|disk]

Prints, for each scenario, seconds and MB/s (MB = 10**6 bytes) and the ratio to the baseline
measured in the same run:

1. uncapped, one file of ``--size-mb``: this fetcher (sha256, fsync and the ``.verified`` record
   included) vs ``curl`` (one stream; also curl followed by ``sha256sum``), ``aria2c -x 8``
   (installed with apt-get if missing; skipped if that fails) and ``huggingface_hub``'s
   ``hf_hub_download`` through ``HF_ENDPOINT`` pointed at the same server in Hub mode;
2. the same with every connection capped at ``--cap-mbps`` (as CDNs do), on ``--capped-mb``;
3. peak RSS of this fetcher for a sparse ``--rss-gb`` file;
4. eight processes fetching one file onto one volume at once: wall time vs one, bytes the
   server sent vs the file's size; and the same for ``huggingface_hub`` sharing a ``local_dir``.

The server is `tests.httpserver.FaultServer` in this process (the clients are other processes,
so it has the interpreter to itself). Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ``--before REV`` runs the fetch children on an export of REV's ``bootstrap`` (BENCH_CODE).
sys.path.insert(0, str(REPO))
if os.environ.get("BENCH_CODE"):
    sys.path.insert(0, os.environ["BENCH_CODE"])

from tests.httpserver import FAKE_COMMIT, FaultServer  # noqa: E402

PY = sys.executable


# -- the fetcher, as a child process ------------------------------------------------------------


def fetch_main(url: str, volume: str, fmt: str) -> int:
    """Child mode: the weights phase for one file, exactly as bootstrap runs it."""
    import io

    from bootstrap.plan import Plan
    from bootstrap.settings import Settings
    from bootstrap.timeline import Timeline
    from bootstrap.volume import Volume
    from bootstrap.weights import ensure_weights

    manifest = Path(volume) / "models.toml"
    manifest.write_text(
        f'[[file]]\ndest = "bench/file.bin"\nsource = "{url}"\nformat = "{fmt}"\ncapability = "bench"\n'
    )
    settings = Settings.from_env(
        {
            "BOOTSTRAP_VOLUME": volume,
            "BOOTSTRAP_MANIFEST": str(manifest),
            "BOOTSTRAP_EXTRAS": "bench",
            "BOOTSTRAP_MIN_FREE_GB": "0",
            "BOOTSTRAP_WORKER_ID": f"bench-{os.getpid()}",
            "BOOTSTRAP_LOCK_TIMEOUT_S": "600",
        }
    )
    vol = Volume(Path(volume), "bench")
    vol.make_layout()
    timeline = Timeline(settings.worker_id, stream=io.StringIO())
    t0 = time.monotonic()
    ensure_weights(settings, vol, timeline, Plan(settings.worker_id, volume, str(REPO)), {})
    # The weights phase alone (lease, probe, disk check, transfer, sha256, fsync, publish,
    # record), without the interpreter's start and imports: what the parent reports beside
    # the process's wall time.
    print(f"phase_s={time.monotonic() - t0:.6f}")
    return 0


def floor_main(url: str, out: str) -> int:
    """Child mode: the least a verifying fetcher does: one stream into the file (``pwrite``),
    sha256 on a second thread straight from the received buffers (no read back, no journal, no
    fsync, no retries). What it reaches is the floor of this machine for a verified fetch."""
    import http.client
    import queue
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    t0 = time.monotonic()
    conn.request("GET", parts.path)
    resp = conn.getresponse()
    full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(8):
        free.put(bytearray(1024 * 1024))
    h = hashlib.sha256()

    def hasher() -> None:
        while (item := full.get()) is not None:
            h.update(memoryview(item[0])[: item[1]])
            free.put(item[0])

    thread = threading.Thread(target=hasher)
    thread.start()
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    pos = 0
    while True:
        buf = free.get()
        n = resp.readinto(memoryview(buf))
        if not n:
            break
        os.pwrite(fd, memoryview(buf)[:n], pos)
        pos += n
        full.put((buf, n))
    full.put(None)
    thread.join()
    os.close(fd)
    print(f"phase_s={time.monotonic() - t0:.6f}")
    return 0


def hf_main(endpoint: str, local_dir: str) -> int:
    """Child mode: huggingface_hub downloads the same file through HF_ENDPOINT."""
    from huggingface_hub import hf_hub_download

    hf_hub_download("bench/repo", "file.bin", revision=FAKE_COMMIT, local_dir=local_dir)
    return 0


# -- measuring -----------------------------------------------------------------------------------


LAST_PHASE_S: list[float] = []  # the weights phase's own seconds, as the last fetch child printed


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one child process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err[-2000:]}")
    out = proc.stdout.read().decode() if proc.stdout else ""
    LAST_PHASE_S[:] = [float(line[8:]) for line in out.splitlines() if line.startswith("phase_s=")]
    return seconds, usage.ru_maxrss * 1024


def timed_many(argvs: list[list[str]], env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    procs = [subprocess.Popen(a, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for a in argvs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"exited {p.returncode}: {err.decode(errors='replace')[-2000:]}")
    return time.monotonic() - t0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_", "BOOTSTRAP_"))}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def ensure_aria2c() -> str | None:
    found = shutil.which("aria2c")
    if found:
        return found
    print("# aria2c missing: apt-get install -y aria2 …", flush=True)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "aria2"], check=True, capture_output=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError) as err:
        print(f"# aria2c unavailable ({type(err).__name__}): skipped", flush=True)
        return None
    return shutil.which("aria2c")


def make_file(path: Path, size: int, *, sparse: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        if sparse:
            f.truncate(size)
            return
        rng = __import__("random").Random(1)
        left = size
        while left:
            n = min(left, 16 * 1024 * 1024)
            f.write(rng.randbytes(n))
            left -= n


class Bench:
    def __init__(self, work: Path, volume_base: Path, srv: FaultServer) -> None:
        self.work = work
        self.volume_base = volume_base
        self.srv = srv
        self.aria2c = ensure_aria2c()
        self.n = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        d = self.volume_base / f"{name}-{self.n}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def ours(self, rel: str, fmt: str = "raw", code: Path | None = None) -> tuple[float, int]:
        vol = self.fresh("ours")
        env = child_env(BENCH_CODE=str(code)) if code else child_env()
        try:
            return timed([PY, __file__, "--child-fetch", f"{self.srv.url}/{rel}", str(vol), fmt], env)
        finally:
            shutil.rmtree(vol, ignore_errors=True)

    def curl(self, rel: str, *, with_sha: bool = False) -> float:
        out = self.fresh("curl") / "file.bin"
        t0 = time.monotonic()
        subprocess.run(["curl", "-sf", "-o", str(out), f"{self.srv.url}/{rel}"], check=True)
        if with_sha:
            subprocess.run(["sha256sum", str(out)], check=True, capture_output=True)
        seconds = time.monotonic() - t0
        shutil.rmtree(out.parent, ignore_errors=True)
        return seconds

    def aria(self, rel: str) -> float | None:
        if not self.aria2c:
            return None
        d = self.fresh("aria")
        t0 = time.monotonic()
        subprocess.run(
            [
                self.aria2c,
                "-q",
                "-x",
                "8",
                "-s",
                "8",
                "-k",
                "1M",
                "--file-allocation=none",
                "-d",
                str(d),
                "-o",
                "file.bin",
                f"{self.srv.url}/{rel}",
            ],
            check=True,
        )
        seconds = time.monotonic() - t0
        shutil.rmtree(d, ignore_errors=True)
        return seconds

    def hub(self, n: int = 1) -> float:
        d = self.fresh("hub")
        env = child_env(
            HF_ENDPOINT=self.srv.url,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_OFFLINE="0",
            HF_HOME=str(d / "home"),
            HF_HUB_DISABLE_XET="1",
        )
        argv = [PY, __file__, "--child-hf", self.srv.url, str(d / "out")]
        seconds = timed(argv, env)[0] if n == 1 else timed_many([argv] * n, env)
        shutil.rmtree(d, ignore_errors=True)
        return seconds


def export(rev: str, work: Path) -> tuple[str, Path]:
    """REV's ``bootstrap`` package in ``work/code-REV`` (for ``--before``)."""
    dest = work / f"code-{rev}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "bootstrap"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return rev, dest


def mbps(size: int, seconds: float | None) -> str:
    return "skipped" if seconds is None else f"{seconds:7.2f} s {size / seconds / 1e6:8.1f} MB/s"


def ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"  ({a / b:.2f}× the baseline's speed)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--capped-mb", type=int, default=256)
    parser.add_argument("--cap-mbps", type=float, default=40.0)
    parser.add_argument("--rss-gb", type=float, default=4.0)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-weights")
    parser.add_argument("--only", default="1,2,3,4", help="comma list of the scenarios to run (1-4)")
    parser.add_argument("--volume-on", choices=("disk", "tmpfs"), default="disk")
    parser.add_argument("--repeat", type=int, default=5, help="runs of scenario 1 (medians)")
    parser.add_argument(
        "--before", metavar="REV", help="also run scenario 1 with REV's bootstrap (git archive): before/after"
    )
    parser.add_argument("--child-fetch", nargs=3, metavar=("URL", "VOLUME", "FORMAT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-floor", nargs=2, metavar=("URL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-hf", nargs=2, metavar=("ENDPOINT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_fetch:
        return fetch_main(*args.child_fetch)
    if args.child_hf:
        return hf_main(*args.child_hf)
    if args.child_floor:
        return floor_main(*args.child_floor)

    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    root = work / "srv"
    size = args.size_mb * 1024 * 1024
    capped = args.capped_mb * 1024 * 1024
    make_file(root / "big.bin", size)
    make_file(root / "capped.bin", capped)
    (root / "bench" / "repo").mkdir(parents=True, exist_ok=True)
    link = root / "bench" / "repo" / "file.bin"
    if link.exists() or link.is_symlink():
        link.unlink()
    os.link(root / "big.bin", link)
    volume_base = Path("/dev/shm/bench-weights-vol") if args.volume_on == "tmpfs" else work / "vol"
    volume_base.mkdir(parents=True, exist_ok=True)
    print(
        f"# files: {size / 1e6:.0f} MB uncapped, {capped / 1e6:.0f} MB capped; volume on {args.volume_on} ({volume_base}); {os.cpu_count()} cores"
    )

    with FaultServer(root, hf=True) as srv:
        b = Bench(work, volume_base, srv)
        # Warm the page cache and the server's sha256 cache for the Hub headers.
        sha256_file(root / "big.bin")
        subprocess.run(
            ["curl", "-sfI", f"{srv.url}/bench/repo/resolve/{FAKE_COMMIT}/file.bin"],
            check=True,
            capture_output=True,
        )

        only = set(args.only.split(","))
        before = export(args.before, work) if args.before else None
        if "1" in only:
            uncapped(b, size, args.repeat, before)
        if "2" in only:
            capped_run(b, capped, args.cap_mbps, before, max(1, args.repeat // 2 + 1))
        if "3" in only:
            rss_run(b, root, args.rss_gb)
        if "4" in only:
            eight(b, size)
    print(f"\n# benchmark's own peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


def hashlib_rate(path: Path, size: int) -> float:
    """One core's ``hashlib.sha256`` rate (bytes/s) over the file's first 256 MiB, in memory, in
    a child process (so this process stays small: a child's peak RSS counts its parent's)."""
    code = (
        "import hashlib, sys, time\n"
        f"data = memoryview(open({str(path)!r}, 'rb').read({min(size, 256 * 1024 * 1024)}))\n"
        "h = hashlib.sha256(); t0 = time.perf_counter()\n"
        "for i in range(0, len(data), 4 << 20): h.update(data[i : i + (4 << 20)])\n"
        "print(len(data) / (time.perf_counter() - t0))\n"
    )
    return float(subprocess.run([PY, "-c", code], check=True, capture_output=True, text=True).stdout)


def cpu_s() -> float:
    """CPU seconds of this process (the server's threads) and its waited-for children so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def uncapped(b: Bench, size: int, repeat: int, before: tuple[str, Path] | None) -> None:
    print(f"\n## 1. uncapped (median of {repeat}, interleaved; {load()})")
    rows: dict[str, list[float]] = {"curl": [], "hash": [], "ours": [], "ours_phase": [], "rss": []}
    rows |= {"curl_cores": [], "ours_cores": [], "floor": []}
    if before:
        rows |= {"before": [], "before_phase": []}
    for _ in range(repeat):
        c0 = cpu_s()
        rows["curl"].append(b.curl("big.bin"))
        rows["curl_cores"].append((cpu_s() - c0) / rows["curl"][-1])
        rows["hash"].append(hashlib_rate(b.srv.state.root / "big.bin", size))
        out = b.fresh("floor") / "file.bin"
        timed([PY, __file__, "--child-floor", f"{b.srv.url}/big.bin", str(out)], child_env())
        rows["floor"].append(LAST_PHASE_S[0])
        shutil.rmtree(out.parent, ignore_errors=True)
        c0 = cpu_s()
        t, rss = b.ours("big.bin")
        rows["ours_cores"].append((cpu_s() - c0) / t)
        rows["ours"].append(t)
        rows["ours_phase"].append(LAST_PHASE_S[0])
        rows["rss"].append(rss)
        if before:
            rows["before"].append(b.ours("big.bin", code=before[1])[0])
            rows["before_phase"].append(LAST_PHASE_S[0])
    t_curl = median(rows["curl"])
    hash_s = size / median(rows["hash"])
    floor = max(t_curl, hash_s)  # the slower of one unverified stream and one core hashing
    print(f"curl (1 stream)          {mbps(size, t_curl)}   [baseline]")
    print(f"hashlib.sha256, 1 core   {mbps(size, hash_s)}   (in memory, this process)")
    print(f"target: 0.9 × the slower of the two = {0.9 * size / floor / 1e6:.1f} MB/s")
    t_floor = median(rows["floor"])
    print(
        f"floor: 1 stream + sha256   {mbps(size, t_floor)}  = {floor / t_floor:.2f}× the target's base"
        " (pwrite, hash on a 2nd thread from the same buffers; nothing else)"
    )
    for key, label in (("ours", "this fetcher"), ("before", f"this fetcher @ {before[0] if before else ''}")):
        if key not in rows:
            continue
        t, phase = median(rows[key]), median(rows[f"{key}_phase"])
        print(
            f"{label:<24} {mbps(size, phase)}  = {floor / phase:.2f}× the target's base (weights phase;"
            f" sha256, fsync, record)\n{'':<24} {mbps(size, t)}  = {floor / t:.2f}× (the whole process,"
            " interpreter start and imports included)"
        )
    print(f"this fetcher's peak RSS  {median(rows['rss']) / 1e6:.0f} MB; {load()}")
    print(
        f"cores busy (client + server CPU seconds / wall, of {os.cpu_count()}): curl"
        f" {median(rows['curl_cores']):.2f}, this fetcher {median(rows['ours_cores']):.2f}"
    )
    t_curl_sha = b.curl("big.bin", with_sha=True)
    t_aria = b.aria("big.bin")
    t_hub = b.hub()
    print(f"curl + sha256sum         {mbps(size, t_curl_sha)}{ratio(t_curl, t_curl_sha)}")
    print(f"aria2c -x 8              {mbps(size, t_aria)}{ratio(t_curl, t_aria)}")
    print(f"huggingface_hub          {mbps(size, t_hub)}{ratio(t_curl, t_hub)}")


def capped_run(b: Bench, capped: int, cap_mbps: float, before: tuple[str, Path] | None, repeat: int) -> None:
    srv = b.srv
    print(f"\n## 2. each connection capped at {cap_mbps:g} MB/s (fetchers: median of {repeat}; {load()})")
    srv.set_rate(int(cap_mbps * 1e6))
    c_curl = b.curl("capped.bin")
    ours: list[float] = []
    old: list[float] = []
    for _ in range(repeat):
        b.ours("capped.bin")
        ours.append(LAST_PHASE_S[0])
        if before:
            b.ours("capped.bin", code=before[1])
            old.append(LAST_PHASE_S[0])
    c_aria = b.aria("capped.bin")
    print(f"curl (1 stream)          {mbps(capped, c_curl)}   [baseline]")
    print(
        f"this fetcher (+sha256)   {mbps(capped, median(ours))}{ratio(c_curl, median(ours))}  (weights phase)"
    )
    if before:
        print(f"this fetcher @ {before[0]:<9} {mbps(capped, median(old))}{ratio(c_curl, median(old))}")
    print(f"aria2c -x 8              {mbps(capped, c_aria)}{ratio(c_curl, c_aria)}")
    srv.set_rate(None)


def rss_run(b: Bench, root: Path, rss_gb: float) -> None:
    print(f"\n## 3. peak RSS for a {rss_gb:g} GB file (sparse)")
    rss_size = int(rss_gb * 1e9)
    make_file(root / "huge.bin", rss_size, sparse=True)
    t_huge, rss_huge = b.ours("huge.bin")
    print(f"this fetcher             {mbps(rss_size, t_huge)}  peak RSS {rss_huge / 1e6:.0f} MB")
    (root / "huge.bin").unlink()


def eight(b: Bench, size: int) -> None:
    srv = b.srv
    print("\n## 4. eight processes fetch one file onto one volume at once")
    vol = b.fresh("eight")
    srv.reset_log()
    argv = [PY, __file__, "--child-fetch", f"{srv.url}/big.bin", str(vol), "raw"]
    t_one, _ = timed(argv, child_env())
    one_bytes = srv.bytes_sent("big.bin")
    shutil.rmtree(vol, ignore_errors=True)
    vol = b.fresh("eight")
    argv = [PY, __file__, "--child-fetch", f"{srv.url}/big.bin", str(vol), "raw"]
    srv.reset_log()
    t_eight = timed_many([argv] * 8, child_env())
    sent = srv.bytes_sent("big.bin")
    shutil.rmtree(vol, ignore_errors=True)
    print(f"one process              {mbps(size, t_one)}  server sent {one_bytes / size:.2f}× the file")
    print(
        f"eight processes          {t_eight:7.2f} s ({t_eight / t_one:.2f}× one)  server sent {sent / size:.2f}× the file"
    )
    srv.reset_log()
    t_hub8 = b.hub(8)
    hub_sent = srv.bytes_sent("bench/repo/file.bin")
    print(
        f"huggingface_hub × 8      {t_hub8:7.2f} s  server sent {hub_sent / size:.2f}× the file (shared local_dir)"
    )


if __name__ == "__main__":
    sys.exit(main())
