"""The ``speech`` capability: ``tts`` (F5-TTS voice cloning) and ``transcribe`` (Whisper with
word timings through ``transformers``), SPEC §10 "Speech".

``load`` runs once, before the first job (warm-load, FAILURES F10):

1. the torch device and dtype come from `worker.torchdev.probe` (bf16/fp16 on a GPU, fp32 on
   CPU); ``BOOTSTRAP_REQUIRE_GPU=1`` on CPU is exit 16;
2. every model path comes from the plan (``ctx.model_path``), never from a hub download (F3):
   the F5 checkpoint and its vocab, the Vocos vocoder directory, the Whisper directory;
3. the F5 model is built as ``f5_tts.infer.utils_infer.load_model`` builds it (same `CFM`
   and mel settings), its size (dim, depth, text_dim, ff_mult, conv_layers) read from the
   checkpoint's own tensor shapes, the rest from the package's ``F5TTS_v1_Base.yaml``; the
   safetensors are read with the loader `read_safetensors` picks for the filesystem;
4. f5-tts/vocos prints go to stderr (stdout carries the timeline's JSON lines);
5. a warm-up synthesizes and transcribes a generated clip, so the first job costs what the
   tenth does.

A ``tts`` job goes fetch → decode (→ trim at a pause) → (transcribe the reference) →
synthesize sentence groups → join → encode (→ transcribe the result for ``words``) (→ upload).
The processed reference (samples, trim, text) is cached by the sha256 of its bytes and its
``ref_text``, so a repeated voice costs no decode and no transcription.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import secrets
import sys
import threading
import unicodedata
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from bootstrap.errors import GpuError
from worker import audio as waudio
from worker import fetch as wfetch
from worker import output as wout
from worker import torchdev
from worker.errors import JobError, WorkerFault
from worker.pipelines.base import LoadContext, Stages
from worker.pipelines.speech_input import OUTPUT_FORMATS, AudioRef, parse_transcribe, parse_tts

# f5_tts/vocos print on import and load; keep stdout for the timeline from the first line.
with contextlib.redirect_stdout(sys.stderr):
    import torch
    from f5_tts.infer import utils_infer
    from f5_tts.model import CFM, DiT
    from f5_tts.model.utils import convert_char_to_pinyin
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

NAME = "speech"
#: Manifest dests: each model is a ``[[repo]]`` directory (worker/models.speech.toml); until
#: every manifest has repos, the same files may come as ``[[file]]`` entries under it.
F5_REPO = "speech/f5-tts"
F5_CKPT = "F5TTS_v1_Base/model_1250000.safetensors"
F5_VOCAB = "F5TTS_v1_Base/vocab.txt"
VOCOS_REPO = "speech/vocos-mel-24khz"
WHISPER_REPO = "speech/whisper-large-v3-turbo"
F5_CKPT_DEST = f"{F5_REPO}/{F5_CKPT}"
F5_VOCAB_DEST = f"{F5_REPO}/{F5_VOCAB}"
VOCOS_DEST = f"{VOCOS_REPO}/config.yaml"
WHISPER_DEST = f"{WHISPER_REPO}/config.json"

SAMPLE_RATE = utils_infer.target_sample_rate  # 24000
WHISPER_RATE = 16000
REF_MAX_S = 12.0
CROSS_FADE_S = utils_infer.cross_fade_duration
REF_CACHE_SIZE = 32
#: filesystems where mmap of a large file stalls (page faults become network round trips)
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "fuse.mfs", "fuse.moosefs", "ceph", "fuse.s3fs", "9p", "lustre")


def model_file(ctx: LoadContext, repo_dest: str, rel: str) -> Path:
    """``rel`` inside the plan's ``[[repo]]`` directory ``repo_dest``, or the plan's ``[[file]]``
    entry ``repo_dest/rel``; neither is a clear error naming what the plan has (F3)."""
    if repo_dest in ctx.models:
        return Path(ctx.models[repo_dest]) / rel
    return Path(ctx.model_path(f"{repo_dest}/{rel}"))


# -- loading ------------------------------------------------------------------------------------


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts; "" when unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    real = os.path.realpath(path)
    best, kind = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def on_network_fs(path: str) -> bool:
    """NFS/SMB/Ceph/Lustre, or any FUSE mount (MooseFS mounts as plain ``fuse``)."""
    fs = filesystem_type(path)
    return fs in NETWORK_FS or fs == "fuse" or fs.startswith("fuse.")


def read_safetensors(path: str, device: str = "cpu") -> dict[str, Any]:
    """A safetensors file as a state dict, with the loader measured best for its filesystem.

    benchmarks/bench_speech.py measures both: on a local disk ``load_file`` (mmap) is as fast
    as a plain read or faster (the page cache serves both, and mmap copies nothing until a
    tensor is touched); on a network filesystem each page fault of an mmap is a round trip,
    so one sequential ``read()`` into memory, then ``safetensors.torch.load(bytes)``, wins.
    """
    import safetensors.torch

    if on_network_fs(path):
        with open(path, "rb") as f:
            state = safetensors.torch.load(f.read())
        return {k: v.to(device) for k, v in state.items()} if device != "cpu" else state
    return dict(safetensors.torch.load_file(path, device=device))


def prefetch(directory: Path) -> None:
    """Read a model directory's files once, sequentially, on a network filesystem, so the
    loader's mmap then hits the page cache instead of faulting page by page over the network."""
    if not on_network_fs(str(directory)):
        return
    for p in sorted(directory.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass


def _default_arch() -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load(files("f5_tts").joinpath("configs/F5TTS_v1_Base.yaml").read_text())
    return dict(cfg["model"]["arch"])


def arch_from_state(state: dict[str, Any]) -> dict[str, Any]:
    """DiT options: sizes from the checkpoint's tensor shapes, the rest from F5TTS_v1_Base.yaml.

    For the real F5TTS_v1_Base checkpoint these equal the yaml's (dim 1024, depth 22, heads 16,
    ff_mult 2, text_dim 512, conv_layers 4); a smaller checkpoint (the tests') loads as itself.
    """
    arch = _default_arch()
    arch.pop("attn_backend", None)
    arch.pop("checkpoint_activations", None)
    q = state["transformer.transformer_blocks.0.attn.to_q.weight"]
    dim = int(state["transformer.input_embed.proj.weight"].shape[0])
    blocks = {k.split(".")[2] for k in state if k.startswith("transformer.transformer_blocks.")}
    convs = {k.split(".")[3] for k in state if k.startswith("transformer.text_embed.text_blocks.")}
    ff_hidden = int(state["transformer.transformer_blocks.0.ff.ff.0.0.weight"].shape[0])
    arch.update(
        dim=dim,
        depth=len(blocks),
        heads=max(1, int(q.shape[0]) // 64),
        dim_head=64,
        ff_mult=ff_hidden // dim,
        text_dim=int(state["transformer.text_embed.text_embed.weight"].shape[1]),
        conv_layers=len(convs),
    )
    return arch


def load_f5(ckpt: str, vocab_file: str, device: str, dtype: Any) -> tuple[Any, dict[str, int]]:
    """The F5 CFM as `utils_infer.load_model` builds it, from the EMA weights of ``ckpt``."""
    vocab_char_map, vocab_size = utils_infer.get_tokenizer(vocab_file, "custom")
    raw = read_safetensors(ckpt)
    state = {
        k.replace("ema_model.", "", 1): v
        for k, v in raw.items()
        if k not in ("initted", "step", "ema_model.initted", "ema_model.step")
    }
    for key in ("mel_spec.mel_stft.mel_scale.fb", "mel_spec.mel_stft.spectrogram.window"):
        state.pop(key, None)
    arch = arch_from_state(state)
    model = CFM(
        transformer=DiT(**arch, text_num_embeds=vocab_size, mel_dim=utils_infer.n_mel_channels),
        mel_spec_kwargs={
            "n_fft": utils_infer.n_fft,
            "hop_length": utils_infer.hop_length,
            "win_length": utils_infer.win_length,
            "n_mel_channels": utils_infer.n_mel_channels,
            "target_sample_rate": SAMPLE_RATE,
            "mel_spec_type": utils_infer.mel_spec_type,
        },
        odeint_kwargs={"method": utils_infer.ode_method},
        vocab_char_map=vocab_char_map,
    )
    model.load_state_dict(state)
    del raw, state
    return model.to(dtype).to(device).eval(), vocab_char_map


# -- text and joining -----------------------------------------------------------------------------------


_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？；：])\s+|(?<=[。！？；：])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def group_sentences(parts: list[str], max_bytes: int) -> list[str]:
    """Whole sentences joined into groups of at most ``max_bytes`` UTF-8 bytes (a sentence
    longer than that is split at commas, then at spaces)."""
    pieces: list[str] = []
    for s in parts:
        if len(s.encode()) <= max_bytes:
            pieces.append(s)
            continue
        for chunk in utils_infer.chunk_text(s, max_chars=max_bytes):
            if len(chunk.encode()) <= max_bytes:
                pieces.append(chunk)
                continue
            words, cur = chunk.split(" "), ""
            for w in words:
                if cur and len((cur + " " + w).encode()) > max_bytes:
                    pieces.append(cur)
                    cur = w
                else:
                    cur = f"{cur} {w}".strip()
            if cur:
                pieces.append(cur)
    groups: list[str] = []
    for p in pieces:
        if groups and len((groups[-1] + " " + p).encode()) <= max_bytes:
            groups[-1] += " " + p
        else:
            groups.append(p)
    return groups


def cross_fade(waves: list[np.ndarray], rate: int, seconds: float) -> np.ndarray:
    """Join waves with a linear cross-fade, as f5-tts joins its batches."""
    out = waves[0]
    for nxt in waves[1:]:
        n = min(int(seconds * rate), len(out), len(nxt))
        if n <= 0:
            out = np.concatenate([out, nxt])
            continue
        fade = np.linspace(1.0, 0.0, n, dtype=np.float32)
        out = np.concatenate([out[:-n], out[-n:] * fade + nxt[:n] * (1 - fade), nxt[n:]])
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class Voice:
    """A processed reference: 24 kHz samples, how it was trimmed, and its text."""

    samples: np.ndarray
    trim: waudio.Trim | None
    text: str


# -- the pipeline -------------------------------------------------------------------------------


class Speech:
    """F5-TTS + Vocos + Whisper, loaded once."""

    name = NAME

    def __init__(self, ctx: LoadContext) -> None:
        settings = ctx.settings
        self.settings = settings
        self.policy = wfetch.FetchPolicy(
            max_bytes=settings.worker_max_input_bytes,
            allow_private=settings.worker_allow_private_urls,
            timeout_s=float(ctx.extra.get("fetch_timeout_s", wfetch.FETCH_TIMEOUT_S)),
        )
        self.uploader = wout.Uploader.from_settings(settings)
        self.dev = torchdev.probe()
        if settings.require_gpu and not self.dev.cuda:
            raise GpuError(
                f"BOOTSTRAP_REQUIRE_GPU=1 but torch runs the speech models on CPU: {self.dev.reason}",
                hint="pick a GPU whose driver supports the wheels' CUDA 12 (`bootstrap diagnose`, gpu section), "
                "or set BOOTSTRAP_REQUIRE_GPU=0 to allow CPU",
            )
        self.dtype = self.dev.dtype()
        ckpt = str(model_file(ctx, F5_REPO, F5_CKPT))
        vocab = str(model_file(ctx, F5_REPO, F5_VOCAB))
        vocos_dir = model_file(ctx, VOCOS_REPO, "config.yaml").parent
        whisper_dir = model_file(ctx, WHISPER_REPO, "config.json").parent
        for label, path in (("F5 checkpoint", ckpt), ("F5 vocab", vocab)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"expected the {label} at {path}, found nothing there")
        for label, d, need in (
            ("Vocos", vocos_dir, ("config.yaml", "pytorch_model.bin")),
            ("Whisper", whisper_dir, ("config.json", "generation_config.json", "preprocessor_config.json")),
        ):
            found = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
            missing = [n for n in need if n not in found]
            if missing:
                raise FileNotFoundError(
                    f"{label} at {d} lacks {', '.join(missing)} (found: {', '.join(found) or 'nothing'})"
                )
        device = self.dev.device
        with contextlib.redirect_stdout(sys.stderr):
            self.f5, self.vocab = load_f5(ckpt, vocab, device, self.dtype)
            self.vocoder = utils_infer.load_vocoder(
                vocoder_name="vocos", is_local=True, local_path=str(vocos_dir), device=device
            )
            prefetch(whisper_dir)
            whisper: Any = WhisperForConditionalGeneration.from_pretrained(
                str(whisper_dir), dtype=self.dtype, local_files_only=True
            )
            self.whisper = whisper.to(device).eval()
            self.processor = WhisperProcessor.from_pretrained(str(whisper_dir), local_files_only=True)
            tokenizer = self.processor.tokenizer
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self.asr = pipeline(
                "automatic-speech-recognition",
                model=self.whisper,
                tokenizer=tokenizer,
                feature_extractor=self.processor.feature_extractor,
                device=torch.device(device),
                dtype=self.dtype,
            )
        self.languages: dict[str, int] = dict(getattr(self.whisper.generation_config, "lang_to_id", {}) or {})
        self._lock = threading.Lock()
        self._voices: collections.OrderedDict[str, Voice] = collections.OrderedDict()
        if ctx.extra.get("warm_up", True):  # off only for the benchmark's cold baseline
            self.warm_up()

    def device(self) -> dict[str, Any]:
        return {
            "gpu": self.dev.name if self.dev.cuda else None,
            "providers": [],
            "torch": self.dev.describe(),
        }

    # -- warm-up --------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """A whole tts job (with words) on a generated 3 s voice, then a transcription."""
        rng = np.random.default_rng(0)
        t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
        voice = (0.2 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(
            np.float32
        )
        voice += (0.003 * rng.standard_normal(len(voice))).astype(np.float32)
        wave = self._synthesize(
            Voice(voice, None, "This is a voice."), "Hello there, this warms up.", 1.0, 0, 8
        )
        for fmt in OUTPUT_FORMATS:
            waudio.encode(wave, SAMPLE_RATE, fmt)
        self._transcribe(waudio.resample(wave, SAMPLE_RATE, WHISPER_RATE), None)

    # -- models ---------------------------------------------------------------------------------

    def unsupported(self, text: str) -> list[str]:
        """Letters/digits of ``text`` the checkpoint's vocab lacks (after F5's own pinyin step)."""
        missing: list[str] = []
        for token in convert_char_to_pinyin([text])[0]:
            if token in self.vocab:
                continue
            for c in token:
                if unicodedata.category(c)[0] in ("L", "N") and c not in missing:
                    missing.append(c)
        return missing

    def _check_language(self, text: str, what: str) -> None:
        missing = self.unsupported(text)
        if missing:
            shown = "".join(missing[:12])
            scripts = sorted({unicodedata.name(c, "UNKNOWN").split(" ")[0] for c in missing})
            raise JobError(
                "UNSUPPORTED_LANGUAGE",
                f"{what} has characters the loaded F5-TTS checkpoint cannot speak: {shown!r} "
                f"({', '.join(scripts)}); F5TTS_v1_Base speaks English and Chinese",
            )

    def _synthesize(self, voice: Voice, text: str, speed: float, seed: int, steps: int) -> np.ndarray:
        ref_s = len(voice.samples) / SAMPLE_RATE
        ref_text = voice.text if voice.text.endswith((". ", "。")) else voice.text.rstrip(".") + ". "
        ref_bytes = max(1, len(ref_text.encode()))
        # as utils_infer.infer_process sizes its batches: the reference plus a group ≤ ~22 s
        max_bytes = max(20, int(ref_bytes / max(ref_s, 0.5) * (22 - min(ref_s, 20)) * speed))
        groups = group_sentences(sentences(text), max_bytes)
        ref = torch.from_numpy(voice.samples).unsqueeze(0)
        waves = []
        with self._lock:
            for i, group in enumerate(groups):
                torch.manual_seed(seed + i)
                wave, _sr, _spec = next(
                    utils_infer.infer_batch_process(
                        (ref, SAMPLE_RATE),
                        ref_text,
                        [group],
                        self.f5,
                        self.vocoder,
                        mel_spec_type=utils_infer.mel_spec_type,
                        progress=None,
                        nfe_step=steps,
                        speed=speed,
                        device=self.dev.device,
                    )
                )
                if wave is not None:
                    waves.append(np.asarray(wave, dtype=np.float32).reshape(-1))
        if not waves:
            raise WorkerFault("F5-TTS produced no audio")
        return cross_fade(waves, SAMPLE_RATE, CROSS_FADE_S)

    def _transcribe(self, samples16k: np.ndarray, language: str | None) -> dict[str, Any]:
        """Whisper over the whole clip: 30 s windows (with stride) and word timings."""
        with self._lock, torch.inference_mode():
            if language is None and self.languages:
                feats = self.processor.feature_extractor(
                    samples16k[: 30 * WHISPER_RATE], sampling_rate=WHISPER_RATE, return_tensors="pt"
                ).input_features.to(self.dev.device, self.dtype)
                lang_id = int(self.whisper.detect_language(feats)[0])
                language = self.processor.tokenizer.convert_ids_to_tokens(lang_id)[2:-2]
            generate: dict[str, Any] = {"task": "transcribe"}
            if language:
                generate["language"] = language
            result: Any = self.asr(
                {"raw": samples16k, "sampling_rate": WHISPER_RATE},
                return_timestamps="word",
                chunk_length_s=30,
                batch_size=8 if self.dev.cuda else 1,
                generate_kwargs=generate,
            )
        duration = len(samples16k) / WHISPER_RATE
        words = []
        last = 0.0
        for chunk in result.get("chunks", []):
            word = str(chunk.get("text", "")).strip()
            start, end = chunk.get("timestamp", (None, None))
            if not word:
                continue
            start = last if start is None else float(start)
            end = start if end is None else float(end)
            start = min(max(start, last), duration)
            end = min(max(end, start), duration)
            words.append({"word": word, "start": round(start, 2), "end": round(end, 2)})
            last = start
        return {"text": str(result.get("text", "")).strip(), "language": language, "words": words}

    # -- jobs -----------------------------------------------------------------------------------

    def _bytes(self, ref: AudioRef) -> bytes:
        if ref.kind == "url":
            return wfetch.fetch_url(ref.value, self.policy)
        return wfetch.decode_base64(ref.value, self.settings.worker_max_input_bytes, ref.field)

    def _voice(self, data: bytes, ref_text: str, t: Stages) -> tuple[Voice, bool]:
        key = hashlib.sha256(data).hexdigest() + "\0" + ref_text
        with self._lock:
            cached = self._voices.get(key)
            if cached is not None:
                self._voices.move_to_end(key)
                return cached, True
        with t.stage("decode"):
            decoded = waudio.decode(
                data, rate=SAMPLE_RATE, max_s=self.settings.worker_max_audio_s, what="the reference audio"
            )
            trimmed, trim = waudio.trim_reference(decoded, max_s=REF_MAX_S)
        if len(trimmed.samples) < SAMPLE_RATE // 2:
            raise JobError("NOT_AUDIO", "the reference audio holds less than 0.5 s of sound")
        text = ref_text
        if not text:
            with t.stage("transcribe_ref"):
                text = self._transcribe(waudio.resample(trimmed.samples, SAMPLE_RATE, WHISPER_RATE), None)[
                    "text"
                ]
            if not text:
                raise JobError(
                    "INVALID_INPUT", "no speech was recognised in the reference audio; give ref_text"
                )
        voice = Voice(trimmed.samples, trim, text)
        with self._lock:
            self._voices[key] = voice
            while len(self._voices) > REF_CACHE_SIZE:
                self._voices.popitem(last=False)
        return voice, False

    def tts(self, job_input: dict[str, Any]) -> dict[str, Any]:
        req = parse_tts(job_input, self.settings.worker_max_text_chars, self.uploader.allowed_buckets)
        self._check_language(req.text, "text")
        if req.ref_text:
            self._check_language(req.ref_text, "ref_text")
        if req.output.kind == "s3":
            self.uploader.check(req.output)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        t = Stages()
        with t.stage("fetch"):
            data = self._bytes(req.ref)
        voice, cached = self._voice(data, req.ref_text, t)
        del data
        with t.stage("synthesize"):
            wave = self._synthesize(voice, req.text, req.speed, seed, req.steps)
        with t.stage("encode"):
            encoded = waudio.encode(wave, SAMPLE_RATE, req.output_format)
        out: dict[str, Any] = {"success": True}
        if req.output.kind == "s3":
            fmt = req.output_format.upper()
            with t.stage("upload"):
                out.update(
                    self.uploader.upload(
                        encoded,
                        ext=wout.EXTENSIONS[fmt],
                        content_type=wout.CONTENT_TYPES[fmt],
                        target=req.output,
                        prefix="speech",
                    )
                )
        else:
            import base64

            out["audio_base64"] = base64.b64encode(encoded).decode("ascii")
        out.update(
            format=req.output_format,
            sample_rate=SAMPLE_RATE,
            duration_s=round(len(wave) / SAMPLE_RATE, 3),
            seed=seed,
            ref_text=voice.text,
            ref_cached=cached,
        )
        if voice.trim is not None:
            out["ref_trimmed"] = voice.trim.output()
        if req.words:
            with t.stage("words"):
                out["words"] = self._transcribe(waudio.resample(wave, SAMPLE_RATE, WHISPER_RATE), None)[
                    "words"
                ]
        out["ms"] = t.ms
        return out

    def transcribe(self, job_input: dict[str, Any]) -> dict[str, Any]:
        req = parse_transcribe(job_input, self.languages)
        t = Stages()
        with t.stage("fetch"):
            data = self._bytes(req.audio)
        with t.stage("decode"):
            clip = waudio.decode(
                data, rate=WHISPER_RATE, max_s=self.settings.worker_max_audio_s, what="the audio"
            )
        del data
        with t.stage("transcribe"):
            result = self._transcribe(clip.samples, req.language)
        return {
            "success": True,
            "text": result["text"],
            "language": result["language"],
            "duration_s": round(clip.duration_s, 3),
            "words": result["words"],
            "ms": t.ms,
        }

    def run(self, job_input: dict[str, Any]) -> dict[str, Any]:
        task = job_input.get("task")
        if task == "transcribe":
            return self.transcribe(job_input)
        return self.tts(job_input)


def load(ctx: LoadContext) -> Speech:
    """Warm-load the speech pipeline from the plan's model paths (see the module docstring)."""
    return Speech(ctx)
