"""Hostile video inputs each get a structured answer and the worker keeps serving; a SIGKILLed
worker leaves no ffmpeg and no temp files; progress goes through the SDK where it has a job API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bootstrap.settings import Settings
from tests.fixture_models import ImageServer, write_models_dir
from tests.fixture_video import Clip, Face, make_clip
from tests.helpers import REPO
from tests.test_video import SOURCE, H, W, fds_into, ffmpeg_children, make_worker
from tests.webhook_receiver import Receiver
from worker.pipelines import faceswap, video
from worker.pipelines.base import LoadContext


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("video-tmp")


@pytest.fixture(scope="module")
def pipes(models: dict[str, str], scratch: Path) -> dict[str, video.FaceSwapVideo]:
    """Two workers' pipelines on one set of models: loopback allowed (to serve the files) or not."""
    loopback = Settings.from_env(
        {"WORKER_ALLOW_PRIVATE_URLS": "1", "WORKER_MAX_VIDEO_MB": "1", "WORKER_MAX_VIDEO_S": "30"}
    )
    public = Settings.from_env({})
    swapper = faceswap.load(LoadContext(settings=loopback, models=models))
    out = {}
    for name, s in (("loopback", loopback), ("public", public)):
        ctx = LoadContext(
            settings=s, models=models, extra={"tmp_dir": str(scratch), "pipelines": {"faceswap": swapper}}
        )
        out[name] = video.load(ctx)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImageServer, Path]]:
    srv = ImageServer()
    yield srv, tmp_path_factory.mktemp("hostile")
    srv.close()


def _ffmpeg(*args: str) -> None:
    proc = subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _hostile(tmp: Path, srv: ImageServer) -> list[tuple[str, dict[str, Any], str, str]]:
    """(name, input fields, pipeline, expected code) — twenty of them."""
    good = make_clip(tmp / "good.mp4", Clip(W, H, seconds=0.5, faces=(Face(60, 40, 56),)))
    fast = tmp / "faststart.mp4"
    _ffmpeg("-i", str(good), "-c", "copy", "-movflags", "+faststart", str(fast))
    data = fast.read_bytes()
    from tests.fixture_models import encode, picture

    png = encode(picture(64, 64, [(10, 10, 30)]))
    huge = tmp / "huge.mp4"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=black:s=8192x5120:r=1",
        "-frames:v",
        "1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        str(huge),
    )
    hours = tmp / "hours.mkv"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=black:s=64x64:r=1/3600",
        "-frames:v",
        "3",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        str(hours),
    )
    audio = tmp / "audio.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=0.5", "-c:a", "aac", str(audio))
    m3u8 = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    concat = b"ffconcat version 1.0\nfile '/etc/passwd'\n"
    corrupt = bytearray(data)
    mid = len(corrupt) // 2
    corrupt[mid : mid + 4000] = os.urandom(4000)

    def endless(handler: Any) -> None:  # no Content-Length, more than the limit
        chunk = b"\0" * 65536
        for _ in range(40):
            handler.wfile.write(chunk)

    def url(path: str, body: Any, **kw: Any) -> str:
        return srv.add(path, body, headers={"Content-Type": "video/mp4", **kw.get("headers", {})})

    return [
        (
            "text",
            {"video_url": url("/text.mp4", b"just some text, not a video\n" * 40)},
            "loopback",
            "NOT_A_VIDEO",
        ),
        ("png", {"video_url": url("/pic.png", png)}, "loopback", "NOT_A_VIDEO"),
        ("random", {"video_url": url("/random.mp4", os.urandom(50000))}, "loopback", "NOT_A_VIDEO"),
        ("empty", {"video_url": url("/empty.mp4", b"")}, "loopback", "NOT_A_VIDEO"),
        (
            "truncated-mid-stream",
            {"video_url": url("/trunc.mp4", data[: len(data) * 2 // 3])},
            "loopback",
            "NOT_A_VIDEO",
        ),
        (
            "no-index",
            {"video_url": url("/noindex.mp4", good.read_bytes()[: good.stat().st_size // 2])},
            "loopback",
            "NOT_A_VIDEO",
        ),
        ("corrupt-middle", {"video_url": url("/corrupt.mp4", bytes(corrupt))}, "loopback", "NOT_A_VIDEO"),
        ("hls-playlist-to-a-file", {"video_url": url("/list.m3u8", m3u8)}, "loopback", "NOT_A_VIDEO"),
        ("ffconcat-script", {"video_url": url("/list.txt", concat)}, "loopback", "NOT_A_VIDEO"),
        ("audio-only", {"video_url": url("/audio.m4a", audio.read_bytes())}, "loopback", "NOT_A_VIDEO"),
        (
            "huge-dimensions",
            {"video_url": url("/huge.mp4", huge.read_bytes())},
            "loopback",
            "VIDEO_TOO_LARGE",
        ),
        (
            "hours-long-by-metadata",
            {"video_url": url("/hours.mkv", hours.read_bytes())},
            "loopback",
            "VIDEO_TOO_LONG",
        ),
        (
            "over-the-size-limit",
            {"video_url": url("/big.mp4", b"\0" * (1024 * 1024 + 1))},
            "loopback",
            "VIDEO_TOO_LARGE",
        ),
        (
            "over-the-limit-no-length",
            {"video_url": url("/endless.mp4", endless)},
            "loopback",
            "VIDEO_TOO_LARGE",
        ),
        ("http-404", {"video_url": srv.url("/missing.mp4")}, "loopback", "FETCH_FAILED"),
        ("loopback-url", {"video_url": srv.url("/good.mp4")}, "public", "URL_NOT_ALLOWED"),
        (
            "metadata-address",
            {"video_url": "http://169.254.169.254/latest/meta-data/"},
            "public",
            "URL_NOT_ALLOWED",
        ),
        ("private-address", {"video_url": "http://10.1.2.3/clip.mp4"}, "public", "URL_NOT_ALLOWED"),
        ("file-scheme", {"video_url": "file:///etc/passwd"}, "public", "URL_NOT_ALLOWED"),
        (
            "bad-fields",
            {"video_url": srv.url("/good.mp4"), "crf": 99, "codec": "vp9"},
            "loopback",
            "INVALID_INPUT",
        ),
    ]


def test_twenty_hostile_inputs_each_get_a_structured_answer_and_the_worker_keeps_serving(
    pipes: dict[str, video.FaceSwapVideo], files: tuple[ImageServer, Path], scratch: Path
) -> None:
    srv, tmp = files
    cases = _hostile(tmp, srv)
    assert len(cases) == 20
    good_url = srv.add("/good.mp4", (tmp / "good.mp4").read_bytes(), headers={"Content-Type": "video/mp4"})
    workers = {name: make_worker(p) for name, p in pipes.items()}
    answers = {}
    for name, fields, which, code in cases:
        job = {
            "id": name,
            "input": {"task": "faceswap_video", "source_image": SOURCE, "output": "base64", **fields},
        }
        out = asyncio.run(workers[which].handle(job))
        answers[name] = out
        assert out.get("success") is False and out.get("code") == code, (name, out)
        assert isinstance(out["message"], str) and out["message"], name
        assert not ffmpeg_children(), name
        assert not fds_into(scratch) and not list(scratch.iterdir()), name
    # the frame where decoding stopped is named
    assert "past frame" in answers["truncated-mid-stream"]["message"]
    assert "8192×5120" in answers["huge-dimensions"]["message"]
    assert "WORKER_MAX_VIDEO_S" in answers["hours-long-by-metadata"]["message"]
    assert "/etc/passwd" not in json.dumps(answers["hls-playlist-to-a-file"])
    # and the worker still serves
    out = asyncio.run(
        workers["loopback"].handle(
            {
                "id": "after",
                "input": {
                    "task": "faceswap_video",
                    "source_image": SOURCE,
                    "video_url": good_url,
                    "output": "base64",
                },
            }
        )
    )
    assert out["success"] is True and out["faces_swapped"] > 0


_KILL_SCRIPT = textwrap.dedent(
    """
    import asyncio, io, sys
    from pathlib import Path
    from bootstrap.plan import Capability, Plan
    from bootstrap.settings import Settings
    from bootstrap.timeline import Timeline
    from tests.fixture_models import write_models_dir
    from worker.handler import Worker
    from worker.lifecycle import Lifecycle, State
    from worker.pipelines import video
    from worker.pipelines.base import LoadContext

    models_dir, tmp_dir, url, source = sys.argv[1:5]
    settings = Settings.from_env({"WORKER_ALLOW_PRIVATE_URLS": "1"})
    ctx = LoadContext(settings=settings, models=write_models_dir(Path(models_dir)), extra={"tmp_dir": tmp_dir})
    w = Worker(plan=Plan(worker_id="k", volume="/x", app_dir="."), timeline=Timeline("k", stream=io.StringIO()), lifecycle=Lifecycle())
    w.pipelines["video"] = video.load(ctx)
    w.capabilities["video"] = Capability()
    w.lifecycle.to(State.WARM)
    w.lifecycle.to(State.READY)
    print("loaded", flush=True)
    asyncio.run(w.handle({"id": "k", "input": {"task": "faceswap_video", "source_image": source, "video_url": url, "output": "base64"}}))
    print("finished", flush=True)
    """
)


def _wait(what: str, cond: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkilled_worker_leaves_no_ffmpeg_and_no_temp_files(
    files: tuple[ImageServer, Path], tmp_path: Path
) -> None:
    srv, tmp = files
    clip = make_clip(tmp / "long.mp4", Clip(W, H, fps=24, seconds=8.0))
    url = srv.add("/long.mp4", clip.read_bytes(), headers={"Content-Type": "video/mp4"})
    tmp_dir = tmp_path / "worker-tmp"
    tmp_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "models"), str(tmp_dir), url, SOURCE],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        worker = psutil.Process(proc.pid)

        def kids() -> list[psutil.Process]:
            try:
                return [c for c in worker.children(recursive=True) if c.name() == "ffmpeg"]
            except psutil.NoSuchProcess:
                return []

        children = _wait(
            "the job's decoder and encoder", lambda: (lambda k: k if len(k) >= 2 else None)(kids())
        )
        pids = [c.pid for c in children]
        assert fds_into(tmp_dir, proc.pid)  # its temp files are open, in the temp dir ...
        assert list(tmp_dir.iterdir()) == []  # ... and have no name there
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

        def gone() -> bool:
            for pid in pids:
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        return False
                except psutil.NoSuchProcess:
                    continue
            return True

        _wait("the ffmpeg children to die with the worker", gone, timeout=15)
        assert list(tmp_dir.iterdir()) == []
        out = proc.stdout.read() if proc.stdout else ""
        assert "finished" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout:
            proc.stdout.close()


def test_progress_goes_through_the_sdk_where_it_has_a_job_api() -> None:
    """In a process whose SDK has RUNPOD_WEBHOOK_POST_OUTPUT (as on RunPod), progress_update posts."""
    with Receiver() as rx:
        script = textwrap.dedent(
            """
            import io, time
            from bootstrap.timeline import Timeline
            from worker import jobctx
            assert jobctx.sdk_configured()
            ctx = jobctx.JobContext.for_job({"id": "sdk-job"}, Timeline("s", stream=io.StringIO()))
            assert ctx.sdk is not None
            ctx.progress({"frames": 10, "total": 40, "fps": 5.0, "eta_s": 6.0}, final=True)
            time.sleep(3)  # the SDK sends from a thread
            """
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "AWS_", "BUCKET_"))}
        env["RUNPOD_WEBHOOK_POST_OUTPUT"] = rx.url("/job-done/$ID")
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        _wait("the SDK's progress post", lambda: rx.deliveries, timeout=10)
    d = rx.deliveries[0]
    assert d.path.startswith("/job-done/")
    from urllib.parse import parse_qs

    raw = d.body.decode()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = json.loads(next(iter(parse_qs(raw))))
    assert payload["status"] == "IN_PROGRESS"
    assert payload["output"] == {"frames": 10, "total": 40, "fps": 5.0, "eta_s": 6.0}
