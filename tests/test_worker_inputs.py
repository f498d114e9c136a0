"""Hostile inputs of issue 12: many faces (a bounded swap loop) and deep pixels (no float64)."""

from __future__ import annotations

import io
import tracemalloc
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bootstrap.settings import Settings
from tests.fixture_models import b64, encode, picture, write_models_dir
from worker import io as wio
from worker.pipelines import faceswap
from worker.pipelines.base import LoadContext

SOURCE = [(60, 60, 100)]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> faceswap.FaceSwap:
    models = write_models_dir(tmp_path_factory.mktemp("models"))
    return faceswap.load(LoadContext(settings=Settings.from_env({}), models=models))


def _with_max_faces(pipe: faceswap.FaceSwap, n: int) -> faceswap.FaceSwap:
    import copy
    import dataclasses

    clone = copy.copy(pipe)
    clone.settings = dataclasses.replace(pipe.settings, worker_max_faces=n)
    return clone


def _grid(large: set[int]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """25 faces on a 5×5 grid of a 1000×1000 picture; the ones in ``large`` are bigger."""
    faces = []
    for i in range(25):
        row, col = divmod(i, 5)
        side = 110 if i in large else 70
        faces.append((col * 200 + 20, row * 200 + 20, side))
    return picture(1000, 1000, faces), faces


def _swapped_faces(before: np.ndarray, out: dict[str, Any], faces: list[tuple[int, int, int]]) -> set[int]:
    import base64

    after = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["image_base64"]))).convert("RGB"))
    changed = set()
    for i, (x, y, side) in enumerate(faces):
        region = np.abs(after[y : y + side, x : x + side].astype(int) - before[y : y + side, x : x + side])
        if region.sum(axis=2).max() > 30:
            changed.add(i)
    return changed


def test_target_index_zero_swaps_at_most_max_faces_the_largest(pipe: faceswap.FaceSwap) -> None:
    large = {3, 7, 12, 18, 24}
    target, faces = _grid(large)
    job = {"source_image": b64(encode(picture(200, 200, SOURCE))), "target_image": b64(encode(target))}
    out = _with_max_faces(pipe, 5).run(job)
    assert out["faces"] == {"source": 1, "target": 25}
    assert out["swapped"] == 5
    assert _swapped_faces(target, out, faces) == large


def test_the_default_bound_is_20_faces(pipe: faceswap.FaceSwap) -> None:
    assert pipe.settings.worker_max_faces == 20
    target, faces = _grid(set())
    job = {"source_image": b64(encode(picture(200, 200, SOURCE))), "target_image": b64(encode(target))}
    out = pipe.run(job)
    assert out["faces"]["target"] == 25 and out["swapped"] == 20
    assert len(_swapped_faces(target, out, faces)) == 20
    # A face picked by index is swapped whatever the bound.
    out = _with_max_faces(pipe, 1).run({**job, "target_index": 25})
    assert out["swapped"] == 1 and _swapped_faces(target, out, faces) == {24}


def test_max_faces_setting() -> None:
    assert Settings.from_env({"WORKER_MAX_FACES": "3"}).worker_max_faces == 3
    from bootstrap.errors import ConfigError

    with pytest.raises(ConfigError, match="WORKER_MAX_FACES"):
        Settings.from_env({"WORKER_MAX_FACES": "0"})


def _png16(width: int, height: int) -> tuple[bytes, np.ndarray]:
    ramp = (np.arange(width * height, dtype=np.uint64) * 65535 // (width * height - 1)).astype(np.uint16)
    grey = ramp.reshape(height, width)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    return buf.getvalue(), grey


def test_a_16_bit_png_is_scaled_in_integers() -> None:
    data, grey = _png16(64, 32)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = wio.decode_image(data, max_pixels=10**6, max_side=None, what="t")
    assert decoded.bgr.dtype == np.uint8 and decoded.bgr.shape == (32, 64, 3)
    expected = (grey.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    assert np.array_equal(decoded.bgr[:, :, 0], expected)
    assert decoded.bgr[0, 0, 0] == 0 and decoded.bgr[-1, -1, 0] == 255


def test_a_16_bit_png_never_holds_a_float64_copy() -> None:
    """Peak memory of decoding a 16-bit 3-megapixel PNG stays under what one float64 copy of its
    pixels alone would take (8 bytes a pixel; the old path held two)."""
    width, height = 2000, 1500
    data, _ = _png16(width, height)
    tracemalloc.start()
    try:
        decoded = wio.decode_image(data, max_pixels=10**8, max_side=None, what="t")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.bgr.dtype == np.uint8
    assert peak < 8 * width * height, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0, 128, 255]], dtype=np.int32), [0, 128, 255]),
        (np.array([[-5, 1000, 2**31 - 1]], dtype=np.int32), [0, 0, 255]),
        (np.array([[np.nan, 300.0, 12.7]], dtype=np.float32), [0, 255, 12]),
        (np.array([[0, 65535, 32768]], dtype=np.uint16), [0, 255, 127]),
    ],
)
def test_deep_grey_to_8_bit(values: np.ndarray, expected: list[int]) -> None:
    out = wio._to_8bit(values)
    assert out.dtype == np.uint8 and out.tolist() == [expected]
