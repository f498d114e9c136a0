"""The transfer itself (`bootstrap.weights.transfer.Transfer`) against the loopback server: how
many connections it opens, and that the whole-file sha256 is right whichever way each byte
reached the hasher (lent from the buffer it arrived in, or read back from the file)."""

from __future__ import annotations

import hashlib
import os
import time
import types
from pathlib import Path

import pytest

from bootstrap.weights.sources import HTTPSource
from bootstrap.weights.transfer import FetchOptions, Transfer
from tests.httpserver import FaultServer

SIZE = 3 * 1024 * 1024 + 12345  # not a multiple of the piece or the buffer


def serve(tmp_path: Path) -> tuple[Path, bytes]:
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "f.bin").write_bytes(data)
    return root, data


def transfer(tmp_path: Path, url: str, options: FetchOptions) -> tuple[Transfer, str]:
    part = tmp_path / "part"
    part.mkdir()
    source = HTTPSource(url, timeout_s=10)
    source.size = SIZE
    t = Transfer(source, part / "data", part / "journal", SIZE, [], options)
    result = t.run()
    assert result.size == SIZE and result.received == SIZE
    return t, result.sha256


def test_capped_connections_are_added_and_the_hash_is_right_both_ways(tmp_path: Path) -> None:
    root, data = serve(tmp_path)
    with FaultServer(root, rate_bps=1_000_000) as srv:  # each connection capped at 1 MB/s
        options = FetchOptions(connections=4, piece_bytes=256 * 1024, probe_s=0.1, ramp_every_s=0.2)
        t, sha = transfer(tmp_path, f"{srv.url}/f.bin", options)
        conns = {r.conn for r in srv.requests("f.bin", method="GET")}
    assert sha == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "part" / "data").read_bytes() == data
    # One connection alone is far below what sha256 takes: the ramp opened the others.
    assert len(conns) == 4, conns
    # The first piece came alone, in order: lent to the hasher; pieces finished ahead of the
    # hash's position by the other connections were read back. Every byte once.
    assert t.hasher.from_memory > 0 and t.hasher.read_back > 0
    assert t.hasher.from_memory + t.hasher.read_back == SIZE


class SlowSha256:
    """sha256 at ~4 MB/s: a CPU whose hash is slower than one connection (the real hash, slowed)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def update(self, data: memoryview) -> None:
        self.h.update(data)
        time.sleep(len(data) / 4e6)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def test_one_connection_stays_alone_while_it_outruns_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One stream already brings bytes faster than sha256 takes them (here 20 MB/s against a
    hash slowed to 4 MB/s), so no second connection is opened, the stream waits for the hasher
    instead of running ahead, and every byte is hashed from the buffer it arrived in."""
    import bootstrap.weights.hasher as hasher_mod

    monkeypatch.setattr(hasher_mod, "hashlib", types.SimpleNamespace(sha256=SlowSha256))
    root, data = serve(tmp_path)
    with FaultServer(root, rate_bps=20_000_000) as srv:
        options = FetchOptions(connections=4, piece_bytes=256 * 1024, probe_s=0.1, ramp_every_s=0.2)
        t, sha = transfer(tmp_path, f"{srv.url}/f.bin", options)
        conns = {r.conn for r in srv.requests("f.bin", method="GET")}
    assert sha == hashlib.sha256(data).hexdigest()
    assert len(conns) == 1, conns
    assert t.hasher.waits > 0
    assert t.hasher.from_memory == SIZE and t.hasher.read_back == 0


def test_a_lone_connection_asks_once_for_all_its_pieces_and_resumes_where_a_cut_body_broke(
    tmp_path: Path,
) -> None:
    """One connection (here the only one allowed) takes every remaining contiguous piece with
    one request instead of one request per piece; a body cut mid-way is asked again from the
    byte it broke at, to the same end."""
    root, data = serve(tmp_path)
    with FaultServer(root) as srv:
        srv.fault("f.bin", "cut", at=1_000_000, times=1)
        options = FetchOptions(connections=1, piece_bytes=256 * 1024, backoff_s=0.01)
        t, sha = transfer(tmp_path, f"{srv.url}/f.bin", options)
        gets = srv.requests("f.bin", method="GET")
    assert sha == hashlib.sha256(data).hexdigest()
    assert [r.range for r in gets] == [f"bytes=0-{SIZE - 1}", f"bytes=1000000-{SIZE - 1}"], gets
    assert t.hasher.from_memory == SIZE
