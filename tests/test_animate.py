"""The ``animate`` pipeline in-process on CPU, with the tiny Wan2.2-Animate built offline
(tests/fixture_wan.py): both modes, segments, given conditioning videos, every input code,
the GPU memory policy on real probe shapes, and a job that runs out of memory."""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.errors import GpuError
from bootstrap.settings import Settings
from tests import fixture_wan
from tests.fixture_models import ImageServer, b64, encode, picture
from worker import torchdev
from worker.errors import JobError
from worker.pipelines import animate, animate_input
from worker.pipelines.base import LoadContext

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    # diffusers/transformers deprecations inside the libraries themselves, not in our calls
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="session")
def wan_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return fixture_wan.build_models(tmp_path_factory.mktemp("animate") / "models")


def _settings(**env: str) -> Settings:
    return Settings.from_env({"HF_HUB_OFFLINE": "1", "WORKER_ALLOW_PRIVATE_URLS": "1", **env})


@pytest.fixture(scope="module")
def pipe(wan_models: dict[str, str]) -> animate.Animate:
    return animate.load(LoadContext(settings=_settings(), models=wan_models, extra={"fetch_timeout_s": 10}))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 s at 25 fps with a tone: 16 frames at the default 16 fps."""
    return fixture_wan.driving_video(tmp_path_factory.mktemp("clip") / "drive.mp4", seconds=1.0)


@pytest.fixture
def server() -> Iterator[ImageServer]:
    srv = ImageServer()
    yield srv
    srv.close()


IMAGE = b64(encode(picture(64, 64, [(20, 16, 24)])))


def job(clip: Path, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": "animate",
        "image": IMAGE,
        "video": b64(clip.read_bytes()),
        "steps": 2,
        "height": 32,
        "width": 48,
        "output": "base64",
        "seed": 7,
    }
    out.update(extra)
    return out


def probe(data: bytes, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    proc = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(proc.stdout)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio = [s for s in info["streams"] if s["codec_type"] == "audio"]
    return {
        "frames": int(video["nb_read_frames"]),
        "size": (int(video["width"]), int(video["height"])),
        "rate": video["r_frame_rate"],
        "audio": bool(audio),
        "audio_s": float(audio[0]["duration"]) if audio else None,
        "duration": float(info["format"]["duration"]),
    }


def code_of(pipeline: animate.Animate, job_input: Any) -> str:
    with pytest.raises(JobError) as info:
        pipeline.run(job_input)
    return info.value.code


# -- load ----------------------------------------------------------------------------------------


def test_load_from_the_plan_on_cpu(pipe: animate.Animate) -> None:
    info = pipe.device()
    assert info["torch"]["device"] == "cpu" and info["torch"]["dtype"] == "float32"
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["memory"]["action"] == "device"
    assert pipe.face_size == 16  # the fixture transformer's motion_encoder_size


def test_missing_pipeline_is_named(wan_models: dict[str, str]) -> None:
    models = {fixture_wan.PREPROCESS_DEST: wan_models[fixture_wan.PREPROCESS_DEST]}
    with pytest.raises(FileNotFoundError, match=r"animate/Wan2.2-Animate-14B-Diffusers.*found: animate/"):
        animate.load(LoadContext(settings=_settings(), models=models, extra={"warm_up": False}))


def test_file_entries_resolve_to_their_common_directory(wan_models: dict[str, str]) -> None:
    """Until ``[[repo]]`` lands, one ``[[file]]`` per file: the model dir is their parent."""
    root = Path(wan_models[fixture_wan.PIPELINE_DEST])
    files = {
        f"{fixture_wan.PIPELINE_DEST}/{p.relative_to(root)}": str(p) for p in root.rglob("*") if p.is_file()
    }
    ctx = LoadContext(settings=_settings(), models=files)
    assert animate._model_dir(ctx, fixture_wan.PIPELINE_DEST) == root


# -- jobs ----------------------------------------------------------------------------------------


def test_animate_mode_frames_size_fps_and_audio(pipe: animate.Animate, clip: Path, tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    out = pipe.run(job(clip), progress=events.append)
    video = base64.b64decode(out.pop("video_base64"))
    assert set(out.pop("ms")) == {"fetch", "preprocess", "generate", "encode"}
    assert out == {
        "success": True,
        "format": "mp4",
        "mode": "animate",
        "frames": 16,
        "fps": 16.0,
        "duration_s": 1.0,
        "width": 48,
        "height": 32,
        "segments": 1,
        "audio": True,
        "seed": 7,
        "encoder": "libx264",
        "detected": {"people": 16, "faces": 16},
    }
    got = probe(video, tmp_path)
    assert got["frames"] == 16 and got["size"] == (48, 32) and got["rate"] == "16/1"
    assert got["audio"] and got["audio_s"] == pytest.approx(1.0, abs=0.05)
    steps = [e for e in events if e["stage"] == "generate"]
    assert [(e["segment"], e["step"]) for e in steps] == [(1, 1), (1, 2)]
    assert steps[-1]["percent"] == 100.0


def test_replace_mode_two_segments_stitch_to_the_driving_length(
    pipe: animate.Animate, clip: Path, tmp_path: Path
) -> None:
    """11 frames in segments of 9 (1 conditioning frame): the pipeline pads to 17 and runs two
    segments; the output has exactly the 11 driving frames, at 11 fps, audio over 1 s."""
    events: list[dict[str, Any]] = []
    out = pipe.run(job(clip, mode="replace", fps=11, segment_frame_length=9), progress=events.append)
    assert (out["mode"], out["frames"], out["segments"], out["fps"]) == ("replace", 11, 2, 11.0)
    got = probe(base64.b64decode(out["video_base64"]), tmp_path)
    assert got["frames"] == 11 and got["rate"] == "11/1" and got["size"] == (48, 32)
    assert got["audio_s"] == pytest.approx(1.0, abs=0.1)
    steps = [(e["segment"], e["step"], e["segments"]) for e in events if e["stage"] == "generate"]
    assert steps == [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]


def test_same_seed_same_video_and_no_audio_kept_absent(pipe: animate.Animate, tmp_path: Path) -> None:
    silent = fixture_wan.driving_video(tmp_path / "silent.mp4", seconds=0.5, audio=False)
    a = pipe.run(job(silent, fps=8))
    b = pipe.run(job(silent, fps=8))
    assert a["audio"] is False and a["frames"] == 4
    assert a["video_base64"] == b["video_base64"]
    assert probe(base64.b64decode(a["video_base64"]), tmp_path)["audio"] is False


def test_given_pose_face_and_mask_videos_are_used(
    pipe: animate.Animate, clip: Path, server: ImageServer, tmp_path: Path
) -> None:
    data = clip.read_bytes()
    urls = {
        k: server.add(f"/{k}.mp4", data, headers={"Content-Type": "video/mp4"})
        for k in ("drive", "pose", "face", "mask")
    }
    out = pipe.run(
        job(
            clip,
            video=None,
            video_url=urls["drive"],
            mode="replace",
            pose_video_url=urls["pose"],
            face_video_url=urls["face"],
            mask_video_url=urls["mask"],
        )
    )
    assert out["frames"] == 16 and "detected" not in out  # the worker's own preprocessing did not run
    assert sorted(server.hits) == ["/drive.mp4", "/face.mp4", "/mask.mp4", "/pose.mp4"]


def test_a_shorter_pose_video_is_refused(
    pipe: animate.Animate, clip: Path, server: ImageServer, tmp_path: Path
) -> None:
    short = fixture_wan.driving_video(tmp_path / "short.mp4", seconds=0.5)
    url = server.add("/pose.mp4", short.read_bytes(), headers={"Content-Type": "video/mp4"})
    with pytest.raises(JobError, match=r"pose_video_url has 8 frames at 16 fps; the driving video has 16"):
        pipe.run(job(clip, pose_video_url=url))


# -- input codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"video": None}, "video_url or video is required"),
        ({"image": None}, "image_url or image is required"),
        ({"image_url": "http://127.0.0.1:1/x.png"}, "not both"),
        ({"mode": "dance"}, "mode must be"),
        ({"height": 33}, "multiple of 16"),
        ({"width": 0}, "between 16 and"),
        ({"steps": 0}, "steps must be between"),
        ({"steps": "many"}, "steps must be an integer"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a number"),
        ({"fps": 0}, "fps must be between"),
        ({"segment_frame_length": 10}, "4k\\+1"),
        ({"prompt": 3}, "prompt must be a string"),
        ({"output": "ftp"}, "output must be"),
        ({"s3": {"bucket": "b"}}, "only used with output: 's3'"),
        ({"mask_video_url": "http://127.0.0.1:1/m.mp4"}, "only used with mode 'replace'"),
        ({"video": "!!!not base64!!!"}, "not valid base64"),
    ],
)
def test_invalid_input(pipe: animate.Animate, clip: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError, match=message) as info:
        pipe.run(job(clip, **change))
    assert info.value.code == "INVALID_INPUT"


def test_not_an_image_and_not_a_video(pipe: animate.Animate, clip: Path) -> None:
    assert code_of(pipe, job(clip, image=b64(b"GIF89a not really"))) == "NOT_AN_IMAGE"
    assert code_of(pipe, job(clip, video=b64(encode(picture(32, 32, []))))) == "NOT_A_VIDEO"
    assert code_of(pipe, job(clip, video=b64(b"\x00" * 4096))) == "NOT_A_VIDEO"


def test_url_not_allowed(pipe: animate.Animate, clip: Path) -> None:
    assert code_of(pipe, job(clip, video=None, video_url="file:///etc/passwd")) == "URL_NOT_ALLOWED"
    strict = copy.copy(pipe)
    strict.video_policy = animate.wfetch.FetchPolicy(max_bytes=10**6, allow_private=False)
    assert code_of(strict, job(clip, video=None, video_url="http://127.0.0.1:9/a.mp4")) == "URL_NOT_ALLOWED"


def test_limits(pipe: animate.Animate, clip: Path) -> None:
    capped = copy.copy(pipe)
    capped.max_frames = 15
    with pytest.raises(JobError, match=r"16 frames at 16 fps; the limit is 15 frames per job") as info:
        capped.run(job(clip))
    assert info.value.code == "VIDEO_TOO_LONG"
    assert capped.run(job(clip, fps=12))["frames"] == 12  # a lower fps fits the same clip
    short = copy.copy(pipe)
    short.max_video_s = 0.5
    assert code_of(short, job(clip)) == "VIDEO_TOO_LONG"
    small = copy.copy(pipe)
    small.max_video_bytes = 1000
    assert code_of(small, job(clip)) == "VIDEO_TOO_LARGE"
    tight = copy.copy(pipe)
    tight.max_result_bytes = 100
    assert code_of(tight, job(clip)) == "RESULT_TOO_LARGE"


def test_s3_without_credentials_is_a_worker_fault_before_any_work(pipe: animate.Animate, clip: Path) -> None:
    from worker.errors import WorkerFault

    with pytest.raises(WorkerFault, match="BUCKET_ACCESS_KEY_ID"):
        pipe.run(job(clip, output="s3"))


def test_job_progress_goes_through_the_job_context_and_the_last_step_always_does() -> None:
    """Run by the worker (no callback), a job reports through its `jobctx.JobContext`: the
    context throttles (here: one report a minute), but the last denoising step is never held back."""
    from worker import jobctx

    class Timeline:
        def __init__(self) -> None:
            self.details: list[dict[str, Any]] = []

        def event(self, phase: str, event: str, detail: dict[str, Any]) -> None:
            self.details.append(detail)

    timeline = Timeline()
    report = animate.job_progress(jobctx.JobContext(job={"id": "j1"}, timeline=timeline, every_s=60))
    for done in range(1, 5):
        segment, step = (done - 1) // 2 + 1, (done - 1) % 2 + 1
        report({"stage": "generate", "segment": segment, "segments": 2, "step": step, "percent": 25.0 * done})
    assert [(d["id"], d["segment"], d["step"], d["percent"]) for d in timeline.details] == [
        ("j1", 1, 1, 25.0),
        ("j1", 2, 2, 100.0),
    ]


def test_segments_match_the_pipeline_arithmetic() -> None:
    assert animate_input.segments_for(77, 77) == 1
    assert animate_input.segments_for(78, 77) == 2
    assert animate_input.segments_for(153, 77) == 2
    assert animate_input.segments_for(154, 77) == 3
    assert animate_input.segments_for(11, 9) == 2
    assert animate_input.segments_for(2, 5) == 1


# -- GPU memory policy ---------------------------------------------------------------------------

GiB = 1024**3
# torch.cuda's own numbers for these cards (get_device_properties(0).total_memory)
H100 = torchdev.TorchDevice(
    "cuda:0", "bfloat16", name="NVIDIA H100 80GB HBM3", capability=(9, 0), total_memory=85_045_477_376
)
L40S = torchdev.TorchDevice(
    "cuda:0", "bfloat16", name="NVIDIA L40S", capability=(8, 9), total_memory=47_697_362_944
)
A10G = torchdev.TorchDevice(
    "cuda:0", "bfloat16", name="NVIDIA A10G", capability=(8, 6), total_memory=23_609_475_072
)
T4 = torchdev.TorchDevice(
    "cuda:0", "float16", name="Tesla T4", capability=(7, 5), total_memory=15_655_829_504
)
CPU = torchdev.TorchDevice("cpu", "float32", reason="torch sees no CUDA device")
# Wan2.2-Animate-14B in bf16: ~34.5 GB transformer, 11.4 GB UMT5-XXL, 1.3 GB CLIP-H, 0.25 GB VAE
WEIGHTS = int(47.4e9)
LARGEST = int(34.5e9)


@pytest.mark.parametrize(
    ("dev", "free", "offload", "action"),
    [
        (H100, 78 * GiB, False, "device"),
        (L40S, 43 * GiB, False, "refuse"),
        (L40S, 43 * GiB, True, "offload"),
        (A10G, 21 * GiB, True, "refuse"),
        (T4, 14 * GiB, False, "refuse"),
        (CPU, None, False, "device"),
        (H100, None, False, "device"),  # no free figure: the total decides
    ],
)
def test_memory_plan(dev: torchdev.TorchDevice, free: int | None, offload: bool, action: str) -> None:
    work = animate.working_bytes(WEIGHTS)
    plan = torchdev.memory_plan(
        dev,
        need=WEIGHTS + work,
        largest=LARGEST + work,
        free=free,
        offload_allowed=offload,
        what="Wan2.2-Animate",
    )
    assert plan.action == action
    if dev.cuda:
        assert "Wan2.2-Animate needs about 50.8 GiB" in plan.message
        assert dev.name in plan.message
    if action == "refuse" and not offload:
        assert "WORKER_ANIMATE_OFFLOAD=1" in plan.message
    if action == "refuse" and offload:
        assert "largest part needs 38.8 GiB" in plan.message


def test_safetensors_headers_give_the_weights_at_the_load_dtype(wan_models: dict[str, str]) -> None:
    from safetensors.torch import load_file

    root = Path(wan_models[fixture_wan.PIPELINE_DEST])
    for comp in animate.COMPONENTS:
        tensors = [t for f in (root / comp).glob("*.safetensors") for t in load_file(str(f)).values()]
        floats = sum(t.numel() for t in tensors if t.is_floating_point())
        others = sum(t.numel() * t.element_size() for t in tensors if not t.is_floating_point())
        assert floats > 0
        assert animate.component_bytes(root, 2)[comp] == floats * 2 + others
        assert animate.component_bytes(root, 4)[comp] == floats * 4 + others


def test_too_small_gpu_is_exit_16_when_required_and_a_reason_when_optional(
    wan_models: dict[str, str],
) -> None:
    tiny = torchdev.TorchDevice(
        "cuda:0", "bfloat16", name="NVIDIA Tiny", capability=(8, 0), total_memory=64 * 1024**2
    )
    extra = {"torch_device": tiny, "free_memory": 32 * 1024**2, "warm_up": False}
    with pytest.raises(
        GpuError, match=r"needs about 0\.\d GiB; NVIDIA Tiny has 0\.0 GiB free of 0\.1 GiB"
    ) as info:
        animate.load(LoadContext(settings=_settings(), models=wan_models, extra=extra))
    assert info.value.exit_code == 16
    assert "WORKER_ANIMATE_OFFLOAD=1" in info.value.message
    optional = _settings(BOOTSTRAP_OPTIONAL="animate")
    with pytest.raises(RuntimeError, match=r"NVIDIA Tiny has 0\.0 GiB free") as err:
        animate.load(LoadContext(settings=optional, models=wan_models, extra=extra))
    assert not isinstance(err.value, GpuError)  # main marks the optional capability unavailable


def test_offload_setting_is_read() -> None:
    assert _settings().worker_animate_offload is False
    assert _settings(WORKER_ANIMATE_OFFLOAD="1").worker_animate_offload is True
    assert _settings(WORKER_ANIMATE_MAX_FRAMES="77").worker_animate_max_frames == 77


# -- out of memory -------------------------------------------------------------------------------

OOM_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, resource, sys, warnings
    warnings.simplefilter("ignore")
    from bootstrap.plan import Capability, Plan
    from bootstrap.settings import Settings
    from bootstrap.timeline import Timeline
    from worker.handler import Worker
    from worker.lifecycle import Lifecycle, State
    from worker.pipelines import animate
    from worker.pipelines.base import LoadContext

    models, small, big = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    settings = Settings.from_env({"HF_HUB_OFFLINE": "1", "BOOTSTRAP_WORKER_ID": "oom"})
    worker = Worker(plan=Plan(worker_id="oom", volume="/nonexistent", app_dir=".",
                              capabilities={"animate": Capability()}),
                    timeline=Timeline("oom", stream=sys.stderr), lifecycle=Lifecycle())
    worker.pipelines["animate"] = animate.load(LoadContext(settings=settings, models=models))
    worker.capabilities["animate"] = Capability()
    worker.lifecycle.to(State.WARM)
    worker.lifecycle.to(State.READY)

    async def main():
        first = await worker.handle({"id": "a", "input": small})
        with open("/proc/self/status") as fh:
            vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
        limit = vm + 256 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # the worker's memory limit
        oom = await worker.handle({"id": "b", "input": big})
        health = await worker.handle({"id": "c", "input": {"task": "health"}})
        again = await worker.handle({"id": "d", "input": small})
        for name, out in (("first", first), ("oom", oom), ("health", health), ("again", again)):
            out.pop("video_base64", None)
            print(name, json.dumps(out, default=str), flush=True)

    asyncio.run(main())
    """
)


def test_a_job_out_of_memory_asks_for_refresh_and_the_worker_keeps_answering(
    wan_models: dict[str, str], clip: Path
) -> None:
    small = job(clip, fps=4)
    big = job(clip, height=1920, width=1920)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BUCKET_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT, json.dumps(wan_models), json.dumps(small), json.dumps(big)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    first, oom = json.loads(lines["first"]), json.loads(lines["oom"])
    health, again = json.loads(lines["health"]), json.loads(lines["again"])
    assert first["success"] is True and first["frames"] == 4
    assert oom.get("refresh_worker") is True, oom
    assert "out of memory" in oom["error"]
    assert set(oom) == {"error", "refresh_worker"}
    assert health["capabilities"]["animate"]["status"] == "ok"
    assert again["success"] is True and again["frames"] == 4


def test_a_cancelled_job_stops_at_the_next_step_and_leaves_no_temp_dir(
    pipe: animate.Animate, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run by the worker, a job whose context is cancelled mid-generation raises
    `jobctx.JobCancelled` from the next denoising step (as the video job stops between frames)."""
    import asyncio
    import tempfile

    from worker import jobctx

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the job's scratch dir lands here
    ctx = jobctx.JobContext(job={"id": "cancel-me"})
    steps_seen: list[int] = []
    real_progress = ctx.progress

    def progress(detail: dict[str, Any], *, final: bool = False) -> bool:
        if detail.get("stage") == "generate":
            steps_seen.append(int(detail["step"]))
            ctx.cancel("RunPod cancelled the job")  # after the first denoising step
        return real_progress(detail, final=final)

    ctx.progress = progress  # type: ignore[method-assign]
    with pytest.raises(jobctx.JobCancelled, match="RunPod cancelled"):
        asyncio.run(jobctx.run_in_thread(pipe.run, job(clip, steps=3), ctx))
    assert steps_seen == [1]
    assert not list(tmp_path.glob("animate-job-*"))
