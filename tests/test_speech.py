"""The speech pipeline in process: tiny F5-TTS, Vocos and Whisper models (tests/fixture_speech.py)
loaded through the pipeline's real `load`, jobs through `run`, every input code from a real bad
input."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from bootstrap.settings import Settings
from tests import fixture_speech as fx
from worker import audio as waudio

speech = pytest.importorskip("worker.pipelines.speech")

DESTS = (speech.F5_CKPT_DEST, speech.F5_VOCAB_DEST, speech.VOCOS_DEST, speech.WHISPER_DEST)


@pytest.fixture(scope="session")
def speech_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("speech-models")
    fx.build(root)
    return root


def _ctx(root: Path, **env: str) -> Any:
    from worker.pipelines.base import LoadContext

    return LoadContext(settings=Settings.from_env(env), models={d: str(root / d) for d in DESTS})


@pytest.fixture(scope="module")
def pipe(speech_models: Path) -> Iterator[Any]:
    yield speech.load(_ctx(speech_models))


def _run(pipe: Any, job: dict[str, Any]) -> dict[str, Any]:
    """A job as the handler answers it: a JobError becomes its ``success: false`` output."""
    from worker.errors import JobError

    try:
        out: dict[str, Any] = pipe.run(job)
    except JobError as err:
        return err.output()
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


REF = _b64(fx.wav_bytes(fx.tone(3.0), 24000))


def _audio(out: dict[str, Any]) -> tuple[np.ndarray, int, str]:
    data = base64.b64decode(out["audio_base64"])
    with sf.SoundFile(io.BytesIO(data)) as f:
        return f.read(dtype="float32"), int(f.samplerate), str(f.format)


def _ordered_inside(words: list[dict[str, Any]], duration: float) -> None:
    assert words, "no words"
    last = 0.0
    for w in words:
        assert set(w) == {"word", "start", "end"} and w["word"].strip()
        assert last <= w["start"] <= w["end"] <= duration + 0.01, (w, duration)
        last = w["start"]


def test_tts_speaks_a_wav_with_words(pipe: Any) -> None:
    out = _run(
        pipe,
        {
            "task": "tts",
            "text": "Hello there.",
            "ref_audio": REF,
            "ref_text": "a voice",
            "seed": 7,
            "words": True,
        },
    )
    assert out["success"] is True, out
    samples, rate, fmt = _audio(out)
    assert fmt == "WAV" and rate == 24000 == out["sample_rate"]
    assert out["format"] == "wav" and out["seed"] == 7
    assert out["duration_s"] > 0 and abs(len(samples) / rate - out["duration_s"]) < 0.01
    assert np.abs(samples).max() > 0
    _ordered_inside(out["words"], out["duration_s"])
    assert {"fetch", "decode", "synthesize", "encode", "words"} <= set(out["ms"])
    assert out["ref_text"] == "a voice" and "ref_trimmed" not in out
    # the same seed gives the same audio; words false → no field
    again = _run(
        pipe, {"task": "tts", "text": "Hello there.", "ref_audio": REF, "ref_text": "a voice", "seed": 7}
    )
    assert again["audio_base64"] == out["audio_base64"]
    assert "words" not in again and again["ref_cached"] is True


def test_tts_random_seed_is_returned_and_formats_parse(pipe: Any) -> None:
    seeds = set()
    for fmt, sf_name in (("flac", "FLAC"), ("mp3", "MP3"), ("ogg", "OGG")):
        out = _run(
            pipe,
            {"task": "tts", "text": "Hi.", "ref_audio": REF, "ref_text": "a voice", "output_format": fmt},
        )
        assert out["success"] is True and out["format"] == fmt
        samples, rate, got = _audio(out)
        assert got == sf_name and rate == 24000 and len(samples) > 0
        assert isinstance(out["seed"], int) and out["seed"] >= 0
        seeds.add(out["seed"])
    assert len(seeds) == 3


def test_empty_ref_text_is_transcribed_and_cached(pipe: Any) -> None:
    ref = _b64(fx.wav_bytes(fx.tone(2.5, seed=3), 24000))
    first = _run(pipe, {"task": "tts", "text": "Hello world.", "ref_audio": ref, "ref_text": ""})
    assert first["success"] is True and first["ref_cached"] is False
    assert first["ref_text"].split()[0] == "hello"  # the tiny Whisper's word
    second = _run(pipe, {"task": "tts", "text": "Hello world.", "ref_audio": ref})
    assert (
        second["ref_cached"] is True and "transcribe_ref" not in second["ms"] and "decode" not in second["ms"]
    )


def test_long_reference_is_trimmed_at_a_pause(pipe: Any) -> None:
    ref = _b64(fx.wav_bytes(fx.tone(16.0, pause_at=8.0, seed=4), 24000))
    out = _run(pipe, {"task": "tts", "text": "Hi.", "ref_audio": ref, "ref_text": "a voice"})
    trimmed = out["ref_trimmed"]
    assert trimmed["at_pause"] is True and trimmed["from_s"] == 16.0
    assert 8.0 <= trimmed["to_s"] <= 8.4


def test_long_text_is_split_into_sentences_and_joined(pipe: Any) -> None:
    text = " ".join(f"This is sentence number {i}, said by the test voice." for i in range(12))
    one = _run(
        pipe,
        {
            "task": "tts",
            "text": "This is sentence number one.",
            "ref_audio": REF,
            "ref_text": "a voice",
            "seed": 1,
        },
    )
    out = _run(pipe, {"task": "tts", "text": text, "ref_audio": REF, "ref_text": "a voice", "seed": 1})
    assert out["success"] is True
    assert out["duration_s"] > 4 * one["duration_s"]
    groups = speech.group_sentences(speech.sentences(text), 120)
    assert len(groups) > 1 and all(len(g.encode()) <= 120 for g in groups)
    assert " ".join(groups) == text


def test_unsupported_language(pipe: Any) -> None:
    out = _run(pipe, {"task": "tts", "text": "Привет, мир.", "ref_audio": REF, "ref_text": "a voice"})
    assert out["success"] is False and out["code"] == "UNSUPPORTED_LANGUAGE"
    assert "CYRILLIC" in out["message"]
    out = _run(pipe, {"task": "transcribe", "audio": REF, "language": "xx"})
    assert out["code"] == "UNSUPPORTED_LANGUAGE"


def test_transcribe_short_and_long(pipe: Any) -> None:
    short = _run(pipe, {"task": "transcribe", "audio": _b64(fx.wav_bytes(fx.tone(3.0, 16000), 16000))})
    assert short["success"] is True, short
    assert short["duration_s"] == 3.0 and short["language"] in fx.LANGS and short["text"]
    _ordered_inside(short["words"], 3.0)
    long = _run(
        pipe,
        {
            "task": "transcribe",
            "audio": _b64(fx.wav_bytes(fx.tone(65.0, 16000), 16000, "FLAC")),
            "language": "en",
        },
    )
    assert long["success"] is True and long["duration_s"] == 65.0 and long["language"] == "en"
    _ordered_inside(long["words"], 65.0)
    assert long["words"][-1]["start"] > 30.0  # timings continue past the first 30 s window


def test_input_codes_from_real_bad_inputs(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    assert _run(pipe, {"task": "transcribe", "audio": _b64(png)})["code"] == "NOT_AUDIO"
    assert (
        _run(pipe, {"task": "tts", "text": "Hi.", "ref_audio": _b64(b"RIFF\x00\x00garbage" * 10)})["code"]
        == "NOT_AUDIO"
    )
    assert _run(pipe, {"task": "transcribe", "audio": "%%%"})["code"] == "INVALID_INPUT"
    assert _run(pipe, {"task": "tts", "text": "Hi."})["code"] == "INVALID_INPUT"
    assert (
        _run(pipe, {"task": "tts", "text": "Hi.", "ref_audio": REF, "ref_audio_url": "http://x"})["code"]
        == "INVALID_INPUT"
    )
    assert (
        _run(pipe, {"task": "tts", "text": "Hi.", "ref_audio": REF, "output_format": "aac"})["code"]
        == "INVALID_INPUT"
    )
    assert _run(pipe, {"task": "tts", "text": "Hi.", "ref_audio": REF, "speed": 9})["code"] == "INVALID_INPUT"
    assert (
        _run(pipe, {"task": "tts", "text": "Hi.", "ref_audio": REF, "words": "yes"})["code"]
        == "INVALID_INPUT"
    )
    too_long = _run(pipe, {"task": "tts", "text": "a" * 5001, "ref_audio": REF})
    assert too_long["code"] == "TEXT_TOO_LONG" and "WORKER_MAX_TEXT_CHARS" in too_long["message"]
    url = _run(pipe, {"task": "transcribe", "audio_url": "http://127.0.0.1:9/a.wav"})
    assert url["code"] == "URL_NOT_ALLOWED"
    monkeypatch.setattr(pipe, "settings", Settings.from_env({"WORKER_MAX_AUDIO_S": "5"}))
    six = _b64(fx.wav_bytes(fx.tone(6.0, 16000), 16000))
    out = _run(pipe, {"task": "transcribe", "audio": six})
    assert out["code"] == "AUDIO_TOO_LONG" and "WORKER_MAX_AUDIO_S" in out["message"]
    assert _run(pipe, {"task": "tts", "text": "Hi.", "ref_audio": six})["code"] == "AUDIO_TOO_LONG"


def test_device_is_told_truthfully_on_cpu(pipe: Any) -> None:
    info = pipe.device()
    assert info["gpu"] is None and info["providers"] == []
    assert info["torch"]["cuda"] is False and info["torch"]["device"] == "cpu"
    assert info["torch"]["dtype"] == "float32" and info["torch"]["reason"]


def test_load_keeps_stdout_clean(speech_models: Path, capfd: pytest.CaptureFixture[str]) -> None:
    speech.load(_ctx(speech_models))
    out, _err = capfd.readouterr()
    for line in out.splitlines():
        json.loads(line)  # only JSON lines (none, here) may reach stdout


def test_require_gpu_on_cpu_is_exit_16(speech_models: Path) -> None:
    from bootstrap.errors import GpuError

    with pytest.raises(GpuError) as err:
        speech.load(_ctx(speech_models, BOOTSTRAP_REQUIRE_GPU="1"))
    assert err.value.exit_code == 16


def test_missing_model_names_expected_and_found(speech_models: Path, tmp_path: Path) -> None:
    from worker.pipelines.base import LoadContext

    models = {d: str(speech_models / d) for d in DESTS}
    models[speech.WHISPER_DEST] = str(tmp_path / "nowhere" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"Whisper at .* lacks config\.json"):
        speech.load(LoadContext(settings=Settings.from_env({}), models=models))
    with pytest.raises(FileNotFoundError, match="not in the plan"):
        speech.load(LoadContext(settings=Settings.from_env({}), models={}))


def test_trim_without_pause_cuts_at_the_limit() -> None:
    clip = waudio.Audio(fx.tone(15.0), 24000)
    cut, trim = waudio.trim_reference(clip)
    assert trim is not None and trim.at_pause is False and abs(cut.duration_s - 12.0) < 0.05
    short, none = waudio.trim_reference(waudio.Audio(fx.tone(5.0), 24000))
    assert none is None and short.duration_s <= 5.0


def test_arch_is_read_from_the_checkpoint(speech_models: Path) -> None:
    state = speech.read_safetensors(str(speech_models / speech.F5_CKPT_DEST))
    arch = speech.arch_from_state({k.replace("ema_model.", "", 1): v for k, v in state.items()})
    assert (
        arch["dim"],
        arch["depth"],
        arch["heads"],
        arch["text_dim"],
        arch["conv_layers"],
        arch["ff_mult"],
    ) == (
        64,
        2,
        1,
        32,
        1,
        2,
    )
    assert speech.filesystem_type(str(speech_models)) not in speech.NETWORK_FS


# -- the env's smoke test ----------------------------------------------------------------------


def _smoke(tmp_path: Path, **env: str) -> tuple[int, dict[str, Any]]:
    import subprocess
    import sys

    from tests.helpers import REPO, base_environ

    proc = subprocess.run(
        [sys.executable, "-m", "worker.smoke", "speech"],
        env=base_environ(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_smoke_test_runs_a_clip_through_the_audio_stack(tmp_path: Path) -> None:
    """Issue 13: torch, torchaudio and torchcodec must work together, not only import."""
    rc, out = _smoke(tmp_path)
    assert (rc, out["capabilities"]) == (0, {"speech": None}), out


def test_a_torchcodec_whose_library_does_not_load_fails_the_smoke_test(tmp_path: Path) -> None:
    """The mismatch the pins prevent: torchcodec's native library built for another torch raises
    OSError at the decoder's import; the smoke test names it (the env is then not published)."""
    fake = tmp_path / "shadow" / "torchcodec"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "decoders.py").write_text(
        "raise OSError('libtorchcodec_core7.so: undefined symbol: _ZN3c1017RegisterOperators')\n"
    )
    rc, out = _smoke(tmp_path, PYTHONPATH=str(tmp_path / "shadow"))
    assert rc == 1
    assert out["capabilities"]["speech"].startswith("audio: decode wav (torchcodec): OSError"), out


def test_the_default_steps_are_f5_tts_own() -> None:
    """The job parser knows no torch, so it names F5-TTS's default step count itself."""
    from f5_tts.infer import utils_infer

    from worker.pipelines import speech_input

    assert utils_infer.nfe_step == speech_input.DEFAULT_STEPS
