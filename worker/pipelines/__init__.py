"""One module per task. Importing this package registers every capability (cheaply: the
pipeline modules themselves, with their heavy imports, load only when a capability is enabled)."""

from __future__ import annotations

from worker.capabilities import CapabilitySpec, register

register(
    CapabilitySpec(
        name="faceswap",
        task="faceswap",
        # imported by the env's smoke test; the pipeline module also checks that the CPU
        # onnxruntime and the GUI opencv-python are absent (FAILURES F5, F15)
        modules=("cv2", "onnxruntime", "insightface", "insightface.app", "boto3"),
        pipeline="worker.pipelines.faceswap",
    )
)

register(
    CapabilitySpec(
        name="video",
        task="faceswap_video",
        # the env's smoke test also runs ffmpeg and ffprobe for this capability (worker.smoke)
        modules=("ffmpeg", "cv2", "insightface", "boto3"),
        pipeline="worker.pipelines.video",
        programs=("ffmpeg", "ffprobe"),
        encodes_video=True,
    )
)

register(
    CapabilitySpec(
        name="animate",
        task="animate",
        # ftfy: Wan's prompt cleaning needs it and diffusers does not declare it (a NameError at
        # the first job otherwise); the pipeline class's own module is imported too
        modules=(
            "torch",
            "transformers",
            "diffusers",
            "ftfy",
            "diffusers.pipelines.wan.pipeline_wan_animate",
        ),
        pipeline="worker.pipelines.animate",
        programs=("ffmpeg", "ffprobe"),  # the pose video in, the result's mp4 out
        encodes_video=True,
    )
)

register(
    CapabilitySpec(
        name="speech",
        task="tts",
        also=("transcribe",),
        # the smoke test imports these in the built env, then the pipeline module itself
        modules=("f5_tts", "f5_tts.infer.utils_infer", "transformers", "torch", "torchaudio", "soundfile"),
        pipeline="worker.pipelines.speech",
        programs=("ffmpeg",),  # mp3/ogg encoding; torchcodec loads its libraries
    )
)
