"""One judgement of "is the writer of this leftover dead?": env, gc, diagnose and the weights agree."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootstrap import diagnose as dg
from bootstrap import env as envmod
from bootstrap import gc, lease
from bootstrap.settings import Settings
from bootstrap.volume import Volume
from bootstrap.weights.transfer import owner_alive
from tests.helpers import base_environ


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _leftover(envs: Path, tag: str, record: dict[str, object], age_s: float) -> Path:
    """A builder's temp dir with its ``.builder`` heartbeat, last touched ``age_s`` ago."""
    d = envs / f"{envmod.TMP_PREFIX}{tag * 16}-{envmod._host()}-1-abcdef"
    (d / "lib").mkdir(parents=True)
    marker = d / envmod.BUILDER_FILE
    marker.write_text(json.dumps(record))
    t = time.time() - age_s
    os.utime(marker, (t, t))
    return d


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "vol").mkdir()
    return Settings.from_env(base_environ(BOOTSTRAP_VOLUME=str(tmp_path / "vol"), BOOTSTRAP_LEASE_TTL_S="30"))


def test_env_gc_and_diagnose_judge_the_same_leftover_the_same_way(settings: Settings) -> None:
    assert settings.stale_after_s == lease.stale_after_s(30.0) == 120.0
    volume = Volume(settings.volume or Path(), "test")
    here = socket.gethostname()
    stale = settings.stale_after_s
    cases = {
        # name: (record, age, dead?)
        "a": (lease.owner_record(), 10 * stale, False),  # this process: never dead, however old
        "b": ({"host": here, "pid": _dead_pid()}, 1.0, True),  # this host, pid gone: dead at once
        "c": ({"host": "elsewhere", "pid": 1}, 1.0, False),  # elsewhere, fresh heartbeat
        "d": ({"host": "elsewhere", "pid": 1}, stale + 30, True),  # elsewhere, silent too long
    }
    paths = {tag: _leftover(volume.envs, tag, rec, age) for tag, (rec, age, _dead) in cases.items()}

    gc_dead = {i.path.name for i in gc.collect(settings, volume) if i.kind == "leftover"}
    report = dg.collect(settings, dg.Options(), only=["env"])
    half_built = next(c for c in report.section("env").checks if c.name == "half_built").detail
    for tag, (record, age, dead) in cases.items():
        p = paths[tag]
        assert envmod.leftover_is_dead(p, stale) is dead, tag
        assert lease.writer_is_dead(record, time.time() - age, stale) is dead, tag
        assert owner_alive(record, settings.lease_ttl_s, time.time() - age) is not dead, tag
        assert (p.name in gc_dead) is dead, tag
        line = next(line for line in half_built.splitlines() if line.startswith(p.name))
        assert ("its builder is gone" in line) is dead, (tag, line)
        assert ("being built by" in line) is not dead, (tag, line)
