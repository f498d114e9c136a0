"""Cross-host leases on the shared volume (SPEC §5, FAILURES F12, F14).

``flock`` may not exclude across hosts on RunPod's network volume, so a lease is a plain file,
``leases/<name>.lease``, holding JSON: owner, host, pid, started, renewed and a random token.
Leases only keep workers from doing the same work twice; correctness never depends on them
(every artifact is published by one atomic rename), so a broken lease costs only duplicated work.

Internal logic:

1. Acquire: write our record to a unique temp file and ``link`` it to the lease path. ``link``
   fails with EEXIST when the lease exists, so exactly one creator wins (``O_EXCL`` where the
   filesystem has no hard links).
2. Hold: a heartbeat thread rewrites the record every TTL/3 (temp file + ``rename``), first
   checking that the file still carries our token; if it does not, the lease was taken over
   (we stalled past the TTL) and `Lease.lost` is set.
3. Wait: a waiter judges staleness on its own monotonic clock — the lease file has not changed
   for TTL seconds while it watched — so the hosts' clocks never have to agree. On the same
   host a dead holder pid is stale at once. The waiter writes a ``wait`` event every few seconds
   naming the owner and seconds waited, and gives up with exit 14 after the lock timeout.
4. Take over (rename-then-recheck): re-read the lease and check it is still the record judged
   stale, ``rename`` our record over it (the path never disappears, so no creator can slip in),
   wait a settle interval, and read it back: only the worker whose token is there holds it;
   every other racer goes back to waiting. Two takers can both rename only if both checked
   the same stale record; the later rename wins and the earlier taker sees that on recheck.
5. Release: check the token is still ours, then unlink.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bootstrap.atomic import write_temp
from bootstrap.errors import LockTimeoutError

WAIT_LOG_EVERY_S = 5.0


class EventSink(Protocol):
    def event(self, phase: str, event: str, *, ms: float | None = ..., detail: Any = ...) -> Any: ...


def lease_path(leases_dir: Path, name: str) -> Path:
    return leases_dir / f"{name}.lease"


def read_lease(path: Path) -> dict[str, Any] | None:
    """The record in a lease file, or None if absent or unreadable (being written)."""
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _observe(path: Path) -> tuple[int, int, int, bytes] | None:
    """What a waiter compares between polls: inode, mtime, size and the bytes."""
    try:
        st = os.stat(path)  # noqa: PTH116 - one stat, compared as a tuple
        content = path.read_bytes()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, content)


def _pid_namespace() -> str:
    """This process's pid namespace (containers on one host may share a hostname, not pids)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)  # noqa: PTH116 - a /proc handle, not a project path
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_record(**extra: Any) -> dict[str, Any]:
    """Who is writing: host, pid and pid namespace (plus ``extra``), the one owner record every
    lease, builder heartbeat, download journal and unpack directory carries."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(), **extra}


def stale_after_s(lease_ttl_s: float) -> float:
    """How long an unchanged leftover's writer is presumed alive: 4 heartbeat periods of a lease
    (a writer touches its record every TTL/3), at least a minute. The one staleness threshold."""
    return max(60.0, 4 * lease_ttl_s)


def writer_is_dead(
    record: Mapping[str, Any] | None, last_change: float, stale_s: float, now: float | None = None
) -> bool:
    """Is the writer of a leftover gone? The one judgement (leases, env temp dirs, download parts,
    unpack directories, gc and diagnose all ask it):

    - this very process is never dead;
    - a writer on this host (same pid namespace) is dead exactly when its pid is not running;
    - any other writer is dead once its record (or the leftover) went unchanged for ``stale_s``.
    """
    here = _pid_namespace()
    if (
        record
        and record.get("host") == socket.gethostname()
        and record.get("pid") == os.getpid()
        and record.get("pidns", here) == here
    ):
        return False
    if holder_dead_here(dict(record) if record else None):
        return True
    return (time.time() if now is None else now) - last_change > stale_s


def holder_dead_here(record: dict[str, Any] | None) -> bool:
    """True when ``record``'s holder is provably dead: same host, same pid namespace (a record
    without one is trusted on the host alone), and its pid is not running. Holders elsewhere
    are judged only by the lease file going unchanged for the TTL."""
    if not record or not isinstance(record.get("pid"), int):
        return False
    if record.get("host") != socket.gethostname():
        return False
    if record.get("pidns", _pid_namespace()) != _pid_namespace():
        return False
    return record["pid"] != os.getpid() and not _pid_alive(record["pid"])


def _write_temp(directory: Path, record: dict[str, Any]) -> Path:
    return write_temp(directory, json.dumps(record), stem=str(record["token"]))


@dataclass
class Lease:
    """A lease we hold. Use as a context manager or call `release`."""

    path: Path
    record: dict[str, Any]
    ttl_s: float
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return str(self.record["token"])

    def is_ours(self) -> bool:
        current = read_lease(self.path)
        return current is not None and current.get("token") == self.token

    def renew(self) -> bool:
        """Rewrite the record with a new ``renewed`` time; False (and `lost` set) if not ours."""
        if not self.is_ours():
            self.lost.set()
            return False
        self.record["renewed"] = time.time()
        tmp = _write_temp(self.path.parent, self.record)
        os.replace(tmp, self.path)
        return True

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        return
                except OSError:
                    continue  # a transient volume error: try again next beat

        self._thread = threading.Thread(target=beat, name=f"lease:{self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours.

        The check and the unlink are two steps: a taker slipping in between (possible only if we
        stalled past the TTL) loses its lease, which costs duplicated work, never correctness.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.is_ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _new_record(name: str, owner: str) -> dict[str, Any]:
    now = time.time()
    return owner_record(name=name, owner=owner, started=now, renewed=now, token=uuid.uuid4().hex)


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lease file exclusively with ``record`` in it; False if it exists."""
    tmp = _write_temp(path.parent, record)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links here: fall back to O_EXCL (a waiter may briefly read an empty file,
        # which it treats as "changing", never as stale).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _take_over(
    path: Path, record: dict[str, Any], stale: tuple[int, int, int, bytes], settle_s: float
) -> bool:
    """Replace the stale lease with ours, then recheck after ``settle_s`` (see module doc, step 4)."""
    if _observe(path) != stale:
        return False  # it changed (renewed or taken) since we judged it stale
    tmp = _write_temp(path.parent, record)
    try:
        os.replace(tmp, path)
    except FileNotFoundError:
        return False
    time.sleep(settle_s)
    current = read_lease(path)
    return current is not None and current.get("token") == record["token"]


def acquire(
    leases_dir: Path,
    name: str,
    *,
    owner: str,
    ttl_s: float,
    timeout_s: float,
    timeline: EventSink | None = None,
    phase: str = "env",
    done: Callable[[], bool] = lambda: False,
    enabled: bool = True,
    poll_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
) -> Lease | None:
    """Take the lease ``name``, waiting for its holder; None once ``done()`` says the work is done.

    With ``enabled=False`` (``BOOTSTRAP_LOCKS=off``) returns a lease that excludes nothing, so
    callers run the same code path with every worker doing the work.
    """
    leases_dir.mkdir(parents=True, exist_ok=True)
    path = lease_path(leases_dir, name)
    record = _new_record(name, owner)
    if not enabled:
        return Lease(path=leases_dir / f".unlocked-{record['token']}", record=record, ttl_s=ttl_s)
    settle_s = min(1.0, max(0.05, ttl_s / 20))
    t0 = clock()
    last_log = t0 - WAIT_LOG_EVERY_S  # log the first wait at once
    observed: tuple[int, int, int, bytes] | None = None
    unchanged_since = t0
    while True:
        if _try_create(path, record):
            lease = Lease(path=path, record=record, ttl_s=ttl_s)
            lease.start_heartbeat()
            return lease
        if done():
            return None
        now = clock()
        current = _observe(path)
        if current != observed:
            observed, unchanged_since = current, now
        holder = read_lease(path) or {}
        # A dead pid proves a dead holder only in our own pid namespace on our own host.
        dead_here = holder_dead_here(holder)
        if current is not None and (dead_here or now - unchanged_since >= ttl_s):
            if _take_over(path, record, current, settle_s):
                lease = Lease(path=path, record=record, ttl_s=ttl_s)
                lease.start_heartbeat()
                if timeline is not None:
                    timeline.event(
                        phase,
                        "wait",
                        detail={
                            "lease": name,
                            "took_over_from": holder.get("owner"),
                            "waited_s": round(now - t0, 1),
                            "stale_s": round(now - unchanged_since, 1),
                        },
                    )
                return lease
            observed, unchanged_since = None, clock()
            continue
        if now - t0 >= timeout_s:
            raise LockTimeoutError(
                f"waited {now - t0:.0f} s for lease {name!r} held by {holder.get('owner', 'unknown')} "
                f"on host {holder.get('host', 'unknown')} (last change {now - unchanged_since:.0f} s ago)",
            )
        if timeline is not None and now - last_log >= WAIT_LOG_EVERY_S:
            last_log = now
            timeline.event(
                phase,
                "wait",
                detail={
                    "lease": name,
                    "owner": holder.get("owner"),
                    "host": holder.get("host"),
                    "waited_s": round(now - t0, 1),
                    "since": holder.get("started"),
                },
            )
        time.sleep(poll_s)


@contextlib.contextmanager
def held(leases_dir: Path, name: str, **kwargs: Any) -> Iterator[Lease | None]:
    """`acquire` as a context manager that releases on exit."""
    lease = acquire(leases_dir, name, **kwargs)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()


def list_leases(leases_dir: Path) -> list[tuple[Path, dict[str, Any] | None, float]]:
    """(path, record, seconds since the file last changed) for every lease file, for diagnose and gc."""
    out = []
    now = time.time()
    for path in sorted(leases_dir.glob("*.lease")) if leases_dir.is_dir() else []:
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        out.append((path, read_lease(path), age))
    return out
