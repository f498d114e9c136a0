"""Tiny speech models built offline, saved the way the real ones are published, so the speech
pipeline runs its real loading code (f5-tts, vocos, transformers) on them.

- F5-TTS: a `CFM` around a `DiT` (dim 64, depth 2, 1 head of 64, text_dim 32, one ConvNeXt text
  block) with the real mel settings (24 kHz, 100 mels, hop 256), saved as
  ``model.safetensors`` with the EMA key prefix (``ema_model.…``) as F5TTS_v1_Base's
  ``model_1250000.safetensors`` is, plus a ``vocab.txt`` (space first, lower/upper ASCII
  letters, digits, common punctuation; no Cyrillic, no CJK);
- Vocos: ``config.yaml`` (the real ``MelSpectrogramFeatures``/``VocosBackbone``/``ISTFTHead``
  classes, dim 32, 2 layers) + ``pytorch_model.bin``, as ``charactr/vocos-mel-24khz`` ships;
- Whisper: a 2+2-layer ``WhisperForConditionalGeneration`` (d_model 64, 128 mel bins as
  large-v3-turbo) via ``save_pretrained``, a byte-level BPE tokenizer trained by ``tokenizers``
  on a few words with Whisper's special tokens (``<|notimestamps|>`` the last special one,
  then 1501 timestamp tokens), a feature extractor, and a generation config carrying what word
  timestamps need (``alignment_heads``, ``no_timestamps_token_id``, ``lang_to_id``…). Its
  decoder's last layer norm is constant and the word tokens " hello"/" world" are aligned with
  it, so it always writes words (``min_new_tokens`` forbids an early end): a transcription of
  anything is "hello hello …", with word timings from the real cross-attention DTW.

Everything comes from fixed seeds. `build(root)` writes all three under the manifest's dests.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

F5_DIR = "speech/f5-tts/F5TTS_v1_Base"
F5_CKPT = f"{F5_DIR}/model_1250000.safetensors"
F5_VOCAB = f"{F5_DIR}/vocab.txt"
VOCOS_DIR = "speech/vocos-mel-24khz"
WHISPER_DIR = "speech/whisper-large-v3-turbo"
WHISPER_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
VOCOS_FILES = ("config.yaml", "pytorch_model.bin")

WORDS = ["hello", "world", "there", "voice", "speech", "test", "the", "a", "is", "this"]
LANGS = ["en", "de", "fr"]


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    """f5_tts/vocos import torch.jit.script-decorated code, deprecated in torch 2.10: a
    DeprecationWarning that the suite's ``filterwarnings = error`` would turn into a failure
    when the first import happens inside a fixture."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def vocab_chars() -> list[str]:
    chars = [" "]
    chars += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += list("0123456789")
    chars += list(".,!?;:'\"-()")
    return chars


def build_f5(root: Path) -> Path:
    """The tiny F5 checkpoint + vocab under ``root/F5_DIR``."""
    with _quiet_imports():
        import torch
        from f5_tts.model import CFM, DiT
        from safetensors.torch import save_file

    out = root / F5_DIR
    out.mkdir(parents=True, exist_ok=True)
    chars = vocab_chars()
    (out / "vocab.txt").write_text("".join(c + "\n" for c in chars), encoding="utf-8")
    torch.manual_seed(0)
    model = CFM(
        transformer=DiT(
            dim=64,
            depth=2,
            heads=1,
            dim_head=64,
            ff_mult=2,
            text_dim=32,
            conv_layers=1,
            text_num_embeds=len(chars),
            mel_dim=100,
            text_mask_padding=True,
            pe_attn_head=None,
        ),
        mel_spec_kwargs={
            "n_fft": 1024,
            "hop_length": 256,
            "win_length": 1024,
            "n_mel_channels": 100,
            "target_sample_rate": 24000,
            "mel_spec_type": "vocos",
        },
        vocab_char_map={c: i for i, c in enumerate(chars)},
    )
    state = {"ema_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if "mel_spec" not in k}
    save_file(state, str(out / "model_1250000.safetensors"))
    return out


VOCOS_CONFIG = """\
feature_extractor:
  class_path: vocos.feature_extractors.MelSpectrogramFeatures
  init_args:
    sample_rate: 24000
    n_fft: 1024
    hop_length: 256
    n_mels: 100
    padding: center

backbone:
  class_path: vocos.models.VocosBackbone
  init_args:
    input_channels: 100
    dim: 32
    intermediate_dim: 64
    num_layers: 2

head:
  class_path: vocos.heads.ISTFTHead
  init_args:
    dim: 32
    n_fft: 1024
    hop_length: 256
    padding: same
"""


def build_vocos(root: Path) -> Path:
    with _quiet_imports():
        import torch
        from vocos import Vocos

    out = root / VOCOS_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(VOCOS_CONFIG)
    torch.manual_seed(1)
    vocos = Vocos.from_hparams(str(out / "config.yaml"))
    torch.save(vocos.state_dict(), out / "pytorch_model.bin")
    return out


def _special_tokens() -> list[str]:
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{lang}|>" for lang in LANGS],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]


def build_whisper(root: Path) -> Path:
    """A tiny Whisper in transformers format, tokenizer and processor included."""
    with _quiet_imports():
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import (
            GenerationConfig,
            WhisperConfig,
            WhisperFeatureExtractor,
            WhisperForConditionalGeneration,
            WhisperTokenizerFast,
        )

    out = root / WHISPER_DIR
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    corpus = [" ".join(WORDS)] * 20 + [" " + " ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    bpe.train_from_iterator(corpus, trainer=trainer)
    raw = io.StringIO(bpe.to_str())
    data = json.load(raw)
    vocab: dict[str, int] = data["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    vocab.pop("<|endoftext|>", None)
    vocab = {k: i for i, k in enumerate(sorted(vocab, key=vocab.__getitem__))}
    tok = WhisperTokenizerFast(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    specials = _special_tokens()
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    assert tok.all_special_ids[-1] == ids["<|notimestamps|>"], tok.all_special_ids[-5:]
    vocab_size = len(tok)
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=128,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(2)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Constant decoder output, and word tokens aligned with it: the model always "speaks".
        hidden = torch.randn(64)
        hidden = hidden / hidden.norm() * math.sqrt(64)
        norm = model.model.decoder.layer_norm
        norm.weight.zero_()
        norm.bias.copy_(hidden)
        emb = model.model.decoder.embed_tokens.weight
        for rank, word in enumerate(["hello", "world"]):
            for tid in tok.encode(" " + word, add_special_tokens=False)[:1]:
                emb[tid] = hidden / hidden.norm() * (6.0 - rank)
    model.save_pretrained(out, safe_serialization=True)
    gen = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=True,
        lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in LANGS},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        alignment_heads=[[1, 0], [1, 1]],
        begin_suppress_tokens=[ids["<|endoftext|>"]],
        suppress_tokens=[],
        max_initial_timestamp_index=50,
        max_length=448,
        max_new_tokens=12,
        min_new_tokens=6,
    )
    gen.save_pretrained(out)
    tok.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(out)
    for extra in (
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "normalizer.json",
    ):
        (out / extra).unlink(missing_ok=True)
    return out


def build(root: Path) -> dict[str, Path]:
    """All three tiny models under ``root`` (the manifest's dests); dest → path."""
    build_f5(root)
    build_vocos(root)
    build_whisper(root)
    files = [F5_CKPT, F5_VOCAB] + [f"{VOCOS_DIR}/{f}" for f in VOCOS_FILES]
    files += [f"{WHISPER_DIR}/{f}" for f in WHISPER_FILES]
    return {dest: root / dest for dest in files}


def tone(seconds: float, rate: int = 24000, *, pause_at: float | None = None, seed: int = 0) -> np.ndarray:
    """A voiced-sounding test signal (harmonics with a syllable-rate envelope, a little noise);
    ``pause_at`` puts 0.4 s of near-silence there."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    sig = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 3.0 * t) ** 2
    out = 0.2 * sig * env + 0.005 * rng.standard_normal(len(t))
    if pause_at is not None:
        a, b = int(pause_at * rate), int((pause_at + 0.4) * rate)
        out[a:b] = 0.0005 * rng.standard_normal(b - a)
    return np.asarray(out, dtype=np.float32)


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()
