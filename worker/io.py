"""A job's images in and out: fetch (URL or base64), decode, encode, upload (SPEC §10).

Every problem with the job's own input is a `JobError` with a stable code; a problem of the
operator's (bucket credentials) is a `WorkerFault`. Nothing here trusts the input:

- URLs: http(s) only; the host is resolved once and *every* address must be public unless
  ``WORKER_ALLOW_PRIVATE_URLS=1`` (loopback, private, link-local — the cloud metadata
  address —, CGNAT, multicast, reserved, IPv4-mapped forms of them); the connection goes to
  the address that was checked (no second lookup an attacker's DNS could answer differently);
  redirects are followed by hand and each hop is checked again (FAILURES F19).
- Limits: a deadline for the whole fetch, the byte limit (``WORKER_MAX_INPUT_MB``) checked on
  ``Content-Length`` and again while reading, on base64 before decoding it, and the pixel limit
  (``WORKER_MAX_PIXELS``) read from the image header before any pixel is decoded.
- Decoding: a short list of raster formats (never EPS, which would run Ghostscript), EXIF
  orientation applied, grayscale/palette/CMYK/16-bit converted, alpha kept aside.
- Upload: only the ``BUCKET_*`` settings, never a silent local fallback (FAILURES F20).
"""

from __future__ import annotations

import binascii
import concurrent.futures
import http.client
import io
import ipaddress
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import JobError, WorkerFault

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
PRESIGN_EXPIRES_S = 7 * 24 * 3600
USER_AGENT = "volume-worker/0.1 (+faceswap)"

Resolver = Callable[[str, int], list[str]]


def _default_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(addr: str) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in (ip.ipv4_mapped, ip.sixtofour):
            if embedded is not None:
                return is_public_address(str(embedded))
        if ip.teredo is not None:
            return False
    return bool(ip.is_global) and not ip.is_multicast


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


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """GET ``url`` within the policy's limits; redirects followed by hand, each hop checked.

    Internal logic:

    1. check the scheme, resolve the host and check every address (unless private is allowed);
    2. connect to the first checked address itself (TLS still verifies the host name);
    3. on a redirect, go back to 1 with the new location (at most ``max_redirects`` times);
    4. refuse a ``Content-Length`` over the limit, then read in chunks, stopping at limit + 1
       byte or at the deadline.
    """
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _hop in range(policy.max_redirects + 1):
        scheme, host, port, path = _check_url(current)
        addrs = _checked_addresses(host, port, policy, current, deadline)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise JobError("FETCH_FAILED", f"fetching {_shown(url)} took longer than {policy.timeout_s:g} s")
        conn = _connection(scheme, host, port, addrs[0], min(remaining, policy.timeout_s))
        resp: http.client.HTTPResponse | None = None
        try:
            try:
                conn.request(
                    "GET",
                    path,
                    headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
                )
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException, ssl.SSLError) as err:
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
            return _read_limited(resp, policy, deadline, current)
        finally:
            if resp is not None:
                resp.close()
            conn.close()
    raise JobError("FETCH_FAILED", f"{_shown(url)} redirected more than {policy.max_redirects} times")


def _connection(scheme: str, host: str, port: int, addr: str, timeout: float) -> http.client.HTTPConnection:
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)

    # Connect to the address that was checked, not to whatever a second DNS lookup returns.
    def pinned(_address: tuple[str, int], timeout: float | None = None, source: Any = None) -> socket.socket:
        return socket.create_connection((addr, port), timeout, source)

    conn._create_connection = pinned  # type: ignore[attr-defined]
    return conn


def _read_limited(resp: http.client.HTTPResponse, policy: FetchPolicy, deadline: float, url: str) -> bytes:
    length = resp.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise JobError(
            "INPUT_TOO_LARGE",
            f"{_shown(url)} is {int(length)} bytes; the limit is {policy.max_bytes} bytes (WORKER_MAX_INPUT_MB)",
        )
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise JobError("FETCH_FAILED", f"fetching {_shown(url)} took longer than {policy.timeout_s:g} s")
        try:
            chunk = resp.read1(min(65536, policy.max_bytes + 1 - total))
        except (OSError, http.client.HTTPException) as err:
            raise JobError(
                "FETCH_FAILED", f"reading {_shown(url)} failed: {type(err).__name__}: {err}"
            ) from None
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
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr32 = np.asarray(img, dtype=np.float64)
            top = float(arr32.max()) or 1.0
            img = Image.fromarray((arr32 * (255.0 / max(top, 255.0))).astype(np.uint8), "L")
        elif img.mode == "F":
            arrf = np.nan_to_num(np.asarray(img, dtype=np.float64))
            img = Image.fromarray(np.clip(arrf, 0, 255).astype(np.uint8), "L")
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


# -- S3 output ---------------------------------------------------------------------------------

ENDPOINT = "BUCKET_ENDPOINT_URL"
ACCESS_KEY = "BUCKET_ACCESS_KEY_ID"
SECRET_KEY = "BUCKET_SECRET_ACCESS_KEY"  # noqa: S105 - the variable's name, not a secret
BUCKET = "BUCKET_NAME"
REGION = "BUCKET_REGION"


@dataclass
class Uploader:
    """Uploads outputs to the job bucket (RunPod's ``BUCKET_*`` settings) and presigns a URL."""

    environ: Mapping[str, str]
    _client: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

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

    def check(self, job_s3: Mapping[str, str] | None) -> str:
        """The bucket to use; a WorkerFault naming what is missing (run before any model work)."""
        self._settings()  # credentials first: the message names what is missing
        bucket = (job_s3 or {}).get("bucket") or (self.environ.get(BUCKET) or "").strip()
        if not bucket:
            raise WorkerFault(
                f"output 's3' needs a bucket: set {BUCKET} on the endpoint or send input.s3.bucket"
            )
        return bucket

    def upload(self, data: bytes, fmt: str, job_s3: Mapping[str, str] | None) -> dict[str, str]:
        """Put ``data`` at ``<prefix>/<date>/<uuid>.<ext>``; return url (presigned), bucket, key."""
        bucket = self.check(job_s3)
        prefix = ((job_s3 or {}).get("prefix") or "faceswap").strip("/")
        key = f"{prefix}/{time.strftime('%Y-%m-%d', time.gmtime())}/{uuid.uuid4().hex}.{EXTENSIONS[fmt]}"
        client = self.client()
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=CONTENT_TYPES[fmt])
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_EXPIRES_S
            )
        except (BotoCoreError, ClientError) as err:
            raise WorkerFault(f"uploading the output to bucket {bucket!r} failed: {err}") from None
        return {"url": str(url), "bucket": bucket, "key": key}
