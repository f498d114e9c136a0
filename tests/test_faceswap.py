"""The face-swap pipeline (issue 5), loaded in-process from fixture ONNX models.

The fixture detector calls each bright square a face (tests/fixture_models.py), so no face,
several faces and left-to-right order are real outcomes of the real InsightFace code.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bootstrap.errors import GpuError
from bootstrap.plan import Capability, Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from tests.fixture_models import (
    BUFFALO_DEST,
    INSWAPPER_DEST,
    ImageServer,
    b64,
    encode,
    picture,
    write_models_dir,
)
from worker import device
from worker import fetch as wfetch
from worker.errors import JOB_CODES
from worker.handler import Worker
from worker.lifecycle import Lifecycle, State
from worker.pipelines import faceswap
from worker.pipelines.base import LoadContext

# Three faces, left to right, on a 500×300 picture; a source with one (or two) faces.
TARGET_FACES = [(40, 100, 80), (210, 100, 80), (380, 100, 80)]
SOURCE_FACES = [(60, 60, 100)]


def make_pipeline(models: dict[str, str], **settings: Any) -> faceswap.FaceSwap:
    env = {k: str(v) for k, v in settings.items()}
    return faceswap.load(
        LoadContext(settings=Settings.from_env(env), models=models, extra={"fetch_timeout_s": 3})
    )


def with_settings(pipe: faceswap.FaceSwap, **changes: Any) -> faceswap.FaceSwap:
    """The same loaded models, other limits (a shallow copy: sessions are shared)."""
    clone = copy.copy(pipe)
    clone.settings = dataclasses.replace(pipe.settings, **changes)
    clone.policy = wfetch.FetchPolicy(
        max_bytes=clone.settings.worker_max_input_bytes,
        allow_private=clone.settings.worker_allow_private_urls,
        timeout_s=3,
    )
    return clone


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pipe(models: dict[str, str]) -> faceswap.FaceSwap:
    return make_pipeline(models)


@pytest.fixture
def server() -> Iterator[ImageServer]:
    srv = ImageServer()
    yield srv
    srv.close()


def decode_result(out: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["image_base64"]))).convert("RGB"))


def changed_columns(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
    diff = np.abs(after.astype(int) - before.astype(int)).sum(axis=2) > 30
    xs = np.nonzero(diff.any(axis=0))[0]
    assert xs.size, "nothing changed"
    return int(xs.min()), int(xs.max())


def job(source: np.ndarray, target: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"source_image": b64(encode(source)), "target_image": b64(encode(target)), **extra}


def code_of(pipe: faceswap.FaceSwap, job_input: Any) -> str:
    with pytest.raises(faceswap.JobError) as info:
        pipe.run(job_input)
    assert info.value.code in JOB_CODES
    assert info.value.message
    return info.value.code


# -- the swap itself ----------------------------------------------------------------------------


def test_load_routes_fixture_models_and_reports_cpu(pipe: faceswap.FaceSwap) -> None:
    assert type(pipe.detector).__name__ == "SCRFD"
    assert type(pipe.recognizer).__name__ == "ArcFaceONNX"
    assert type(pipe.swapper).__name__ == "INSwapper"
    # Only detection and recognition got a session: the landmark and gender/age files did not.
    assert set(pipe.app.models) == {"detection", "recognition"}
    info = pipe.device()
    assert info["gpu"] is None
    assert info["providers"] == ["CPUExecutionProvider"]
    # This machine's onnxruntime is the GPU build: CUDA was asked for and fell back, and says so.
    assert info["requested"][0] == "CUDAExecutionProvider"
    assert "no NVIDIA driver in this container" in info["fallback"]


def test_one_face_swapped_with_the_exact_result_shape(pipe: faceswap.FaceSwap) -> None:
    target = picture(300, 240, [(100, 70, 90)])
    out = pipe.run(job(picture(200, 200, SOURCE_FACES), target))
    assert set(out) == {"success", "image_base64", "faces", "swapped", "ms"}
    assert out["success"] is True
    assert out["faces"] == {"source": 1, "target": 1}
    assert out["swapped"] == 1
    assert set(out["ms"]) == {"fetch", "decode", "detect", "swap", "encode"}
    assert all(isinstance(v, float) and v >= 0 for v in out["ms"].values())
    result = decode_result(out)
    assert result.shape == target.shape
    lo, hi = changed_columns(target, result)
    assert lo >= 80 and hi <= 210  # around the face (x 100..190), not elsewhere


def test_target_index_zero_swaps_every_face(pipe: faceswap.FaceSwap) -> None:
    target = picture(500, 300, TARGET_FACES)
    out = pipe.run(job(picture(200, 200, SOURCE_FACES), target))
    assert out["faces"] == {"source": 1, "target": 3}
    assert out["swapped"] == 3
    result = decode_result(out)
    for x, y, side in TARGET_FACES:
        region = np.abs(
            result[y : y + side, x : x + side].astype(int) - target[y : y + side, x : x + side]
        ).sum()
        assert region > 0


@pytest.mark.parametrize("index", [1, 2, 3])
def test_target_faces_are_numbered_left_to_right(pipe: faceswap.FaceSwap, index: int) -> None:
    target = picture(500, 300, TARGET_FACES)
    out = pipe.run(job(picture(200, 200, SOURCE_FACES), target, target_index=index))
    assert out["swapped"] == 1 and out["faces"]["target"] == 3
    lo, hi = changed_columns(target, decode_result(out))
    x, _, side = TARGET_FACES[index - 1]
    assert x - 25 <= lo and hi <= x + side + 25, (lo, hi)


def test_source_index_picks_the_face_left_to_right(pipe: faceswap.FaceSwap) -> None:
    # picture() colours faces in order: the left face and the right face differ in colour.
    source = picture(400, 200, [(30, 50, 100), (250, 50, 100)])
    target = picture(300, 240, [(100, 70, 90)])
    first = decode_result(pipe.run(job(source, target, source_index=1)))
    second = decode_result(pipe.run(job(source, target, source_index=2)))
    assert not np.array_equal(first, second)
    # The left source face alone gives the same result as source_index 1.
    alone = picture(400, 200, [(30, 50, 100)])
    assert np.array_equal(decode_result(pipe.run(job(alone, target))), first)
    assert code_of(pipe, job(source, target, source_index=3)) == "FACE_INDEX_OUT_OF_RANGE"


def test_no_face_and_index_out_of_range(pipe: faceswap.FaceSwap) -> None:
    face = picture(200, 200, SOURCE_FACES)
    dark = picture(200, 200, [])
    assert code_of(pipe, job(dark, face)) == "NO_FACE_IN_SOURCE"
    assert code_of(pipe, job(face, dark)) == "NO_FACE_IN_TARGET"
    assert (
        code_of(pipe, job(face, picture(500, 300, TARGET_FACES), target_index=4)) == "FACE_INDEX_OUT_OF_RANGE"
    )


@pytest.mark.parametrize(
    ("fmt", "magic", "pil"),
    [
        ("png", b"\x89PNG", "PNG"),
        ("jpeg", b"\xff\xd8", "JPEG"),
        ("jpg", b"\xff\xd8", "JPEG"),
        ("webp", b"RIFF", "WEBP"),
    ],
)
def test_output_formats(pipe: faceswap.FaceSwap, fmt: str, magic: bytes, pil: str) -> None:
    out = pipe.run(
        job(picture(200, 200, SOURCE_FACES), picture(300, 240, [(100, 70, 90)]), output_format=fmt)
    )
    data = base64.b64decode(out["image_base64"])
    assert data.startswith(magic)
    assert Image.open(io.BytesIO(data)).format == pil


def test_alpha_is_kept_for_png_and_dropped_for_jpeg(pipe: faceswap.FaceSwap) -> None:
    rgb = picture(300, 240, [(100, 70, 90)])
    alpha = np.full((240, 300), 255, dtype=np.uint8)
    alpha[:, :40] = 0
    rgba = np.dstack([rgb, alpha])
    target = b64(encode(rgba))
    src = b64(encode(picture(200, 200, SOURCE_FACES)))
    out = pipe.run({"source_image": src, "target_image": target})
    img = Image.open(io.BytesIO(base64.b64decode(out["image_base64"])))
    assert img.mode == "RGBA"
    assert np.array_equal(np.asarray(img)[:, :, 3], alpha)
    out = pipe.run({"source_image": src, "target_image": target, "output_format": "jpeg"})
    assert Image.open(io.BytesIO(base64.b64decode(out["image_base64"]))).mode == "RGB"


def test_grayscale_and_palette_inputs(pipe: faceswap.FaceSwap) -> None:
    grey = np.asarray(Image.fromarray(picture(300, 240, [(100, 70, 90)])).convert("L"))
    palette = Image.fromarray(picture(200, 200, SOURCE_FACES)).convert("P")
    buf = io.BytesIO()
    palette.save(buf, "GIF")
    out = pipe.run({"source_image": b64(buf.getvalue()), "target_image": b64(encode(grey))})
    assert out["faces"] == {"source": 1, "target": 1}
    assert decode_result(out).shape == (240, 300, 3)


def test_exif_orientation_is_applied(pipe: faceswap.FaceSwap) -> None:
    # Stored landscape 400×200 with the face on the left, EXIF says "rotate 90° clockwise":
    # upright it is 200×400 with the face at the top.
    stored = picture(400, 200, [(20, 50, 100)])
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    out = pipe.run({"source_image": b64(encode(picture(200, 200, SOURCE_FACES))), "target_image": b64(data)})
    result = decode_result(out)
    assert result.shape == (400, 200, 3)
    upright = np.asarray(ImageOpsHelper.upright(data))
    diff = np.abs(result.astype(int) - upright.astype(int)).sum(axis=2) > 30
    ys = np.nonzero(diff.any(axis=1))[0]
    assert ys.max() < 200  # the face (and so the swap) is in the top half once upright


class ImageOpsHelper:
    @staticmethod
    def upright(data: bytes) -> Image.Image:
        from PIL import ImageOps

        return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def test_max_side_scales_down(pipe: faceswap.FaceSwap) -> None:
    target = picture(1000, 600, [(300, 200, 200)])
    out = pipe.run(job(picture(200, 200, SOURCE_FACES), target, max_side=500))
    assert decode_result(out).shape == (300, 500, 3)
    out = pipe.run(job(picture(200, 200, SOURCE_FACES), target, max_side=4000))
    assert decode_result(out).shape == (600, 1000, 3)


# -- every input error code ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        "swap",
        {},
        {"target_image": "x"},
        {"source_image": "x", "source_url": "http://a/b.png", "target_image": "x"},
        {"source_image": 7, "target_image": "x"},
        {"source_image": "", "target_image": "x"},
        {"source_image": "x", "target_image": "x", "source_index": 0},
        {"source_image": "x", "target_image": "x", "source_index": "1"},
        {"source_image": "x", "target_image": "x", "source_index": True},
        {"source_image": "x", "target_image": "x", "target_index": -1},
        {"source_image": "x", "target_image": "x", "target_index": 1.5},
        {"source_image": "x", "target_image": "x", "output_format": "gif"},
        {"source_image": "x", "target_image": "x", "output": "disk"},
        {"source_image": "x", "target_image": "x", "max_side": 0},
        {"source_image": "x", "target_image": "x", "s3": {"bucket": "b"}},
        {"source_image": "x", "target_image": "x", "output": "s3", "s3": "bucket"},
        {"source_image": "x", "target_image": "x", "output": "s3", "s3": {"region": "x"}},
    ],
)
def test_invalid_input(pipe: faceswap.FaceSwap, bad: Any) -> None:
    assert code_of(pipe, bad) == "INVALID_INPUT"


@pytest.mark.parametrize(
    "broken", ["not base64 at all!", "QUJD*", "data:image/png,QUJD", "data:image/png;base64,@@@"]
)
def test_broken_base64_is_invalid_input(pipe: faceswap.FaceSwap, broken: str) -> None:
    good = b64(encode(picture(100, 100, [])))
    assert code_of(pipe, {"source_image": broken, "target_image": good}) == "INVALID_INPUT"


def test_data_urls_and_urlsafe_base64_are_accepted(pipe: faceswap.FaceSwap) -> None:
    src = "data:image/png;base64," + b64(encode(picture(200, 200, SOURCE_FACES)))
    tgt = base64.urlsafe_b64encode(encode(picture(300, 240, [(100, 70, 90)]))).decode().rstrip("=")
    out = pipe.run(
        {"source_image": src, "target_image": "\n".join(tgt[i : i + 76] for i in range(0, len(tgt), 76))}
    )
    assert out["swapped"] == 1


def test_input_too_large_base64(pipe: faceswap.FaceSwap) -> None:
    small = with_settings(pipe, worker_max_input_bytes=1000)
    data = encode(picture(200, 200, SOURCE_FACES))
    assert len(data) > 1000
    assert code_of(small, {"source_image": b64(data), "target_image": b64(data)}) == "INPUT_TOO_LARGE"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is not a picture",
        bytes(range(256)) * 8,
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        b"<html><body>Not found</body></html>",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n",
    ],
)
def test_not_an_image(pipe: faceswap.FaceSwap, data: bytes) -> None:
    good = b64(encode(picture(100, 100, [])))
    if not data:
        assert code_of(pipe, {"source_image": "", "target_image": good}) == "INVALID_INPUT"
        return
    assert code_of(pipe, {"source_image": b64(data), "target_image": good}) == "NOT_AN_IMAGE"


def test_truncated_image_is_not_an_image(pipe: faceswap.FaceSwap) -> None:
    data = encode(picture(300, 300, SOURCE_FACES, seed=3))
    assert (
        code_of(pipe, {"source_image": b64(data[: len(data) // 2]), "target_image": b64(data)})
        == "NOT_AN_IMAGE"
    )


def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_too_large_is_refused_from_the_header(pipe: faceswap.FaceSwap) -> None:
    good = b64(encode(picture(100, 100, [])))
    # A 100000×100000 PNG (10¹⁰ pixels) of 33 bytes: refused before any pixel is decoded.
    bomb = b64(_png_header_only(100_000, 100_000))
    assert code_of(pipe, {"source_image": bomb, "target_image": good}) == "IMAGE_TOO_LARGE"
    small = with_settings(pipe, worker_max_pixels=100 * 99)
    assert code_of(small, {"source_image": good, "target_image": good}) == "IMAGE_TOO_LARGE"


# -- URLs -----------------------------------------------------------------------------------------


def test_urls_are_fetched_from_loopback_when_allowed(pipe: faceswap.FaceSwap, server: ImageServer) -> None:
    allowed = with_settings(pipe, worker_allow_private_urls=True)
    src = server.add("/src.png", encode(picture(200, 200, SOURCE_FACES)))
    server.add("/tgt.png", encode(picture(300, 240, [(100, 70, 90)])))
    redirect = server.add("/moved", b"", status=302, headers={"Location": "/tgt.png"})
    out = allowed.run({"source_url": src, "target_url": redirect})
    assert out["swapped"] == 1
    assert server.hits == ["/src.png", "/moved", "/tgt.png"]
    assert out["ms"]["fetch"] > 0


def test_fetch_failures(pipe: faceswap.FaceSwap, server: ImageServer) -> None:
    allowed = with_settings(pipe, worker_allow_private_urls=True)
    good = b64(encode(picture(100, 100, [])))
    missing = server.url("/missing.png")
    assert code_of(allowed, {"source_url": missing, "target_image": good}) == "FETCH_FAILED"
    error = server.add("/err", b"boom", status=500)
    assert code_of(allowed, {"source_url": error, "target_image": good}) == "FETCH_FAILED"
    loop = server.add("/loop", b"", status=302, headers={"Location": "/loop"})
    assert code_of(allowed, {"source_url": loop, "target_image": good}) == "FETCH_FAILED"
    nowhere = f"http://127.0.0.1:{_closed_port()}/x.png"
    assert code_of(allowed, {"source_url": nowhere, "target_image": good}) == "FETCH_FAILED"
    server.add("/html", b"<html>login</html>", headers={"Content-Type": "text/html"})
    assert code_of(allowed, {"source_url": server.url("/html"), "target_image": good}) == "NOT_AN_IMAGE"


def test_slow_server_hits_the_deadline(pipe: faceswap.FaceSwap, server: ImageServer) -> None:
    import time

    def trickle(handler: Any) -> None:
        for _ in range(100):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)

    allowed = with_settings(pipe, worker_allow_private_urls=True)  # deadline 3 s (with_settings)
    slow = server.add("/slow", trickle, headers={"Content-Type": "image/png", "Content-Length": "100"})
    good = b64(encode(picture(100, 100, [])))
    t0 = time.monotonic()
    assert code_of(allowed, {"source_url": slow, "target_image": good}) == "FETCH_FAILED"
    assert time.monotonic() - t0 < 9  # protocol bound: the deadline, not the server, ends it


def test_input_too_large_from_urls(pipe: faceswap.FaceSwap, server: ImageServer) -> None:
    small = with_settings(pipe, worker_allow_private_urls=True, worker_max_input_bytes=1000)
    good = b64(encode(picture(100, 100, [])))
    declared = server.add("/declared", b"x" * 5000)
    assert code_of(small, {"source_url": declared, "target_image": good}) == "INPUT_TOO_LARGE"

    def endless(handler: Any) -> None:
        for _ in range(1000):
            handler.wfile.write(b"y" * 1000)

    # No Content-Length (the server closes the connection): counted while reading.
    undeclared = server.add(
        "/undeclared", endless, headers={"Content-Type": "image/png", "Connection": "close"}
    )
    assert code_of(small, {"source_url": undeclared, "target_image": good}) == "INPUT_TOO_LARGE"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "gopher://127.0.0.1/",
        "example.com/a.png",
        "javascript:alert(1)",
    ],
)
def test_url_schemes_not_allowed(pipe: faceswap.FaceSwap, url: str) -> None:
    good = b64(encode(picture(100, 100, [])))
    assert code_of(pipe, {"source_url": url, "target_image": good}) == "URL_NOT_ALLOWED"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "169.254.169.254",  # the cloud metadata address
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.4",
        "100.64.0.1",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "[fe80::1]",
        "[fc00::1]",
        "2130706433",  # 127.0.0.1 written as one number
        "0x7f.1",
    ],
)
def test_private_addresses_are_refused(pipe: faceswap.FaceSwap, server: ImageServer, host: str) -> None:
    good = b64(encode(picture(100, 100, [])))
    url = f"http://{host}:{server.port}/src.png"
    server.add("/src.png", encode(picture(200, 200, SOURCE_FACES)))
    assert code_of(pipe, {"source_url": url, "target_image": good}) == "URL_NOT_ALLOWED"
    assert server.hits == []  # refused before connecting


def _public_loopback(pipe: faceswap.FaceSwap, answers: dict[str, list[str]]) -> faceswap.FaceSwap:
    """Loopback pretending to be the internet: names resolve from ``answers``, 127.0.0.1 counts as public."""
    clone = with_settings(pipe)

    def resolve(host: str, port: int) -> list[str]:
        if host in answers:
            return answers[host]
        return wfetch._default_resolve(host, port)

    clone.policy = dataclasses.replace(
        clone.policy, resolve=resolve, is_public=lambda a: a == "127.0.0.1" or wfetch.is_public_address(a)
    )
    return clone


def test_redirect_hops_are_checked_again(pipe: faceswap.FaceSwap, server: ImageServer) -> None:
    public = _public_loopback(pipe, {"images.example": ["127.0.0.1"]})
    good = b64(encode(picture(100, 100, [])))
    for location in (
        "http://169.254.169.254/latest/meta-data/",
        f"http://127.0.0.2:{server.port}/x",
        f"http://[::1]:{server.port}/x",
        "file:///etc/passwd",
    ):
        server.add("/hop", b"", status=301, headers={"Location": location})
        got = code_of(
            public, {"source_url": f"http://images.example:{server.port}/hop", "target_image": good}
        )
        assert got == "URL_NOT_ALLOWED", location
    # A redirect between public names is followed.
    server.add("/final.png", encode(picture(200, 200, SOURCE_FACES)))
    server.add(
        "/hop", b"", status=307, headers={"Location": f"http://images.example:{server.port}/final.png"}
    )
    out = public.run(
        {
            "source_url": f"http://images.example:{server.port}/hop",
            "target_image": b64(encode(picture(300, 240, [(100, 70, 90)]))),
        }
    )
    assert out["swapped"] == 1


def test_every_resolved_address_must_be_public(pipe: faceswap.FaceSwap, server: ImageServer) -> None:
    rebind = _public_loopback(pipe, {"mixed.example": ["127.0.0.1", "10.0.0.7"]})
    server.add("/src.png", encode(picture(200, 200, SOURCE_FACES)))
    good = b64(encode(picture(100, 100, [])))
    assert (
        code_of(rebind, {"source_url": f"http://mixed.example:{server.port}/src.png", "target_image": good})
        == "URL_NOT_ALLOWED"
    )
    assert server.hits == []


def test_is_public_address() -> None:
    assert wfetch.is_public_address("8.8.8.8")
    assert wfetch.is_public_address("2606:4700:4700::1111")
    for addr in (
        "127.0.0.1",
        "::1",
        "10.0.0.1",
        "169.254.169.254",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "224.0.0.1",
        "fd00::1",
        "0.0.0.0",
        "::",
    ):
        assert not wfetch.is_public_address(addr), addr


def test_url_credentials_are_not_echoed(pipe: faceswap.FaceSwap) -> None:
    with pytest.raises(faceswap.JobError) as info:
        pipe.run({"source_url": "http://user:hunter2@127.0.0.1/x.png", "target_image": "eA=="})
    assert info.value.code == "URL_NOT_ALLOWED"
    assert "hunter2" not in info.value.message


# -- load failures, GPU, faults --------------------------------------------------------------------


def test_require_gpu_on_a_cpu_machine_exits_16(models: dict[str, str]) -> None:
    with pytest.raises(GpuError) as info:
        make_pipeline(models, BOOTSTRAP_REQUIRE_GPU="1")
    assert info.value.exit_code == 16
    assert "CPUExecutionProvider" in info.value.message
    assert info.value.hint


def test_missing_model_files_are_named(tmp_path: Path, models: dict[str, str]) -> None:
    with pytest.raises(FileNotFoundError, match=r"inswapper_128\.onnx"):
        make_pipeline({BUFFALO_DEST: models[BUFFALO_DEST]})
    partial = tmp_path / "buffalo_l"
    partial.mkdir()
    (partial / "w600k_r50.onnx").write_bytes(Path(models[BUFFALO_DEST], "w600k_r50.onnx").read_bytes())
    with pytest.raises(FileNotFoundError) as info:
        make_pipeline({BUFFALO_DEST: str(partial), INSWAPPER_DEST: models[INSWAPPER_DEST]})
    assert "det_10g.onnx" in str(info.value) and "found: w600k_r50.onnx" in str(info.value)


class _ExplodingSession:
    def __init__(self, real: Any, message: str) -> None:
        self.real, self.message = real, message

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(self.message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _worker(pipeline: Any) -> Worker:
    plan = Plan(worker_id="t", volume="/nonexistent", app_dir=".")
    w = Worker(plan=plan, timeline=Timeline("t", stream=io.StringIO()), lifecycle=Lifecycle())
    w.pipelines["faceswap"] = pipeline
    w.capabilities["faceswap"] = Capability()
    w.lifecycle.to(State.WARM)
    w.lifecycle.to(State.READY)
    return w


def test_cuda_oom_asks_for_a_new_worker_and_the_worker_keeps_serving(pipe: faceswap.FaceSwap) -> None:
    broken = copy.copy(pipe)
    broken.swapper = copy.copy(pipe.swapper)
    broken.swapper.session = _ExplodingSession(
        pipe.swapper.session,
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc",
    )
    good = job(picture(200, 200, SOURCE_FACES), picture(300, 240, [(100, 70, 90)]))
    out = asyncio.run(_worker(broken).handle({"id": "j1", "input": good}))
    assert out["refresh_worker"] is True
    assert "out of memory" in out["error"]
    # A plain bug is an error without refresh; and the real pipeline still serves.
    broken.swapper.session = _ExplodingSession(pipe.swapper.session, "something else went wrong")
    out = asyncio.run(_worker(broken).handle({"id": "j2", "input": good}))
    assert "refresh_worker" not in out and "something else" in out["error"]
    out = asyncio.run(_worker(pipe).handle({"id": "j3", "input": good}))
    assert out["success"] is True


def test_health_reports_the_provider_in_use(pipe: faceswap.FaceSwap) -> None:
    health = asyncio.run(_worker(pipe).handle({"input": {"task": "health"}}))
    assert health["device"] == {"gpu": None, "providers": ["CPUExecutionProvider"]}
    assert health["capabilities"]["faceswap"]["status"] == "ok"


def test_classify_runtime_error() -> None:
    assert device.classify_runtime_error(RuntimeError("CUDNN_STATUS_ALLOC_FAILED")) == (
        "GPU out of memory while running the models: CUDNN_STATUS_ALLOC_FAILED",
        True,
    )
    found = device.classify_runtime_error(RuntimeError("CUDA error cudaErrorLaunchFailure"))
    assert found is not None and found[1] is True
    assert device.classify_runtime_error(MemoryError()) == ("out of memory while running the models", True)
    assert device.classify_runtime_error(ValueError("shape mismatch")) is None


def test_distribution_problems() -> None:
    good = (
        {"opencv-python-headless", "onnxruntime-gpu"}
        if device.wants_gpu_build()
        else {"opencv-python-headless", "onnxruntime"}
    )
    assert device.distribution_problems(good) == []
    assert any(
        "opencv-python is installed" in p for p in device.distribution_problems(good | {"opencv-python"})
    )
    if device.wants_gpu_build():
        assert any("CPU onnxruntime" in p for p in device.distribution_problems(good | {"onnxruntime"}))
        assert any(
            "onnxruntime-gpu is not installed" in p
            for p in device.distribution_problems({"opencv-python-headless", "onnxruntime"})
        )
    # And the environment running these tests is right.
    assert device.distribution_problems() == []


def test_concurrent_jobs_share_the_loaded_models(pipe: faceswap.FaceSwap) -> None:
    """WORKER_CONCURRENCY=3: jobs run at once in threads and give the same answers as one by one."""
    worker = _worker(pipe)
    worker.concurrency = 3
    jobs = [
        job(picture(200, 200, SOURCE_FACES), picture(500, 300, TARGET_FACES), target_index=i % 4)
        for i in range(6)
    ]
    alone = [asyncio.run(_worker(pipe).handle({"input": j})) for j in jobs]

    async def together() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(worker.handle({"input": j}) for j in jobs)))

    for one, many in zip(alone, asyncio.run(together()), strict=True):
        assert many["success"] is True
        assert many["image_base64"] == one["image_base64"] and many["swapped"] == one["swapped"]


@pytest.mark.parametrize(
    ("size", "faces"),
    [
        ((500, 300), TARGET_FACES),
        ((300, 240), [(0, 0, 120)]),
        ((1600, 1200), [(100, 100, 300), (1200, 800, 380)]),
    ],
)
def test_region_paste_back_matches_insightface_full_picture_paste_back(
    pipe: faceswap.FaceSwap, size: tuple[int, int], faces: list[tuple[int, int, int]]
) -> None:
    img = picture(*size, faces)
    src = picture(200, 200, SOURCE_FACES)
    source = pipe._detect(src)[0]
    pipe.recognizer.get(src, source)
    full, region = img.copy(), img.copy()
    for face in pipe._detect(img):
        full = pipe.swapper.get(full, face, source, paste_back=True)
        pipe._swap_into(region, face, source)
    diff = np.abs(full.astype(int) - region.astype(int))
    changed = (np.abs(full.astype(int) - img.astype(int)).sum(axis=2) > 0).sum()
    assert changed > 1000
    assert diff.max() <= 1  # float rounding of the shifted transform, nothing more
    assert (diff > 0).sum() < changed * 0.01


def test_https_still_verifies_the_certificate_of_the_checked_address(
    pipe: faceswap.FaceSwap, server: ImageServer, tmp_path: Path
) -> None:
    """The connection goes to the pinned address, but TLS still checks the certificate against
    the URL's host: a self-signed server is refused."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=images.example",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.add("/src.png", encode(picture(200, 200, SOURCE_FACES)))
    tls = ImageServer()
    tls.routes.update(server.routes)
    tls.server.socket = ctx.wrap_socket(tls.server.socket, server_side=True)
    public = _public_loopback(pipe, {"images.example": ["127.0.0.1"]})
    good = b64(encode(picture(100, 100, [])))
    try:
        with pytest.raises(faceswap.JobError) as info:
            public.run({"source_url": f"https://images.example:{tls.port}/src.png", "target_image": good})
    finally:
        tls.close()
    assert info.value.code == "FETCH_FAILED"
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.message


def test_unknown_task_through_the_handler(pipe: faceswap.FaceSwap) -> None:
    out = asyncio.run(_worker(pipe).handle({"input": {"task": "paint", "source_image": "x"}}))
    assert out["success"] is False and out["code"] == "UNKNOWN_TASK"
    assert "faceswap" in out["message"]  # names the tasks this worker knows


def test_every_job_code_has_a_test_here() -> None:
    # the other tasks' codes are tested with their tasks (tests/test_video*.py, test_speech*.py,
    # test_animate*.py)
    here = Path(__file__)
    others = [
        p
        for pattern in ("test_video*.py", "test_speech*.py", "test_animate*.py")
        for p in sorted(here.parent.glob(pattern))
    ]
    text = here.read_text() + "".join(p.read_text() for p in others)
    assert [code for code in JOB_CODES if f'"{code}"' not in text] == []


@pytest.mark.parametrize(("w", "h"), [(2000, 1), (1, 2000), (3000, 2)])
def test_pictures_too_thin_for_the_detector_have_no_face(pipe: faceswap.FaceSwap, w: int, h: int) -> None:
    white = b64(encode(np.full((h, w, 3), 255, dtype=np.uint8)))
    assert (
        code_of(pipe, {"source_image": b64(encode(picture(200, 200, SOURCE_FACES))), "target_image": white})
        == "NO_FACE_IN_TARGET"
    )


def _warm(models: dict[str, str], **env: str) -> Worker:
    from worker.main import warm_up

    settings = Settings.from_env(env)
    plan = Plan(
        worker_id="w", volume="/x", app_dir=".", capabilities={"faceswap": Capability()}, models=dict(models)
    )
    worker = Worker(plan=plan, timeline=Timeline("w", stream=io.StringIO()), lifecycle=Lifecycle())
    warm_up(worker, settings)
    return worker


def test_warm_phase_loads_the_pipeline_and_names_its_device(models: dict[str, str]) -> None:
    worker = _warm(models)
    assert worker.capability_table()["faceswap"] == {"status": "ok", "reason": None}
    assert worker.pipelines["faceswap"].device()["providers"] == ["CPUExecutionProvider"]


def test_a_wrong_model_under_the_swapper_name_fails_warm_load_with_15(
    tmp_path: Path, models: dict[str, str]
) -> None:
    from bootstrap.errors import WarmLoadError

    wrong = tmp_path / "inswapper_128.onnx"
    wrong.write_bytes(
        Path(models[BUFFALO_DEST], "w600k_r50.onnx").read_bytes()
    )  # a valid ONNX, not a swapper
    with pytest.raises(WarmLoadError) as info:
        _warm({**models, INSWAPPER_DEST: str(wrong)})
    assert info.value.exit_code == 15
    assert str(wrong) in info.value.message and "ArcFaceONNX" in info.value.message
    # A required GPU that is not there is exit 16, not 15.
    with pytest.raises(GpuError):
        _warm(models, BOOTSTRAP_REQUIRE_GPU="1")


def test_a_slow_resolver_costs_the_job_its_deadline_only(pipe: faceswap.FaceSwap) -> None:
    import threading
    import time

    release = threading.Event()

    def stuck(host: str, port: int) -> list[str]:
        release.wait(30)
        return ["127.0.0.1"]

    slow = with_settings(pipe)
    slow.policy = dataclasses.replace(slow.policy, resolve=stuck, timeout_s=1)
    t0 = time.monotonic()
    try:
        assert (
            code_of(slow, {"source_url": "http://slow-dns.example/x.png", "target_image": "eA=="})
            == "FETCH_FAILED"
        )
    finally:
        release.set()
    assert time.monotonic() - t0 < 10  # protocol bound: the deadline (1 s), not the resolver (30 s)


@pytest.mark.parametrize(("w", "h", "value"), [(3, 5, 31), (11, 11, 128), (7, 2, 200), (1, 1, 255)])
def test_faces_of_a_few_pixels_are_answered(pipe: faceswap.FaceSwap, w: int, h: int, value: int) -> None:
    """Dithered specks upscaled into the detector look like faces a few pixels wide; InsightFace's
    paste-back would fail on their empty mask (found by the property test)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (value,) * 3).convert("1").save(buf, "PNG")
    try:
        out = pipe.run(
            {
                "source_image": b64(encode(picture(200, 200, SOURCE_FACES))),
                "target_image": b64(buf.getvalue()),
            }
        )
    except faceswap.JobError as err:
        assert err.code in ("NO_FACE_IN_TARGET", "FACE_INDEX_OUT_OF_RANGE")
    else:
        assert out["success"] is True
        assert decode_result(out).shape == (h, w, 3)
