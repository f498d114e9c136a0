"""A loopback HTTP file server with Range support, a per-connection rate cap and injectable faults.

For tests and benchmarks that need "the world" on 127.0.0.1::

    with FaultServer(root_dir) as srv:                 # serves root_dir/<path> at srv.url/<path>
        srv.fault("model.onnx", "status", status=429, retry_after="1", times=2)
        ...  # fetch srv.url + "/model.onnx"
        srv.bytes_sent("model.onnx")                   # body bytes the server really sent
        srv.requests("model.onnx", method="GET")       # the request log (`Request` rows)

Faults (`Fault.kind`), each for the first ``times`` matching requests (None: always):

- ``lfs_pointer`` / ``html`` / ``json_error`` / ``gzip``: the path serves that content instead
  of the file (Range applies to it, as a real server would);
- ``cut``: the body stops after ``at`` bytes and the connection is closed (a dropped connection;
  with ``times=None`` every body is truncated);
- ``ignore_range``: 200 with the whole file even when a Range was asked for;
- ``status``: answer ``status`` (429, 503, 404…) with an optional ``Retry-After``;
- ``wrong_length``: Content-Length off by ``delta`` (the body is the real bytes, then close);
- ``bad_etag``: (``hf`` mode) the Hub headers announce a wrong sha256;
- ``redirect``: 302 to ``location``;
- ``no_length``: no Content-Length, no Accept-Ranges: the body runs to the connection's close
  (a source that announces no size).

``hf=True`` also answers the Hub's tree API, ``/api/models/{org}/{repo}/tree/{rev}?recursive=true``
(paginated by ``Link`` headers, ``tree_page`` entries a page; LFS files by extension carry
``lfs.oid``, every file its git blob ``oid``), and its resolve URLs, ``/{org}/{repo}/resolve/{rev}/{path}`` →
``root/{org}/{repo}/{path}``, like huggingface.co: HEAD/GET give 302 to a "CDN" URL (this
server, addressed as ``localhost``: another host, as a real CDN is) with ``X-Linked-Size``, ``X-Linked-Etag`` (the sha256), ``ETag`` and ``X-Repo-Commit``,
so both this project's fetcher and ``huggingface_hub`` (through ``HF_ENDPOINT``) work against it.

Run standalone for benchmarks: ``python -m tests.httpserver ROOT --port 8080 [--rate BYTES_PER_S] [--hf]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_POINTER_TEXT = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af0\n"
    b"size 554253681\n"
)
HTML_TEXT = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in.</body></html>\n"
JSON_TEXT = b'{"error": "Repository not found", "status": 404}\n'
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_HF = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_TREE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)/tree/([^/]+)/?$")
#: what a repo's .gitattributes stores in LFS, as on the Hub (plus anything over 10 MB)
LFS_SUFFIXES = (".safetensors", ".onnx", ".bin", ".pt", ".pth", ".ckpt", ".zip", ".msgpack", ".h5", ".model")


def is_lfs(path: Path) -> bool:
    return path.suffix in LFS_SUFFIXES or path.stat().st_size > 10 * 1024 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Fault:
    kind: str
    times: int | None = None
    status: int = 503
    retry_after: str | None = None
    at: int = 0
    delta: int = 0
    methods: tuple[str, ...] = ("GET", "HEAD")
    location: str = ""
    used: int = 0


@dataclass
class Request:
    method: str
    path: str
    status: int
    range: str | None
    sent: int
    conn: int
    fault: str | None = None
    #: the request carried an Authorization header (its value is never logged)
    auth: bool = False


@dataclass
class _State:
    root: Path
    rate_bps: int | None
    hf: bool
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sha_cache: dict[tuple[str, int, int], str] = field(default_factory=dict)
    conn_counter: int = 0
    sig: int = 0
    #: base URL of the "CDN" hf mode redirects LFS files to (default: this server as localhost)
    cdn: str | None = None
    #: entries per page of the tree API (the rest follows by ``Link: <…>; rel="next"``)
    tree_page: int = 1000


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FaultServer/1"
    state: _State

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.state.conn_counter += 1
            self.conn_id = self.state.conn_counter

    # -- helpers ---------------------------------------------------------------------------
    def _take_fault(self, path: str, kinds: tuple[str, ...] | None = None) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults.get(path, []):
                if self.command not in fault.methods or (kinds is not None and fault.kind not in kinds):
                    continue
                if fault.times is not None and fault.used >= fault.times:
                    continue
                fault.used += 1
                return fault
        return None

    def _next_sig(self) -> int:
        with self.state.lock:
            self.state.sig += 1
            return self.state.sig

    def _record(self, path: str, status: int, sent: int, fault: Fault | None) -> None:
        with self.state.lock:
            self.state.log.append(
                Request(
                    self.command,
                    path,
                    status,
                    self.headers.get("Range"),
                    sent,
                    self.conn_id,
                    fault.kind if fault else None,
                    "Authorization" in self.headers,
                )
            )

    def _sha(self, file: Path) -> str:
        st = file.stat()
        key = (str(file), st.st_size, st.st_mtime_ns)
        with self.state.lock:
            cached = self.state.sha_cache.get(key)
        if cached:
            return cached
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(4 * 1024 * 1024):
                h.update(chunk)
        with self.state.lock:
            self.state.sha_cache[key] = h.hexdigest()
        return h.hexdigest()

    def _plain(
        self, path: str, status: int, body: bytes, fault: Fault | None, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(path, status, 0 if self.command == "HEAD" else len(body), fault)

    # -- verbs -----------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        raw_path = unquote(urlsplit(self.path).path)
        tree = _TREE.match(raw_path) if self.state.hf else None
        if tree:
            return self._tree(*tree.groups())
        hf = _HF.match(raw_path) if self.state.hf else None
        if hf:
            _kind, org, repo, rev, rel = hf.groups()
            logical = f"{org}/{repo}/{rel}"
            fault = self._take_fault(logical, ("status", "bad_etag"))
            if fault and fault.kind == "status":
                return self._status_fault(logical, fault)
            file = self.state.root / org / repo / rel
            if not file.is_file():
                return self._plain(logical, 404, b"Entry not found", fault, {"X-Error-Code": "EntryNotFound"})
            if not is_lfs(file):
                # A small file lives in git itself: served at once, its ETag the git blob id.
                fault = fault or self._take_fault(logical, ("cut", "html", "lfs_pointer", "ignore_range"))
                return self._file(
                    logical,
                    file,
                    fault,
                    {"ETag": f'"{git_blob_id(file.read_bytes())}"', "X-Repo-Commit": rev},
                )
            sha = self._sha(file)
            if fault and fault.kind == "bad_etag":
                sha = hashlib.sha256(sha.encode()).hexdigest()
            # The "CDN" is this server under another name, so clients see a cross-host redirect
            # (as from huggingface.co to its CDN) and must not forward the Hub token there.
            cdn = self.state.cdn or f"http://localhost:{self.server.server_address[1]}"
            headers = {
                "X-Repo-Commit": rev if re.fullmatch(r"[0-9a-f]{40}", rev) else FAKE_COMMIT,
                "X-Linked-Size": str(file.stat().st_size),
                "X-Linked-Etag": f'"{sha}"',
                "ETag": f'"{sha}"',
                # Signed like a real CDN URL: a new signature each time it is resolved.
                "Location": f"{cdn}/cdn/{org}/{repo}/{rel}?sig={self._next_sig()}",
                "Accept-Ranges": "bytes",
            }
            self._plain(logical, 302, b"", fault, headers)
            return None
        if raw_path.startswith("/cdn/") and self.state.hf:
            raw_path = raw_path[len("/cdn") :]
        rel = raw_path.lstrip("/")
        fault = self._take_fault(rel)
        if fault and fault.kind == "status":
            return self._status_fault(rel, fault)
        if fault and fault.kind == "redirect":
            return self._plain(rel, 302, b"", fault, {"Location": fault.location})
        file = (self.state.root / rel).resolve()
        if self.state.root.resolve() not in file.parents or not file.is_file():
            self._plain(rel, 404, b"not found", fault)
        else:
            self._file(rel, file, fault)
        return None

    def _status_fault(self, path: str, fault: Fault) -> None:
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        self._plain(path, fault.status, f"fault: HTTP {fault.status}".encode(), fault, headers)

    def _tree(self, kind: str, org: str, repo: str, rev: str) -> None:
        """The Hub's ``/api/models/{repo}/tree/{rev}?recursive=true``, paginated by ``cursor``."""
        base = self.state.root / org / repo
        query = dict(p.split("=", 1) for p in urlsplit(self.path).query.split("&") if "=" in p)
        logical = f"api/{org}/{repo}/tree"
        if not base.is_dir():
            return self._plain(logical, 404, b'{"error": "Repository not found"}', None)
        items: list[dict[str, Any]] = []
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base).as_posix()
            if p.is_dir():
                items.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": rel})
                continue
            data = p.read_bytes()
            item: dict[str, Any] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": rel}
            if is_lfs(p):
                item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            items.append(item)
        start = int(query.get("cursor", "0"))
        page = items[start : start + self.state.tree_page]
        headers = {"Content-Type": "application/json"}
        if start + self.state.tree_page < len(items):
            nxt = f"http://127.0.0.1:{self.server.server_address[1]}/api/{kind}/{org}/{repo}/tree/{rev}?recursive=true&cursor={start + self.state.tree_page}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._plain(logical, 200, json.dumps(page).encode(), None, headers)
        return None

    def _file(self, rel: str, file: Path, fault: Fault | None, extra: dict[str, str] | None = None) -> None:
        content: bytes | None = None
        if fault and fault.kind == "lfs_pointer":
            content = LFS_POINTER_TEXT
        elif fault and fault.kind == "html":
            content = HTML_TEXT
        elif fault and fault.kind == "json_error":
            content = JSON_TEXT
        elif fault and fault.kind == "gzip":
            content = gzip.compress(file.read_bytes(), compresslevel=1, mtime=0)
        size = len(content) if content is not None else file.stat().st_size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and not (fault and fault.kind == "ignore_range"):
            m = _RANGE.match(rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start = max(0, size - int(m.group(2)))
                if start >= size or start > end:
                    self._plain(rel, 416, b"", fault, {"Content-Range": f"bytes */{size}"})
                    return
                status = 206
        length = end - start + 1
        if fault and fault.kind == "no_length":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            sent = 0 if self.command == "HEAD" else self._send_file(file, 0, size)
            self._record(rel, 200, sent, fault)
            self.close_connection = True
            return
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        extra = extra or {}
        self.send_header("ETag", extra.get("ETag", f'"{file.stat().st_mtime_ns:x}-{size:x}"'))
        for k, v in extra.items():
            if k != "ETag":
                self.send_header(k, v)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        announced = length + (fault.delta if fault and fault.kind == "wrong_length" else 0)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if self.command == "HEAD":
            self._record(rel, status, 0, fault)
            return
        limit = length
        close_after = False
        if fault and fault.kind == "cut":
            limit = min(length, fault.at)
            close_after = True
        if fault and fault.kind == "wrong_length":
            limit = min(length, announced)
            close_after = True
        sent = 0
        try:
            if content is not None:
                sent = self._send_bytes(content[start : start + limit])
            else:
                sent = self._send_file(file, start, limit)
        except (BrokenPipeError, ConnectionResetError):
            close_after = True
        self._record(rel, status, sent, fault)
        if close_after:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _pace(self, t0: float, sent: int) -> None:
        if self.state.rate_bps:
            ahead = sent / self.state.rate_bps - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)

    def _send_bytes(self, data: bytes) -> int:
        t0 = time.monotonic()
        sent = 0
        step = 256 * 1024
        for i in range(0, len(data), step):
            self.wfile.write(data[i : i + step])
            sent += len(data[i : i + step])
            self._pace(t0, sent)
        return sent

    def _send_file(self, file: Path, offset: int, count: int) -> int:
        sock = self.connection
        step = 4 * 1024 * 1024
        if self.state.rate_bps:
            step = max(16 * 1024, min(step, self.state.rate_bps // 20))
        t0 = time.monotonic()
        sent = 0
        with open(file, "rb") as f:
            while sent < count:
                n = os.sendfile(sock.fileno(), f.fileno(), offset + sent, min(step, count - sent))
                if n == 0:
                    break
                sent += n
                self._pace(t0, sent)
        return sent


class FaultServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 serving ``root`` (see the module doc)."""

    def __init__(
        self,
        root: Path,
        *,
        rate_bps: int | None = None,
        hf: bool = False,
        port: int = 0,
        host: str = "127.0.0.1",
        cdn: str | None = None,
    ) -> None:
        self.state = _State(Path(root), rate_bps, hf, cdn=cdn)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.host = host
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def root(self) -> Path:
        return self.state.root

    def start(self) -> FaultServer:
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults and the log ----------------------------------------------------------------
    def fault(self, path: str, kind: str, **kw: Any) -> Fault:
        """Inject a fault for ``path`` (relative to root; in hf mode ``org/repo/file``)."""
        f = Fault(kind, **kw)
        with self.state.lock:
            self.state.faults.setdefault(path.lstrip("/"), []).append(f)
        return f

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def set_rate(self, rate_bps: int | None) -> None:
        self.state.rate_bps = rate_bps

    def requests(self, path: str | None = None, method: str | None = None) -> list[Request]:
        with self.state.lock:
            rows = list(self.state.log)
        return [
            r
            for r in rows
            if (path is None or r.path == path.lstrip("/")) and (method is None or r.method == method)
        ]

    def bytes_sent(self, path: str | None = None) -> int:
        """Body bytes actually written to sockets (for ``path``, or all)."""
        return sum(r.sent for r in self.requests(path))

    def reset_log(self) -> None:
        with self.state.lock:
            self.state.log.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=int, default=None, help="bytes per second per connection")
    parser.add_argument("--hf", action="store_true")
    args = parser.parse_args()
    srv = FaultServer(args.root, rate_bps=args.rate, hf=args.hf, port=args.port).start()
    print(srv.url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
