"""Tiny Wan2.2-Animate models built offline, for the ``animate`` tests and benchmark.

- `build_pipeline(dir)`: a `WanAnimatePipeline` with every component of the real one, at the
  sizes of diffusers' own fast test for the locked version (tests/pipelines/wan/
  test_wan_animate.py), ``save_pretrained`` into ``dir`` (a few hundred KB). The text encoder is a
  tiny ``UMT5EncoderModel`` (the class the real repo ships) over a Unigram tokenizer trained here
  with ``tokenizers`` on a few words: diffusers' test loads ``hf-internal-testing/tiny-random-t5``
  from the Hub, which tests cannot reach.
- `person_detector()` / `pose_model()`: ONNX graphs with the real input/output shapes of
  Wan2.2's preprocessing models — YOLOv10m (``images`` [1,3,640,640] → ``output0`` [1,300,6]:
  x1, y1, x2, y2, score, class in letterbox pixels) and ViTPose-H whole-body (``input``
  [1,3,256,192] → ``output`` [1,133,64,48] heatmaps). The detector answers one person covering
  the middle of the frame; the pose model's heatmaps follow the picture's brightness, so the
  key points move with the content.
- `driving_video(path, …)`: an mp4 (libx264) with a moving bright figure and a sine-tone audio
  track, made by ffmpeg.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PIPELINE_DEST = "animate/Wan2.2-Animate-14B-Diffusers"
PREPROCESS_DEST = "animate/Wan2.2-Animate-14B-preprocess"
DETECTOR_PATH = "process_checkpoint/det/yolov10m.onnx"
POSE_PATH = "process_checkpoint/pose2d/vitpose_h_wholebody.onnx/end2end.onnx"

_WORDS = [
    "a person dancing in the park",
    "the character moves with the music",
    "blurry low quality static frame",
    "dance monkey",
    "a cat walking",
]


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(_WORDS * 5, trainer)
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    ), tok.get_vocab_size()


def build_pipeline(out_dir: Path) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it into ``out_dir`` (diffusers layout)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanAnimatePipeline,
        WanAnimateTransformer3DModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    tokenizer, vocab = _tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    torch.manual_seed(0)
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        latent_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=4,
        rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )
    torch.manual_seed(0)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=4,
            intermediate_size=16,
            patch_size=1,
        )
    )
    pipe = WanAnimatePipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_processor=CLIPImageProcessor(crop_size=4, size=4),
        image_encoder=image_encoder,
        transformer=transformer,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out_dir))
    return out_dir


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def person_detector() -> bytes:
    """YOLOv10m's interface: ``images`` [1,3,640,640] → ``output0`` [1,300,6] (one person)."""
    rows = np.zeros((1, 300, 6), dtype=np.float32)
    rows[0, 0] = [200.0, 120.0, 440.0, 600.0, 0.9, 0.0]  # a person in the middle
    rows[0, 1] = [10.0, 10.0, 60.0, 60.0, 0.8, 2.0]  # a car: not a person, ignored
    inits = [
        numpy_helper.from_array(rows, "rows"),
        numpy_helper.from_array(np.zeros((1,), dtype=np.float32), "zero"),
    ]
    nodes = [
        # 0 × mean(image) keeps the graph a function of its input (no constant folding away)
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["rows", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixture_yolov10m",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 300, 6])],
        inits,
    )
    return _model(graph)


def pose_model() -> bytes:
    """ViTPose-H whole-body's interface: ``input`` [1,3,256,192] → ``output`` [1,133,64,48]."""
    rng = np.random.default_rng(133)
    weight = rng.normal(0, 1, size=(133, 3, 1, 1)).astype(np.float32)
    bias = np.zeros((133,), dtype=np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["pooled", "w", "b"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixture_vitpose_h_wholebody",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 256, 192])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 133, 64, 48])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return _model(graph)


def write_preprocess_dir(root: Path) -> Path:
    """The preprocessing models laid out as the real repo's ``process_checkpoint`` folder."""
    (root / DETECTOR_PATH).parent.mkdir(parents=True, exist_ok=True)
    (root / POSE_PATH).parent.mkdir(parents=True, exist_ok=True)
    (root / DETECTOR_PATH).write_bytes(person_detector())
    (root / POSE_PATH).write_bytes(pose_model())
    return root


def build_models(models_root: Path) -> dict[str, str]:
    """Both model directories under ``models_root`` at their manifest dests; the plan's mapping."""
    pipe_dir = build_pipeline(models_root / PIPELINE_DEST)
    pre_dir = write_preprocess_dir(models_root / PREPROCESS_DEST)
    return {PIPELINE_DEST: str(pipe_dir), PREPROCESS_DEST: str(pre_dir)}


def driving_video(
    path: Path,
    *,
    seconds: float = 1.0,
    fps: int = 25,
    size: tuple[int, int] = (96, 64),
    audio: bool = True,
) -> Path:
    """An mp4 with a bright box moving over a dark background, and (by default) a 440 Hz tone."""
    w, h = size
    box = max(4, h // 3)
    src = f"color=c=0x202020:s={w}x{h}:r={fps}:d={seconds}"
    draw = f"drawbox=x='mod(t*{w},{w - box})':y={h // 3}:w={box}:h={box}:color=0xE0C090:t=fill"
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    cmd += ["-vf", draw, "-c:v", "libx264", "-pix_fmt", "yuv420p"]
    if audio:
        cmd += ["-c:a", "aac", "-shortest"]
    cmd.append(str(path))
    subprocess.run(cmd, check=True, capture_output=True)
    return path
