"""A job's images in and out: fetch (URL or base64), decode, encode, upload (SPEC §10).

Every problem with the job's own input is a `JobError` with a stable code; a problem of the
operator's (bucket credentials) is a `WorkerFault`. Nothing here trusts the input:

- URLs: http(s) only; the host is resolved once and *every* address must be public unless
  ``WORKER_ALLOW_PRIVATE_URLS=1`` (loopback, private, link-local — the cloud metadata
  address —, CGNAT, multicast, reserved, IPv4-mapped forms of them); the connection goes to
  the address that was checked (no second lookup an attacker's DNS could answer differently);
  redirects are followed by hand and each hop is checked again (FAILURES F19).
- Limits: a deadline for the whole fetch, held on the sockets themselves (connect, TLS
  handshake, every read and write get the time left; the response head is at most 64 KiB), the
  byte limit (``WORKER_MAX_INPUT_MB``) checked on
  ``Content-Length`` and again while reading, on base64 before decoding it, and the pixel limit
  (``WORKER_MAX_PIXELS``) read from the image header before any pixel is decoded.
- Decoding: a short list of raster formats (never EPS, which would run Ghostscript), EXIF
  orientation applied, grayscale/palette/CMYK/16-bit converted, alpha kept aside.
- Output options (`parse_output`, shared by every task): ``output`` base64|s3 and ``s3``
  ``{bucket, prefix}``; the prefix is plain ``[A-Za-z0-9._-]`` segments (no ``.``/``..``), the
  bucket a valid S3 name that ``BUCKET_NAME`` or ``WORKER_S3_BUCKETS`` allows — checked while
  parsing, before any fetch or model run.
- Upload: only the ``BUCKET_*`` settings, never a silent local fallback (FAILURES F20); URLs
  presigned for ``WORKER_PRESIGN_TTL_S``.
"""

from __future__ import annotations

import binascii
import concurrent.futures
import http.client
import io
import re
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bootstrap.urls import is_public_address
from worker.errors import JobError, WorkerFault

if TYPE_CHECKING:
    from bootstrap.settings import Settings

#: Raster formats a job may send. EPS/PS (Ghostscript), PDF and exotic plugins are refused.
_WANTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
# Audio outputs (the speech capability) upload through the same `Uploader`.
CONTENT_TYPES.update({"WAV": "audio/wav", "FLAC": "audio/flac", "MP3": "audio/mpeg", "OGG": "audio/ogg"})
EXTENSIONS.update({"WAV": "wav", "FLAC": "flac", "MP3": "mp3", "OGG": "ogg"})
# `decode_image` enforces WORKER_MAX_PIXELS from the header itself; Pillow's own guard would
# answer differently (a warning, or an error under another name) around its fixed 89 M pixels.
Image.MAX_IMAGE_PIXELS = None
Image.init()  # register every plugin now; `formats=` then restricts what may be opened
# (phone photos' MPO is its own opener in older Pillow, part of JPEG's in newer ones)
IMAGE_FORMATS = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)
MAX_REDIRECTS = 5
FETCH_TIMEOUT_S = 30.0
#: presigned URL lifetime unless WORKER_PRESIGN_TTL_S says otherwise (SPEC §3)
PRESIGN_TTL_S = 24 * 3600
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


@dataclass
class Decoded:
    """An image ready for the models: BGR uint8 pixels, and the alpha channel if it had one."""

    bgr: np.ndarray
    alpha: np.ndarray | None = None
    format: str | None = None
    scaled_from: tuple[int, int] | None = None


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit integer or float grey as 8-bit, scaled so the brightest pixel maps to at
    most 255 — in integers (or float32 for float input), in place where possible: a 40-megapixel
    picture never holds a float64 copy (8 bytes a pixel, twice over)."""
    if arr.dtype.kind == "f":
        grey = arr.astype(np.float32, copy=True)
        np.nan_to_num(grey, copy=False)
        np.clip(grey, 0, 255, out=grey)
        return grey.astype(np.uint8)
    work = arr.astype(np.uint32, copy=True) if arr.dtype.kind == "u" else np.maximum(arr, 0).astype(np.uint32)
    top = int(work.max()) if work.size else 0
    if top > 0xFFFF:  # 32-bit input: to 16 bits first, so ×255 stays within uint32
        shift = top.bit_length() - 16
        work >>= shift
        top >>= shift
    if top > 255:
        work *= 255
        work //= top
    return work.astype(np.uint8)


def decode_image(data: bytes, *, max_pixels: int, max_side: int | None, what: str) -> Decoded:
    """Decode with the pixel limit checked from the header, EXIF orientation applied.

    Internal logic:

    1. open (header only) among `IMAGE_FORMATS`; anything else is NOT_AN_IMAGE;
    2. width × height over ``max_pixels`` → IMAGE_TOO_LARGE, before decoding a pixel;
    3. decode (a truncated or corrupt body is NOT_AN_IMAGE), apply EXIF orientation;
    4. to RGB: palette/grayscale/16-bit/CMYK converted, alpha kept aside and composited on
       mid-grey for the models; then scale down to ``max_side``.
    """
    img: Image.Image
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, EOFError) as err:
        raise JobError(
            "NOT_AN_IMAGE",
            f"{what} is not an image in a supported format ({', '.join(IMAGE_FORMATS)}): {err}",
        ) from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise JobError("NOT_AN_IMAGE", f"{what} has no pixels")
        if width * height > max_pixels:
            raise JobError(
                "IMAGE_TOO_LARGE",
                f"{what} is {width}×{height} = {width * height} pixels; the limit is {max_pixels} (WORKER_MAX_PIXELS)",
            )
        fmt = img.format
        try:
            img.load()
            img = ImageOps.exif_transpose(img) or img
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
            raise JobError(
                "NOT_AN_IMAGE", f"{what} could not be decoded: {type(err).__name__}: {err}"
            ) from None
        alpha: np.ndarray | None = None
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            img = Image.fromarray(_to_8bit(np.asarray(img)), "L")
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            alpha = np.asarray(rgba)[:, :, 3].copy()
            grey = Image.new("RGB", rgba.size, (128, 128, 128))
            grey.paste(rgba, mask=rgba.getchannel("A"))
            img = grey
        elif img.mode != "RGB":
            img = img.convert("RGB")
        scaled_from = None
        if max_side is not None and max(img.size) > max_side:
            scaled_from = img.size
            factor = max_side / max(img.size)
            size = (max(1, round(img.size[0] * factor)), max(1, round(img.size[1] * factor)))
            img = img.resize(size, Image.Resampling.LANCZOS)
            if alpha is not None:
                alpha = np.asarray(Image.fromarray(alpha, "L").resize(size, Image.Resampling.LANCZOS))
        rgb = np.asarray(img, dtype=np.uint8)
        return Decoded(
            bgr=np.ascontiguousarray(rgb[:, :, ::-1]), alpha=alpha, format=fmt, scaled_from=scaled_from
        )
    finally:
        img.close()


def encode_image(bgr: np.ndarray, alpha: np.ndarray | None, output_format: str) -> bytes:
    """PNG, JPEG (quality 95) or WebP (quality 95); alpha kept where the format carries it."""
    fmt = OUTPUT_FORMATS[output_format]
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    img = Image.fromarray(rgb, "RGB")
    if alpha is not None and fmt in ("PNG", "WEBP") and alpha.shape == rgb.shape[:2]:
        img.putalpha(Image.fromarray(alpha, "L"))
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=95)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=95)
    else:
        img.save(buf, "PNG", compress_level=3)
    return buf.getvalue()


# -- output options and S3 ----------------------------------------------------------------------

ENDPOINT = "BUCKET_ENDPOINT_URL"
ACCESS_KEY = "BUCKET_ACCESS_KEY_ID"
SECRET_KEY = "BUCKET_SECRET_ACCESS_KEY"  # noqa: S105 - the variable's name, not a secret
BUCKET = "BUCKET_NAME"
REGION = "BUCKET_REGION"
OUTPUTS = ("base64", "s3")
#: A key prefix segment: plain characters only (no "." or ".." segment, no empty one).
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")
#: S3's bucket naming rules: 3-63 of a-z 0-9 . -, starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Output:
    """Where a job's result goes: inline ``base64``, or ``s3`` (the job's bucket and prefix, or None)."""

    kind: str = "base64"
    bucket: str | None = None
    prefix: str | None = None


def bucket_problem(name: str) -> str | None:
    """Why ``name`` is not a valid S3 bucket name, or None."""
    if not _BUCKET_NAME.fullmatch(name):
        return "3-63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit"
    if ".." in name or ".-" in name or "-." in name:
        return "no '..', '.-' or '-.'"
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        return "not formatted as an IP address"
    if name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3")):
        return "no reserved prefix (xn--, sthree-) or suffix (-s3alias, --ol-s3)"
    return None


def _prefix(value: str) -> str:
    segments = value.strip("/").split("/")
    for segment in segments:
        if segment in (".", "..") or not _PREFIX_SEGMENT.fullmatch(segment):
            raise JobError(
                "INVALID_INPUT",
                f"s3.prefix segment {segment[:80]!r} is not allowed: use '/'-separated segments of "
                "A-Z, a-z, 0-9, '.', '_' and '-', none of them '.' or '..'",
            )
    return "/".join(segments)


def parse_output(job: Mapping[str, Any], allowed_buckets: Collection[str]) -> Output:
    """A job's ``output`` (``base64`` | ``s3``) and ``s3`` (``{"bucket", "prefix"}``), checked.

    Every task with an S3 output calls this while parsing its input, so a bad prefix or bucket is
    INVALID_INPUT before any fetch or model run. ``allowed_buckets`` is `Uploader.allowed_buckets`:
    a job may name only those (SPEC §3, ``WORKER_S3_BUCKETS``).
    """
    kind = job.get("output", "base64")
    if not isinstance(kind, str) or kind.strip().lower() not in OUTPUTS:
        raise JobError("INVALID_INPUT", "output must be 'base64' or 's3'")
    kind = kind.strip().lower()
    s3 = job.get("s3")
    if s3 is None:
        return Output(kind)
    if kind != "s3":
        raise JobError("INVALID_INPUT", "'s3' is only used with output: 's3'")
    if not isinstance(s3, dict) or set(s3) - {"bucket", "prefix"}:
        raise JobError("INVALID_INPUT", "s3 must be an object with 'bucket' and/or 'prefix'")
    for key, value in s3.items():
        if not isinstance(value, str) or len(value) > 1024 or any(ord(c) < 32 for c in value):
            raise JobError("INVALID_INPUT", f"s3.{key} must be a string without control characters")
    bucket = s3.get("bucket", "").strip() or None
    if bucket is not None:
        why = bucket_problem(bucket)
        if why is not None:
            raise JobError("INVALID_INPUT", f"s3.bucket {bucket[:80]!r} is not a valid bucket name: {why}")
        if bucket not in allowed_buckets:
            raise JobError(
                "INVALID_INPUT",
                f"s3.bucket {bucket!r} is not a bucket this endpoint lets jobs name "
                f"(the operator lists them in WORKER_S3_BUCKETS); leave s3.bucket out to use the endpoint's own",
            )
    prefix = _prefix(s3["prefix"]) if s3.get("prefix", "").strip("/") else None
    return Output(kind, bucket, prefix)


@dataclass
class Uploader:
    """Uploads outputs to the job bucket (RunPod's ``BUCKET_*`` settings) and presigns a URL."""

    environ: Mapping[str, str]
    #: buckets a job may name besides BUCKET_NAME (WORKER_S3_BUCKETS)
    buckets: tuple[str, ...] = ()
    presign_ttl_s: int = PRESIGN_TTL_S
    _client: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> Uploader:
        return cls(
            settings.environ, buckets=settings.worker_s3_buckets, presign_ttl_s=settings.worker_presign_ttl_s
        )

    @property
    def default_bucket(self) -> str | None:
        return (self.environ.get(BUCKET) or "").strip() or None

    @property
    def allowed_buckets(self) -> frozenset[str]:
        """WORKER_S3_BUCKETS and BUCKET_NAME: what a job's ``s3.bucket`` may name."""
        default = self.default_bucket
        return frozenset(self.buckets) | ({default} if default else set())

    def _settings(self) -> tuple[str | None, str, str]:
        endpoint = (self.environ.get(ENDPOINT) or "").strip() or None
        access = (self.environ.get(ACCESS_KEY) or "").strip()
        secret = (self.environ.get(SECRET_KEY) or "").strip()
        missing = [name for name, value in ((ACCESS_KEY, access), (SECRET_KEY, secret)) if not value]
        if missing:
            raise WorkerFault(
                f"output 's3' needs bucket credentials, but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set on this endpoint; set "
                f"{ENDPOINT}, {ACCESS_KEY}, {SECRET_KEY} and {BUCKET} (or send output 'base64')"
            )
        return endpoint, access, secret

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                endpoint, access, secret = self._settings()
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=endpoint,
                    aws_access_key_id=access,
                    aws_secret_access_key=secret,
                    region_name=(self.environ.get(REGION) or "").strip() or "us-east-1",
                    config=Config(
                        signature_version="s3v4",
                        s3={"addressing_style": "path" if endpoint else "auto"},
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=10,
                        read_timeout=60,
                    ),
                )
            return self._client

    def check(self, target: Output) -> str:
        """The bucket to use; a WorkerFault naming what is missing (run before any model work)."""
        self._settings()  # credentials first: the message names what is missing
        bucket = target.bucket or self.default_bucket
        if not bucket:
            raise WorkerFault(f"output 's3' needs a bucket: set {BUCKET} on the endpoint")
        return bucket

    def upload(
        self, data: bytes, *, ext: str, content_type: str, target: Output, prefix: str
    ) -> dict[str, str]:
        """Put ``data`` at ``<prefix>/<date>/<uuid>.<ext>`` (the job's prefix, else ``prefix``);
        return url (presigned for ``presign_ttl_s``), bucket, key."""
        bucket = self.check(target)
        key = self._key(target, prefix, ext)
        client = self.client()
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.presign_ttl_s
            )
        except (BotoCoreError, ClientError) as err:
            raise WorkerFault(f"uploading the output to bucket {bucket!r} failed: {err}") from None
        return {"url": str(url), "bucket": bucket, "key": key}

    def upload_file(
        self,
        fileobj: Any,
        *,
        ext: str,
        content_type: str,
        target: Output,
        prefix: str,
        part_bytes: int = 16 * 1024 * 1024,
    ) -> dict[str, str]:
        """Like `upload`, for large outputs read from ``fileobj`` (e.g. a video on the container
        disk): boto3's transfer manager sends parts of ``part_bytes`` in parallel (multipart
        above one part), never the whole file in memory; then a presigned GET URL."""
        bucket = self.check(target)
        key = self._key(target, prefix, ext)
        client = self.client()
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        config = TransferConfig(
            multipart_threshold=part_bytes,
            multipart_chunksize=part_bytes,
            max_concurrency=4,
            use_threads=True,
        )
        try:
            fileobj.seek(0)
            client.upload_fileobj(
                fileobj, bucket, key, ExtraArgs={"ContentType": content_type}, Config=config
            )
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.presign_ttl_s
            )
        except (BotoCoreError, ClientError) as err:
            raise WorkerFault(f"uploading the output to bucket {bucket!r} failed: {err}") from None
        return {"url": str(url), "bucket": bucket, "key": key}

    @staticmethod
    def _key(target: Output, prefix: str, ext: str) -> str:
        """``<the job's prefix, else prefix>/<date>/<uuid>.<ext>``."""
        return (
            f"{target.prefix or prefix}/{time.strftime('%Y-%m-%d', time.gmtime())}/{uuid.uuid4().hex}.{ext}"
        )
