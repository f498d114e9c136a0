"""``faceswap_video`` in-process: real ffmpeg clips, fixture models, loopback servers, ffprobe checks.

Every clip is made by ffmpeg itself (tests/fixture_video.py); the worker fetches it from a
loopback server, decodes, swaps and encodes through pipes, and the output is checked with
ffprobe and by decoding its pixels.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from bootstrap.plan import Capability, Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from tests.fixture_models import ImageServer, b64, encode, picture, write_models_dir
from tests.fixture_video import Clip, Face, audio_stream, ffprobe, frames, make_clip, video_stream
from tests.webhook_receiver import Receiver
from worker import media, webhook
from worker.handler import Worker
from worker.lifecycle import Lifecycle, State
from worker.pipelines import faceswap, video
from worker.pipelines.base import LoadContext

W, H = 192, 144
SOURCE = b64(encode(picture(200, 200, [(60, 60, 100)])))
SECRET = "video-webhook-secret-5678"


def ffmpeg_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() in ("ffmpeg", "ffprobe") and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def fds_into(directory: Path, pid: int | None = None) -> list[str]:
    """Open files of a process that live in ``directory`` (anonymous temp files included)."""
    out = []
    fd_dir = Path(f"/proc/{pid or os.getpid()}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            out.append(target)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("video-tmp")


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings.from_env({"WORKER_ALLOW_PRIVATE_URLS": "1", "WORKER_MAX_VIDEO_MB": "3"})


@pytest.fixture(scope="module")
def swapper(models: dict[str, str], settings: Settings) -> faceswap.FaceSwap:
    return faceswap.load(LoadContext(settings=settings, models=models))


@pytest.fixture(scope="module")
def pipe(
    models: dict[str, str], settings: Settings, swapper: faceswap.FaceSwap, scratch: Path
) -> video.FaceSwapVideo:
    ctx = LoadContext(
        settings=settings, models=models, extra={"tmp_dir": str(scratch), "pipelines": {"faceswap": swapper}}
    )
    return video.load(ctx)


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    srv = ImageServer()
    yield srv
    srv.close()


class _Paced:
    """The face-swap models at a fixed pace per detection (everything else passes through)."""

    def __init__(self, inner: faceswap.FaceSwap, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def detect(self, frame: Any) -> Any:
        time.sleep(self.delay_s)
        return self.inner.detect(frame)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def make_worker(pipe: video.FaceSwapVideo, stream: io.StringIO | None = None, **kw: Any) -> Worker:
    w = Worker(
        plan=Plan(worker_id="t", volume="/x", app_dir="."),
        timeline=Timeline("t", stream=stream or io.StringIO(), log_format="json"),
        lifecycle=Lifecycle(),
        **kw,
    )
    w.pipelines["video"] = pipe
    w.capabilities["video"] = Capability()
    w.lifecycle.to(State.WARM)
    w.lifecycle.to(State.READY)
    return w


def serve_clip(server: ImageServer, tmp: Path, name: str, clip: Clip) -> tuple[str, Path]:
    path = make_clip(tmp / name, clip)
    return server.add(f"/{name}", path.read_bytes(), headers={"Content-Type": "video/mp4"}), path


def job(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": extra.pop("id", "job-1"),
        "input": {
            "task": "faceswap_video",
            "source_image": SOURCE,
            "video_url": url,
            "output": "base64",
            **extra,
        },
    }


def decoded_output(out: dict[str, Any], tmp: Path, name: str = "out.mp4") -> Path:
    path = tmp / name
    path.write_bytes(base64.b64decode(out["video_base64"]))
    return path


CLIPS = {
    "24fps-aac": Clip(W, H, fps=24, seconds=1.0, faces=(Face(60, 40, 56, dx=20, t0=0.25),)),
    "30fps-odd-opus": Clip(161, 121, fps=30, seconds=1.0, faces=(Face(40, 30, 56, t0=0.2),), audio="libopus"),
    "vfr": Clip(W, H, fps=30, seconds=1.2, faces=(Face(60, 40, 56, t0=0.1),), vfr=True),
    "rotated-90": Clip(W, H, fps=24, seconds=1.0, faces=(Face(100, 50, 56),), rotate=90),
    "mkv-pcm-audio": Clip(
        W, H, fps=24, seconds=1.0, faces=(Face(60, 40, 56),), audio="pcm_s16le", container="matroska"
    ),
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_clip_keeps_frames_rate_size_audio_and_swaps_the_faces(
    name: str, pipe: video.FaceSwapVideo, server: ImageServer, tmp_path: Path
) -> None:
    clip = CLIPS[name]
    url, src = serve_clip(
        server, tmp_path, f"{name}.{'mkv' if clip.container == 'matroska' else 'mp4'}", clip
    )
    worker = make_worker(pipe)
    out = asyncio.run(worker.handle(job(url)))
    assert out.get("success") is True, out
    assert set(out) == {
        "success", "video_base64", "format", "frames", "fps", "duration_s", "width", "height", "audio",
        "audio_mode", "vfr_input", "faces_swapped", "encoder", "ms",
    }  # fmt: skip
    assert out["format"] == "mp4" and out["encoder"] == "libx264"
    assert set(out["ms"]) == {"fetch", "probe", "swap", "encode"}
    result = decoded_output(out, tmp_path)

    src_info, out_info = ffprobe(src), ffprobe(result)
    sv, ov = video_stream(src_info), video_stream(out_info)
    n_src, n_out = int(sv["nb_read_frames"]), int(ov["nb_read_frames"])
    assert abs(n_out - n_src) <= 1 and out["frames"] == n_out, (n_src, n_out)
    from fractions import Fraction

    src_fps, out_fps = Fraction(sv["avg_frame_rate"]), Fraction(ov["avg_frame_rate"])
    assert abs(float(out_fps) - float(src_fps)) <= 0.02 * float(src_fps), (src_fps, out_fps)
    assert ov["codec_name"] == "h264" and ov["pix_fmt"] == "yuv420p"
    # size: upright (rotation applied), odd sides padded by one pixel
    disp_w, disp_h = (clip.height, clip.width) if clip.rotate in (90, 270) else (clip.width, clip.height)
    assert (ov["width"], ov["height"]) == (disp_w + disp_w % 2, disp_h + disp_h % 2)
    assert (out["width"], out["height"]) == (ov["width"], ov["height"])
    assert not ov.get("side_data_list")  # no rotation tag left: the pixels are upright
    # audio: present, the same length; copied when MP4 carries the codec, else AAC
    sa, oa = audio_stream(src_info), audio_stream(out_info)
    assert sa is not None and oa is not None and out["audio"] is True
    src_audio = float(sa.get("duration") or src_info["format"]["duration"])
    assert abs(float(oa["duration"]) - src_audio) < 0.1
    if clip.audio == "pcm_s16le":
        assert oa["codec_name"] == "aac" and out["audio_mode"] == "aac"
    else:
        assert oa["codec_name"] == sa["codec_name"] and out["audio_mode"] == "copy"
    assert abs(float(out_info["format"]["duration"]) - float(src_info["format"]["duration"])) < 0.15
    assert out["vfr_input"] is clip.vfr

    # pixels: changed where the faces are, (nearly) unchanged far from them
    before = frames(src, width=disp_w, height=disp_h).astype(int)
    after = frames(result, width=ov["width"], height=ov["height"])[:, :disp_h, :disp_w].astype(int)
    assert before.shape[0] == n_src and after.shape[0] == n_out
    face_frames = 0
    for b, a in zip(before, after, strict=False):
        mask = b.max(axis=2) > 150
        if mask.sum() < 400:
            continue
        face_frames += 1
        ys, xs = np.nonzero(mask)
        diff = np.abs(a - b).sum(axis=2)
        assert diff[mask].mean() > 40, "the face was not swapped"
        far = np.ones_like(mask)
        far[max(0, ys.min() - 24) : ys.max() + 24, max(0, xs.min() - 24) : xs.max() + 24] = False
        assert diff[far].mean() < 12, "pixels away from the face changed"
    assert face_frames > 0 and abs(out["faces_swapped"] - face_frames) <= 1, (
        out["faces_swapped"],
        face_frames,
    )
    assert not ffmpeg_children()


def test_target_index_follows_the_person_by_embedding(
    pipe: video.FaceSwapVideo, server: ImageServer, tmp_path: Path
) -> None:
    # A (yellow) crosses from the left along the top; B (cyan) from the right along the bottom:
    # half-way the left-to-right order flips, so only an embedding keeps following A.
    clip = Clip(
        W, H, fps=24, seconds=1.0, faces=(Face(4, 4, 48, dx=130), Face(138, 92, 48, dx=-130, colour=1))
    )
    url, src = serve_clip(server, tmp_path, "cross.mp4", clip)
    out = asyncio.run(make_worker(pipe).handle(job(url, target_index=1)))
    assert out["success"] is True and out["faces_swapped"] == out["frames"], out
    before = frames(src, width=W, height=H).astype(int)
    after = frames(decoded_output(out, tmp_path), width=W, height=H).astype(int)
    top, bottom = slice(0, 60), slice(84, H)
    for i in (0, len(before) - 1):
        diff = np.abs(after[i] - before[i]).sum(axis=2)
        assert diff[top].mean() > 3 * diff[bottom].mean() + 5, (i, diff[top].mean(), diff[bottom].mean())
    # the last frame has A on the right: index-based picking would have swapped B there
    last_a_x = int(np.nonzero(before[-1][top].max(axis=(0, 2)) > 150)[0].mean())
    assert last_a_x > W // 2

    out = asyncio.run(make_worker(pipe).handle(job(url, target_index=0)))
    assert out["success"] is True
    after = frames(decoded_output(out, tmp_path, "all.mp4"), width=W, height=H).astype(int)
    diff = np.abs(after[-1] - before[-1]).sum(axis=2)
    assert diff[top].mean() > 5 and diff[bottom].mean() > 5  # both swapped

    out = asyncio.run(make_worker(pipe).handle(job(url, target_index=9)))
    assert out["code"] == "FACE_INDEX_OUT_OF_RANGE", out


def test_no_face_in_video_and_max_side(
    pipe: video.FaceSwapVideo, server: ImageServer, tmp_path: Path
) -> None:
    url, _ = serve_clip(server, tmp_path, "empty.mp4", Clip(W, H, seconds=0.5, faces=()))
    out = asyncio.run(make_worker(pipe).handle(job(url)))
    assert out == {
        "success": False,
        "code": "NO_FACE_IN_VIDEO",
        "message": "no face found in any frame of the video",
    }
    url, _ = serve_clip(server, tmp_path, "big.mp4", Clip(320, 240, seconds=0.5, faces=(Face(100, 60, 100),)))
    out = asyncio.run(make_worker(pipe).handle(job(url, max_side=160, crf=30, codec="hevc")))
    assert out["success"] is True and (out["width"], out["height"]) == (160, 120), out
    assert out["encoder"] == "libx265"
    info = video_stream(ffprobe(decoded_output(out, tmp_path), count=False))
    assert info["codec_name"] == "hevc" and (info["width"], info["height"]) == (160, 120)


def test_progress_goes_to_the_timeline_and_not_the_sdk_under_the_local_api(
    pipe: video.FaceSwapVideo, server: ImageServer, tmp_path: Path
) -> None:
    from worker import jobctx

    assert jobctx.sdk_configured() is False  # no RUNPOD_WEBHOOK_POST_OUTPUT in this process
    url, _ = serve_clip(server, tmp_path, "p.mp4", Clip(W, H, seconds=1.0))
    stream = io.StringIO()
    out = asyncio.run(make_worker(pipe, stream).handle(job(url, id="prog-1")))
    assert out["success"] is True
    events = [json.loads(x) for x in stream.getvalue().splitlines() if x.startswith("{")]
    progress = [e for e in events if e["phase"] == "job" and e["event"] == "progress"]
    assert progress, events
    last = progress[-1]["detail"]
    assert last["id"] == "prog-1" and last["frames"] == last["total"] == out["frames"]
    assert last["fps"] > 0 and last["eta_s"] == 0.0
    assert set(last) == {"id", "frames", "total", "fps", "eta_s"}
    assert events[-1]["event"] == "end" and events[-1]["phase"] == "job"


def test_webhook_delivered_once_per_video_job_also_when_it_fails(
    pipe: video.FaceSwapVideo, server: ImageServer, tmp_path: Path
) -> None:
    config = webhook.WebhookConfig(secret=SECRET, allow_private=True, backoff_first_s=0.05)
    url, _ = serve_clip(server, tmp_path, "w.mp4", Clip(W, H, seconds=0.5, faces=(Face(60, 40, 56),)))
    bad = server.add("/not-a-video.mp4", b"hello, I am text\n" * 50, headers={"Content-Type": "video/mp4"})
    with Receiver([500, 500]) as rx:
        worker = make_worker(pipe, webhooks=config)
        ok = asyncio.run(worker.handle(job(url, id="v-ok", webhook=rx.url())))
        failed = asyncio.run(worker.handle(job(bad, id="v-bad", webhook=rx.url())))
    assert ok["success"] is True and ok["webhook"] == {"delivered": True, "attempts": 3, "error": None}
    assert failed["code"] == "NOT_A_VIDEO" and failed["webhook"]["delivered"] is True
    by_id: dict[str, list[Any]] = {}
    for d in rx.deliveries:
        by_id.setdefault(d.headers["X-Worker-Delivery"], []).append(d)
    assert len(by_id["v-ok"]) == 3 and len(by_id["v-bad"]) == 1  # 500, 500, then delivered once
    for d in (by_id["v-ok"][-1], by_id["v-bad"][0]):
        assert webhook.verify(d.body, d.headers["X-Worker-Signature"], SECRET)
    body = by_id["v-ok"][-1].json()
    assert body["status"] == "COMPLETED" and body["output"]["faces_swapped"] == ok["faces_swapped"]
    assert by_id["v-bad"][0].json()["output"]["code"] == "NOT_A_VIDEO"


def test_health_names_the_encoder_chosen_by_a_real_trial(pipe: video.FaceSwapVideo) -> None:
    health = make_worker(pipe).health()
    assert health["device"]["encoder"] == "libx264"
    assert pipe.choice.encoders == {"h264": "libx264", "hevc": "libx265"}
    assert "no NVIDIA driver" in pipe.choice.reasons["h264"]


def test_deadline_stops_the_job_and_its_ffmpeg(
    pipe: video.FaceSwapVideo, server: ImageServer, tmp_path: Path, scratch: Path
) -> None:
    """The models are slowed to 50 ms a frame, so the 144 frames cannot finish inside the 2 s
    deadline on any machine: the deadline, not the machine's speed, ends the job."""
    url, _ = serve_clip(server, tmp_path, "long.mp4", Clip(W, H, fps=24, seconds=6.0))
    slow = video.FaceSwapVideo(
        LoadContext(settings=pipe.settings, models={}, extra={"tmp_dir": str(scratch)}),
        swapper=_Paced(pipe.faces, 0.05),  # type: ignore[arg-type]
    )
    out = asyncio.run(make_worker(slow).handle(job(url, deadline_s=2)))
    assert set(out) == {"error"} and "deadline" in out["error"], out
    assert not ffmpeg_children()
    assert not fds_into(scratch) and not list(scratch.iterdir())


def test_cancelled_job_leaves_no_ffmpeg_and_no_temp_files(
    pipe: video.FaceSwapVideo, server: ImageServer, tmp_path: Path, scratch: Path
) -> None:
    url, _ = serve_clip(server, tmp_path, "cancel.mp4", Clip(W, H, fps=24, seconds=6.0))
    worker = make_worker(pipe)
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        task = asyncio.ensure_future(worker.handle(job(url, id="cancel-me")))
        for _ in range(600):
            await asyncio.sleep(0.05)
            kids = ffmpeg_children()
            if len(kids) >= 2:
                seen["pids"] = [k.pid for k in kids]
                seen["fds"] = fds_into(scratch)
                seen["listing"] = list(scratch.iterdir())
                break
        task.cancel()  # what the runpod SDK does when RunPod cancels the job
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(seen.get("pids", [])) >= 2, "the decoder and encoder never started"
    # while it ran, its temp files were open (in the temp dir) but had no name there
    assert seen["fds"] and seen["listing"] == []
    assert not ffmpeg_children()
    assert all(
        not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in seen["pids"]
    )
    assert not fds_into(scratch) and not list(scratch.iterdir())


def test_disk_check_before_the_job_names_the_numbers(
    models: dict[str, str],
    settings: Settings,
    swapper: faceswap.FaceSwap,
    server: ImageServer,
    tmp_path: Path,
) -> None:
    from tests.helpers import can_mount_tmpfs, tmpfs

    if not can_mount_tmpfs():
        pytest.skip("needs root for a tmpfs")
    url, _ = serve_clip(server, tmp_path, "disk.mp4", Clip(W, H, seconds=0.5, faces=(Face(60, 40, 56),)))
    with tmpfs(tmp_path / "small", "4m") as small:
        ctx = LoadContext(
            settings=settings,
            models=models,
            extra={"tmp_dir": str(small), "pipelines": {"faceswap": swapper}},
        )
        tight = video.load(ctx)  # the container disk must keep 1 GB
        out = asyncio.run(make_worker(tight).handle(job(url)))
        assert set(out) == {"error"}, out
        assert (
            "bytes) on " + str(small) in out["error"]
            and "GB kept free" in out["error"]
            and "is free" in out["error"]
        )
        assert list(small.iterdir()) == []
        # with no reserve it fits, and leaves the tmpfs empty
        ctx.extra["disk_reserve"] = 0
        roomy = video.load(ctx)
        out = asyncio.run(make_worker(roomy).handle(job(url)))
        assert out["success"] is True, out
        assert list(small.iterdir()) == []


def test_encoder_decision_on_the_real_trial_and_its_parser() -> None:
    tools = media.Tools.find()
    listed = tools.encoders()
    assert {"libx264", "libx265"} <= listed
    if "h264_nvenc" in listed:
        trial = media.trial_encode(tools, "h264_nvenc")
        if not Path("/dev/nvidia0").exists():
            # Debian's ffmpeg lists NVENC without any GPU: listing is not having
            assert trial.ok is False and trial.returncode != 0
            reason = media.nvenc_failure_reason(trial.stderr, trial.returncode)
            assert reason == "no NVIDIA driver in this container (libcuda.so.1 not found)", trial.stderr
            enc, why = media.choose_encoder("h264", listed, trial)
            assert enc == "libx264" and why == f"h264_nvenc: {reason}"
        else:  # pragma: no cover - a GPU host
            enc, why = media.choose_encoder("h264", listed, trial)
            assert (enc == "h264_nvenc") is trial.ok
    ok = media.Trial("h264_nvenc", True, 0, "")
    assert media.choose_encoder("h264", {"h264_nvenc", "libx264"}, ok) == ("h264_nvenc", None)
    assert media.choose_encoder("hevc", {"libx265"}, None) == (
        "libx265",
        "this ffmpeg build has no hevc_nvenc",
    )
    # other NVENC failures as ffmpeg words them
    cases = {
        "[h264_nvenc @ 0x1] Cannot load libnvidia-encode.so.1\n": "NVIDIA_DRIVER_CAPABILITIES",
        "[h264_nvenc @ 0x1] The minimum required Nvidia driver for nvenc is 520.56.06 or newer\n": "too old",
        "[h264_nvenc @ 0x1] OpenEncodeSessionEx failed: out of memory (10): (no details)\n": "session",
        "[h264_nvenc @ 0x1] No capable devices found\n": "no NVENC",
        "something else entirely\n": "exit 1",
    }
    for stderr, words in cases.items():
        assert words in media.nvenc_failure_reason(stderr, 1), stderr


def test_s3_output_is_a_multipart_upload_with_a_presigned_url(
    models: dict[str, str], swapper: faceswap.FaceSwap, server: ImageServer, tmp_path: Path, scratch: Path
) -> None:
    import urllib.request

    from tests.test_faceswap_s3 import SECRET as S3_SECRET
    from tests.test_faceswap_s3 import _bucket_env, _make_buckets

    endpoint = _start_moto(tmp_path)
    try:
        s3 = _make_buckets(endpoint, "outputs")
        env = {"WORKER_ALLOW_PRIVATE_URLS": "1", **_bucket_env(endpoint)}
        s = Settings.from_env(env)
        p = video.load(
            LoadContext(
                settings=s, models=models, extra={"tmp_dir": str(scratch), "pipelines": {"faceswap": swapper}}
            )
        )
        url, _ = serve_clip(server, tmp_path, "s3.mp4", Clip(W, H, seconds=0.5, faces=(Face(60, 40, 56),)))
        in_job = job(url)
        del in_job["input"]["output"]  # S3 is the default for video
        out = asyncio.run(make_worker(p).handle(in_job))
        assert out["success"] is True, out
        assert {"url", "bucket", "key"} <= set(out) and "video_base64" not in out and "upload" in out["ms"]
        assert (
            out["bucket"] == "outputs"
            and out["key"].startswith("faceswap-video/")
            and out["key"].endswith(".mp4")
        )
        with urllib.request.urlopen(out["url"], timeout=30) as resp:  # loopback moto
            body = resp.read()
        got = tmp_path / "from-s3.mp4"
        got.write_bytes(body)
        assert int(video_stream(ffprobe(got))["nb_read_frames"]) == out["frames"]
        assert s3.head_object(Bucket="outputs", Key=out["key"])["ContentType"] == "video/mp4"
        assert S3_SECRET not in json.dumps(out)
        # a large output goes up in parts (the multipart ETag ends with -<parts>)
        from worker import output as wout

        big = io.BytesIO(os.urandom(11 * 1024 * 1024))
        res = wout.Uploader.from_settings(s).upload_file(
            big,
            ext="mp4",
            content_type="video/mp4",
            target=wout.Output("s3"),
            prefix="x",
            part_bytes=5 * 1024 * 1024,
        )
        head = s3.head_object(Bucket="outputs", Key=res["key"])
        assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == 11 * 1024 * 1024
    finally:
        _stop_moto()


_MOTO: list[Any] = []


def _start_moto(tmp: Path) -> str:
    import shutil
    import socket
    import subprocess
    import sys
    import time

    from tests.helpers import free_port

    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    log = open(tmp / "moto.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    _MOTO.append((proc, log))
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("moto_server did not start") from None
            time.sleep(0.2)


def _stop_moto() -> None:
    while _MOTO:
        proc, log = _MOTO.pop()
        proc.terminate()
        proc.wait(10)
        log.close()
