"""On a real MooseFS mounted twice, as two hosts see RunPod's network volume (F12, F13, F14).

Workers are real ``bootstrap`` processes run on two simulated hosts (`tests.moosefs.Host`: own
hostname and pid namespace, the root network namespace, where the loopback weight server is).
Host A sees the volume through one mount, host B through the other. The env is the envkit
fixture project's (fast, no registry); the weights come from a `FaultServer` on loopback whose
request log counts every byte sent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap import volume as volmod
from tests import moosefs as mfs
from tests.envkit import check_env_works, env_end, env_environ, fixture_project, leftovers, published_envs
from tests.helpers import BOOTSTRAP, REPO, read_jsonl
from tests.httpserver import FaultServer

REASON = mfs.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

TTL = 5.0
CAP = "calc"  # the fixture project's capability; its files are what the manifest fetches
BIG = 48 * 1024 * 1024


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixture_project(tmp_path_factory.mktemp("fixture"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultServer, dict[str, bytes]]]:
    root = tmp_path_factory.mktemp("srv")
    rng = random.Random(11)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"m{i}.bin", rng.randbytes(40_000))
    files = {"big.bin": rng.randbytes(BIG), "small.bin": rng.randbytes(300_000), "pack.zip": buf.getvalue()}
    for name, data in files.items():
        (root / name).write_bytes(data)
    with FaultServer(root) as srv:
        yield srv, files


@pytest.fixture
def vol(moosefs: mfs.MooseFS) -> Iterator[dict[str, Path]]:
    """A fresh volume directory on the MooseFS, as each host's mount shows it."""
    name = f"vol-{uuid.uuid4().hex[:8]}"
    (moosefs.a / name).mkdir()
    yield {h: m / name for h, m in moosefs.mounts.items()}
    shutil.rmtree(moosefs.a / name, ignore_errors=True)


def _manifest(tmp_path: Path, url: str, names: list[str]) -> Path:
    text = ""
    for name in names:
        fmt = "zip" if name.endswith(".zip") else "raw"
        text += (
            f'[[file]]\ndest = "w/{name}"\nsource = "{url}/{name}"\nformat = "{fmt}"\ncapability = "{CAP}"\n'
        )
        if fmt == "zip":
            text += 'unpack = "w/pack"\n'
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def _environ(
    volume: Path, project: Path, worker: str, manifest: Path | None = None, **extra: str
) -> dict[str, str]:
    env = env_environ(
        volume,
        project,
        BOOTSTRAP_WORKER_ID=worker,
        BOOTSTRAP_EXTRAS=CAP,
        BOOTSTRAP_LEASE_TTL_S=str(TTL),
        BOOTSTRAP_MIN_FREE_GB="0",
        **extra,
    )
    if manifest is not None:
        env["BOOTSTRAP_MANIFEST"] = str(manifest)
    return env


def _boot(host: mfs.Host, until: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], Any]:
    out = open(log, "wb")  # noqa: SIM115 - closed by the caller via _finish
    proc = host.popen(
        [*BOOTSTRAP, "run", "--until", until], env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
    )
    return proc, out


def _finish(proc: subprocess.Popen[bytes], out: Any, log: Path, timeout: float = 300) -> str:
    proc.wait(timeout)
    out.close()
    return log.read_text(errors="replace")


def _events(volume: Path, worker: str) -> list[dict[str, Any]]:
    path = volume / ".bootstrap" / "logs" / worker / "boot.jsonl"
    return read_jsonl(path) if path.exists() else []


def _end(volume: Path, worker: str, phase: str) -> dict[str, Any]:
    ends = [
        e for e in _events(volume, worker) if e.get("phase") == phase and e.get("event") in ("end", "fail")
    ]
    assert ends, _events(volume, worker)[-5:]
    return ends[-1]


def _assert_intact(volume: Path, files: dict[str, bytes], names: list[str]) -> None:
    """Every published file whole and recorded; nothing half-published anywhere."""
    models = volume / ".bootstrap" / "models"
    for name in names:
        if name.endswith(".zip"):
            rec = json.loads((models / ".verified" / "w" / "pack.json").read_text())
            assert len(rec["files"]) == 3
            for item in rec["files"]:
                data = (models / "w" / "pack" / item["path"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == item["sha256"]
        else:
            assert (models / "w" / name).read_bytes() == files[name], name
            rec = json.loads((models / ".verified" / "w" / f"{name}.json").read_text())
            assert rec["sha256"] == hashlib.sha256(files[name]).hexdigest()
    half = [p for p in models.rglob("*") if p.name.endswith((".part", ".unpack", ".tmp", ".new"))]
    assert half == []


def _journal_covered(volume: Path) -> int:
    total = 0
    for journal in (volume / ".bootstrap" / "models" / "w").glob(".big.bin.*.part/journal"):
        with contextlib.suppress(OSError):
            for line in journal.read_text().splitlines()[1:]:
                a, _, b = line.partition(" ")
                if a.isdigit() and b.isdigit():
                    total += int(b) - int(a)
    return total


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


NAMES = ["big.bin", "small.bin", "pack.zip"]


def _eight(
    moosefs: mfs.MooseFS, vol: dict[str, Path], project: Path, man: Path, tmp_path: Path, **extra: str
) -> list[str]:
    """Eight workers, four per host, each booting env + weights; returns their worker ids."""
    started = []
    for i in range(8):
        host = mfs.HOSTS[i % 2]
        worker = f"{host[-1]}{i}"
        env = _environ(vol[host], project, worker, man, **extra)
        started.append((worker, *_boot(moosefs.host(host), "weights", env, tmp_path / f"{worker}.log")))
    for worker, proc, out in started:
        text = _finish(proc, out, tmp_path / f"{worker}.log")
        assert proc.returncode == 0, f"{worker}: {text[-3000:]}"
    return [w for w, _, _ in started]


@pytest.mark.slow
def test_eight_workers_on_two_hosts_build_once_and_fetch_each_file_once(
    moosefs: mfs.MooseFS,
    vol: dict[str, Path],
    project: Path,
    served: tuple[FaultServer, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    srv, files = served
    srv.reset_log()
    srv.set_rate(4_000_000)  # per connection: the download lasts long enough for all eight to meet it
    workers = _eight(moosefs, vol, project, _manifest(tmp_path, srv.url, NAMES), tmp_path)
    srv.set_rate(None)
    a, b = vol["host-a"], vol["host-b"]
    # one build: one worker built, seven reused, both hosts see one published env
    built = [w for w in workers if _end(a, w, "env")["detail"]["reused"] is False]
    assert len(built) == 1, built
    for view in (a, b):
        (final,) = published_envs(view)
        assert leftovers(view) == []
        check_env_works(final)
    # each file fetched once: by the server's own count of bytes sent, and by who says it fetched
    for name in NAMES:
        assert srv.bytes_sent(name) <= 1.05 * len(files[name]), (name, srv.bytes_sent(name))
    fetched: dict[str, int] = {}
    for w in workers:
        for dest in _end(a, w, "weights")["detail"]["fetched"]:
            fetched[dest] = fetched.get(dest, 0) + 1
    assert fetched == {"w/big.bin": 1, "w/small.bin": 1, "w/pack": 1}
    # nothing half-published, seen from either host; every lease released
    _assert_intact(a, files, NAMES)
    _assert_intact(b, files, NAMES)
    assert not list((b / ".bootstrap" / "leases").glob("*.lease"))
    # waiters on host B named a holder; leases carry the host they were taken on
    hosts_seen = {
        e["detail"].get("host")
        for w in workers
        for e in _events(a, w)
        if e.get("event") == "wait" and "host" in e.get("detail", {})
    }
    assert hosts_seen <= {"host-a", "host-b"} and hosts_seen, hosts_seen


@pytest.mark.slow
def test_eight_workers_on_two_hosts_without_locks_duplicate_work_only(
    moosefs: mfs.MooseFS,
    vol: dict[str, Path],
    project: Path,
    served: tuple[FaultServer, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    srv, files = served
    srv.reset_log()
    srv.set_rate(8_000_000)
    workers = _eight(
        moosefs, vol, project, _manifest(tmp_path, srv.url, NAMES), tmp_path, BOOTSTRAP_LOCKS="off"
    )
    srv.set_rate(None)
    a, b = vol["host-a"], vol["host-b"]
    keys = {_end(a, w, "env")["detail"]["key"] for w in workers}
    assert len(keys) == 1
    for view in (a, b):
        (final,) = published_envs(view)
        assert final.name in keys and leftovers(view) == []
        check_env_works(final)
        _assert_intact(view, files, NAMES)
    ready = json.loads((final / "READY").read_text())
    assert ready["builder"] in workers
    # duplicated work only: at most one copy per worker went over the wire, and no lease was taken
    for name in NAMES:
        assert len(files[name]) <= srv.bytes_sent(name) <= 8.4 * len(files[name]), name
    assert not list((b / ".bootstrap" / "leases").glob("*.lease"))


def _stop_when(proc: subprocess.Popen[bytes], pred: Any, timeout: float, what: str) -> None:
    """SIGSTOP the worker's whole process group as soon as ``pred()``: it holds its lease, frozen."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"{what}: the worker finished first"
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGSTOP)


def _kill(proc: subprocess.Popen[bytes]) -> float:
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.time()
    proc.wait(10)
    return killed


def _took_over(volume: Path, worker: str, lease_prefix: str) -> dict[str, Any]:
    got = [
        e
        for e in _events(volume, worker)
        if e.get("event") == "wait"
        and "took_over_from" in e.get("detail", {})
        and str(e["detail"].get("lease", "")).startswith(lease_prefix)
    ]
    assert len(got) == 1, _events(volume, worker)[-8:]
    return got[0]


@pytest.mark.slow
def test_builder_killed_on_host_a_is_taken_over_by_host_b(
    moosefs: mfs.MooseFS, vol: dict[str, Path], project: Path, tmp_path: Path
) -> None:
    a, b = vol["host-a"], vol["host-b"]
    host_a, host_b = moosefs.host("host-a"), moosefs.host("host-b")
    builder, out_a = _boot(host_a, "env", _environ(a, project, "builder"), tmp_path / "builder.log")
    envs = a / ".bootstrap" / "envs"
    # frozen mid-build: its temp env exists and its lease names it
    _stop_when(
        builder,
        lambda: envs.is_dir() and any(p.name.startswith(".tmp-") for p in envs.iterdir()),
        120,
        "build",
    )
    waiter, out_b = _boot(host_b, "env", _environ(b, project, "waiter"), tmp_path / "waiter.log")
    _wait_for(
        lambda: any(
            e.get("event") == "wait" and e["detail"].get("host") == "host-a" for e in _events(b, "waiter")
        ),
        60,
        "host B never waited for host A's lease",
    )
    killed = _kill(builder)
    out_a.close()
    text = _finish(waiter, out_b, tmp_path / "waiter.log")
    assert waiter.returncode == 0, text[-3000:]
    took = _took_over(b, "waiter", "env-")
    assert took["detail"]["took_over_from"].startswith("builder")
    assert took["ts"] - killed <= TTL + 5, (took["ts"] - killed, took)
    assert env_end(_jsonl_text(b, "waiter"))["reused"] is False  # it built the env itself
    (final,) = published_envs(a)
    check_env_works(final)
    assert json.loads((final / "READY").read_text())["builder"] == "waiter"
    # The dead builder's temp dir: host B cannot prove a builder on host A dead before its
    # heartbeat goes stale, so gc there keeps it; on host A its pid is provably dead.
    (leftover,) = leftovers(b)
    assert "host_a" in leftover.name
    gc_b = host_b.run([*BOOTSTRAP, "gc"], _environ(b, project, "gc-b"), cwd=REPO)
    assert gc_b.returncode == 0, gc_b.stderr[-2000:]
    assert leftovers(b) == [leftover]
    gc_a = host_a.run([*BOOTSTRAP, "gc"], _environ(a, project, "gc-a"), cwd=REPO)
    assert gc_a.returncode == 0, gc_a.stderr[-2000:]
    assert leftovers(a) == [] and leftovers(b) == []
    (final,) = published_envs(b)
    check_env_works(final)


def _jsonl_text(volume: Path, worker: str) -> str:
    return (volume / ".bootstrap" / "logs" / worker / "boot.jsonl").read_text()


@pytest.mark.slow
def test_downloader_killed_on_host_a_is_resumed_by_host_b(
    moosefs: mfs.MooseFS,
    vol: dict[str, Path],
    project: Path,
    served: tuple[FaultServer, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    srv, files = served
    a, b = vol["host-a"], vol["host-b"]
    host_a, host_b = moosefs.host("host-a"), moosefs.host("host-b")
    man = _manifest(tmp_path, srv.url, ["big.bin"])
    pre = host_a.run([*BOOTSTRAP, "run", "--until", "env"], _environ(a, project, "pre"), cwd=REPO)
    assert pre.returncode == 0, pre.stdout[-2000:]
    srv.reset_log()
    srv.set_rate(1_000_000)  # per connection: ~6 s for the file
    loader, out_a = _boot(host_a, "weights", _environ(a, project, "loader", man), tmp_path / "loader.log")
    _stop_when(loader, lambda: _journal_covered(a) >= 0.4 * BIG, 120, "download")
    waiter, out_b = _boot(host_b, "weights", _environ(b, project, "waiter", man), tmp_path / "waiter.log")
    _wait_for(
        lambda: any(
            e.get("event") == "wait" and e.get("phase") == "weights" and e["detail"].get("host") == "host-a"
            for e in _events(b, "waiter")
        ),
        60,
        "host B never waited for host A's download",
    )
    srv.set_rate(None)
    killed = _kill(loader)
    out_a.close()
    time.sleep(0.2)
    first = srv.bytes_sent("big.bin")
    text = _finish(waiter, out_b, tmp_path / "waiter.log")
    assert waiter.returncode == 0, text[-3000:]
    took = _took_over(b, "waiter", "file-")
    assert took["detail"]["took_over_from"].startswith("loader")
    assert took["ts"] - killed <= TTL + 5, (took["ts"] - killed, took)
    _assert_intact(b, files, ["big.bin"])
    # resumed, not restarted: B fetched only what A had not journaled
    end = _end(b, "waiter", "weights")
    assert end["event"] == "end" and end["detail"]["bytes_resumed"] >= 0.4 * BIG, end
    second = srv.bytes_sent("big.bin") - first
    assert second <= 0.65 * BIG, (first, second)
    assert first + second <= 1.25 * BIG, (first, second)


def test_leases_and_renames_are_atomic_across_mounts(moosefs: mfs.MooseFS, vol: dict[str, Path]) -> None:
    """What the protocol does rely on: ``link`` is exclusive and ``rename`` is seen whole from
    the other mount."""
    a, b = vol["host-a"], vol["host-b"]
    (a / "rec-a").write_text("a")
    (b / "rec-b").write_text("b")
    os.link(a / "rec-a", a / "the.lease")
    with pytest.raises(FileExistsError):
        os.link(b / "rec-b", b / "the.lease")
    assert (b / "the.lease").read_text() == "a"
    (a / "new").write_text("x" * 100_000)
    os.replace(a / "new", a / "the.lease")
    assert (b / "the.lease").read_text() == "x" * 100_000


FLOCK_PROBE = r"""
import fcntl, sys, time
f = open(sys.argv[1], "a+")
kind = sys.argv[2]
(fcntl.flock if kind == "flock" else fcntl.lockf)(f, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(3600)
"""


def _try_lock(path: Path, kind: str) -> bool:
    with open(path, "a+") as f:
        try:
            (fcntl.flock if kind == "flock" else fcntl.lockf)(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        (fcntl.flock if kind == "flock" else fcntl.lockf)(f, fcntl.LOCK_UN)
        return True


@pytest.mark.parametrize("kind", ["flock", "lockf"])
def test_what_locks_do_across_the_two_mounts(
    moosefs: mfs.MooseFS, vol: dict[str, Path], kind: str, record_property: Any
) -> None:
    """Measures, and records, what ``flock``/``lockf`` do between the two mounts (docs/moosefs.md).

    Nothing asserted here is about exclusion itself — correctness never depends on it (SPEC §5):
    only that a lock of a killed holder does not outlive it, which a lease must not rely on either
    but a user's own ``flock`` would.
    """
    a, b = vol["host-a"], vol["host-b"]
    (a / "lk").write_text("")
    holder = moosefs.host("host-a").popen(
        [sys.executable, "-c", FLOCK_PROBE, str(a / "lk"), kind],
        os.environ,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        excluded_other_mount = not _try_lock(b / "lk", kind)
        excluded_same_mount = not _try_lock(a / "lk", kind)
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
        t0 = time.monotonic()
        while not _try_lock(b / "lk", kind):
            assert time.monotonic() - t0 < 30, f"{kind}: a SIGKILLed holder's lock outlived it by 30 s"
            time.sleep(0.05)
        released_after_s = round(time.monotonic() - t0, 3)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    found = {
        "kind": kind,
        "excluded_other_mount": excluded_other_mount,
        "excluded_same_mount": excluded_same_mount,
        "released_after_kill_s": released_after_s,
    }
    record_property("locks", found)
    print(json.dumps(found))


def test_filesystem_names_moosefs(moosefs: mfs.MooseFS, vol: dict[str, Path], tmp_path: Path) -> None:
    fs = volmod.filesystem(vol["host-a"])
    assert fs.mount_point == moosefs.a
    assert fs.type == "fuse" and fs.source.startswith("mfs#")
    assert fs.name == "MooseFS"
    assert "MooseFS" in fs.describe() and str(moosefs.a) in fs.describe()
    local = volmod.filesystem(tmp_path)
    assert local.name != "MooseFS" and local.type not in ("", "fuse")
