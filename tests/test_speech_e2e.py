"""Speech end to end: rendered start.sh → bootstrap (env from the session's torch env, tiny
weights as `[[file]]` entries served from loopback) → warm-loaded worker → `tts` and
`transcribe` through the SDK's local API, inputs served from loopback."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fixture_speech as fx
from tests.helpers import WorkerProcess, base_environ, free_port, read_jsonl, run_bootstrap
from tests.httpserver import FaultServer

# A torch env build on a loaded 2-core machine runs past the suite-wide 900 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultServer, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("speech-srv")
    files = fx.build(root)
    (root / "voice.wav").write_bytes(fx.wav_bytes(fx.tone(3.0), 24000))
    (root / "clip.flac").write_bytes(fx.wav_bytes(fx.tone(40.0, 16000), 16000, "FLAC"))
    (root / "notaudio.wav").write_bytes(b"<html>sign in</html>" * 20)
    with FaultServer(root) as srv:
        yield srv, files


def _manifest(path: Path, url: str, files: dict[str, Path]) -> Path:
    text = ""
    for dest in sorted(files):
        fmt = "safetensors" if dest.endswith(".safetensors") else "raw"
        text += (
            f'[[file]]\ndest = "{dest}"\nsource = "{url}/{dest}"\nformat = "{fmt}"\ncapability = "speech"\n\n'
        )
    path.write_text(text)
    return path


def _env_python(volume: Path) -> Path:
    ready = sorted((volume / ".bootstrap" / "envs").glob("*/bin/python"))
    assert ready, "no env built"
    return ready[-1]


def test_env_has_the_torch_stack_and_no_gradio(tmp_path: Path, torch_env_volume: Any) -> None:
    volume = torch_env_volume(tmp_path / "runpod-volume")
    python = _env_python(volume)
    code = (
        "import importlib.metadata as m, importlib.util as u, json;"
        "import f5_tts, f5_tts.infer.utils_infer, transformers, torch, torchaudio, torchcodec;"
        "print(json.dumps({'gradio': u.find_spec('gradio') is not None,"
        " 'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()),"
        " 'torch': torch.__version__, 'torchaudio': torchaudio.__version__}))"
    )
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["gradio"] is False and "gradio" not in info["dists"] and "gradio-client" not in info["dists"]
    assert info["torch"].startswith("2.10.0") and info["torchaudio"].startswith("2.10.0")


def test_tts_and_transcribe_through_the_local_api(
    tmp_path: Path, torch_env_volume: Any, served: tuple[FaultServer, dict[str, Path]]
) -> None:
    srv, files = served
    volume = torch_env_volume(tmp_path / "runpod-volume")
    manifest = _manifest(tmp_path / "models.toml", srv.url, files)
    start = tmp_path / "start.sh"
    proc = run_bootstrap(["render", "--output", str(start)], base_environ())
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS="speech",
        BOOTSTRAP_MANIFEST=str(manifest),
        BOOTSTRAP_MIN_FREE_GB="0.01",
        BOOTSTRAP_SERVE_API=f"127.0.0.1:{port}",
        BOOTSTRAP_WORKER_ID="sp1",
        WORKER_ALLOW_PRIVATE_URLS="1",
    )
    worker = WorkerProcess([str(start)], env, port, tmp_path / f"sp1-{time.monotonic_ns()}.log")
    try:
        worker.wait_ready(timeout=1500)
        _, tts = worker.runsync(
            {"task": "tts", "text": "Hello there.", "ref_audio_url": f"{srv.url}/voice.wav", "words": True}
        )
        _, tr = worker.runsync({"task": "transcribe", "audio_url": f"{srv.url}/clip.flac"})
        _, bad = worker.runsync({"task": "transcribe", "audio_url": f"{srv.url}/notaudio.wav"})
        _, health = worker.runsync({"task": "health"})
    finally:
        worker.stop()
    import soundfile as sf

    assert tts["status"] == "COMPLETED", (tts, worker.output()[-4000:])
    out = tts["output"]
    assert out["success"] is True and out["sample_rate"] == 24000 and out["format"] == "wav"
    with sf.SoundFile(io.BytesIO(base64.b64decode(out["audio_base64"]))) as f:
        assert f.format == "WAV" and f.samplerate == 24000 and f.frames > 0
    assert out["duration_s"] > 0 and isinstance(out["seed"], int) and out["words"]
    out = tr["output"]
    assert out["success"] is True and out["duration_s"] == 40.0 and out["words"]
    starts = [w["start"] for w in out["words"]]
    assert starts == sorted(starts) and all(0 <= w["start"] <= w["end"] <= 40.0 for w in out["words"])
    assert bad["output"]["code"] == "NOT_AUDIO"
    h = health["output"]
    assert h["capabilities"]["speech"]["status"] == "ok"
    assert h["device"]["torch"]["device"] == "cpu" and h["device"]["torch"]["cuda"] is False
    events = read_jsonl(volume / ".bootstrap" / "logs" / "sp1" / "boot.jsonl")
    warm_end = next(e for e in events if e["phase"] == "warm" and e["event"] == "end")
    assert warm_end["detail"]["loaded"] == ["speech"]
