"""``faceswap_video`` end to end: rendered start.sh → bootstrap (env with the ``video`` extra, the
face-swap weights it needs through BOOTSTRAP_MIRROR) → warm-loaded worker → the SDK's local
API, the clip served from loopback, a signed webhook to a loopback receiver."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.fixture_models import ImageServer
from tests.fixture_video import Clip, Face, audio_stream, ffprobe, make_clip, video_stream
from tests.helpers import WorkerProcess, base_environ, free_port, read_jsonl, run_bootstrap, seed_uv_cache
from tests.test_faceswap_e2e import _mirror
from tests.test_video import SOURCE
from tests.webhook_receiver import Receiver
from worker import webhook

pytestmark = pytest.mark.slow

SECRET = "e2e-webhook-secret-0000"


def _boot(tmp_path: Path, volume: Path, name: str, **env: str) -> WorkerProcess:
    start = tmp_path / "start.sh"
    proc = run_bootstrap(["render", "--output", str(start)], base_environ())
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    environ = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS="video",
        BOOTSTRAP_MIRROR=str(tmp_path / "mirror"),
        BOOTSTRAP_SERVE_API=f"127.0.0.1:{port}",
        BOOTSTRAP_WORKER_ID=name,
        WORKER_ALLOW_PRIVATE_URLS="1",
        **env,
    )
    return WorkerProcess([str(start)], environ, port, tmp_path / f"{name}.log")


def test_video_job_through_start_sh_and_the_local_api(tmp_path: Path, volume: Path) -> None:
    _mirror(tmp_path / "mirror")
    seed_uv_cache(volume, ("video",))
    srv = ImageServer()
    clip = make_clip(
        tmp_path / "clip.mp4", Clip(192, 144, fps=30, seconds=1.0, faces=(Face(60, 40, 56, t0=0.3),))
    )
    url = srv.add("/clip.mp4", clip.read_bytes(), headers={"Content-Type": "video/mp4"})
    bad = srv.add("/bad.mp4", b"not a video at all\n" * 20, headers={"Content-Type": "video/mp4"})
    rx = Receiver()
    worker = _boot(
        tmp_path,
        volume,
        "v1",
        WORKER_WEBHOOK_SECRET=SECRET,
        TMPDIR=str(tmp_path),
    )
    try:
        worker.wait_ready(timeout=900)
        job = {"task": "faceswap_video", "source_image": SOURCE, "video_url": url, "output": "base64"}
        status, done = worker.runsync({**job, "webhook": rx.url("/hook?k=1")}, timeout=600)
        _, failed = worker.runsync({**job, "video_url": bad, "webhook": rx.url("/hook")})
        _, health = worker.runsync({"task": "health"})
    finally:
        worker.stop()
        srv.close()
        rx.close()
    assert status == 200 and done["status"] == "COMPLETED", (done, worker.output()[-4000:])
    out = done["output"]
    assert out["success"] is True and out["encoder"] == "libx264" and out["audio"] is True
    assert out["webhook"] == {"delivered": True, "attempts": 1, "error": None}
    result = tmp_path / "out.mp4"
    result.write_bytes(base64.b64decode(out["video_base64"]))
    src, got = ffprobe(clip), ffprobe(result)
    assert abs(int(video_stream(got)["nb_read_frames"]) - int(video_stream(src)["nb_read_frames"])) <= 1
    assert video_stream(got)["avg_frame_rate"] == "30/1"
    assert audio_stream(got) is not None
    assert 0 < out["faces_swapped"] < out["frames"]
    assert failed["output"]["code"] == "NOT_A_VIDEO" and failed["output"]["webhook"]["delivered"] is True

    # one signed delivery per job
    assert [d.headers["X-Worker-Delivery"] for d in rx.deliveries] == [done["id"], failed["id"]]
    for d in rx.deliveries:
        assert webhook.verify(d.body, d.headers["X-Worker-Signature"], SECRET)
    assert rx.deliveries[0].json()["output"]["faces_swapped"] == out["faces_swapped"]

    h = health["output"]
    assert h["status"] == "ok", h
    assert h["capabilities"]["video"] == {"status": "ok", "reason": None}
    assert h["capabilities"]["faceswap"] == {"status": "ok", "reason": None}
    assert h["device"]["encoder"] == "libx264"

    events = read_jsonl(volume / ".bootstrap" / "logs" / "v1" / "boot.jsonl")
    warm = next(e for e in events if e["phase"] == "warm" and e["event"] == "end")
    assert warm["detail"]["loaded"] == ["faceswap", "video"]
    progress = [e for e in events if e["phase"] == "job" and e["event"] == "progress"]
    assert progress and progress[-1]["detail"]["frames"] == progress[-1]["detail"]["total"] == out["frames"]
    assert progress[-1]["detail"]["id"] == done["id"]
    log = (volume / ".bootstrap" / "logs" / "v1" / "boot.log").read_text()
    assert "libx264 because h264_nvenc: no NVIDIA driver" in log
    assert SECRET not in log and SECRET not in worker.output()
    assert list(tmp_path.glob("tmp*")) == []  # no temp file left on the "container disk"
