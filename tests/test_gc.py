"""``bootstrap gc`` on a real volume layout: what goes, what stays, and --dry-run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bootstrap import env as envmod
from tests import test_weights_repo
from tests.helpers import base_environ, run_bootstrap
from tests.httpserver import FaultServer
from tests.test_weights_fetch import Boot
from tests.test_weights_repo import FILES, PIN, assert_repo, make_cache, repo_entry, tree_state

hub = test_weights_repo.hub  # the HF-like server fixture

DAY = 86400.0


def _env(envs: Path, key: str, built_at: float, size: int = 100_000) -> Path:
    d = envs / key
    (d / "lib").mkdir(parents=True)
    (d / "lib" / "blob").write_bytes(b"x" * size)
    (d / "READY").write_text(json.dumps({"key": key, "built_at": built_at, "extras": ["calc"]}))
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _layout(volume: Path, manifest: Path) -> dict[str, Path]:
    b = volume / ".bootstrap"
    envs = b / "envs"
    now = time.time()
    p: dict[str, Path] = {}
    p["used"] = _env(envs, "a" * 32, now - 30 * DAY)
    p["unused"] = _env(envs, "b" * 32, now - 30 * DAY)
    p["fresh"] = _env(envs, "c" * 32, now - 60)
    p["stale_plan"] = _env(envs, "d" * 32, now - 30 * DAY)
    p["leased"] = _env(envs, "e" * 32, now - 30 * DAY)
    (b / "state").mkdir(parents=True)
    (b / "state" / "w1.json").write_text(json.dumps({"env_key": "a" * 32}))
    (b / "state" / "old.json").write_text(json.dumps({"env_key": "d" * 32}))
    _age(b / "state" / "old.json", 8 * DAY)
    (b / "leases").mkdir()
    (b / "leases" / f"env-{'e' * 32}.lease").write_text(
        json.dumps({"owner": "w9:1", "host": socket.gethostname(), "pid": os.getpid(), "token": "t"})
    )
    p["old_lease"] = b / "leases" / "file-abc.lease"
    p["old_lease"].write_text(json.dumps({"owner": "gone:1", "host": "elsewhere", "pid": 1, "token": "t"}))
    _age(p["old_lease"], 3600)
    host = envmod._host()
    dead = envs / f"{envmod.TMP_PREFIX}{'f' * 16}-{host}-{_dead_pid()}-abcdef"
    (dead / "lib").mkdir(parents=True)
    (dead / envmod.BUILDER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    p["dead_tmp"] = dead
    live = envs / f"{envmod.TMP_PREFIX}{'0' * 16}-{host}-{os.getpid()}-abcdef"
    live.mkdir()
    (live / envmod.BUILDER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    p["live_tmp"] = live
    p["trash"] = envs / f"{envmod.TMP_PREFIX}{envmod.TRASH}12345678"
    p["trash"].mkdir()
    q = b / "quarantine"
    q.mkdir()
    p["q_old"] = q / "x.onnx.20260101T000000Z.abcd1234"
    p["q_old"].write_bytes(b"bad")
    _age(p["q_old"], 2 * DAY)
    p["q_new"] = q / "y.onnx.20261123T000000Z.abcd1234"
    p["q_new"].write_bytes(b"bad")
    models = b / "models"
    (models / ".verified").mkdir(parents=True)
    for name in ("listed.onnx", "gone.onnx"):
        (models / name).write_bytes(b"m" * 1000)
        (models / ".verified" / f"{name}.json").write_text(json.dumps({"size": 1000}))
    p["listed"], p["gone"] = models / "listed.onnx", models / "gone.onnx"
    manifest.write_text(
        '[[file]]\ndest = "listed.onnx"\nsource = "https://example.com/listed.onnx"\nformat = "raw"\ncapability = "calc"\n'
    )
    return p


def test_gc_dry_run_lists_then_gc_removes_only_what_no_one_uses(tmp_path: Path, volume: Path) -> None:
    manifest = tmp_path / "models.toml"
    p = _layout(volume, manifest)
    environ = base_environ(
        BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_MANIFEST=str(manifest), BOOTSTRAP_EXTRAS="calc"
    )
    dry = run_bootstrap(["gc", "--dry-run", "--models"], environ)
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    for name in ("unused", "stale_plan", "dead_tmp", "trash", "q_old", "gone"):
        assert "would remove" in out and str(p[name]) in out, name
    for name in ("used", "fresh", "leased", "live_tmp", "q_new", "listed"):
        assert str(p[name]) + " " not in out, name
    assert "would free" in out and "bytes" in out
    assert all(path.exists() for path in p.values())  # dry run removes nothing

    plain = run_bootstrap(["gc"], environ)
    assert plain.returncode == 0, plain.stderr
    for name in ("unused", "stale_plan", "dead_tmp", "trash", "q_old", "old_lease"):
        assert not p[name].exists(), name
    for name in ("used", "fresh", "leased", "live_tmp", "q_new", "listed", "gone"):
        assert p[name].exists(), name  # models only with --models
    assert not [x for x in (volume / ".bootstrap" / "envs").iterdir() if envmod.TRASH in x.name]

    models = run_bootstrap(["gc", "--models"], environ)
    assert models.returncode == 0, models.stderr
    assert (
        not p["gone"].exists()
        and not (volume / ".bootstrap" / "models" / ".verified" / "gone.onnx.json").exists()
    )
    assert (
        p["listed"].exists()
        and (volume / ".bootstrap" / "models" / ".verified" / "listed.onnx.json").exists()
    )


def test_gc_on_an_empty_volume_exits_0(volume: Path) -> None:
    proc = run_bootstrap(["gc"], base_environ(BOOTSTRAP_VOLUME=str(volume)))
    assert proc.returncode == 0, proc.stderr
    assert "freed 0.00 GB (0 bytes)" in proc.stdout


def test_gc_models_keeps_a_listed_repo_removes_an_old_revision_and_never_touches_the_hf_cache(
    tmp_path: Path, hub: FaultServer
) -> None:
    cache = tmp_path / "hf-cache"
    snap = make_cache(cache, PIN)
    before = tree_state(cache)
    kept = repo_entry("speech/tiny")
    moved = repo_entry("speech/moved")
    Boot(tmp_path, kept + moved, HF_ENDPOINT=hub.url).run()  # both published on the volume
    boot = Boot(
        tmp_path,
        kept + moved + repo_entry("speech/cached"),
        HF_ENDPOINT=hub.url,
        BOOTSTRAP_HF_CACHE=str(cache),
    )
    boot.run()  # speech/cached verified in place in the cache
    assert (boot.volume.verified / "speech/cached.json").exists()
    # The manifest now pins speech/moved at another revision and no longer lists speech/cached.
    boot.manifest.write_text(kept + repo_entry("speech/moved", source=f"hf://org/tiny?revision={'2' * 40}"))
    environ = base_environ(**{k: v for k, v in boot.environ.items() if k != "BOOTSTRAP_LOCK_TIMEOUT_S"})
    proc = run_bootstrap(["gc", "--models"], environ)
    assert proc.returncode == 0, proc.stderr
    assert "removed model" in proc.stdout and "an old revision" in proc.stdout, proc.stdout
    assert_repo(boot, "speech/tiny")  # listed and current: every file still there
    assert (boot.volume.verified / "speech/tiny.json").exists()
    assert not (boot.models / "speech/moved").exists()
    assert not (boot.volume.verified / "speech/moved.json").exists()
    assert not (boot.volume.verified / "speech/cached.json").exists()  # only its record goes
    assert tree_state(cache) == before  # nothing in the HF cache deleted or touched
    assert all((snap / rel).read_bytes() == FILES[rel] for rel in FILES)
