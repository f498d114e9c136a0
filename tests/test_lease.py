"""The cross-host lease with real processes: SIGKILLed holders, racing takers, bounded waits (F14)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bootstrap import lease
from bootstrap.errors import LockTimeoutError
from tests.helpers import REPO

HOLDER = """
import json, socket, sys, time
from pathlib import Path
leases_dir, owner, host, ttl, hold, log = sys.argv[1:7]
if host != "-":
    socket.gethostname = lambda: host  # pretend to be another host: only the TTL can free it
from bootstrap import lease
l = lease.acquire(Path(leases_dir), "env-x", owner=owner, ttl_s=float(ttl), timeout_s=120, poll_s=0.05)
start = time.time()
print("held", flush=True)
time.sleep(float(hold))
end = time.time()
if log != "-":
    with open(log, "a") as f:
        f.write(json.dumps({"owner": owner, "start": start, "end": end, "lost": l.lost.is_set()}) + "\\n")
l.release()
"""


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []

    def event(self, phase: str, event: str, *, ms: float | None = None, detail: Any = None) -> Any:
        self.items.append((phase, event, dict(detail or {})))


def _holder(
    leases_dir: Path, owner: str, *, host: str = "-", ttl: float = 2.0, hold: float = 3600, log: str = "-"
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(leases_dir), owner, host, str(ttl), str(hold), log],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_held(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    proc.stdout.close()


def test_holder_on_another_host_killed_is_taken_over_within_ttl(tmp_path: Path) -> None:
    ttl = 2.0
    holder = _holder(tmp_path, "remote:1", host="other-host", ttl=ttl)
    _wait_held(holder)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    events = Events()
    t0 = time.monotonic()
    got = lease.acquire(
        tmp_path, "env-x", owner="me:2", ttl_s=ttl, timeout_s=30, timeline=events, poll_s=0.05
    )
    took = time.monotonic() - t0
    assert got is not None
    try:
        # judged on our own clock: unchanged for a TTL while we watched, then taken within a few s
        assert ttl * 0.9 <= took <= ttl + 3, took
        assert lease.read_lease(lease.lease_path(tmp_path, "env-x"))["owner"] == "me:2"
        took_over = [d for _p, e, d in events.items if e == "wait" and "took_over_from" in d]
        assert took_over and took_over[0]["took_over_from"] == "remote:1"
        assert any(
            d.get("owner") == "remote:1" and d.get("host") == "other-host" for _p, _e, d in events.items
        )
    finally:
        got.release()
    assert not lease.lease_path(tmp_path, "env-x").exists()


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    holder = _holder(tmp_path, "local:1", ttl=30.0)
    _wait_held(holder)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    got = lease.acquire(tmp_path, "env-x", owner="me:2", ttl_s=30.0, timeout_s=10)
    assert got is not None and time.monotonic() - t0 < 5
    got.release()


def test_live_holder_is_waited_for_then_exit_14(tmp_path: Path) -> None:
    holder = _holder(tmp_path, "busy:1", host="other-host", ttl=1.0)
    _wait_held(holder)
    try:
        events = Events()
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError) as err:
            lease.acquire(
                tmp_path, "env-x", owner="me:2", ttl_s=1.0, timeout_s=3.0, timeline=events, poll_s=0.05
            )
        assert 3.0 <= time.monotonic() - t0 < 8
        assert err.value.exit_code == 14
        assert "busy:1" in err.value.message and "other-host" in err.value.message
        waits = [d for _p, e, d in events.items if e == "wait"]
        assert waits and all(d["owner"] == "busy:1" and "waited_s" in d for d in waits)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_done_ends_the_wait_without_the_lease(tmp_path: Path) -> None:
    holder = _holder(tmp_path, "busy:1", host="other-host", ttl=30.0)
    _wait_held(holder)
    try:
        flag = tmp_path / "done"
        flag.touch()
        assert lease.acquire(tmp_path, "env-x", owner="me:2", ttl_s=30, timeout_s=5, done=flag.exists) is None
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_racing_takers_of_a_stale_lease_never_hold_it_together(tmp_path: Path) -> None:
    # A stale lease left by a host that is gone; six workers on "different hosts" race for it.
    path = lease.lease_path(tmp_path, "env-x")
    path.write_text(json.dumps({"owner": "gone:1", "host": "gone-host", "pid": 1, "token": "old"}))
    log = tmp_path / "holds.jsonl"
    procs = [
        _holder(tmp_path, f"racer{i}:1", host=f"host{i}", ttl=1.0, hold=1.0, log=str(log)) for i in range(6)
    ]
    for p in procs:
        _wait_held(p)
        p.wait(timeout=120)
        assert p.returncode == 0
    holds = sorted((json.loads(x) for x in log.read_text().splitlines()), key=lambda h: h["start"])
    assert len(holds) == 6
    for a, b in itertools.pairwise(holds):
        assert b["start"] >= a["end"], f"{a['owner']} and {b['owner']} held the lease together"
    assert not any(h["lost"] for h in holds)


def test_locks_off_returns_a_lease_that_excludes_nothing(tmp_path: Path) -> None:
    a = lease.acquire(tmp_path, "env-x", owner="a", ttl_s=5, timeout_s=1, enabled=False)
    b = lease.acquire(tmp_path, "env-x", owner="b", ttl_s=5, timeout_s=1, enabled=False)
    assert a is not None and b is not None
    assert not list(tmp_path.glob("*.lease"))
    a.release()
    b.release()


def test_heartbeat_renews_and_a_taken_lease_is_seen_as_lost(tmp_path: Path) -> None:
    got = lease.acquire(tmp_path, "env-x", owner="me", ttl_s=1.5, timeout_s=5)
    assert got is not None
    path = lease.lease_path(tmp_path, "env-x")
    first = lease.read_lease(path)
    time.sleep(1.2)
    assert lease.read_lease(path)["renewed"] > first["renewed"]
    # someone else takes it (as a taker would after we stalled): our heartbeat notices
    path.write_text(json.dumps({**first, "token": "theirs", "owner": "them"}))
    assert got.lost.wait(3)
    got.release()
    assert lease.read_lease(path)["owner"] == "them"  # release never removes another's lease


@pytest.mark.slow
def test_boot_waiting_on_a_live_builder_exits_14_after_the_lock_timeout(tmp_path: Path) -> None:
    from bootstrap import env as envmod
    from bootstrap.settings import Settings
    from tests.envkit import env_environ, fixture_project
    from tests.helpers import run_bootstrap

    project = fixture_project(tmp_path / "fx")
    volume = tmp_path / "vol"
    volume.mkdir()
    environ = env_environ(
        volume, project, BOOTSTRAP_LOCK_TIMEOUT_S="3", BOOTSTRAP_LEASE_TTL_S="2", BOOTSTRAP_WORKER_ID="late"
    )
    key = envmod.env_key(envmod.key_inputs(Settings.from_env(environ), ("calc",)))
    leases_dir = volume / ".bootstrap" / "leases"
    leases_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDER.replace('"env-x"', f'"env-{key}"'),
            str(leases_dir),
            "builder:7",
            "other-host",
            "2",
            "3600",
            "-",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_held(holder)
    try:
        proc = run_bootstrap(["run", "--until", "env"], environ, timeout=120)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 14, proc.stderr[-2000:]
    assert "builder:7" in proc.stderr and "other-host" in proc.stderr
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    waits = [e for e in events if e.get("phase") == "env" and e.get("event") == "wait"]
    assert waits and waits[0]["detail"]["owner"] == "builder:7"
    fail = [e for e in events if e.get("event") == "fail"]
    assert fail and fail[0]["detail"]["name"] == "LOCK"


def test_same_hostname_in_another_pid_namespace_waits_for_the_ttl(tmp_path: Path) -> None:
    # Two containers may share a hostname; their pids mean nothing to each other.
    import socket

    path = lease.lease_path(tmp_path, "env-x")
    record = {
        "owner": "twin:1",
        "host": socket.gethostname(),
        "pid": 999_999,
        "pidns": "another",
        "token": "t",
    }
    path.write_text(json.dumps(record))
    t0 = time.monotonic()
    got = lease.acquire(tmp_path, "env-x", owner="me", ttl_s=1.5, timeout_s=10, poll_s=0.05)
    assert got is not None
    assert time.monotonic() - t0 >= 1.4
    got.release()
