"""Sniff and format checks on real files: ONNX built with `onnx`, safetensors and zips built here."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bootstrap.weights.verify import BadFile, check_format, sniff_bytes, sniff_problem, zip_members
from tests.httpserver import HTML_TEXT, JSON_TEXT, LFS_POINTER_TEXT


def onnx_bytes(n_floats: int = 1000, seed: int = 0) -> bytes:
    """A real, loadable ONNX model: y = x + w, with ``w`` an initializer of ``n_floats`` floats."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal(n_floats).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_floats])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n_floats])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        raw = arr.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_real_onnx_parses(tmp_path: Path) -> None:
    check_format(write(tmp_path, "m.onnx", onnx_bytes()), "onnx")


def test_fixture_models_parse(tmp_path: Path) -> None:
    fixtures = pytest.importorskip("tests.fixture_models")
    check_format(write(tmp_path, "swap.onnx", fixtures.swapper()), "onnx")
    check_format(write(tmp_path, "buffalo_l.zip", fixtures.buffalo_zip()), "zip")


@pytest.mark.parametrize("cut", [1, 10, 100, -1, -7])
def test_truncated_onnx_rejected(tmp_path: Path, cut: int) -> None:
    data = onnx_bytes()
    p = write(tmp_path, "m.onnx", data[:cut])
    with pytest.raises(BadFile):
        check_format(p, "onnx")


def test_onnx_with_trailing_garbage_rejected(tmp_path: Path) -> None:
    with pytest.raises(BadFile):
        check_format(write(tmp_path, "m.onnx", onnx_bytes() + b"\xff\xff\xff"), "onnx")


def test_onnx_without_graph_rejected(tmp_path: Path) -> None:
    model = onnx.ModelProto(ir_version=8, producer_name="x")
    with pytest.raises(BadFile, match="graphs"):
        check_format(write(tmp_path, "m.onnx", model.SerializeToString()), "onnx")


@pytest.mark.parametrize(
    ("content", "fmt", "words"),
    [
        (LFS_POINTER_TEXT, "onnx", "Git-LFS pointer"),
        (LFS_POINTER_TEXT, "raw", "Git-LFS pointer"),
        (HTML_TEXT, "onnx", "HTML"),
        (HTML_TEXT, "safetensors", "HTML"),
        (b"  <html><body>503</body></html>", "zip", "HTML"),
        (JSON_TEXT, "onnx", "JSON"),
        (JSON_TEXT, "zip", "JSON"),
        (gzip.compress(b"\x08\x08" * 1000), "onnx", "gzip"),
        (b"\x28\xb5\x2f\xfd" + b"\0" * 100, "safetensors", "zstd"),
        (b"PK\x03\x04" + b"\0" * 100, "onnx", "zip"),
        (b"", "raw", "empty"),
        (b"hello world, not a zip", "zip", "zip"),
    ],
)
def test_sniff_rejects(content: bytes, fmt: str, words: str) -> None:
    why = sniff_bytes(content[:1024], len(content), fmt)
    assert why is not None and words in why


def test_sniff_accepts_real_files(tmp_path: Path) -> None:
    assert sniff_problem(write(tmp_path, "a.onnx", onnx_bytes()), "onnx") is None
    assert (
        sniff_problem(write(tmp_path, "a.st", safetensors_bytes({"w": np.ones((2, 3))})), "safetensors")
        is None
    )
    assert sniff_problem(write(tmp_path, "a.zip", zip_bytes({"a.onnx": onnx_bytes()})), "zip") is None
    assert sniff_problem(write(tmp_path, "cfg.json", b'{"a": 1}'), "raw") is None


def test_safetensors_good_and_bad(tmp_path: Path) -> None:
    good = safetensors_bytes({"a": np.ones((4, 4)), "b": np.zeros(3)})
    check_format(write(tmp_path, "g.safetensors", good), "safetensors")
    with pytest.raises(BadFile, match="cover"):
        check_format(write(tmp_path, "t.safetensors", good[:-4]), "safetensors")
    with pytest.raises(BadFile, match="cover"):
        check_format(write(tmp_path, "x.safetensors", good + b"\0" * 8), "safetensors")
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    header["a"]["data_offsets"] = [4, 68]  # a gap at the start
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with pytest.raises(BadFile):
        check_format(
            write(tmp_path, "o.safetensors", struct.pack("<Q", len(text)) + text + good[8 + n :]),
            "safetensors",
        )


def test_zip_good(tmp_path: Path) -> None:
    p = write(tmp_path, "z.zip", zip_bytes({"det_10g.onnx": onnx_bytes(), "sub/readme.txt": b"hi"}))
    assert sorted(m.filename for m in zip_members(p)) == ["det_10g.onnx", "sub/readme.txt"]


@pytest.mark.parametrize("name", ["../evil.onnx", "/etc/evil", "a/../../evil", "C:/evil", "a\\..\\evil"])
def test_zip_escape_rejected(tmp_path: Path, name: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.onnx", b"x")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    with pytest.raises(BadFile, match="member"):
        zip_members(write(tmp_path, "z.zip", buf.getvalue()))


def test_zip_symlink_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(BadFile, match="symlink"):
        zip_members(write(tmp_path, "z.zip", buf.getvalue()))


def test_zip_crc_corruption_rejected(tmp_path: Path) -> None:
    data = bytearray(zip_bytes({"a.bin": bytes(range(256)) * 400}))
    # Flip a byte inside the compressed data (after the 30-byte local header and the name).
    data[30 + len("a.bin") + 20] ^= 0xFF
    with pytest.raises(BadFile):
        zip_members(write(tmp_path, "z.zip", bytes(data)))


def test_truncated_zip_rejected(tmp_path: Path) -> None:
    data = zip_bytes({"a.onnx": onnx_bytes()})
    with pytest.raises(BadFile):
        check_format(write(tmp_path, "z.zip", data[: len(data) // 2]), "zip")
