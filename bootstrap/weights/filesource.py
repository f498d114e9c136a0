"""``file://`` sources (and a ``BOOTSTRAP_MIRROR`` directory): ranges read with ``preadv``."""

from __future__ import annotations

import os
from pathlib import Path

from bootstrap.weights.protocol import Connection, Probe, Response, SourceFailed


class _FileBody:
    whole = False

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd, self.pos, self.end = fd, start, end

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self.end + 1 - self.pos)
        if n <= 0:
            return 0
        n = os.preadv(self.fd, [buf[:n]], self.pos)
        self.pos += n
        return n

    def close(self) -> None:
        pass


class FileConnection:
    def __init__(self, source: FileSource) -> None:
        self.source = source
        self.fd: int | None = None

    def get(self, start: int, end: int | None) -> Response:
        if self.fd is None:
            try:
                self.fd = os.open(self.source.path, os.O_RDONLY)
            except OSError as err:
                raise SourceFailed(f"{err.strerror or err}") from None
        size = os.fstat(self.fd).st_size
        return _FileBody(self.fd, start, size - 1 if end is None else end)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class FileSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = f"file://{path}"

    def probe(self) -> Probe:
        try:
            st = self.path.stat()
        except OSError as err:
            raise SourceFailed(f"{err.strerror or err}") from None
        if not self.path.is_file():
            raise SourceFailed("not a file")
        return Probe(size=st.st_size, etag=f"{st.st_mtime_ns}-{st.st_size}")

    def connect(self) -> Connection:
        return FileConnection(self)
