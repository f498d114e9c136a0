"""Fetching a job's URL against hostile servers on loopback (issue 12, Slowloris): the deadline
holds on the socket itself — trickled headers, a trickled chunk-size line and a slow TLS
handshake end at the deadline — and the response head is bounded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from worker import fetch as wfetch
from worker.errors import JobError

DEADLINE_S = 2.0
#: a trickle lasts far longer than the deadline: without the socket deadline a fetch takes this long
TRICKLE_S = 20.0


class RawServer:
    """A TCP server on 127.0.0.1 that runs ``behave(conn)`` for each connection, in a thread."""

    def __init__(self, behave: Callable[[socket.socket, threading.Event], None]) -> None:
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.behave = behave
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.behave(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


@contextlib.contextmanager
def serving(behave: Callable[[socket.socket, threading.Event], None]) -> Iterator[RawServer]:
    srv = RawServer(behave)
    try:
        yield srv
    finally:
        srv.close()


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


def _trickle(conn: socket.socket, stop: threading.Event, data: bytes, every: float = 0.5) -> None:
    end = time.monotonic() + TRICKLE_S
    for i in range(len(data)):
        if stop.is_set() or time.monotonic() > end:
            return
        conn.sendall(data[i : i + 1])
        time.sleep(every)


def _fetch(url: str, timeout_s: float = DEADLINE_S) -> tuple[JobError, float]:
    policy = wfetch.FetchPolicy(max_bytes=10_000_000, allow_private=True, timeout_s=timeout_s)
    t0 = time.monotonic()
    with pytest.raises(JobError) as info:
        wfetch.fetch_url(url, policy)
    return info.value, time.monotonic() - t0


def test_headers_trickled_a_byte_at_a_time_end_at_the_deadline() -> None:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        _trickle(conn, stop, b"X-Slow: " + b"a" * 200)

    with serving(behave) as srv:
        err, took = _fetch(f"http://127.0.0.1:{srv.port}/x.png")
    assert err.code == "FETCH_FAILED"
    assert f"took longer than {DEADLINE_S:g} s" in err.message
    # Protocol bound: the deadline plus one trickle interval and scheduling slack, not the trickle.
    assert took < DEADLINE_S + 1.5, took


def test_a_trickled_status_line_ends_at_the_deadline() -> None:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        _read_request(conn)
        _trickle(conn, stop, b"HTTP/1.1 200 OK" + b" " * 100)

    with serving(behave) as srv:
        err, took = _fetch(f"http://127.0.0.1:{srv.port}/x.png")
    assert err.code == "FETCH_FAILED" and "took longer than" in err.message
    assert took < DEADLINE_S + 1.5, took


def test_a_trickled_chunk_size_line_ends_at_the_deadline() -> None:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(b"4\r\nabcd\r\n")  # one good chunk, then a size line that never ends
        _trickle(conn, stop, b"5;ext=" + b"x" * 200)

    with serving(behave) as srv:
        err, took = _fetch(f"http://127.0.0.1:{srv.port}/x.png")
    assert err.code == "FETCH_FAILED" and "took longer than" in err.message
    assert took < DEADLINE_S + 1.5, took


def test_a_slow_tls_handshake_ends_at_the_deadline() -> None:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        conn.recv(4096)  # the ClientHello
        # A TLS handshake record announcing 16 KiB, sent a byte at a time.
        _trickle(conn, stop, b"\x16\x03\x03\x40\x00" + b"\x02" * 200)

    with serving(behave) as srv:
        err, took = _fetch(f"https://127.0.0.1:{srv.port}/x.png")
    assert err.code == "FETCH_FAILED" and "took longer than" in err.message
    assert took < DEADLINE_S + 1.5, took


def test_the_deadline_covers_the_whole_fetch_not_each_read() -> None:
    """Bytes arriving every 0.3 s never let a single read time out; the fetch still ends."""

    def behave(conn: socket.socket, stop: threading.Event) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        _trickle(conn, stop, b"b" * 1000, every=0.3)

    with serving(behave) as srv:
        err, took = _fetch(f"http://127.0.0.1:{srv.port}/x.png")
    assert err.code == "FETCH_FAILED" and "took longer than" in err.message
    assert took < DEADLINE_S + 1.5, took


def test_a_response_head_over_64_kib_is_refused() -> None:
    """90 header lines of 2 KiB: under http.client's 100 lines, over the head's byte bound."""

    def behave(conn: socket.socket, stop: threading.Event) -> None:
        _read_request(conn)
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 2048) for i in range(90))
        conn.sendall(head + b"Content-Length: 2\r\n\r\nok")

    with serving(behave) as srv:
        err, took = _fetch(f"http://127.0.0.1:{srv.port}/x.png")
    assert err.code == "FETCH_FAILED"
    assert "headers exceed 64 KiB" in err.message
    assert took < DEADLINE_S


def test_an_ordinary_response_with_headers_and_chunks_is_read() -> None:
    body = bytes(range(256)) * 300

    def behave(conn: socket.socket, stop: threading.Event) -> None:
        _read_request(conn)
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H-%d: %s\r\n" % (i, b"v" * 500) for i in range(60))
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 7000]), body[i : i + 7000]) for i in range(0, len(body), 7000)
        )
        conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")

    with serving(behave) as srv:
        policy = wfetch.FetchPolicy(max_bytes=10_000_000, allow_private=True, timeout_s=DEADLINE_S)
        assert wfetch.fetch_url(f"http://127.0.0.1:{srv.port}/x.png", policy) == body
