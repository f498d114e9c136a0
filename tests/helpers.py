"""Shared test tools: the repository, boot environments, a seeded uv cache, free ports, tmpfs.

Everything here is real: processes, filesystems, servers on loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = [sys.executable, "-m", "bootstrap"]

#: Variables a developer's shell may carry that must never leak into a test's worker.
SCRUBBED_PREFIXES = ("AWS_", "HF_", "RUNPOD_", "BUCKET_", "BOOTSTRAP_", "WORKER_", "UV_", "VIRTUAL_ENV")

#: Marker files (which extras sets the shared cache is known to hold) and the fill lock.
TEST_CACHE_HOME = Path(os.environ.get("VW_TEST_CACHE_HOME", Path.home() / ".cache" / "volume-worker-tests"))


def _registered(names: tuple[str, ...]) -> tuple[str, ...]:
    from worker import pipelines  # noqa: F401 - registers the capabilities (standard library only)
    from worker.capabilities import CAPABILITIES

    return tuple(n for n in names if n in CAPABILITIES)


#: The torch capabilities, built together once per test session (`torch_env_volume` in
#: conftest): those of speech, video and animate whose pipelines this checkout registers.
TORCH_EXTRAS = _registered(("animate", "speech", "video"))


def shared_uv_cache() -> Path:
    """The uv cache the dev venv was synced from (``uv cache dir``), so test volumes reuse the
    wheels already downloaded for it instead of a second multi-GB download for torch.
    ``VW_TEST_UV_CACHE`` overrides it."""
    override = os.environ.get("VW_TEST_UV_CACHE")
    if override:
        return Path(override)
    proc = subprocess.run(
        [sys.executable, "-m", "uv", "cache", "dir"], capture_output=True, text=True, check=False
    )
    found = proc.stdout.strip()
    return Path(found) if proc.returncode == 0 and found else Path.home() / ".cache" / "uv"


SHARED_UV_CACHE = shared_uv_cache()


def base_environ(**overrides: str) -> dict[str, str]:
    """A clean environment for a boot: no credentials, no hub lookups, no Python downloads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "UV_PYTHON_DOWNLOADS": "never",
            "PYTHONUNBUFFERED": "1",
            "BOOTSTRAP_LOG_FORMAT": "json",
        }
    )
    env.update(overrides)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_uv_cache(volume_root: Path, extras: tuple[str, ...] = ()) -> None:
    """Hard-link the dev uv cache (holding the project's lock with ``extras``) into a test volume.

    Internal logic:

    1. once per extras set and lock (a marker under `TEST_CACHE_HOME`, under a file lock so
       parallel test processes do it once), a real ``uv sync`` into a scratch env makes sure the
       cache holds every wheel: ``--offline`` first (the dev venv's sync already filled it),
       online only when something is missing; hard links into the scratch env when it shares
       the cache's filesystem, so the check copies nothing;
    2. the cache is then hard-linked (``cp -al``) into ``<volume>/.bootstrap/uv-cache``; on
       another filesystem, where links cannot go, it is copied (``cp -a``). uv writes cache
       entries by temp file + rename, so a test's uv never changes the shared files in place.

    Only the cache is seeded: every env is still built by the product, with its own commands.
    """
    cache = shared_uv_cache()
    cache.mkdir(parents=True, exist_ok=True)
    TEST_CACHE_HOME.mkdir(parents=True, exist_ok=True)
    marker = (
        TEST_CACHE_HOME / f"holds-{_cache_id(cache)}-{'-'.join(sorted(extras)) or 'base'}-{_lock_digest()}"
    )
    with open(TEST_CACHE_HOME / "fill.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            scratch_parent = cache.parent if _same_fs(cache.parent, cache) else TEST_CACHE_HOME
            scratch = scratch_parent / f".vw-scratch-{uuid.uuid4().hex[:8]}"
            link = "hardlink" if _same_fs(scratch_parent, cache) else "copy"
            cmd = ["uv", "sync", "--frozen", "--no-install-project", "--no-dev", "--link-mode", link]
            for extra in extras:
                cmd += ["--extra", extra]
            env = base_environ(UV_CACHE_DIR=str(cache), UV_PROJECT_ENVIRONMENT=str(scratch))
            try:
                offline = subprocess.run(
                    [*cmd, "--offline"], cwd=REPO, env=env, capture_output=True, check=False
                )
                if offline.returncode != 0:
                    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            marker.touch()
    target = volume_root / ".bootstrap" / "uv-cache"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        how = "-al" if _same_fs(target.parent, cache) else "-a"
        subprocess.run(["cp", how, str(cache), str(target)], check=True)


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _cache_id(cache: Path) -> str:
    import hashlib

    return hashlib.sha256(str(cache.resolve()).encode()).hexdigest()[:8]


def _lock_digest() -> str:
    import hashlib

    return hashlib.sha256((REPO / "uv.lock").read_bytes()).hexdigest()[:12]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def phases_in_order(events: list[dict[str, Any]]) -> list[str]:
    """Phases by first appearance."""
    seen: list[str] = []
    for e in events:
        if e.get("phase") not in seen:
            seen.append(e["phase"])
    return seen


def run_bootstrap(
    args: list[str], env: Mapping[str, str], *, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BOOTSTRAP, *args],
        env=dict(env),
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def post_json(url: str, payload: Any, timeout: float = 120) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # loopback only
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body or b"null")
        except ValueError:
            return err.code, body.decode(errors="replace")


class WorkerProcess:
    """A real boot (``start.sh`` or ``bootstrap run``) serving the SDK's local API on loopback."""

    def __init__(self, argv: list[str], env: Mapping[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=REPO,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"worker not listening after {timeout} s:\n{self.output()[-4000:]}")

    def runsync(self, job_input: Any, timeout: float = 300) -> tuple[int, Any]:
        return post_json(f"{self.url}/runsync", {"input": job_input}, timeout=timeout)

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_file.close()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. ``"64m"``) mounted at ``path``; needs root."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None
