"""The env's import smoke test: run with the NEW environment's Python before it is published.

``python -m worker.smoke [--project DIR] CAP…`` imports the base modules, then each capability's
modules (and its pipeline module, when one is registered), and prints one JSON line:
``{"base": null | error, "capabilities": {cap: null | error}}``. A missing system library
(libGL) or module shows up here, at build time, not at the first job (FAILURES F4, F5); for
``video`` the ``ffmpeg`` and ``ffprobe`` programs must also run, and for ``speech`` a generated clip
goes through every audio library a job uses (libsndfile's MP3 encoder, the worker's decoder and
resampler, torchaudio's resampler that F5-TTS runs, torchcodec's decoder that ``torchaudio.load``
runs): torch, torchaudio and torchcodec that import but do not match fail here, not at a job.

Module lists come from the project's ``pyproject.toml`` ``[tool.bootstrap.smoke]`` table when it
has one (``base = [...]`` and one list per capability), else from the worker's capability
registry (`worker.capabilities`). Standard library only until the imports under test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tomllib
import traceback
from pathlib import Path
from typing import Any

from worker import pipelines  # noqa: F401 - registers the capabilities
from worker.capabilities import BASE_MODULES, CAPABILITIES


def _try(modules: list[str]) -> str | None:
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as err:  # a missing .so raises OSError, a bad wheel anything at all
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            return f"import {name}: {last}"
    return None


def _ffmpeg_runs() -> str | None:
    """``ffmpeg`` and ``ffprobe`` found on PATH and answering ``-version`` (the video capability)."""
    try:
        from worker import media

        media.Tools.find().versions()
    except Exception as err:
        return f"ffmpeg: {err}"
    return None


def _audio_round_trip() -> str | None:
    """A 0.5 s 440 Hz tone at 44.1 kHz through the speech capability's audio stack (the module doc)."""
    step = "generate"
    try:
        import numpy as np

        from worker import audio

        tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(22050) / 44100)).astype(np.float32)
        step = "encode mp3 (libsndfile)"
        mp3 = audio.encode(tone, 44100, "mp3")
        step = "decode and resample to 24 kHz (worker.audio)"
        got = audio.decode(mp3, rate=24000, max_s=5.0, what="the smoke clip")
        if not 0.4 < got.duration_s < 0.7:
            return f"audio: the 0.5 s clip decoded to {got.duration_s:.2f} s"
        step = "resample 24 -> 16 kHz (torchaudio)"
        import torch
        import torchaudio

        wave = torchaudio.transforms.Resample(24000, 16000)(torch.from_numpy(got.samples).unsqueeze(0))
        if abs(wave.shape[-1] - len(got.samples) * 2 // 3) > 2:
            return f"audio: torchaudio resampled {len(got.samples)} samples to {wave.shape[-1]}"
        step = "decode wav (torchcodec)"
        from torchcodec.decoders import AudioDecoder

        samples = AudioDecoder(audio.encode(tone, 44100, "wav")).get_all_samples()
        if samples.sample_rate != 44100 or samples.data.shape[-1] != len(tone):
            return f"audio: torchcodec decoded {tuple(samples.data.shape)} at {samples.sample_rate} Hz"
    except BaseException as err:  # a native library that does not load raises anything at all
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        return f"audio: {step}: {last}"
    return None


#: Capabilities that need more than imports: cap → a check returning an error or None
#: (system programs for video, the audio stack for speech).
PROGRAM_CHECKS = {"video": _ffmpeg_runs, "speech": _audio_round_trip}


def smoke_table(project: Path | None) -> dict[str, Any] | None:
    """``[tool.bootstrap.smoke]`` of ``project/pyproject.toml``, or None."""
    if project is None:
        return None
    try:
        data = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    table = data.get("tool", {}).get("bootstrap", {}).get("smoke")
    return table if isinstance(table, dict) else None


def plan_imports(caps: list[str], project: Path | None) -> tuple[list[str], dict[str, list[str] | str]]:
    """Base modules and, per capability, its modules (or an error string when it has none)."""
    table = smoke_table(project)
    base = [str(m) for m in table.get("base", [])] if table is not None else list(BASE_MODULES)
    out: dict[str, list[str] | str] = {}
    for cap in caps:
        spec = CAPABILITIES.get(cap)
        listed = table.get(cap) if table is not None else None
        if listed is None and spec is None:
            out[cap] = f"no pipeline is registered for capability {cap!r}"
            continue
        modules = [str(m) for m in (listed or [])]
        if spec is not None:
            modules += [*spec.modules, spec.pipeline]
        out[cap] = modules
    return base, out


def main(argv: list[str]) -> int:
    """Import everything, print the JSON line; exit 0 only when all imports worked."""
    parser = argparse.ArgumentParser(prog="python -m worker.smoke")
    parser.add_argument("--project", type=Path, default=None)
    parser.add_argument(
        "--record",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import MODULE (best effort) and list every file the imports read, as 'files'",
    )
    parser.add_argument("caps", nargs="*")
    args = parser.parse_args(argv)
    base, plans = plan_imports(list(args.caps), args.project)
    caps: dict[str, str | None] = {}
    result: dict[str, object] = {"base": _try(base), "capabilities": caps}
    imported = list(base) if result["base"] is None else []
    for cap, modules in plans.items():
        caps[cap] = modules if isinstance(modules, str) else _try(modules)
        check = PROGRAM_CHECKS.get(cap)
        if caps[cap] is None and check is not None:
            caps[cap] = check()
        if caps[cap] is None and not isinstance(modules, str):
            imported += modules
    # what imported, for the env's prefetch list (bootstrap.env.build)
    result["modules"] = imported
    if args.record:
        # The files a worker start reads, from this same process: the build needs no second
        # interpreter importing everything again just to list them.
        for name in args.record:
            _try([name])
        from bootstrap.fastfs import loaded_files

        result["files"] = loaded_files()
    print(json.dumps(result))
    return 0 if result["base"] is None and all(v is None for v in caps.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
