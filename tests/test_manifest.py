"""The weights manifest: the real one, and every kind of mistake named as a CONFIG error."""

from __future__ import annotations

import pytest

from bootstrap.errors import CONFIG, ConfigError
from bootstrap.manifest import load_manifest, parse_manifest, selected
from tests.helpers import REPO

PIN = "4dccd71e17017ccad11b92171f5f24aa408a1407"


def entry(**kw: object) -> str:
    fields = {
        "dest": "a/m.onnx",
        "source": f"hf://org/repo/m.onnx?revision={PIN}",
        "format": "onnx",
        "capability": "faceswap",
        **kw,
    }
    lines = ["[[file]]"]
    for k, v in fields.items():
        lines.append(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}")
    return "\n".join(lines) + "\n"


def test_real_manifest_names_the_face_swap_files() -> None:
    files = load_manifest(REPO / "worker" / "models.toml")
    by_dest = {f.dest: f for f in files}
    buffalo = by_dest["insightface/models/buffalo_l.zip"]
    assert buffalo.format == "zip" and buffalo.unpack == "insightface/models/buffalo_l"
    assert buffalo.published_dest == "insightface/models/buffalo_l"
    assert buffalo.source.startswith("https://github.com/deepinsight/insightface/releases/download/v0.7/")
    swapper = by_dest["insightface/models/inswapper_128.onnx"]
    assert swapper.format == "onnx" and swapper.source.startswith("hf://")
    assert {f.capability for f in files} == {"faceswap"}
    # Never a guessed checksum: empty unless the source publishes one.
    assert all(f.sha256 == "" and f.size == 0 for f in files)
    assert selected(files, ("faceswap",)) == files
    assert selected(files, ()) == []


def test_good_entries_parse() -> None:
    text = (
        entry()
        + entry(dest="b.zip", source="s3://bucket/key/b.zip", format="zip", unpack="b", capability="other")
        + entry(dest="c.bin", source="file:///srv/c.bin", format="raw")
        + entry(
            dest="d.st",
            source="https://example.com/d.safetensors",
            format="safetensors",
            size=10,
            sha256="a" * 64,
        )
        + entry(dest="e.bin", source="http://127.0.0.1:8080/e.bin", format="raw")
    )
    files = parse_manifest(text)
    assert [f.published_dest for f in files] == ["a/m.onnx", "b", "c.bin", "d.st", "e.bin"]
    assert files[3].size == 10 and files[3].sha256 == "a" * 64


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"dest": "../x.onnx"}, "relative path"),
        ({"dest": "/abs.onnx"}, "relative path"),
        ({"dest": ".verified/x"}, "relative path"),
        ({"source": "ftp://h/x"}, "hf://"),
        ({"source": "hf://org/repo/m.onnx"}, "revision"),
        ({"source": "hf://org/repo/m.onnx?revision=main"}, "revision"),
        ({"source": "hf://org/m.onnx?revision=" + PIN}, "revision"),
        ({"source": "s3://bucket"}, "s3://BUCKET/KEY"),
        ({"source": "http://example.com/x"}, "plain http"),
        ({"size": -1}, "size"),
        ({"sha256": "abc"}, "64 hex"),
        ({"format": "pt"}, "format"),
        ({"format": "zip"}, "unpack"),
        ({"unpack": "x"}, "only for format"),
        ({"capability": ""}, "capability"),
        ({"colour": "red"}, "unknown keys"),
    ],
)
def test_bad_entries_are_config_errors(kw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        parse_manifest(entry(**kw))
    assert info.value.exit_code == CONFIG
    assert info.value.hint


def test_duplicate_dest_and_bad_toml() -> None:
    with pytest.raises(ConfigError, match="twice"):
        parse_manifest(entry() + entry())
    with pytest.raises(ConfigError, match="TOML"):
        parse_manifest("[[file]\n")
