"""What every weight source is to the fetcher: the `Source` / `Connection` / `Response` protocol,
what a probe learns (`Probe`), and the two ways a source fails (SPEC §6).

`Transient`: retry the same request later (a dropped connection, a timeout, 429 or 5xx — with the
server's Retry-After when it gave one). `SourceFailed`: this source will not give the file (404,
403, a wrong size); the next one is tried. The sources themselves are in `bootstrap.weights.sources`
(http(s) and the Hub), `bootstrap.weights.s3source` and `bootstrap.weights.filesource`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Transient(Exception):
    """Worth retrying the same request; ``retry_after`` is the server's wish in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceFailed(Exception):
    """This source will not give a good file; the next one is tried."""


@dataclass
class Probe:
    """What a source says about the file before any byte of it is fetched."""

    size: int | None
    #: a sha256 the source itself vouches for (the Hub's LFS ETag), else None
    sha256: str | None = None
    #: an opaque version tag (HTTP ETag, S3 ETag), to match a journal against
    etag: str | None = None
    #: the git blob id the Hub gives a non-LFS file (its ETag when no X-Linked-Etag came)
    blob: str | None = None


class Response(Protocol):
    """A body being received: ``readinto`` returns 0 at its end."""

    #: True when the body is the whole file (a server that ignored the Range header)
    whole: bool

    def readinto(self, buf: memoryview) -> int: ...

    def close(self) -> None: ...


class Connection(Protocol):
    def get(self, start: int, end: int | None) -> Response:
        """Bytes ``start..end`` inclusive (``end`` None: to the end of the file)."""
        ...

    def close(self) -> None: ...


class Source(Protocol):
    #: where the bytes come from, for logs and records (never holds a credential)
    label: str

    def probe(self) -> Probe: ...

    def connect(self) -> Connection: ...


def clean_etag(value: str | None) -> str | None:
    """An ETag without ``W/`` and quotes (the same tag from HTTP and from S3), or None."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None
