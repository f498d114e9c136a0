"""Animate end to end: rendered start.sh → bootstrap with ``BOOTSTRAP_EXTRAS=animate`` (the env
cloned from the session's torch env; the tiny Wan2.2-Animate pipeline and pose models as
``[[repo]]`` entries, the face-swap models ``animate`` brings with it as ``[[file]]`` entries,
all served from loopback) → warm-loaded worker → ``animate`` jobs through the SDK's local API,
the picture and the driving video served from loopback too."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fixture_wan
from tests.fixture_models import BUFFALO_DEST, INSWAPPER_DEST, encode, picture
from tests.fixture_video import Clip, Face, audio_stream, ffprobe, make_clip, video_stream
from tests.helpers import WorkerProcess, base_environ, free_port, read_jsonl, run_bootstrap
from tests.httpserver import FaultServer
from tests.test_faceswap_e2e import _mirror

pytestmark = [
    # a torch env build on a loaded 2-core machine runs past the suite-wide 900 s
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    # diffusers/transformers deprecations while the fixture pipeline is built in this process
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

#: the driving video: 1 s at 25 fps with a tone, a bright fixture face in the middle
DRIVE = Clip(96, 64, fps=25, seconds=1.0, faces=(Face(36, 12, 24),))
#: the sizes test_animate.py runs on CPU: 48×32, 2 denoising steps
SMALL = {"steps": 2, "height": 32, "width": 48, "output": "base64", "seed": 7}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultServer]:
    """The world on loopback: the models under their manifest dests, the picture, the clips."""
    root = tmp_path_factory.mktemp("animate-srv")
    _mirror(root)  # the face-swap models: video's and animate's face detector
    fixture_wan.build_models(root)
    (root / "avatar.png").write_bytes(encode(picture(64, 64, [(20, 16, 24)])))
    make_clip(root / "drive.mp4", DRIVE)
    (root / "notvideo.mp4").write_bytes(b"<p>this is not a video</p>\n" * 40)
    with FaultServer(root) as srv:
        yield srv


def _manifest(path: Path, srv: FaultServer) -> Path:
    """The faceswap files as the real manifest has them; the two animate dests as ``[[repo]]``
    entries listing their files (a loopback base cannot be listed)."""
    text = (
        f'[[file]]\ndest = "{BUFFALO_DEST}.zip"\nsource = "{srv.url}/{BUFFALO_DEST}.zip"\n'
        f'format = "zip"\nunpack = "{BUFFALO_DEST}"\ncapability = "faceswap"\n\n'
        f'[[file]]\ndest = "{INSWAPPER_DEST}"\nsource = "{srv.url}/{INSWAPPER_DEST}"\n'
        'format = "onnx"\ncapability = "faceswap"\n\n'
    )
    for dest in (fixture_wan.PIPELINE_DEST, fixture_wan.PREPROCESS_DEST):
        base = srv.root / dest
        files = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
        listed = ", ".join(f'"{f}"' for f in files)
        text += f'[[repo]]\ndest = "{dest}"\nsource = "{srv.url}/{dest}"\nfiles = [{listed}]\ncapability = "animate"\n\n'
    path.write_text(text)
    return path


def _probe(data: str, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The video stream (frames counted) and the audio stream of a base64 result."""
    path.write_bytes(base64.b64decode(data))
    info = ffprobe(path)
    return video_stream(info), audio_stream(info)


def test_animate_and_replace_through_the_local_api(
    tmp_path: Path, torch_env_volume: Any, served: FaultServer
) -> None:
    srv = served
    volume = torch_env_volume(tmp_path / "runpod-volume")
    start = tmp_path / "start.sh"
    proc = run_bootstrap(["render", "--output", str(start)], base_environ())
    assert proc.returncode == 0, proc.stderr
    scratch = tmp_path / "container-tmp"  # the "container disk": jobs leave nothing there
    scratch.mkdir()
    port = free_port()
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS="animate",
        BOOTSTRAP_MANIFEST=str(_manifest(tmp_path / "models.toml", srv)),
        BOOTSTRAP_MIN_FREE_GB="0.01",
        BOOTSTRAP_SERVE_API=f"127.0.0.1:{port}",
        BOOTSTRAP_WORKER_ID="an1",
        WORKER_ALLOW_PRIVATE_URLS="1",
        TMPDIR=str(scratch),
    )
    worker = WorkerProcess([str(start)], env, port, tmp_path / f"an1-{time.monotonic_ns()}.log")
    job = {"task": "animate", "image_url": f"{srv.url}/avatar.png", "video_url": f"{srv.url}/drive.mp4"}
    try:
        worker.wait_ready(timeout=2400)
        _, anim = worker.runsync({**job, **SMALL}, timeout=1200)
        # 11 frames at 11 fps in segments of 9 (1 conditioning frame): two segments, padded to 17
        _, repl = worker.runsync(
            {**job, **SMALL, "mode": "replace", "fps": 11, "segment_frame_length": 9}, timeout=1200
        )
        _, bad = worker.runsync({**job, **SMALL, "video_url": f"{srv.url}/notvideo.mp4"})
        _, health = worker.runsync({"task": "health"})
    finally:
        worker.stop()

    assert anim["status"] == "COMPLETED" and anim["output"].get("success") is True, (
        anim,
        worker.output()[-4000:],
    )
    out = anim["output"]
    # 1 s of driving video at the default 16 fps: 16 frames, one segment, the tone kept
    assert (out["mode"], out["frames"], out["fps"], out["segments"]) == ("animate", 16, 16.0, 1)
    assert (out["width"], out["height"], out["audio"], out["seed"]) == (48, 32, True, 7)
    assert out["format"] == "mp4" and out["encoder"] == "libx264"
    assert out["detected"]["people"] == 16  # the fixture person detector answers every frame
    video, audio = _probe(out["video_base64"], tmp_path / "animate.mp4")
    assert int(video["nb_read_frames"]) == 16 and video["r_frame_rate"] == "16/1"
    assert (int(video["width"]), int(video["height"])) == (48, 32)
    assert audio is not None and float(audio["duration"]) == pytest.approx(1.0, abs=0.1)

    assert repl["status"] == "COMPLETED" and repl["output"].get("success") is True, (
        repl,
        worker.output()[-4000:],
    )
    out = repl["output"]
    assert (out["mode"], out["frames"], out["fps"], out["segments"]) == ("replace", 11, 11.0, 2)
    video, audio = _probe(out["video_base64"], tmp_path / "replace.mp4")
    assert int(video["nb_read_frames"]) == 11 and video["r_frame_rate"] == "11/1"
    assert (int(video["width"]), int(video["height"])) == (48, 32)
    assert audio is not None and float(audio["duration"]) == pytest.approx(1.0, abs=0.1)

    assert bad["output"]["code"] == "NOT_A_VIDEO", bad
    assert bad["output"]["success"] is False
    assert bad["output"]["message"].startswith("the driving video is not a video")
    h = health["output"]
    assert h["status"] == "ok", h
    for name in ("animate", "faceswap", "video"):
        assert h["capabilities"][name] == {"status": "ok", "reason": None}, h
    assert h["device"]["torch"]["device"] == "cpu" and h["device"]["torch"]["cuda"] is False

    events = read_jsonl(volume / ".bootstrap" / "logs" / "an1" / "boot.jsonl")
    warm = next(e for e in events if e["phase"] == "warm" and e["event"] == "end")
    assert warm["detail"]["loaded"] == ["animate", "faceswap", "video"]
    # the last denoising step of each job goes out as job progress, naming the segment
    for done, segments in ((anim, 1), (repl, 2)):
        steps = [
            e["detail"]
            for e in events
            if e["phase"] == "job"
            and e["event"] == "progress"
            and (e.get("detail") or {}).get("id") == done["id"]
        ]
        assert steps, f"no progress for job {done['id']}"
        last = steps[-1]
        assert (last["stage"], last["segment"], last["segments"], last["percent"]) == (
            "generate",
            segments,
            segments,
            100.0,
        ), steps
    assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("animate-")) == []
