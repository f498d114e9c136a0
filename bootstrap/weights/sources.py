"""Where a weight file's bytes come from: ``hf://``, ``https://``, ``s3://``, ``file://`` (SPEC §6).

Each source becomes a `Source` (`bootstrap.weights.protocol`): `Source.probe` learns the size
(and, from the Hub, the sha256) without downloading; `Source.connect` gives one `Connection` per
download thread, whose `get` asks for a byte range. This module holds the http(s) and Hub
sources (only the standard library's ``http.client``) and `make_source`, which picks one;
``s3://`` and ``file://`` are `bootstrap.weights.s3source` and `bootstrap.weights.filesource`.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import re
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from bootstrap.errors import ConfigError
from bootstrap.urls import (
    HEX40,
    NotHfRef,
    is_loopback_host,
    is_public_address,
    origin,
    parse_hf,
    scheme_of,
    shown,
)
from bootstrap.weights.filesource import FileSource
from bootstrap.weights.mirror import check_http
from bootstrap.weights.protocol import (
    Connection,
    Probe,
    Response,
    Source,
    SourceFailed,
    Transient,
    clean_etag,
)
from bootstrap.weights.s3source import S3Source

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
USER_AGENT = "volume-worker-bootstrap/1"
MAX_REDIRECTS = 5
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        import time

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


# -- HTTP(S) -----------------------------------------------------------------------------------


Resolver = Callable[[str, int], list[str]]


def default_resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` has (``getaddrinfo``), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class AddressPolicy:
    """How hosts are resolved and judged; injectable so tests never need a real DNS name."""

    resolve: Resolver = default_resolve
    is_public: Callable[[str], bool] = is_public_address


def _addresses(url: str, policy: AddressPolicy) -> list[str]:
    """The addresses of ``url``'s host. A name that does not resolve fails at once: retrying a
    lookup with no answer only spends the boot's budget (`SourceFailed`, not `Transient`)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addrs = policy.resolve(host, port)
    except (OSError, UnicodeError) as err:
        raise SourceFailed(f"its host name does not resolve ({err})") from None
    if not addrs:
        raise SourceFailed("its host name has no address")
    return addrs


def _new_connection(url: str, timeout: float, addrs: list[str]) -> http.client.HTTPConnection:
    """A connection to ``url``'s host that connects only to ``addrs`` (the addresses checked),
    so no second lookup can answer differently; TLS still checks the certificate for the name."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    elif parts.scheme == "http" and is_loopback_host(host):
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    else:
        raise SourceFailed(f"{shown(url)}: only https:// (or http:// on loopback) is fetched")

    def create_connection(address: tuple[str, int], *args: Any, **kw: Any) -> socket.socket:
        last: OSError | None = None
        for addr in addrs:
            try:
                return socket.create_connection((addr, address[1]), *args, **kw)
            except OSError as err:
                last = err
        assert last is not None
        raise last

    conn._create_connection = create_connection  # type: ignore[attr-defined]
    return conn


def _redirect(url: str, location: str) -> str:
    """The next hop; only https:// (or http:// between loopback hosts) may follow."""
    target = urljoin(url, location)
    scheme = scheme_of(target)
    if scheme == "https" or (scheme == "http" and is_loopback_host(urlsplit(target).hostname or "")):
        return target
    raise SourceFailed(f"redirected to {shown(target)}: only https:// is followed")


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _status_error(status: int, reason: str, headers: Any, what: str) -> Exception:
    if status == 429 or status >= 500:
        return Transient(f"{what}: HTTP {status} {reason}", _retry_after(headers.get("Retry-After")))
    if status in (401, 403):
        return SourceFailed(f"{what}: HTTP {status} {reason} (check the token or the URL)")
    return SourceFailed(f"{what}: HTTP {status} {reason}")


class _HTTPBody:
    def __init__(
        self,
        resp: http.client.HTTPResponse,
        whole: bool,
        expect: int | None,
        on_abandon: Callable[[], None] = lambda: None,
    ) -> None:
        self.resp = resp
        self.whole = whole
        self.left = expect
        self.on_abandon = on_abandon

    def readinto(self, buf: memoryview) -> int:
        try:
            n = self.resp.readinto(buf)
        except (OSError, http.client.HTTPException) as err:
            raise Transient(f"connection broke mid-body: {type(err).__name__}: {err}") from None
        if n == 0 and self.left:
            raise Transient(f"the body ended {self.left} bytes short of its Content-Length")
        if self.left is not None:
            self.left -= n
        return n

    def close(self) -> None:
        self.resp.close()
        if self.left != 0:
            # Unread body bytes would be taken for the next response: drop the connection.
            self.on_abandon()


class HTTPConnection:
    """One keep-alive connection (per download thread) to where the bytes are."""

    def __init__(self, source: HTTPSource) -> None:
        self.source = source
        self.conn: http.client.HTTPConnection | None = None
        self.url = source.data_url or source.url

    def _request(self, method: str, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        if self.conn is None or origin(url) != origin(self.url):
            self.close()
            self.conn = _new_connection(url, self.source.timeout_s, self.source.checked_addresses(url))
            self.url = url
        try:
            self.conn.request(method, _path_of(url), headers=self.source.headers_for(url, headers))
            return self.conn.getresponse()
        except (OSError, http.client.HTTPException) as err:
            self.close()
            raise Transient(f"{method} failed: {type(err).__name__}: {err}") from None

    def get(self, start: int, end: int | None) -> Response:
        url = self.source.data_url or self.source.url
        headers = {"Range": f"bytes={start}-{'' if end is None else end}"}
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._request("GET", url, headers)
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                resp.read()
                url = _redirect(url, resp.getheader("Location", ""))
                continue
            break
        else:
            raise SourceFailed("too many redirects")
        size = self.source.size
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch(resp.getheader("Content-Range", "").strip())
            want_end = end if end is not None else (size - 1 if size else None)
            if (
                not m
                or int(m.group(1)) != start
                or (want_end is not None and int(m.group(2)) != want_end)
                or (size is not None and m.group(3) != "*" and int(m.group(3)) != size)
            ):
                resp.close()
                self.close()
                raise Transient(
                    f"asked for bytes {start}-{end}, got Content-Range {resp.getheader('Content-Range')!r}"
                )
            expect = int(m.group(2)) - start + 1
            if resp.length is not None and resp.length != expect:
                resp.close()
                self.close()
                raise Transient(f"Content-Length {resp.length} does not match the range's {expect} bytes")
            return _HTTPBody(resp, False, expect, self.close)
        if resp.status == 200:
            if size is not None and resp.length is not None and resp.length != size:
                resp.close()
                self.close()
                raise Transient(f"Content-Length {resp.length} is not the file's size {size}")
            return _HTTPBody(resp, True, resp.length, self.close)
        err = _status_error(resp.status, resp.reason, resp.headers, "GET")
        resp.read()
        if resp.will_close:
            self.close()
        # A signed CDN URL (GitHub release assets, the Hub's LFS files) that expired mid-download:
        # resolve the original URL again and retry on the fresh one.
        expired = resp.status in (401, 403, 410) and self.source.data_url not in (None, self.source.url)
        if expired and self.source.refresh(url):
            raise Transient("the redirect target expired; resolved it again")
        raise err

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class HTTPSource:
    """An ``https://`` (or loopback ``http://``) URL, or a Hub resolve URL (``hub=True``)."""

    def __init__(
        self,
        url: str,
        *,
        label: str | None = None,
        token: str | None = None,
        hub: bool = False,
        timeout_s: float = 30.0,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.url = url
        self.label = label or shown(url)
        self.token = token
        self.hub = hub
        self.timeout_s = timeout_s
        self.policy = policy or AddressPolicy()
        #: credentials are bound to the origin (scheme, host, port) they were given for
        self.token_origin = origin(url)
        parts = urlsplit(url)
        self.basic = (
            base64.b64encode(
                f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
            ).decode()
            if parts.password is not None
            else None
        )
        #: None until the source's own host was resolved: are its addresses all public?
        self._origin_public: bool | None = None
        #: where GETs go after the probe followed redirects (a CDN for Hub LFS files)
        self.data_url: str | None = None
        self.size: int | None = None
        self._refresh_lock = threading.Lock()

    def headers_for(self, url: str, extra: dict[str, str]) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **extra}
        # Credentials go only to the origin they belong to (scheme, host and port), never to a
        # redirect's CDN or another port of the same host.
        if origin(url) == self.token_origin:
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            elif self.basic:
                headers["Authorization"] = f"Basic {self.basic}"
        return headers

    def checked_addresses(self, url: str) -> list[str]:
        """The addresses to connect to for ``url``, after the checks every hop gets.

        A source whose own host is public may only be redirected to public addresses (a
        redirect to ``http://localhost`` or the cloud metadata address is refused); an operator's
        own private or loopback host may redirect within its network.
        """
        if self._origin_public is None:
            own = _addresses(self.url, self.policy)
            self._origin_public = all(self.policy.is_public(a) for a in own)
            if origin(url) == origin(self.url):
                return own
        addrs = _addresses(url, self.policy)
        if self._origin_public and origin(url) != origin(self.url):
            bad = [a for a in addrs if not self.policy.is_public(a)]
            if bad:
                raise SourceFailed(
                    f"redirected to {shown(url)}, which resolves to {bad[0]}, a loopback, private or "
                    "reserved address: refused"
                )
        return addrs

    def probe(self) -> Probe:
        """HEAD (following redirects by hand, so the Hub's X-Linked-* headers are seen)."""
        conn = HTTPConnection(self)
        url = self.url
        linked_size: str | None = None
        linked_etag: str | None = None
        try:
            for _ in range(MAX_REDIRECTS + 1):
                resp = conn._request("HEAD", url, {})
                resp.read()
                linked_size = linked_size or resp.getheader("X-Linked-Size")
                linked_etag = linked_etag or resp.getheader("X-Linked-Etag")
                if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                    url = _redirect(url, resp.getheader("Location", ""))
                    continue
                break
            else:
                raise SourceFailed("too many redirects")
            if resp.status in (405, 501):
                return self._probe_by_get(conn, url)
            if resp.status != 200:
                raise _status_error(resp.status, resp.reason, resp.headers, "HEAD")
            etag = clean_etag(linked_etag or resp.getheader("ETag"))
            size_text = linked_size or resp.getheader("Content-Length")
            size = int(size_text) if size_text and size_text.isdigit() else None
            host_length = resp.getheader("Content-Length", "")
            if self.hub and linked_size and host_length.isdigit() and int(host_length) != size:
                raise SourceFailed(f"the Hub says {size} bytes but the file's host says {host_length}")
            sha = etag if (self.hub and etag and _HEX64.fullmatch(etag)) else None
            blob = etag if (self.hub and not linked_etag and etag and HEX40.fullmatch(etag)) else None
            self.data_url = url
            self.size = size
            return Probe(size=size, sha256=sha, etag=etag, blob=blob)
        finally:
            conn.close()

    def refresh(self, stale: str) -> bool:
        """Re-resolve the redirect target after ``stale`` failed; True if it changed."""
        with self._refresh_lock:
            if self.data_url != stale:
                return True  # another thread already refreshed it
            old_size = self.size
            try:
                self.probe()
            except (Transient, SourceFailed):
                return False
            if self.size != old_size:
                self.size = old_size
                return False
            return self.data_url != stale

    def _probe_by_get(self, conn: HTTPConnection, url: str) -> Probe:
        self.data_url = url
        body = conn.get(0, 0)
        body.close()
        conn.close()
        assert isinstance(body, _HTTPBody)
        m = _CONTENT_RANGE.fullmatch(body.resp.getheader("Content-Range", "").strip())
        size = int(m.group(3)) if m and m.group(3).isdigit() else body.resp.length if body.whole else None
        self.size = size
        return Probe(size=size, etag=clean_etag(body.resp.getheader("ETag")))

    def connect(self) -> Connection:
        return HTTPConnection(self)


# -- parsing -----------------------------------------------------------------------------------


KNOWN_SCHEMES = ("hf", "https", "http", "s3", "file")


def make_source(
    url: str, environ: Mapping[str, str], *, timeout_s: float = 30.0, policy: AddressPolicy | None = None
) -> Source:
    """A `Source` for a manifest or mirror URL; `ConfigError` when it cannot be one."""
    parts = urlsplit(url)
    scheme = scheme_of(url)
    if scheme == "hf":
        endpoint = (environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).strip()
        try:
            resolved = parse_hf(url).resolve_url(endpoint)
        except NotHfRef as err:
            raise ConfigError(
                str(err), hint="e.g. hf://org/repo/model.onnx?revision=<40-hex commit>"
            ) from None
        check_http(resolved, "HF_ENDPOINT")
        return HTTPSource(
            resolved,
            label=url,
            token=environ.get("HF_TOKEN") or None,
            hub=True,
            timeout_s=timeout_s,
            policy=policy,
        )
    if scheme in ("https", "http"):
        check_http(url, "the source")
        return HTTPSource(url, label=shown(url), timeout_s=timeout_s, policy=policy)
    if scheme == "s3":
        key = parts.path.lstrip("/")
        if not parts.netloc or not key:
            raise ConfigError(
                f"{shown(url)!r} is not s3://BUCKET/KEY", hint="e.g. s3://my-bucket/models/x.onnx"
            )
        return S3Source(parts.netloc, unquote(key), environ, timeout_s=timeout_s)
    if scheme == "file":
        return FileSource(Path(unquote(parts.path)))
    raise ConfigError(
        f"{shown(url)!r}: unsupported scheme {scheme!r}", hint="use hf://, https://, s3:// or file://"
    )


def host_of(url: str) -> str:
    """For messages: the host a URL talks to."""
    with contextlib.suppress(ValueError):
        return urlsplit(url).hostname or socket.gethostname()
    return "?"
