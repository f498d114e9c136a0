"""URLs have one home (`bootstrap.urls`): every caller judges a URL the same way."""

from __future__ import annotations

import io

import pytest

from bootstrap import urls
from bootstrap.errors import ConfigError
from bootstrap.manifest import parse_manifest
from bootstrap.timeline import Timeline
from bootstrap.weights.sources import HTTPSource, make_source
from worker import fetch as wfetch

PIN = "4dccd71e17017ccad11b92171f5f24aa408a1407"


def test_the_worker_judges_addresses_with_the_same_function() -> None:
    assert wfetch.is_public_address is urls.is_public_address
    assert wfetch.FetchPolicy(max_bytes=1).is_public is urls.is_public_address


def test_the_manifest_and_the_fetcher_agree_on_loopback() -> None:
    # The manifest once took any host starting with "127." for loopback; the fetcher did not.
    for host in ("127.attacker.example", "127.0.0.1.nip.io"):
        with pytest.raises(ConfigError, match="plain http"):
            parse_manifest(
                f'[[file]]\ndest = "a"\nsource = "http://{host}/x"\nformat = "raw"\ncapability = "c"\n'
            )
        assert not urls.is_loopback_host(host)
    for host in ("localhost", "127.0.0.2", "[::1]", "LOCALHOST"):
        assert urls.is_loopback_host(host), host
        parse_manifest(
            f'[[file]]\ndest = "a"\nsource = "http://{host}:1/x"\nformat = "raw"\ncapability = "c"\n'
        )


def test_one_hf_parser_for_manifest_and_fetcher() -> None:
    ref = urls.parse_hf(f"hf://datasets/org/repo/sub/m.onnx?revision={PIN}")
    assert (ref.kind, ref.repo, ref.path, ref.revision, ref.pinned) == (
        "datasets",
        "org/repo",
        "sub/m.onnx",
        PIN,
        True,
    )
    assert (
        ref.resolve_url("https://hub.test/") == f"https://hub.test/datasets/org/repo/resolve/{PIN}/sub/m.onnx"
    )
    assert (
        ref.tree_url("https://hub.test")
        == f"https://hub.test/api/datasets/org/repo/tree/{PIN}?recursive=true"
    )
    assert (
        urls.parse_hf(f"hf://org/repo?revision={PIN}", repo_only=True).cache_dir_name == "models--org--repo"
    )
    src = make_source(
        f"hf://datasets/org/repo/sub/m.onnx?revision={PIN}", {"HF_ENDPOINT": "https://hub.test"}
    )
    assert isinstance(src, HTTPSource) and src.url == ref.resolve_url("https://hub.test")
    parse_manifest(
        f'[[file]]\ndest = "a"\nsource = "hf://datasets/org/repo/m.onnx?revision={PIN}"\nformat = "raw"\ncapability = "c"\n'
    )
    with pytest.raises(urls.NotHfRef):
        urls.parse_hf(f"hf://org/m.onnx?revision={PIN}")


def test_the_timeline_scrubs_with_the_one_scrubber() -> None:
    out = io.StringIO()
    tl = Timeline("w", stream=out)
    tl.log("mirror https://user:hunter2secret@host.example/x and s3://k:v@b/x")
    text = out.getvalue()
    assert "hunter2secret" not in text and "k:v@" not in text
    assert "https://user:***@host.example/x" in text
    assert urls.scrub_passwords("https://user:hunter2secret@host/x") == "https://user:***@host/x"
