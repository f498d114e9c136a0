"""A job's child processes (ffmpeg): each dies with the thread that started it and is killed and
reaped when the job ends, however it ends (see `worker.media` for why).

- ``PR_SET_PDEATHSIG`` = SIGKILL is set in the child before ``exec``: a worker SIGKILLed mid-job
  leaves no ffmpeg behind. The kernel ties it to the *thread* that started the child, which is
  the job's thread, alive for as long as the job.
- `Children.kill_all` (and `job_children`, which calls it on the way out) SIGKILLs and reaps every
  child still running and closes the pipes this side holds.
- A child's stderr is drained on a thread (a full pipe would stall it), keeping its last 16 KiB
  for the error message.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

PR_SET_PDEATHSIG = 1
STDERR_KEEP = 16384

_libc: Any = None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux/glibc: children then only die by `Children.kill_all`
    _libc = None


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn``: SIGKILL this child when the thread that started it dies."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


class _StderrTail:
    """Drains a child's stderr on a thread (a full pipe would stall it) keeping the last bytes."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._buf = bytearray()
        self._stream = stream
        self._thread = threading.Thread(target=self._drain, name="ffmpeg-stderr", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: os.read(self._stream.fileno(), 8192), b""):
                self._buf += chunk
                if len(self._buf) > 2 * STDERR_KEEP:
                    del self._buf[:-STDERR_KEEP]

    def text(self, timeout: float = 5.0) -> str:
        self._thread.join(timeout)
        return bytes(self._buf[-STDERR_KEEP:]).decode("utf-8", errors="replace")


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    what: str
    stderr: _StderrTail

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)


@dataclass
class Children:
    """The ffmpeg processes of one job; `kill_all` leaves none behind."""

    items: list[Child] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def spawn(
        self,
        args: Sequence[str],
        what: str,
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Child:
        with self._lock:
            proc = subprocess.Popen(
                list(args),
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=tuple(pass_fds),
                preexec_fn=_die_with_parent(os.getpid()),  # async-signal-safe enough: one prctl
                close_fds=True,
            )
            assert proc.stderr is not None
            child = Child(proc, what, _StderrTail(proc.stderr))
            self.items.append(child)
            return child

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.items if c.proc.poll() is None]

    def kill_all(self) -> None:
        """SIGKILL and reap every child still running; close the pipes this side holds."""
        with self._lock:
            for child in self.items:
                if child.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
            for child in self.items:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(10)
                child.stderr.text(timeout=5)  # the drain ends with the process
                for pipe in (child.proc.stdin, child.proc.stdout, child.proc.stderr):
                    if pipe is not None:
                        with contextlib.suppress(OSError):
                            pipe.close()


@contextlib.contextmanager
def job_children() -> Iterator[Children]:
    """Children of one job, every one killed and reaped when the block ends, however it ends."""
    children = Children()
    try:
        yield children
    finally:
        children.kill_all()
