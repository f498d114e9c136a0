"""The boot path end to end (issue 2): rendered start.sh → bootstrap run → worker → /runsync."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    BOOTSTRAP,
    REPO,
    WorkerProcess,
    base_environ,
    free_port,
    phases_in_order,
    read_jsonl,
    run_bootstrap,
    seed_uv_cache,
)

pytestmark = pytest.mark.slow


def _render(tmp_path: Path) -> Path:
    start = tmp_path / "start.sh"
    proc = run_bootstrap(["render", "--output", str(start)], base_environ())
    assert proc.returncode == 0, proc.stderr
    return start


def _boot(start: Path, volume: Path, tmp_path: Path, name: str, **env: str) -> WorkerProcess:
    port = free_port()
    environ = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS="",
        BOOTSTRAP_SERVE_API=f"127.0.0.1:{port}",
        BOOTSTRAP_WORKER_ID=name,
        **env,
    )
    worker = WorkerProcess([str(start)], environ, port, tmp_path / f"{name}-{time.monotonic_ns()}.log")
    worker.wait_ready(timeout=300)
    return worker


def test_start_sh_boots_a_worker_that_answers_health(tmp_path: Path, volume: Path) -> None:
    start = _render(tmp_path)
    seed_uv_cache(volume)
    worker = _boot(start, volume, tmp_path, "w1")
    try:
        status, body = worker.runsync({"task": "health"})
    finally:
        worker.stop()
    assert status == 200, body
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    envs = [p.name for p in (volume / ".bootstrap" / "envs").iterdir() if (p / "READY").is_file()]
    assert out["env_key"] in envs
    assert out["status"] == "ok"
    assert out["capabilities"] == {}
    assert set(out["boot_ms"]) == {"preflight", "env", "weights", "import", "warm"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in out["boot_ms"].values())
    assert out["versions"]["runpod"] == "1.12.0"

    log_dir = volume / ".bootstrap" / "logs" / "w1"
    events = read_jsonl(log_dir / "boot.jsonl")
    assert phases_in_order(events) == ["preflight", "env", "weights", "import", "warm", "ready", "job"]
    env_end = next(e for e in events if e["phase"] == "env" and e["event"] == "end")
    assert env_end["detail"]["reused"] is False
    assert env_end["detail"]["key"] == out["env_key"]
    assert [e["event"] for e in events if e["phase"] == "ready"] == ["end"]
    job = next(e for e in events if e["phase"] == "job")
    assert job["event"] == "end" and job["ms"] >= 0
    # The timeline also went to stdout as JSON lines (BOOTSTRAP_LOG_FORMAT=json).
    stdout_events = [json.loads(line) for line in worker.output().splitlines() if line.startswith('{"ts"')]
    assert {"preflight", "env", "weights", "import", "warm", "ready"} <= {e["phase"] for e in stdout_events}
    plan = json.loads((volume / ".bootstrap" / "state" / "w1.json").read_text())
    assert plan["env_key"] == out["env_key"]

    # A second boot on the same volume reuses the environment and never runs uv's install.
    worker = _boot(start, volume, tmp_path, "w1")
    try:
        status, body = worker.runsync({"task": "health"})
    finally:
        worker.stop()
    assert body["status"] == "COMPLETED"
    assert body["output"]["env_key"] == out["env_key"]
    events = read_jsonl(log_dir / "boot.jsonl")
    env_end = next(e for e in events if e["phase"] == "env" and e["event"] == "end")
    assert env_end["detail"]["reused"] is True
    assert "uv sync" not in (log_dir / "boot.log").read_text()
    # The first boot's story was kept beside it.
    assert (log_dir / "boot.prev.jsonl").is_file()
    assert phases_in_order(read_jsonl(log_dir / "boot.prev.jsonl"))[:3] == ["preflight", "env", "weights"]

    # A warm boot makes zero network calls: it succeeds in a namespace with no network at all.
    if os.geteuid() == 0 and shutil.which("unshare"):
        env = base_environ(BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="", BOOTSTRAP_WORKER_ID="offline")
        proc = subprocess.run(
            ["unshare", "--net", *BOOTSTRAP, "run", "--until", "weights"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_job_input_is_answered_and_the_worker_keeps_serving(tmp_path: Path, volume: Path) -> None:
    start = _render(tmp_path)
    seed_uv_cache(volume)
    worker = _boot(start, volume, tmp_path, "w2")
    try:
        _, unknown = worker.runsync({"task": "paint"})
        _, bad_task = worker.runsync({"task": 7})
        _, no_capability = worker.runsync({})  # default task faceswap: not selected here
        _, health = worker.runsync({"task": "health"})
    finally:
        worker.stop()
    assert unknown["output"]["success"] is False
    assert unknown["output"]["code"] == "UNKNOWN_TASK"
    assert bad_task["output"] == {
        "success": False,
        "code": "INVALID_INPUT",
        "message": "'task' must be a string",
    }
    # A capability this worker does not have is the operator's fault: a RunPod error.
    assert no_capability["status"] == "FAILED", no_capability
    assert "faceswap" in no_capability["error"]
    assert health["output"]["status"] == "ok"


def test_weights_failure_with_serve_error_answers_jobs_then_exits_13(
    tmp_path: Path, env_volume_factory
) -> None:  # type: ignore[no-untyped-def]
    manifest = tmp_path / "models.toml"
    missing = tmp_path / "nowhere" / "model.bin"
    manifest.write_text(
        f'[[file]]\ndest = "m/model.bin"\nsource = "file://{missing}"\nformat = "raw"\ncapability = "faceswap"\n'
    )
    start = _render(tmp_path)
    volume = env_volume_factory(tmp_path / "vol", ("faceswap",))
    port = free_port()
    environ = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS="faceswap",
        BOOTSTRAP_MANIFEST=str(manifest),
        BOOTSTRAP_ON_FATAL="serve-error",
        BOOTSTRAP_FATAL_GRACE_S="20",  # the SDK's local API must come up inside it on a loaded machine
        BOOTSTRAP_SERVE_API=f"127.0.0.1:{port}",
        BOOTSTRAP_WORKER_ID="w3",
    )
    worker = WorkerProcess([str(start)], environ, port, tmp_path / "w3.log")
    try:
        worker.wait_ready(timeout=300)
        _, job = worker.runsync({"task": "anything"})
        _, health = worker.runsync({"task": "health"})
        rc = worker.proc.wait(timeout=60)
    finally:
        worker.stop()
    assert isinstance(job, dict), job
    assert job["status"] == "FAILED", job
    assert "WEIGHTS (13)" in job["error"]
    assert isinstance(health, dict), (health, worker.output()[-8000:])
    assert health["output"]["status"] == "degraded"
    assert health["output"]["boot_error"]["code"] == 13
    assert rc == 13
    events = read_jsonl(volume / ".bootstrap" / "logs" / "w3" / "boot.jsonl")
    fail = next(e for e in events if e["event"] == "fail")
    assert fail["phase"] == "weights"
    assert fail["detail"]["code"] == 13 and fail["detail"]["name"] == "WEIGHTS"
    assert fail["detail"]["hint"]
