"""Face swaps end to end: rendered start.sh → bootstrap (env, weights through BOOTSTRAP_MIRROR)
→ warm-loaded worker → real HTTP calls to the SDK's local API, inputs served from loopback.

The weights are the fixture ONNX models (tests/fixture_models.py) under the real manifest's
dest names, so the real manifest, the real fetcher (zip unpacking included) and the plan's
paths are what the pipeline loads from.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixture_models import INSWAPPER_DEST, ImageServer, buffalo_zip, encode, picture, swapper
from tests.helpers import (
    WorkerProcess,
    base_environ,
    free_port,
    phases_in_order,
    read_jsonl,
    run_bootstrap,
    seed_uv_cache,
)

pytestmark = pytest.mark.slow

TARGET_FACES = [(40, 100, 80), (210, 100, 80), (380, 100, 80)]


def _mirror(root: Path) -> Path:
    """A directory laid out by the real manifest's dest names."""
    (root / "insightface" / "models").mkdir(parents=True)
    (root / "insightface" / "models" / "buffalo_l.zip").write_bytes(buffalo_zip())
    (root / INSWAPPER_DEST).write_bytes(swapper())
    return root


def _boot(tmp_path: Path, volume: Path, name: str, **env: str) -> WorkerProcess:
    start = tmp_path / "start.sh"
    if not start.exists():
        proc = run_bootstrap(["render", "--output", str(start)], base_environ())
        assert proc.returncode == 0, proc.stderr
    port = free_port()
    environ = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS="faceswap",
        BOOTSTRAP_MIRROR=str(tmp_path / "mirror"),
        BOOTSTRAP_SERVE_API=f"127.0.0.1:{port}",
        BOOTSTRAP_WORKER_ID=name,
        WORKER_ALLOW_PRIVATE_URLS="1",
        **env,
    )
    return WorkerProcess([str(start)], environ, port, tmp_path / f"{name}-{time.monotonic_ns()}.log")


def test_faces_swapped_through_the_local_api(tmp_path: Path, volume: Path) -> None:
    _mirror(tmp_path / "mirror")
    seed_uv_cache(volume, ("faceswap",))
    images = ImageServer()
    target = picture(500, 300, TARGET_FACES)
    src_url = images.add("/source.png", encode(picture(200, 200, [(60, 60, 100)])))
    tgt_url = images.add(
        "/target.jpg", encode(target, "JPEG", quality=95), headers={"Content-Type": "image/jpeg"}
    )
    tgt_png = images.add("/target.png", encode(target))
    dark_url = images.add("/dark.png", encode(picture(200, 200, [])))
    worker = _boot(tmp_path, volume, "fs1")
    try:
        worker.wait_ready(timeout=600)
        status, every = worker.runsync(
            {"source_url": src_url, "target_url": tgt_url, "output_format": "webp"}
        )
        _, second = worker.runsync({"source_url": src_url, "target_url": tgt_png, "target_index": 2})
        _, no_face = worker.runsync({"source_url": src_url, "target_url": dark_url})
        _, refused = worker.runsync({"source_url": "file:///etc/passwd", "target_url": tgt_url})
        _, health = worker.runsync({"task": "health"})
        _, again = worker.runsync(
            {"source_url": src_url, "target_image": base64.b64encode(encode(target)).decode()}
        )
    finally:
        worker.stop()
        images.close()
    assert status == 200 and every["status"] == "COMPLETED", (every, worker.output()[-4000:])
    out = every["output"]
    assert out["success"] is True
    assert out["faces"] == {"source": 1, "target": 3} and out["swapped"] == 3
    assert set(out["ms"]) == {"fetch", "decode", "detect", "swap", "encode"}
    img = Image.open(io.BytesIO(base64.b64decode(out["image_base64"])))
    assert img.format == "WEBP" and img.size == (500, 300)

    out = second["output"]
    assert out["swapped"] == 1
    img = Image.open(io.BytesIO(base64.b64decode(out["image_base64"])))
    assert img.format == "PNG"
    diff = np.abs(np.asarray(img.convert("RGB")).astype(int) - target.astype(int)).sum(axis=2) > 30
    xs = np.nonzero(diff.any(axis=0))[0]
    assert xs.min() >= 180 and xs.max() <= 320, (xs.min(), xs.max())  # only the middle face

    assert no_face["output"] == {
        "success": False,
        "code": "NO_FACE_IN_TARGET",
        "message": "no face found in the target image",
    }
    assert refused["output"]["code"] == "URL_NOT_ALLOWED"
    assert again["output"]["success"] is True

    h = health["output"]
    assert h["status"] == "ok"
    assert h["capabilities"] == {"faceswap": {"status": "ok", "reason": None}}
    assert h["device"] == {"gpu": None, "providers": ["CPUExecutionProvider"]}
    assert {"preflight", "env", "weights", "import", "warm"} <= set(h["boot_ms"])
    assert h["versions"].get("onnxruntime-gpu") and h["versions"].get("insightface") == "2.1"
    assert "onnxruntime" not in h["versions"] and "opencv-python" not in h["versions"]

    # The models came from the mirror through the real fetcher, into the manifest's dest names.
    models = volume / ".bootstrap" / "models" / "insightface" / "models"
    assert sorted(p.name for p in (models / "buffalo_l").iterdir()) == [
        "1k3d68.onnx",
        "2d106det.onnx",
        "det_10g.onnx",
        "genderage.onnx",
        "w600k_r50.onnx",
    ]
    assert not (models / "buffalo_l.zip").exists()
    events = read_jsonl(volume / ".bootstrap" / "logs" / "fs1" / "boot.jsonl")
    assert phases_in_order(events) == ["preflight", "env", "weights", "import", "warm", "ready", "job"]
    warm_end = next(e for e in events if e["phase"] == "warm" and e["event"] == "end")
    assert warm_end["detail"]["loaded"] == ["faceswap"]
    assert warm_end["detail"]["device"] == {"faceswap": {"gpu": None, "providers": ["CPUExecutionProvider"]}}
    assert (
        "runs on CPU: no NVIDIA driver" in (volume / ".bootstrap" / "logs" / "fs1" / "boot.log").read_text()
    )
    jobs = [e for e in events if e["phase"] == "job"]
    assert len(jobs) == 6 and all(e["event"] == "end" for e in jobs)
    # InsightFace's own prints stay out of the JSON timeline on stdout.
    assert "inswapper-shape" not in worker.output()

    # A worker that requires the GPU refuses to serve on CPU: exit 16, named in the boot log.
    gpu = _boot(tmp_path, volume, "fs2", BOOTSTRAP_REQUIRE_GPU="1")
    try:
        rc = gpu.proc.wait(timeout=300)
    finally:
        gpu.stop()
    assert rc == 16, gpu.output()[-4000:]
    events = read_jsonl(volume / ".bootstrap" / "logs" / "fs2" / "boot.jsonl")
    fail = next(e for e in events if e["event"] == "fail")
    assert fail["phase"] == "warm" and fail["detail"]["name"] == "GPU"
    assert "CPUExecutionProvider" in fail["detail"]["error"]
