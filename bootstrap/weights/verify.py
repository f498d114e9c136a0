"""What a weight file must be before it is published (SPEC §6, FAILURES F6).

Two levels, both by hand with the standard library (bootstrap never imports onnx):

- `sniff_problem`: cheap (the first KiB and the size), run on every boot, even warm ones. Rejects a
  Git-LFS pointer, an HTML or JSON error page, a compressed stream where a model is expected
  (gzip magic on an ``.onnx``), and a first record that cannot start the declared format.
- `check_format`: the whole file, run once before publishing. ``onnx``: the ModelProto's
  protobuf wire format parses from the first byte to the last, with a graph holding nodes;
  ``safetensors``: the header's offsets tile the data region exactly up to the file's end;
  ``zip``: every member's CRC tests clean and no member escapes the directory it unpacks into.
"""

from __future__ import annotations

import json
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

SNIFF_BYTES = 1024

LFS_POINTER = b"version https://git-lfs.github.com/spec"
_HTML_STARTS = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<error")
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"PK\x03\x04": "zip",
}

# ModelProto fields (onnx.proto3) and their wire types: 0 varint, 2 length-delimited.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 21: 2, 25: 2}
_GRAPH_FIELDS = {1: 2, 2: 2, 5: 2, 10: 2, 11: 2, 12: 2, 13: 2, 14: 2, 15: 2}
_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
    "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
#: Names the bootstrap itself writes beside or inside what it unpacks; a member named so would be
#: overwritten, deleted or taken for a dead writer's leftover.
MARKER_NAMES = (".owner", "READY", "journal")
TEMP_SUFFIXES = (".part", ".unpack", ".tmp", ".new", ".stage")


class BadFile(Exception):
    """The file is not what the manifest says; the message is the reason kept in quarantine."""


def sniff_bytes(head: bytes, size: int, fmt: str) -> str | None:
    """Why ``head`` (the first bytes of a ``size``-byte file) cannot be a ``fmt`` file, or None."""
    if size == 0:
        return "the file is empty"
    stripped = head.lstrip()
    if stripped.startswith(LFS_POINTER):
        return f"a Git-LFS pointer ({size} bytes), not the file it points to"
    low = stripped[:64].lower()
    if low.startswith(_HTML_STARTS):
        return f"an HTML/XML page ({size} bytes), likely an error or login page"
    if fmt == "raw":
        return None
    if stripped.startswith((b"{", b"[")) and fmt != "safetensors":
        return f"a JSON document ({size} bytes), likely an error response"
    for magic, name in _COMPRESSED.items():
        if head.startswith(magic) and not (fmt == "zip" and name == "zip"):
            return f"{name}-compressed data, but the manifest says {fmt}"
    if fmt == "zip":
        if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            return "not a zip archive (no PK signature)"
    elif fmt == "onnx":
        try:
            key, _ = _varint(head, 0)
        except BadFile:
            return "not an ONNX model (no protobuf field at the start)"
        field, wire = key >> 3, key & 7
        if _MODEL_FIELDS.get(field) != wire:
            return f"not an ONNX model (first protobuf field {field}/{wire} is not a ModelProto field)"
    elif fmt == "safetensors":
        if size < 10:
            return "too short for safetensors"
        n = int.from_bytes(head[:8], "little")
        if n < 2 or n > size - 8 or n > MAX_SAFETENSORS_HEADER or head[8:9] != b"{":
            return "not a safetensors file (bad header length or no JSON header)"
    return None


def sniff_problem(path: Path, fmt: str) -> str | None:
    """`sniff_bytes` on a file: None when its start and size fit ``fmt``."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            size = f.seek(0, 2)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    return sniff_bytes(head, size, fmt)


def format_for(name: str) -> str:
    """The format to check a member of an unpacked archive as, by its extension."""
    suffix = PurePosixPath(name).suffix.lower()
    return {".onnx": "onnx", ".safetensors": "safetensors", ".zip": "zip"}.get(suffix, "raw")


# -- ONNX (protobuf wire format) ---------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise BadFile("truncated protobuf varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise BadFile("protobuf varint longer than 10 bytes")


def _read_varint(f: IO[bytes]) -> int | None:
    """A varint from a file, or None at a clean end of file."""
    value = shift = 0
    first = True
    while True:
        b = f.read(1)
        if not b:
            if first:
                return None
            raise BadFile("truncated protobuf varint")
        first = False
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise BadFile("protobuf varint longer than 10 bytes")


def _walk_message(
    f: IO[bytes], end: int, known: dict[int, int], what: str
) -> dict[int, list[tuple[int, int]]]:
    """Walk the fields of one message spanning ``[f.tell(), end)``; field → [(offset, length)].

    Length-delimited fields are skipped by seeking, so a 500 MB model costs a few hundred reads.
    """
    seen: dict[int, list[tuple[int, int]]] = {}
    while True:
        pos = f.tell()
        if pos == end:
            return seen
        if pos > end:
            raise BadFile(f"{what}: a field runs past the end of its message")
        key = _read_varint(f)
        if key is None:
            raise BadFile(f"{what}: truncated ({pos} of {end} bytes)")
        field, wire = key >> 3, key & 7
        if field == 0:
            raise BadFile(f"{what}: field number 0 at byte {pos}")
        if field in known and known[field] != wire:
            raise BadFile(f"{what}: field {field} has wire type {wire}, expected {known[field]}")
        if wire == 0:
            if _read_varint(f) is None:
                raise BadFile(f"{what}: truncated varint at byte {pos}")
            length = 0
        elif wire == 1:
            length = 8
        elif wire == 5:
            length = 4
        elif wire == 2:
            n = _read_varint(f)
            if n is None:
                raise BadFile(f"{what}: truncated length at byte {pos}")
            length = n
        else:
            raise BadFile(f"{what}: invalid wire type {wire} at byte {pos}")
        start = f.tell()
        if start + length > end:
            raise BadFile(f"{what}: field {field} at byte {pos} needs {length} bytes past the end")
        if length:
            f.seek(start + length)
        seen.setdefault(field, []).append((start, length))


def check_onnx(path: Path) -> None:
    """The file parses as an ONNX ModelProto with ir_version and a graph that has nodes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        fields = _walk_message(f, size, _MODEL_FIELDS, "ONNX model")
        if 1 not in fields:
            raise BadFile("ONNX model has no ir_version")
        graphs = fields.get(7, [])
        if len(graphs) != 1:
            raise BadFile(f"ONNX model has {len(graphs)} graphs, expected 1")
        start, length = graphs[0]
        f.seek(start)
        graph = _walk_message(f, start + length, _GRAPH_FIELDS, "ONNX graph")
        if not graph.get(1):
            raise BadFile("ONNX graph has no nodes")


# -- safetensors -------------------------------------------------------------------------------


def check_safetensors(path: Path) -> None:
    """Header length, JSON and offsets add up exactly to the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadFile("safetensors: shorter than its 8-byte header length")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
            raise BadFile(f"safetensors: header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise BadFile(f"safetensors: header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise BadFile("safetensors: header is not a JSON object")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise BadFile(f"safetensors: tensor {name!r} has no description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _SAFETENSORS_DTYPES:
            raise BadFile(f"safetensors: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BadFile(f"safetensors: tensor {name!r} has a bad shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise BadFile(f"safetensors: tensor {name!r} has bad data_offsets")
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * _SAFETENSORS_DTYPES[dtype]:
            raise BadFile(
                f"safetensors: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its shape needs {count * _SAFETENSORS_DTYPES[dtype]}"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise BadFile(
                f"safetensors: tensor {name!r} starts at {begin}, expected {cursor} (gap or overlap)"
            )
        cursor = end
    if 8 + n + cursor != size:
        raise BadFile(f"safetensors: header and tensors cover {8 + n + cursor} bytes, the file has {size}")


# -- zip ---------------------------------------------------------------------------------------


def safe_member(name: str) -> str | None:
    """Why a zip member name could escape its directory, or None."""
    p = PurePosixPath(name)
    if not name or name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return f"member {name!r} has an absolute or Windows path"
    if ".." in p.parts:
        return f"member {name!r} climbs out of the directory with '..'"
    base = p.name
    if base in MARKER_NAMES or (base.startswith(".") and base.endswith(TEMP_SUFFIXES)):
        return f"member {name!r} is named like the bootstrap's own marker or temporary files"
    return None


def zip_members(path: Path) -> list[zipfile.ZipInfo]:
    """The archive's file members after every safety check; raise `BadFile` on any problem.

    Internal logic: 1. names: none absolute, none with '..', no duplicates, no symlinks;
    2. ``testzip`` reads every member and checks its CRC.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise BadFile(f"zip: {err}") from None
    with zf:
        seen: set[str] = set()
        members = []
        for info in zf.infolist():
            why = safe_member(info.filename)
            if why:
                raise BadFile(f"zip: {why}")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise BadFile(f"zip: member {info.filename!r} is a symlink")
            norm = str(PurePosixPath(info.filename))
            if norm in seen:
                raise BadFile(f"zip: member {info.filename!r} appears twice")
            seen.add(norm)
            if not info.is_dir():
                members.append(info)
        # A file and a directory with one name ("a" and "a/b") cannot both be unpacked.
        files = {str(PurePosixPath(m.filename)) for m in members}
        for name in seen:
            clash = next((str(d) for d in PurePosixPath(name).parents if str(d) in files), None)
            if clash is not None:
                raise BadFile(f"zip: {clash!r} is a file and also the directory of {name!r}")
        if not members:
            raise BadFile("zip: the archive holds no files")
        try:
            bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
            raise BadFile(f"zip: {err}") from None
        if bad is not None:
            raise BadFile(f"zip: member {bad!r} fails its CRC check")
        return members


def check_format(path: Path, fmt: str) -> None:
    """Sniff, then the whole-file check for ``fmt``; raise `BadFile` with the reason."""
    why = sniff_problem(path, fmt)
    if why:
        raise BadFile(why)
    if fmt == "onnx":
        check_onnx(path)
    elif fmt == "safetensors":
        check_safetensors(path)
    elif fmt == "zip":
        zip_members(path)
