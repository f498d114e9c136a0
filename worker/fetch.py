"""A job's inputs, fetched: a URL with every address checked and one deadline, or base64 (SPEC §10).

Every problem with the job's own input is a `JobError` with a stable code. Nothing here trusts
the input:

- URLs: http(s) only; the host is resolved once and *every* address must be public unless
  ``WORKER_ALLOW_PRIVATE_URLS=1`` (loopback, private, link-local — the cloud metadata
  address —, CGNAT, multicast, reserved, IPv4-mapped forms of them); the connection goes to
  the address that was checked (no second lookup an attacker's DNS could answer differently);
  redirects are followed by hand and each hop is checked again (FAILURES F19).
- Limits: a deadline for the whole fetch, held on the sockets themselves (connect, TLS
  handshake, every read and write get the time left; the response head is at most 64 KiB), the
  byte limit (``WORKER_MAX_INPUT_MB``) checked on ``Content-Length`` and again while reading,
  and on base64 before decoding it.
"""

from __future__ import annotations

import binascii
import concurrent.futures
import http.client
import io
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from bootstrap.urls import is_public_address
from worker.errors import JobError

MAX_REDIRECTS = 5
FETCH_TIMEOUT_S = 30.0
USER_AGENT = "volume-worker/0.1 (+faceswap)"

Resolver = Callable[[str, int], list[str]]


def _default_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _shown(url: str) -> str:
    """A URL for messages: without user:password and cut to a sane length."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown if len(shown) <= 200 else shown[:200] + "…"


@dataclass(frozen=True)
class FetchPolicy:
    """How a URL may be fetched. ``resolve`` and ``is_public`` are injectable for tests."""

    max_bytes: int
    allow_private: bool = False
    timeout_s: float = FETCH_TIMEOUT_S
    max_redirects: int = MAX_REDIRECTS
    resolve: Resolver = _default_resolve
    is_public: Callable[[str], bool] = is_public_address


# getaddrinfo cannot be interrupted; it runs here so a slow resolver costs a job its deadline,
# not its thread (the lookup finishes in the background and is dropped).
_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


def _checked_addresses(host: str, port: int, policy: FetchPolicy, url: str, deadline: float) -> list[str]:
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        future = _RESOLVERS.submit(policy.resolve, host, port)
        addrs = future.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        raise JobError(
            "FETCH_FAILED", f"resolving the host of {_shown(url)} took longer than {policy.timeout_s:g} s"
        ) from None
    except (OSError, UnicodeError) as err:
        raise JobError("FETCH_FAILED", f"cannot resolve the host of {_shown(url)}: {err}") from None
    if not addrs:
        raise JobError("FETCH_FAILED", f"the host of {_shown(url)} has no address")
    if not policy.allow_private:
        for addr in addrs:
            try:
                public = policy.is_public(addr)
            except ValueError:
                public = False
            if not public:
                raise JobError(
                    "URL_NOT_ALLOWED",
                    f"{_shown(url)} resolves to {addr}, a loopback, private, link-local or reserved address",
                )
    return addrs


def _check_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path-with-query) of an http(s) URL, or a JobError."""
    if len(url) > 8192:
        raise JobError("INVALID_INPUT", "the URL is longer than 8192 characters")
    if any(c in url for c in "\r\n\t\x00 "):
        raise JobError("INVALID_INPUT", "the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise JobError("INVALID_INPUT", f"malformed URL: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise JobError(
            "URL_NOT_ALLOWED",
            f"only http and https URLs may be fetched, not {scheme or 'a URL without scheme'!r}",
        )
    host = parts.hostname
    if not host:
        raise JobError("INVALID_INPUT", f"the URL {_shown(url)} has no host")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


class FetchTimeout(TimeoutError):
    """The fetch's deadline passed (raised by its sockets before a call that could not finish)."""


class HeadTooLarge(http.client.HTTPException):
    """The response's status line and headers exceed `MAX_HEAD_BYTES`."""


#: The most bytes a response's status line and headers may hold (http.client alone would take
#: 100 header lines of 64 KiB each).
MAX_HEAD_BYTES = 64 * 1024


class _Deadline:
    """One fetch's deadline, shared by every socket call it makes, and its head-size budget."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.in_head = False
        self.head_bytes = 0

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise FetchTimeout("the fetch's deadline passed")
        return left

    def received(self, n: int) -> None:
        if self.in_head:
            self.head_bytes += n
            # The buffered reader may have read up to one buffer of the body with the head.
            if self.head_bytes > MAX_HEAD_BYTES + io.DEFAULT_BUFFER_SIZE:
                raise HeadTooLarge(f"the response's headers exceed {MAX_HEAD_BYTES // 1024} KiB")


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every call waits at most the time left until the fetch's deadline, so
    a server trickling its headers or chunk-size lines byte by byte cannot hold a job."""

    deadline: _Deadline

    def _arm(self) -> None:
        self.settimeout(self.deadline.remaining())

    def connect(self, address: Any) -> None:
        self._arm()
        super().connect(address)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        data = super().recv(bufsize, flags)
        self.deadline.received(len(data))
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        n = super().recv_into(buffer, nbytes, flags)
        self.deadline.received(n)
        return n

    def send(self, data: Any, flags: int = 0) -> int:
        self._arm()
        return super().send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()
        super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The same for TLS: the handshake and every record read or written get the time left."""

    deadline: _Deadline

    def _arm(self) -> None:
        self.settimeout(self.deadline.remaining())

    def do_handshake(self, block: bool = False) -> None:
        self._arm()
        super().do_handshake(block)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        self._arm()
        data = super().recv(buflen, flags)
        self.deadline.received(len(data))
        return data

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        self._arm()
        n = super().recv_into(buffer, nbytes, flags)
        self.deadline.received(n)
        return n

    def send(self, data: Any, flags: int = 0) -> int:
        self._arm()
        return super().send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()
        super().sendall(data, flags)


def _open_socket(addr: str, port: int, deadline: _Deadline) -> _DeadlineSocket:
    """A TCP connection to the address that was checked, not to whatever a second DNS lookup returns."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = _DeadlineSocket(family, socket.SOCK_STREAM)
    sock.deadline = deadline
    try:
        sock.connect((addr, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class _Response(http.client.HTTPResponse):
    """A response whose head (status line, headers) is bounded by `MAX_HEAD_BYTES`."""

    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self._deadline: _Deadline = sock.deadline

    def begin(self) -> None:
        self._deadline.in_head, self._deadline.head_bytes = True, 0
        try:
            super().begin()
        finally:
            self._deadline.in_head = False


class _Connection(http.client.HTTPConnection):
    response_class = _Response

    def __init__(self, host: str, port: int, addr: str, deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=deadline.remaining())
        self._addr, self._deadline = addr, deadline

    def connect(self) -> None:
        self.sock = _open_socket(self._addr, self.port, self._deadline)


class _TLSConnection(http.client.HTTPSConnection):
    response_class = _Response

    def __init__(self, host: str, port: int, addr: str, deadline: _Deadline) -> None:
        context = ssl.create_default_context()  # the certificate is checked against the URL's host
        context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(host, port, timeout=deadline.remaining(), context=context)
        self._addr, self._deadline = addr, deadline

    def connect(self) -> None:
        raw = _open_socket(self._addr, self.port, self._deadline)
        try:
            tls = self._context.wrap_socket(  # type: ignore[attr-defined]
                raw, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            raw.close()
            raise
        tls.deadline = self._deadline
        try:
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        self.sock = tls


def open_connection(
    scheme: str, host: str, port: int, addr: str, timeout_s: float
) -> http.client.HTTPConnection:
    """A connection to ``addr`` (an address `_checked_addresses` allowed) for ``host``, whose
    connect, TLS handshake and every read and write share one deadline ``timeout_s`` from now.
    The one way the worker's fetches, video downloads and webhooks open a connection."""
    deadline = _Deadline(time.monotonic() + timeout_s)
    return (_TLSConnection if scheme == "https" else _Connection)(host, port, addr, deadline)


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """GET ``url`` within the policy's limits; redirects followed by hand, each hop checked.

    Internal logic:

    1. check the scheme, resolve the host and check every address (unless private is allowed);
    2. connect to the first checked address itself (TLS still verifies the host name);
    3. on a redirect, go back to 1 with the new location (at most ``max_redirects`` times);
    4. refuse a ``Content-Length`` over the limit, then read in chunks, stopping at limit + 1
       byte.

    The deadline (``timeout_s`` for the whole fetch, redirects included) is enforced on the
    sockets themselves: the connect, the TLS handshake and every read and write wait at most the
    time left, so headers or chunk-size lines trickled a byte at a time end at the deadline; the
    response head is bounded by `MAX_HEAD_BYTES`.
    """
    deadline = _Deadline(time.monotonic() + policy.timeout_s)
    current = url
    for _hop in range(policy.max_redirects + 1):
        scheme, host, port, path = _check_url(current)
        addrs = _checked_addresses(host, port, policy, current, deadline.at)
        conn: http.client.HTTPConnection | None = None
        resp: http.client.HTTPResponse | None = None
        try:
            try:
                conn = (_TLSConnection if scheme == "https" else _Connection)(host, port, addrs[0], deadline)
                conn.request(
                    "GET",
                    path,
                    headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
                )
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location")
                    if not location:
                        raise JobError("FETCH_FAILED", f"{_shown(current)} redirected without a Location")
                    current = urljoin(current, location.strip())
                    continue
                if resp.status != 200:
                    raise JobError(
                        "FETCH_FAILED", f"{_shown(current)} answered HTTP {resp.status} {resp.reason}"
                    )
                return _read_limited(resp, policy, current)
            except TimeoutError:
                raise JobError(
                    "FETCH_FAILED", f"fetching {_shown(url)} took longer than {policy.timeout_s:g} s"
                ) from None
            except HeadTooLarge as err:
                raise JobError("FETCH_FAILED", f"{_shown(current)}: {err}") from None
            except (OSError, http.client.HTTPException) as err:
                raise JobError(
                    "FETCH_FAILED", f"fetching {_shown(current)} failed: {type(err).__name__}: {err}"
                ) from None
        finally:
            if resp is not None:
                resp.close()
            if conn is not None:
                conn.close()
    raise JobError("FETCH_FAILED", f"{_shown(url)} redirected more than {policy.max_redirects} times")


def _read_limited(resp: http.client.HTTPResponse, policy: FetchPolicy, url: str) -> bytes:
    """The body, at most ``max_bytes`` (the socket's deadline ends a slow one)."""
    length = resp.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise JobError(
            "INPUT_TOO_LARGE",
            f"{_shown(url)} is {int(length)} bytes; the limit is {policy.max_bytes} bytes (WORKER_MAX_INPUT_MB)",
        )
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = resp.read1(min(65536, policy.max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > policy.max_bytes:
            raise JobError(
                "INPUT_TOO_LARGE",
                f"{_shown(url)} is larger than the limit of {policy.max_bytes} bytes (WORKER_MAX_INPUT_MB)",
            )
    return b"".join(chunks)


def decode_base64(value: str, max_bytes: int, what: str) -> bytes:
    """Raw base64 (standard or URL-safe, line breaks allowed) or a ``data:`` URL."""
    text = value.strip()
    if text[:5].lower() == "data:":
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header.lower():
            raise JobError("INVALID_INPUT", f"{what} is a data URL without ';base64,'")
        text = payload
    text = "".join(text.split())
    if len(text) // 4 * 3 > max_bytes + 3:
        raise JobError(
            "INPUT_TOO_LARGE",
            f"{what} holds about {len(text) // 4 * 3} bytes; the limit is {max_bytes} bytes (WORKER_MAX_INPUT_MB)",
        )
    if not text:
        raise JobError("INVALID_INPUT", f"{what} is empty")
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as err:
        raise JobError("INVALID_INPUT", f"{what} is not valid base64: {err}") from None
    if len(data) > max_bytes:
        raise JobError(
            "INPUT_TOO_LARGE",
            f"{what} is {len(data)} bytes; the limit is {max_bytes} bytes (WORKER_MAX_INPUT_MB)",
        )
    return data


def fetch_to_file(  # noqa: C901 - one redirect loop with its error answers, as fetch_url; TODO: one loop for both
    url: str,
    policy: FetchPolicy,
    dest: IO[bytes],
    *,
    max_bytes: int,
    before_body: Any = None,
    check: Any = None,
) -> int:
    """GET ``url`` into ``dest`` by the input URL rules of `fetch_url` (addresses checked at
    every hop, redirects by hand), streaming: never more than one chunk in memory.

    ``max_bytes`` (``WORKER_MAX_VIDEO_MB``) is checked on ``Content-Length`` and while reading
    (VIDEO_TOO_LARGE); ``before_body(length or None)`` runs once the headers are in (the disk
    check); ``check()`` runs between chunks (cancellation, deadline). Returns the bytes written.
    """
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _hop in range(policy.max_redirects + 1):
        scheme, host, port, path = _check_url(current)
        addrs = _checked_addresses(host, port, policy, current, deadline)
        conn = open_connection(scheme, host, port, addrs[0], policy.timeout_s)
        resp = None
        try:
            try:
                conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
                resp = conn.getresponse()
            except (OSError, ValueError) as err:
                raise JobError(
                    "FETCH_FAILED", f"fetching {_shown(current)} failed: {type(err).__name__}: {err}"
                ) from None
            except Exception as err:  # http.client.HTTPException, ssl errors
                raise JobError(
                    "FETCH_FAILED", f"fetching {_shown(current)} failed: {type(err).__name__}: {err}"
                ) from None
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise JobError("FETCH_FAILED", f"{_shown(current)} redirected without a Location")
                current = urljoin(current, location.strip())
                continue
            if resp.status != 200:
                raise JobError("FETCH_FAILED", f"{_shown(current)} answered HTTP {resp.status} {resp.reason}")
            raw = (resp.getheader("Content-Length") or "").strip()
            length = int(raw) if raw.isdigit() else None
            if length is not None and length > max_bytes:
                raise JobError(
                    "VIDEO_TOO_LARGE",
                    f"the video is {length} bytes; the limit is {max_bytes} bytes (WORKER_MAX_VIDEO_MB)",
                )
            if before_body is not None:
                before_body(length)
            total = 0
            while True:
                if check is not None:
                    check()
                if time.monotonic() > deadline:
                    raise JobError(
                        "FETCH_FAILED",
                        f"fetching {_shown(url)} took longer than {policy.timeout_s:g} s",
                    )
                try:
                    chunk = resp.read1(1 << 20)
                except Exception as err:
                    raise JobError(
                        "FETCH_FAILED",
                        f"reading {_shown(current)} failed: {type(err).__name__}: {err}",
                    ) from None
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise JobError(
                        "VIDEO_TOO_LARGE",
                        f"the video is larger than the limit of {max_bytes} bytes (WORKER_MAX_VIDEO_MB)",
                    )
                dest.write(chunk)
            dest.flush()
            if total == 0:
                raise JobError("NOT_A_VIDEO", f"{_shown(current)} sent an empty body")
            return total
        finally:
            if resp is not None:
                resp.close()
            conn.close()
    raise JobError("FETCH_FAILED", f"{_shown(url)} redirected more than {policy.max_redirects} times")
