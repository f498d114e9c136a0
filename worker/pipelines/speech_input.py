"""The speech jobs' fields (``tts``, ``transcribe``), parsed and checked before any download or
model run (SPEC §10 "Speech"). No torch here: the pipeline module imports it."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from worker import audio as waudio
from worker import output as wout
from worker.errors import JobError

OUTPUT_FORMATS = tuple(waudio.OUTPUT_FORMATS)
#: flow-matching steps when a job gives none (f5_tts.infer.utils_infer.nfe_step: tests/test_speech.py checks they agree)
DEFAULT_STEPS = 32


@dataclass(frozen=True)
class AudioRef:
    kind: str  # "url" | "base64"
    value: str
    field: str


@dataclass(frozen=True)
class TtsRequest:
    text: str
    ref: AudioRef
    ref_text: str
    speed: float
    seed: int | None
    output_format: str
    output: wout.Output
    words: bool
    steps: int


@dataclass(frozen=True)
class TranscribeRequest:
    audio: AudioRef
    language: str | None


def _audio_ref(job: dict[str, Any], url_key: str, b64_key: str) -> AudioRef:
    given = [k for k in (url_key, b64_key) if job.get(k) is not None]
    if len(given) != 1:
        raise JobError(
            "INVALID_INPUT",
            f"give exactly one of {url_key} and {b64_key}"
            + (" (both were given)" if len(given) == 2 else " (neither was given)"),
        )
    key = given[0]
    value = job[key]
    if not isinstance(value, str) or not value.strip():
        raise JobError("INVALID_INPUT", f"{key} must be a non-empty string")
    return AudioRef("url" if key == url_key else "base64", value.strip(), key)


def _number(job: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = job.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JobError("INVALID_INPUT", f"{key} must be a number")
    if not lo <= value <= hi:
        raise JobError("INVALID_INPUT", f"{key} must be between {lo:g} and {hi:g}")
    return float(value)


def _integer(job: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = job.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError("INVALID_INPUT", f"{key} must be an integer")
    if not lo <= value <= hi:
        raise JobError("INVALID_INPUT", f"{key} must be between {lo} and {hi}")
    return value


def _output(job: dict[str, Any], allowed_buckets: Collection[str]) -> tuple[str, wout.Output]:
    fmt = job.get("output_format", "wav")
    if not isinstance(fmt, str) or fmt.strip().lower() not in OUTPUT_FORMATS:
        raise JobError("INVALID_INPUT", f"output_format must be one of {', '.join(OUTPUT_FORMATS)}")
    return fmt.strip().lower(), wout.parse_output(job, allowed_buckets)


def parse_tts(job: Any, max_chars: int, allowed_buckets: Collection[str] = frozenset()) -> TtsRequest:
    if not isinstance(job, dict):
        raise JobError("INVALID_INPUT", "the job's input must be a JSON object")
    text = job.get("text")
    if not isinstance(text, str) or not text.strip():
        raise JobError("INVALID_INPUT", "text must be a non-empty string")
    text = " ".join(text.split())
    if len(text) > max_chars:
        raise JobError(
            "TEXT_TOO_LONG",
            f"text has {len(text)} characters; the limit is {max_chars} (WORKER_MAX_TEXT_CHARS)",
        )
    ref = _audio_ref(job, "ref_audio_url", "ref_audio")
    ref_text = job.get("ref_text", "")
    if ref_text is None:
        ref_text = ""
    if not isinstance(ref_text, str):
        raise JobError("INVALID_INPUT", "ref_text must be a string (empty: transcribed)")
    ref_text = " ".join(ref_text.split())
    if len(ref_text) > max_chars:
        raise JobError(
            "TEXT_TOO_LONG",
            f"ref_text has {len(ref_text)} characters; the limit is {max_chars} (WORKER_MAX_TEXT_CHARS)",
        )
    words = job.get("words", False)
    if not isinstance(words, bool):
        raise JobError("INVALID_INPUT", "words must be true or false")
    fmt, output = _output(job, allowed_buckets)
    return TtsRequest(
        text=text,
        ref=ref,
        ref_text=ref_text,
        speed=_number(job, "speed", 1.0, 0.3, 3.0),
        seed=_integer(job, "seed", 0, 2**32 - 1),
        output_format=fmt,
        output=output,
        words=words,
        steps=int(_integer(job, "steps", 4, 64) or DEFAULT_STEPS),
    )


def parse_transcribe(job: Any, languages: dict[str, int]) -> TranscribeRequest:
    if not isinstance(job, dict):
        raise JobError("INVALID_INPUT", "the job's input must be a JSON object")
    ref = _audio_ref(job, "audio_url", "audio")
    lang = job.get("language")
    if lang is not None:
        if not isinstance(lang, str) or not lang.strip():
            raise JobError("INVALID_INPUT", "language must be a language code such as 'en', or null")
        lang = lang.strip().lower()
        if f"<|{lang}|>" not in languages:
            known = ", ".join(sorted(k[2:-2] for k in languages))
            raise JobError(
                "UNSUPPORTED_LANGUAGE", f"language {lang!r} is not one the Whisper model knows ({known})"
            )
    return TranscribeRequest(ref, lang)
