"""One file's bytes from a `Source` into a part directory: parallel, resumable, hashed on the fly.

A download lives in ``<dir of dest>/.<name>.<token>.part/`` holding ``data`` (written with
``pwrite`` at each byte's offset, so memory stays bounded whatever the size) and ``journal``.
The journal's first line is a JSON header naming what is being fetched (size, sha256, etag,
source); each further line ``START END`` records a byte range that is written **and fsynced**
(SPEC §5). A killed download is adopted by renaming its part directory (one atomic claim, so
two adopters can never share one) and resumes from the ranges its journal records; the
whole-file sha256 at the end catches anything wrong.

Internal logic:

1. Work = the ranges the journal does not cover, cut into pieces of ``piece_bytes``.
2. Threads each keep one connection and take pieces from a queue; a piece's progress survives
   a retry (the next request starts where the body broke). It starts with one connection and
   adds more while they raise the throughput (a CDN caps each connection) and sha256 keeps up,
   up to ``connections`` (`FetchOptions`). A connection left alone once that ramp is over asks
   for all the remaining contiguous pieces with one request.
3. A server that ignores Range (200 with the whole body) switches to one sequential stream.
4. Every ``sync_every_s`` the coordinator fsyncs ``data``, then appends the newly completed
   ranges to the journal and fsyncs it — data first, so the journal never claims unsynced bytes.
5. A hasher thread (`bootstrap.weights.hasher`) feeds sha256 with the contiguous written
   prefix as it grows, mostly straight from the buffers the bytes arrived in, so the hash is
   ready when the last byte lands.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.atomic import write_atomic
from bootstrap.lease import stale_after_s, writer_is_dead
from bootstrap.weights.hasher import CHUNK, Hasher
from bootstrap.weights.protocol import Connection, Probe, Source, SourceFailed, Transient
from bootstrap.weights.sources import AddressPolicy

#: a body of unknown size checks free space each time it grows by this much
UNKNOWN_SPACE_EVERY = 4 * CHUNK
JOURNAL_VERSION = 1
#: connections stop being added once the bytes arrive at this share of sha256's own speed
HASH_BOUND = 0.75


@dataclass(frozen=True)
class FetchOptions:
    """Knobs of the fetcher; the defaults are what `bootstrap run` uses."""

    #: most connections for one file. One connection runs alone for ``probe_s``; if its bytes
    #: already arrive at `HASH_BOUND` of sha256's measured speed (or the hasher made it wait),
    #: more would only race ahead of the hash, so it stays alone. Otherwise it opens
    #: ``initial_connections`` and doubles them every ``ramp_every_s`` while that raises the
    #: throughput (a CDN caps each connection) and the hash keeps up.
    connections: int = 16
    probe_s: float = 0.1
    initial_connections: int = 4
    ramp_every_s: float = 0.2
    piece_bytes: int = 8 * 1024 * 1024
    files_at_once: int = 3
    timeout_s: float = 30.0
    #: transient failures tolerated per request before the source is given up
    retries: int = 6
    max_retry_after_s: float = 60.0
    backoff_s: float = 0.5
    sync_every_s: float = 1.0
    progress_every_s: float = 5.0
    #: most bytes taken from a source that announces no size (free space is checked as it grows)
    max_unknown_bytes: int = 64 * 10**9
    #: how hosts are resolved and judged (every redirect hop is checked too)
    addresses: AddressPolicy = field(default_factory=AddressPolicy)

    def retry_delay(self, err: Transient, failures: int, label: str) -> float:
        """The wait before try ``failures + 1`` (the server's Retry-After, else exponential
        backoff up to 10 s), or `SourceFailed` once the retries are spent."""
        if failures > self.retries:
            raise SourceFailed(f"gave up after {failures} failures: {err}") from None
        if err.retry_after is not None:
            return float(min(err.retry_after, self.max_retry_after_s))
        return min(self.backoff_s * 2.0 ** (failures - 1), 10.0)


class Aborted(Exception):
    """Stopped from outside (another required file failed); the journal keeps what was synced."""


# -- the journal -------------------------------------------------------------------------------


def identity(probe: Probe, size: int, sha256: str | None, label: str) -> dict[str, Any]:
    """What a journal header records so a later adopter can tell it fetches the same bytes."""
    return {"v": JOURNAL_VERSION, "size": size, "sha256": sha256, "etag": probe.etag, "source": label}


def same_target(header: dict[str, Any], ident: dict[str, Any]) -> bool:
    """Is a journal (``header``) for the same bytes as ``ident``? A known sha256 settles it."""
    if header.get("v") != JOURNAL_VERSION or header.get("size") != ident["size"]:
        return False
    if header.get("sha256") and ident.get("sha256"):
        return bool(header["sha256"] == ident["sha256"])
    return bool(header.get("source") == ident["source"] and header.get("etag") == ident["etag"])


def read_journal(path: Path) -> tuple[dict[str, Any] | None, list[tuple[int, int]]]:
    """(header, ranges) from a journal; a torn last line (a kill mid-append) is ignored."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None, []
    lines = text.split("\n")
    if len(lines) < 2:
        return None, []
    try:
        header = json.loads(lines[0])
    except ValueError:
        return None, []
    ranges = []
    for line in lines[1:-1]:  # the last element is after the final newline: torn or empty
        a, _, b = line.partition(" ")
        if a.isdigit() and b.isdigit() and int(a) < int(b):
            ranges.append((int(a), int(b)))
    return (header if isinstance(header, dict) else None), merge(ranges)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def covered_bytes(ranges: list[tuple[int, int]], size: int) -> int:
    return sum(min(b, size) - a for a, b in ranges if a < size)


def write_journal(path: Path, header: dict[str, Any], ranges: list[tuple[int, int]]) -> None:
    """Rewrite a journal whole (temp + fsync + rename): used when a download is adopted."""
    write_atomic(path, json.dumps(header) + "\n" + "".join(f"{a} {b}\n" for a, b in ranges))


# -- the transfer ------------------------------------------------------------------------------


@dataclass
class _Piece:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes written from start
    synced: int = 0  # bytes of it already in the journal


@dataclass
class TransferResult:
    size: int
    sha256: str
    #: bytes received over the network in this run (resumed bytes excluded)
    received: int
    resumed: int
    seconds: float
    ranges_ignored: bool = False
    errors: list[str] = field(default_factory=list)


class Transfer:
    """Fetch ``size`` bytes of ``source`` into ``data`` with the journal beside it."""

    def __init__(
        self,
        source: Source,
        data: Path,
        journal: Path,
        size: int | None,
        done_ranges: list[tuple[int, int]],
        options: FetchOptions,
        *,
        on_bytes: Callable[[int], None] = lambda n: None,
        abort: threading.Event | None = None,
        space_check: Callable[[], object] = lambda: None,
    ) -> None:
        self.source = source
        self.data = data
        self.journal = journal
        self.size = size
        self.options = options
        self.on_bytes = on_bytes
        self.abort = abort or threading.Event()
        self.space_check = space_check
        self.stop = threading.Event()
        self.lock = threading.Condition()
        self.error: BaseException | None = None
        self.errors: list[str] = []
        self.received = 0
        self.ranges_ignored = False
        #: one connection left for good: it asks for all its contiguous pieces at once
        self.sole = False
        self.done_ranges = merge(done_ranges) if size is not None else []
        self.pieces: list[_Piece] = []
        if size is not None:
            cursor = 0
            for a, b in [*self.done_ranges, (size, size)]:
                self._cut(cursor, min(a, size))
                cursor = max(cursor, b)
        self.resumed = covered_bytes(self.done_ranges, size) if size is not None else 0

    def _cut(self, start: int, end: int) -> None:
        p = self.options.piece_bytes
        while start < end:
            self.pieces.append(_Piece(start, min(end, start + p)))
            start += p

    # -- coordinator ------------------------------------------------------------------------
    def run(self) -> TransferResult:
        """Fetch every missing byte; raise `SourceFailed`, `Aborted` or a disk `OSError`."""
        t0 = time.monotonic()
        fd = os.open(self.data, os.O_RDWR | os.O_CREAT, 0o644)
        jf = open(self.journal, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        self.fd = fd
        try:
            sha = self._stream_unknown_size(fd) if self.size is None else self._parallel(fd, jf)
            os.fsync(fd)
        finally:
            os.close(fd)
            jf.close()
        size = self.data.stat().st_size
        return TransferResult(
            size, sha, self.received, self.resumed, time.monotonic() - t0, self.ranges_ignored, self.errors
        )

    def _parallel(self, fd: int, jf: Any) -> str:
        assert self.size is not None
        if os.fstat(fd).st_size > self.size:
            os.ftruncate(fd, self.size)
        work = _Work(self.pieces)
        hasher = self.hasher = Hasher(fd, self)
        limit = max(1, min(self.options.connections, len(self.pieces)))
        self.sole = limit == 1
        threads: list[threading.Thread] = []

        def add_threads(n: int) -> None:
            for _ in range(min(n, limit - len(threads))):
                t = threading.Thread(
                    target=self._worker, args=(work,), name=f"fetch-{len(threads)}", daemon=True
                )
                threads.append(t)
                t.start()

        hasher.thread.start()
        add_threads(1)
        last_sync = last_ramp = time.monotonic()
        ramp_bytes, ramp_rate, ramping, waits = 0, 0.0, True, 0
        window = self.options.probe_s
        try:
            while any(t.is_alive() for t in threads):
                if self.abort.is_set():
                    self.stop.set()
                self.stop.wait(0.05)
                now = time.monotonic()
                if now - last_sync >= self.options.sync_every_s:
                    self._sync(fd, jf)
                    last_sync = now
                if ramping and now - last_ramp >= window:
                    # Add connections while they add throughput (a per-connection rate cap, as
                    # CDNs have); stop once they do not (a saturated link or CPU), or once the
                    # thread at the hash's position had to wait for the hasher (the hash is the
                    # slower side: more connections would only land bytes out of order, to be
                    # read back).
                    rate = (self.received - ramp_bytes) / (now - last_ramp)
                    ramp_bytes, last_ramp, window = self.received, now, self.options.ramp_every_s
                    hash_bound = hasher.waits > waits or rate >= HASH_BOUND * hasher.speed()
                    waits = hasher.waits
                    if len(threads) >= limit or work.empty() or rate < ramp_rate * 1.15 or hash_bound:
                        ramping = False
                        # Alone for good: one request for the rest, not one per piece (each
                        # new request leaves the stream idle for a round trip).
                        self.sole = len(threads) == 1
                    else:
                        ramp_rate = rate
                        add_threads(max(len(threads), self.options.initial_connections - len(threads)))
        finally:
            if self.error is not None:
                self.stop.set()
            for t in threads:
                t.join()
            self._sync(fd, jf)
        if self.error is not None:
            hasher.cancel()
            raise self.error
        if self.abort.is_set() and any(p.done < p.end - p.start for p in self.pieces):
            hasher.cancel()
            raise Aborted("stopped: another required file failed")
        return hasher.finish()

    def frontier_locked(self) -> int:
        """End of the contiguous written prefix (what the hasher may read); hold ``lock``."""
        assert self.size is not None
        for p in self.pieces:
            if p.done < p.end - p.start:
                return p.start + p.done
        return self.size

    def _sync(self, fd: int, jf: Any) -> None:
        """Data first, then the journal: the journal never claims bytes not on disk."""
        with self.lock:
            snapshot = [(p, p.done) for p in self.pieces if p.done > p.synced]
        if not snapshot:
            # Keep the journal fresh while stalled (a retry's wait), so no one takes it as dead.
            with contextlib.suppress(OSError):
                os.utime(self.journal)
            return
        os.fsync(fd)
        for p, done in snapshot:
            jf.write(f"{p.start + p.synced} {p.start + done}\n")
        jf.flush()
        os.fsync(jf.fileno())
        with self.lock:
            for p, done in snapshot:
                p.synced = max(p.synced, done)

    def _fail(self, err: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = err
            self.stop.set()
            self.lock.notify_all()  # a thread waiting for the hasher's spare buffer stops now

    # -- download threads -------------------------------------------------------------------
    def _worker(self, work: _Work) -> None:
        conn = self.source.connect()
        slot = _Slot(memoryview(bytearray(CHUNK)))
        try:
            while not self.stop.is_set():
                run = work.take(contiguous=self.sole)
                if not run:
                    return
                self._fetch_run(conn, run, slot)
        except BaseException as err:
            self._fail(err)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _fetch_run(self, conn: Connection, run: list[_Piece], slot: _Slot) -> None:
        """Fetch contiguous pieces with one request (re-asked from where it broke)."""
        failures = 0
        i = 0
        while i < len(run):
            piece = run[i]
            if piece.done >= piece.end - piece.start:
                i += 1
                continue
            if self.stop.is_set() or self.abort.is_set():
                return
            try:
                start = piece.start + piece.done
                body = conn.get(start, run[-1].end - 1)
                try:
                    if body.whole:
                        self._take_whole(body, slot.view)
                        return
                    while i < len(run):
                        self._read_into(body, run[i], slot)
                        if run[i].done < run[i].end - run[i].start:
                            return  # stopped
                        i += 1
                finally:
                    body.close()
            except Transient as err:
                failures += 1
                self.stop.wait(self._retry_delay(err, failures))
                with contextlib.suppress(Exception):
                    conn.close()

    def _retry_delay(self, err: Transient, failures: int) -> float:
        """Record a transient failure and return `FetchOptions.retry_delay`."""
        with self.lock:
            self.errors.append(str(err))
        return self.options.retry_delay(err, failures, self.source.label)

    def _read_into(self, body: Any, piece: _Piece, slot: _Slot) -> None:
        """Read the rest of ``piece`` from ``body`` into ``slot``'s buffer; a buffer lent to the
        hasher is replaced in the slot at once, so a retry after a broken body (an exception
        from here) can never write into bytes the hasher has not taken yet."""
        fd = self.fd
        hasher = self.hasher
        while piece.done < piece.end - piece.start:
            if self.stop.is_set() or self.abort.is_set():
                return
            buf = slot.view
            want = min(len(buf), piece.end - piece.start - piece.done)
            n = body.readinto(buf[:want])
            if n == 0:
                raise Transient(
                    f"the body ended at byte {piece.start + piece.done} of a range ending at {piece.end}"
                )
            at = piece.start + piece.done
            os.pwrite(fd, buf[:n], at)
            with self.lock:
                # Lent once written, and counted only after: until then the hasher cannot read
                # these bytes back, so the thread at the hash's position waits for a spare
                # buffer instead (the hasher is the slower side) and every byte is hashed
                # from memory; threads further ahead never wait.
                spare = hasher.lend_locked(at, buf, n)
                if spare is not None:
                    slot.view = spare
                piece.done += n
                self.received += n
            self.on_bytes(n)

    def _take_whole(self, body: Any, buf: memoryview) -> None:
        """The server ignored Range: take the whole body from byte 0, marking pieces as it goes."""
        with self.lock:
            if self.ranges_ignored:
                return  # another thread already streams the whole body and fills this piece
            self.ranges_ignored = True
            self.errors.append("the server ignored Range (200 instead of 206): one stream from byte 0")
        assert self.size is not None
        failures = 0
        conn: Connection | None = None
        try:
            while True:
                pos = 0
                try:
                    while pos < self.size:
                        if self.abort.is_set() or (self.stop.is_set() and self.error is not None):
                            return
                        n = body.readinto(buf[: min(len(buf), self.size - pos)])
                        if n == 0:
                            raise Transient(f"the body ended at byte {pos} of {self.size}")
                        os.pwrite(self.fd, buf[:n], pos)
                        pos += n
                        with self.lock:
                            self.received += n
                            for p in self.pieces:
                                if p.start < pos and p.done < p.end - p.start:
                                    p.done = max(p.done, min(pos, p.end) - p.start)
                        self.on_bytes(n)
                    return
                except Transient as err:
                    failures += 1
                    time.sleep(self._retry_delay(err, failures))
                    body.close()
                    if conn is not None:
                        conn.close()
                    conn = self.source.connect()
                    with contextlib.suppress(Transient):
                        body = conn.get(0, None)
                        continue
                    body = _Empty()
        finally:
            # The body this loop took last (a Connection: close response owns its socket, which
            # closing the connection alone would leave open until the garbage collector ran).
            body.close()
            if conn is not None:
                conn.close()

    def _stream_unknown_size(self, fd: int) -> str:
        """No size known: one stream to its end, no resume; hashed as it lands."""
        os.ftruncate(fd, 0)
        conn = self.source.connect()
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        body: Any = _Empty()
        try:
            body = conn.get(0, None)
            pos = 0
            while True:
                n = body.readinto(mv)
                if n == 0:
                    break
                if pos + n > self.options.max_unknown_bytes:
                    raise SourceFailed(
                        f"sent more than {self.options.max_unknown_bytes} bytes without announcing a size: "
                        "refused (give the size in the manifest)"
                    )
                if pos == 0 or pos // UNKNOWN_SPACE_EVERY != (pos + n) // UNKNOWN_SPACE_EVERY:
                    self.space_check()  # no size, so no check before: the reserve is kept while it grows
                os.pwrite(fd, mv[:n], pos)
                h.update(mv[:n])
                pos += n
                self.received += n
                self.on_bytes(n)
                if self.abort.is_set():
                    raise Aborted("stopped: another required file failed")
        except Transient as err:
            raise SourceFailed(f"{err} (size unknown, so no resume)") from None
        finally:
            # On every way out: a body read to its close owns the socket (Connection: close), and
            # a refusal (too big, disk full, aborted) must not leave it to the garbage collector.
            body.close()
            conn.close()
        return h.hexdigest()


@dataclass
class _Slot:
    """A download thread's buffer; replaced when the one it held is lent to the hasher."""

    view: memoryview


class _Work:
    """The pieces not yet taken, in file order."""

    def __init__(self, pieces: list[_Piece]) -> None:
        self.pieces = collections.deque(pieces)
        self.lock = threading.Lock()

    def empty(self) -> bool:
        return not self.pieces

    def take(self, *, contiguous: bool) -> list[_Piece]:
        """The next piece (none: all taken); with ``contiguous``, every following piece that
        continues it too (one request for them all)."""
        with self.lock:
            if not self.pieces:
                return []
            run = [self.pieces.popleft()]
            while contiguous and self.pieces and self.pieces[0].start == run[-1].end:
                run.append(self.pieces.popleft())
            return run


class _Empty:
    """A body that is already over (a retry's request failed): the next read retries again."""

    whole = True

    def readinto(self, buf: memoryview) -> int:
        return 0

    def close(self) -> None:
        pass


def owner_alive(header: dict[str, Any], ttl_s: float, mtime: float) -> bool:
    """Is the journal's writer perhaps still at it? `bootstrap.lease.writer_is_dead` judges."""
    return not writer_is_dead(header, mtime, stale_after_s(ttl_s))
