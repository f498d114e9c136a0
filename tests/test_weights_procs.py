"""Phase ``weights`` in real processes: kill -9 and resume, eight workers at once (with and
without locks), a full tmpfs, and a warm boot with the server gone.

The processes run the product's own ``bootstrap run --until weights`` on volumes whose
environment was built once for the session (``env_volume_factory``), so the env phase is a
reuse and the weights phase is what is measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, base_environ, can_mount_tmpfs, read_jsonl, tmpfs
from tests.httpserver import FaultServer
from tests.test_weights_verify import onnx_bytes, zip_bytes

pytestmark = pytest.mark.slow

CAP = "faceswap"  # a selected capability whose env the session builds once
WEIGHTS_ONLY = [sys.executable, "-m", "bootstrap", "run", "--until", "weights"]


def rand_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FaultServer, dict[str, bytes]]]:
    root = tmp_path / "srv"
    root.mkdir()
    files = {
        "big.bin": rand_bytes(96 * 1024 * 1024, 1),
        "small.onnx": onnx_bytes(300_000, seed=3),
        "pack.zip": zip_bytes({f"m{i}.onnx": onnx_bytes(50_000, seed=10 + i) for i in range(3)}),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    with FaultServer(root) as srv:
        yield srv, files


def manifest(tmp_path: Path, url: str, names: list[str]) -> Path:
    kinds = {"big.bin": ("raw", ""), "small.onnx": ("onnx", ""), "pack.zip": ("zip", "w/pack")}
    text = ""
    for name in names:
        fmt, unpack = kinds[name]
        text += (
            f'[[file]]\ndest = "w/{name}"\nsource = "{url}/{name}"\nformat = "{fmt}"\ncapability = "{CAP}"\n'
        )
        if unpack:
            text += f'unpack = "{unpack}"\n'
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def boot_env(volume: Path, manifest_path: Path, worker: str, **extra: str) -> dict[str, str]:
    return base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS=CAP,
        BOOTSTRAP_MANIFEST=str(manifest_path),
        BOOTSTRAP_MIN_FREE_GB="0.01",
        BOOTSTRAP_WORKER_ID=worker,
        BOOTSTRAP_LEASE_TTL_S="5",
        BOOTSTRAP_LOCK_TIMEOUT_S="120",
        **extra,
    )


def weights_end(volume: Path, worker: str) -> dict[str, Any]:
    events = read_jsonl(volume / ".bootstrap" / "logs" / worker / "boot.jsonl")
    ends = [e for e in events if e.get("phase") == "weights" and e.get("event") in ("end", "fail")]
    assert ends, events[-5:]
    return ends[-1]


def journal_covered(volume: Path) -> int:
    total = 0
    for journal in (volume / ".bootstrap" / "models" / "w").glob(".big.bin.*.part/journal"):
        for line in journal.read_text().splitlines()[1:]:
            a, _, b = line.partition(" ")
            if a.isdigit() and b.isdigit():
                total += int(b) - int(a)
    return total


def assert_intact(volume: Path, files: dict[str, bytes], names: list[str]) -> None:
    models = volume / ".bootstrap" / "models"
    for name in names:
        if name.endswith(".zip"):
            rec = json.loads((models / ".verified" / "w" / "pack.json").read_text())
            assert len(rec["files"]) == 3
            for item in rec["files"]:
                assert (
                    hashlib.sha256((models / "w" / "pack" / item["path"]).read_bytes()).hexdigest()
                    == item["sha256"]
                )
            assert not (models / "w" / name).exists()
        else:
            assert (models / "w" / name).read_bytes() == files[name], name
            rec = json.loads((models / ".verified" / "w" / f"{name}.json").read_text())
            assert rec["sha256"] == hashlib.sha256(files[name]).hexdigest()
    leftovers = [p for p in models.rglob("*") if p.name.endswith((".part", ".unpack", ".tmp", ".new"))]
    assert leftovers == []


def test_sigkill_mid_download_then_resume(
    tmp_path: Path, served: tuple[FaultServer, dict[str, bytes]], env_volume_factory: Any
) -> None:
    srv, files = served
    size = len(files["big.bin"])
    srv.set_rate(2_000_000)  # per connection; 8 connections → ~16 MB/s, ~6 s for the file
    volume = env_volume_factory(tmp_path / "vol", (CAP,))
    man = manifest(tmp_path, srv.url, ["big.bin"])
    env = boot_env(volume, man, "killed")
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        WEIGHTS_ONLY, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while journal_covered(volume) < size * 0.4:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the download never got going"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    log.close()
    time.sleep(0.3)  # let the server's handler threads notice the dead connections
    first = srv.bytes_sent("big.bin")
    assert first < size, "killed before the end"
    srv.reset_log()
    srv.set_rate(None)
    done = weights_only(boot_env(volume, man, "second"), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_intact(volume, files, ["big.bin"])
    second = srv.bytes_sent("big.bin")
    refetched = first + second - size
    # Only what was in flight and not yet journaled is fetched twice.
    assert second < size * 0.7, (first, second)
    assert refetched < size * 0.25, (first, second, refetched)
    end = weights_end(volume, "second")
    assert end["event"] == "end" and end["detail"]["bytes_resumed"] >= size * 0.4


def weights_only(env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        WEIGHTS_ONLY, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def _run_many(n: int, volume: Path, man: Path, **extra: str) -> list[subprocess.CompletedProcess[str]]:
    procs = []
    for i in range(n):
        env = boot_env(volume, man, f"w{i}", **extra)
        procs.append(
            subprocess.Popen(
                WEIGHTS_ONLY, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


NAMES = ["big.bin", "small.onnx", "pack.zip"]


def test_eight_workers_fetch_each_file_once(
    tmp_path: Path, served: tuple[FaultServer, dict[str, bytes]], env_volume_factory: Any
) -> None:
    srv, files = served
    srv.set_rate(6_000_000)  # slow enough that all eight overlap
    volume = env_volume_factory(tmp_path / "vol", (CAP,))
    man = manifest(tmp_path, srv.url, NAMES)
    results = _run_many(8, volume, man)
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert_intact(volume, files, NAMES)
    for name in NAMES:
        assert srv.bytes_sent(name) <= 1.05 * len(files[name]), (name, srv.bytes_sent(name))
    fetched: dict[str, int] = {}
    for i in range(8):
        for dest in weights_end(volume, f"w{i}")["detail"]["fetched"]:
            fetched[dest] = fetched.get(dest, 0) + 1
    assert fetched == {"w/big.bin": 1, "w/small.onnx": 1, "w/pack": 1}
    # Then the server goes away: a warm boot needs none of it.
    srv.stop()
    warm = weights_only(boot_env(volume, man, "warm"), timeout=120)
    assert warm.returncode == 0, warm.stdout[-2000:] + warm.stderr[-2000:]
    assert weights_end(volume, "warm")["detail"]["fetched"] == []


def test_eight_workers_without_locks_stay_intact(
    tmp_path: Path, served: tuple[FaultServer, dict[str, bytes]], env_volume_factory: Any
) -> None:
    srv, files = served
    srv.set_rate(8_000_000)
    volume = env_volume_factory(tmp_path / "vol", (CAP,))
    names = ["small.onnx", "pack.zip", "big.bin"]
    man = manifest(tmp_path, srv.url, names)
    results = _run_many(8, volume, man, BOOTSTRAP_LOCKS="off")
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert_intact(volume, files, names)
    assert not list((volume / ".bootstrap" / "leases").glob("file-*.lease"))


def test_tmpfs_too_small_exits_11_before_download(
    tmp_path: Path, served: tuple[FaultServer, dict[str, bytes]], env_volume_factory: Any
) -> None:
    """The models directory on its own 64 MB filesystem ("every filesystem written")."""
    if not can_mount_tmpfs():
        pytest.skip("needs root to mount a tmpfs")
    srv, _ = served
    man = manifest(tmp_path, srv.url, ["big.bin"])
    volume = env_volume_factory(tmp_path / "vol", (CAP,))
    with tmpfs(volume / ".bootstrap" / "models", "64m"):
        proc = weights_only(boot_env(volume, man, "small"), timeout=120)
        assert proc.returncode == 11, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "bytes" in proc.stderr and "free" in proc.stderr
        end = weights_end(volume, "small")
        assert end["event"] == "fail" and end["detail"]["code"] == 11
        assert srv.requests("big.bin", method="GET") == []
        models = volume / ".bootstrap" / "models"
        assert [p for p in models.rglob("*") if p.is_file()] == []
        assert not list((volume / ".bootstrap" / "leases").glob("file-*"))


def test_eight_workers_publish_a_repo_once(tmp_path: Path, env_volume_factory: Any) -> None:
    """Eight real ``bootstrap run --until weights`` race for one ``[[repo]]``: one fetches it,
    the others wait and use it; nothing is ever half-published."""
    import numpy as np

    from tests.test_weights_verify import safetensors_bytes

    pin = "4dccd71e17017ccad11b92171f5f24aa408a1407"
    files = {
        "config.json": b'{"d_model": 8}\n',
        "model.safetensors": safetensors_bytes(
            {"w": np.random.default_rng(0).standard_normal((1024, 4096), dtype=np.float32)}
        ),  # 16 MB
        "sub/vocab.txt": b"a\nb\nc\n",
    }
    root = tmp_path / "hub"
    for rel, data in files.items():
        (root / "org" / "r" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "org" / "r" / rel).write_bytes(data)
    volume = env_volume_factory(tmp_path / "vol", (CAP,))
    man = tmp_path / "models.toml"
    man.write_text(f'[[repo]]\ndest = "w/r"\nsource = "hf://org/r?revision={pin}"\ncapability = "{CAP}"\n')
    with FaultServer(root, hf=True, rate_bps=4_000_000) as hub:
        results = _run_many(8, volume, man, HF_ENDPOINT=hub.url)
        for r in results:
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        for rel, data in files.items():
            assert hub.bytes_sent(f"org/r/{rel}") <= 1.05 * len(data), rel
    fetched = [w for w in range(8) if weights_end(volume, f"w{w}")["detail"]["fetched"] == ["w/r"]]
    assert len(fetched) == 1
    models = volume / ".bootstrap" / "models"
    rec = json.loads((models / ".verified" / "w" / "r.json").read_text())
    assert {i["path"]: i["sha256"] for i in rec["files"]} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()
    }
    for rel, data in files.items():
        assert (models / "w" / "r" / rel).read_bytes() == data
    assert not [p for p in (models / "w").iterdir() if p.name.startswith(".")]
    for w in range(8):  # every worker's plan points at the one published directory
        plan = (
            json.loads((volume / ".bootstrap" / "state" / f"w{w}.json").read_text())
            if (volume / ".bootstrap" / "state" / f"w{w}.json").exists()
            else None
        )
        assert plan is None or plan["models"]["w/r"] == str(models / "w" / "r")


def _imported(stderr: str) -> set[str]:
    """Module names from ``python -X importtime``'s report on stderr."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_a_warm_boot_imports_nothing_that_fetches(
    tmp_path: Path, served: tuple[FaultServer, dict[str, bytes]], env_volume_factory: Any
) -> None:
    """Issue 16: a boot whose files are all verified never loads the fetcher (``http.client``,
    ``ssl``, ``boto3``); the cold boot before it, which fetched, did — so the check can fail."""
    srv, _ = served
    volume = env_volume_factory(tmp_path / "vol", (CAP,))
    man = manifest(tmp_path, srv.url, ["small.onnx"])
    importtime = [sys.executable, "-X", "importtime", *WEIGHTS_ONLY[1:]]
    runs = {}
    for worker in ("cold", "warm"):
        runs[worker] = subprocess.run(
            importtime,
            env=boot_env(volume, man, worker),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert runs[worker].returncode == 0, runs[worker].stderr[-3000:]
    assert weights_end(volume, "cold")["detail"]["fetched"] == ["w/small.onnx"]
    assert weights_end(volume, "warm")["detail"]["fetched"] == []
    fetcher = {"http.client", "ssl", "boto3", "bootstrap.weights.sources", "bootstrap.weights.transfer"}
    cold, warm = _imported(runs["cold"].stderr), _imported(runs["warm"].stderr)
    assert {"http.client", "bootstrap.weights.sources"} <= cold
    assert "bootstrap.weights.phase" in warm
    assert warm & fetcher == set()
