"""The running worker, served through the SDK's local API (``bootstrap run`` with
BOOTSTRAP_SERVE_API): its lifecycle state in ``health``, job outputs kept out of every log
(issue 12), the offline flags it runs with (F16), and ``health`` after a degraded boot (F9).

Weights come from ``file://`` sources of a test manifest (the fixture models), outputs go to a
moto S3 server on loopback; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.fixture_models import b64, buffalo_zip, encode, picture, swapper
from tests.helpers import BOOTSTRAP, WorkerProcess, base_environ, free_port, read_jsonl
from tests.test_faceswap_s3 import ACCESS, SECRET, _make_buckets
from tests.test_faceswap_s3 import moto as moto  # the moto_server fixture, used by name

pytestmark = pytest.mark.slow

OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE")


def _manifest(root: Path, *, swapper_missing: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "buffalo_l.zip").write_bytes(buffalo_zip())
    swap = root / ("gone" if swapper_missing else "") / "inswapper_128.onnx"
    if not swapper_missing:
        swap.write_bytes(swapper())
    manifest = root / "models.toml"
    manifest.write_text(
        "[[file]]\n"
        'dest = "insightface/models/buffalo_l.zip"\n'
        f'source = "file://{root / "buffalo_l.zip"}"\n'
        'format = "zip"\nunpack = "insightface/models/buffalo_l"\ncapability = "faceswap"\n\n'
        "[[file]]\n"
        'dest = "insightface/models/inswapper_128.onnx"\n'
        f'source = "file://{swap}"\n'
        'format = "onnx"\ncapability = "faceswap"\n'
    )
    return manifest


def _boot(tmp_path: Path, volume: Path, name: str, manifest: Path, **env: str) -> WorkerProcess:
    port = free_port()
    environ = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS="faceswap",
        BOOTSTRAP_MANIFEST=str(manifest),
        BOOTSTRAP_SERVE_API=f"127.0.0.1:{port}",
        BOOTSTRAP_WORKER_ID=name,
        **env,
    )
    # The worker must get its offline flags from the product, not from this test's environment.
    for flag in OFFLINE:
        environ.pop(flag, None)
    return WorkerProcess([*BOOTSTRAP, "run"], environ, port, tmp_path / f"{name}-{time.monotonic_ns()}.log")


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _job() -> dict[str, Any]:
    return {
        "source_image": b64(encode(picture(200, 200, [(60, 60, 100)]))),
        "target_image": b64(encode(picture(300, 240, [(100, 70, 90)]))),
    }


def test_a_served_worker_keeps_job_outputs_out_of_its_logs(
    tmp_path: Path,
    env_volume_factory: Any,
    moto: str,
) -> None:
    _make_buckets(moto, "served-out")
    volume = env_volume_factory(tmp_path / "vol", ("faceswap",))
    worker = _boot(
        tmp_path,
        volume,
        "served1",
        _manifest(tmp_path / "weights"),
        BUCKET_ENDPOINT_URL=moto,
        BUCKET_ACCESS_KEY_ID=ACCESS,
        BUCKET_SECRET_ACCESS_KEY=SECRET,
        BUCKET_NAME="served-out",
    )
    try:
        worker.wait_ready(timeout=600)
        _, health = worker.runsync({"task": "health"})
        _, inline = worker.runsync(_job())
        _, stored = worker.runsync({**_job(), "output": "s3"})
        worker_env = _environ_of(worker.proc.pid)
        cmdline = Path(f"/proc/{worker.proc.pid}/cmdline").read_bytes().split(b"\0")
    finally:
        worker.stop()
    assert health["output"]["state"] == "ready" and health["output"]["status"] == "ok", health
    image = inline["output"]["image_base64"]
    url = stored["output"]["url"]
    assert inline["output"]["success"] is True and len(image) > 1000
    assert stored["output"]["success"] is True, stored
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    assert base64.b64decode(image)[:4] == b"\x89PNG"

    logs = {
        "stdout/stderr": worker.output(),
        "boot.log": (volume / ".bootstrap" / "logs" / "served1" / "boot.log").read_text(),
        "boot.jsonl": (volume / ".bootstrap" / "logs" / "served1" / "boot.jsonl").read_text(),
    }
    # The jobs ran and were logged (so these logs are the right ones)...
    events = read_jsonl(volume / ".bootstrap" / "logs" / "served1" / "boot.jsonl")
    assert len([e for e in events if e["phase"] == "job"]) == 3
    # ...and no part of any output is in them: not the picture, not the presigned link.
    for where, text in logs.items():
        for piece in (image[:48], image[len(image) // 2 : len(image) // 2 + 48], image[-48:]):
            assert piece not in text, f"a piece of the base64 output is in {where}"
        assert url not in text and signature not in text, f"the presigned URL is in {where}"
        assert SECRET not in text

    # F16: the worker process (bootstrap exec'd it: same pid) runs with the hub's offline flags.
    assert b"worker" in cmdline and b"-m" in cmdline, cmdline
    assert {flag: worker_env.get(flag) for flag in OFFLINE} == dict.fromkeys(OFFLINE, "1")


def test_health_after_a_degraded_boot_names_what_is_missing(tmp_path: Path, env_volume_factory: Any) -> None:
    """F9: an optional capability whose weights cannot be had degrades; the worker still serves."""
    volume = env_volume_factory(tmp_path / "vol", ("faceswap",))
    worker = _boot(
        tmp_path,
        volume,
        "served2",
        _manifest(tmp_path / "weights", swapper_missing=True),
        BOOTSTRAP_OPTIONAL="faceswap",
    )
    try:
        worker.wait_ready(timeout=600)
        _, health = worker.runsync({"task": "health"})
        _, job = worker.runsync(_job())
    finally:
        worker.stop()
    out = health["output"]
    assert out["state"] == "ready", out
    assert out["status"] == "degraded"
    cap = out["capabilities"]["faceswap"]
    assert cap["status"] == "unavailable"
    assert "inswapper_128.onnx" in cap["reason"], cap
    # A job for it is a RunPod error naming the same reason; the worker keeps serving.
    assert job["status"] == "FAILED", job
    assert "capability faceswap is unavailable" in job["error"] and "inswapper_128.onnx" in job["error"]
