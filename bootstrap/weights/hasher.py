"""sha256 of a download's contiguous written prefix, fed as it grows (`bootstrap.weights.transfer`).

The download thread whose bytes extend the hashed prefix lends its buffer right after writing
it and goes on with a spare from a small pool, so in the common case each byte is hashed
straight from the buffer it arrived in, on another core; bytes that landed out of order are
read back from the file when the prefix reaches them.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bootstrap.weights.transfer import Transfer

#: the download threads' buffer size (a lent buffer must be one of theirs)
CHUNK = 1024 * 1024


class Hasher:
    """sha256 of the data file's contiguous written prefix, fed as the prefix grows.

    ``tail``: every byte before it is hashed or queued, in order. A download thread that has
    just written the bytes at ``tail`` lends their buffer (`lend_locked`): the hasher hashes
    them from memory and puts the buffer in the spare pool. Bytes nobody lent (written out of
    order, or no spare was free) are read back with ``preadv`` once the prefix covers them.
    Memory stays flat: the pool and the queue hold ``SPARES`` buffers between them; the thread
    at ``tail`` that finds the pool empty waits for one (the hasher is behind: there is no point
    in running ahead of it); others keep their buffer, and those bytes are read back later.
    """

    SPARES = 4
    WAIT_S = 1.0

    def __init__(self, fd: int, transfer: Transfer) -> None:
        self.fd = fd
        self.transfer = transfer
        self.h = hashlib.sha256()
        self.pos = 0  # bytes hashed
        self.tail = 0  # bytes hashed or queued (guarded by transfer.lock)
        self.lent: collections.deque[tuple[int, memoryview, int]] = collections.deque()
        self.spares = [memoryview(bytearray(CHUNK)) for _ in range(self.SPARES)]
        self.wake = threading.Event()
        self.cancelled = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self.failed: BaseException | None = None
        #: bytes hashed from lent buffers and read back from the file (for benchmarks)
        self.from_memory = 0
        self.read_back = 0
        #: times the thread at ``tail`` found no spare (the hash was the slower side)
        self.waits = 0
        self.busy_s = 0.0  # seconds spent inside sha256 (its speed on this CPU, measured live)

    def speed(self) -> float:
        """Bytes a second sha256 has taken so far when busy (inf before it has measured)."""
        return self.pos / self.busy_s if self.busy_s > 0.01 else float("inf")

    def lend_locked(self, at: int, buf: memoryview, n: int) -> memoryview | None:
        """Take ``buf[:n]`` (the bytes just written at ``at``, not yet counted in their piece)
        if they extend the queue, waiting up to ``WAIT_S`` for a spare; returns the spare the
        caller goes on with, or None (keep ``buf``; the bytes are read back later). Called with
        ``transfer.lock`` held."""
        if self.closed or at != self.tail or len(buf) != CHUNK:
            return None
        if not self.spares:
            self.waits += 1
            stop = self.transfer.stop
            self.transfer.lock.wait_for(lambda: self.spares or self.closed or stop.is_set(), self.WAIT_S)
            if not self.spares or self.closed:
                return None
        self.tail = at + n
        self.lent.append((at, buf, n))
        self.wake.set()
        return self.spares.pop()

    def _next(self) -> tuple[int, memoryview | None, int] | None:
        """The next bytes to hash: a lent buffer, a range to read back, or None (wait)."""
        t = self.transfer
        with t.lock:
            if self.lent:
                return self.lent.popleft()
            frontier = t.frontier_locked()
            if frontier > self.tail:
                start, self.tail = self.tail, frontier
                return start, None, frontier - start
            self.wake.clear()
        return None

    def _run(self) -> None:
        size = self.transfer.size
        assert size is not None
        view = memoryview(bytearray(4 * CHUNK))  # the read-back buffer, reused
        try:
            while self.pos < size and not self.cancelled.is_set():
                item = self._next()
                if item is None:
                    if self.transfer.stop.is_set() and self.transfer.error is not None:
                        return
                    self.wake.wait(0.05)
                    continue
                at, buf, n = item
                assert at == self.pos, (at, self.pos)
                if buf is not None:
                    t0 = time.perf_counter()
                    self.h.update(buf[:n])
                    self.busy_s += time.perf_counter() - t0
                    self.pos += n
                    self.from_memory += n
                    with self.transfer.lock:
                        self.spares.append(buf)
                        self.transfer.lock.notify_all()
                    continue
                end = at + n
                while self.pos < end and not self.cancelled.is_set():
                    got = os.preadv(self.fd, [view[: min(len(view), end - self.pos)]], self.pos)
                    if not got:
                        raise OSError(f"short read at {self.pos}")
                    t0 = time.perf_counter()
                    self.h.update(view[:got])
                    self.busy_s += time.perf_counter() - t0
                    self.pos += got
                    self.read_back += got
        except BaseException as err:
            self.failed = err
        finally:
            with self.transfer.lock:
                self.closed = True  # lend nothing more; queued buffers are simply dropped
                self.transfer.lock.notify_all()

    def cancel(self) -> None:
        self.cancelled.set()
        self.wake.set()
        self.thread.join()

    def finish(self) -> str:
        self.thread.join()
        if self.failed is not None:
            raise self.failed
        return self.h.hexdigest()
