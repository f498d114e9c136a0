"""``[[repo]]`` entries (SPEC §6) against an HF-like server on loopback, and RunPod's HF cache.

The server (`tests.httpserver.FaultServer` with ``hf=True``) answers the tree API (paginated by
``Link``) and resolve URLs: LFS files by a 302 with ``X-Linked-Etag``/``X-Linked-Size``, small
files at once with their git blob id as ETag, Range on both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bootstrap.errors import CONFIG, ConfigError
from bootstrap.manifest import parse_all
from tests.httpserver import FaultServer, git_blob_id
from tests.test_weights_fetch import Boot
from tests.test_weights_verify import safetensors_bytes

PIN = "4dccd71e17017ccad11b92171f5f24aa408a1407"
OTHER = "1111111111111111111111111111111111111111"
FILES = {
    "config.json": b'{"model_type": "whisper", "d_model": 8}\n',
    "model.safetensors": safetensors_bytes({"w": np.arange(40000, dtype=np.float32).reshape(200, 200)}),
    "sub/tokenizer.json": b'{"version": "1.0", "model": {"vocab": {"a": 0}}}\n',
    "README.md": b"# a model card that include globs leave out\n",
}
WANTED = sorted(p for p in FILES if p != "README.md")


def repo_entry(dest: str = "speech/tiny", source: str = f"hf://org/tiny?revision={PIN}", **kw: object) -> str:
    lines = ["[[repo]]", f'dest = "{dest}"', f'source = "{source}"', 'capability = "t"']
    kw.setdefault("include", ["*.json", "*.safetensors"])
    lines += [f"{k} = {json.dumps(v)}" for k, v in kw.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FaultServer]:
    root = tmp_path / "hub"
    for rel, data in FILES.items():
        (root / "org" / "tiny" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "org" / "tiny" / rel).write_bytes(data)
    with FaultServer(root, hf=True) as srv:
        srv.state.tree_page = 2  # several pages: the Link header is followed
        yield srv


def assert_repo(boot: Boot, dest: str = "speech/tiny") -> dict[str, object]:
    target = boot.models / dest
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == WANTED
    for rel in WANTED:
        assert (target / rel).read_bytes() == FILES[rel]
    rec = boot.record(dest)
    assert {i["path"]: (i["size"], i["sha256"]) for i in rec["files"]} == {
        p: (len(FILES[p]), hashlib.sha256(FILES[p]).hexdigest()) for p in WANTED
    }
    assert not list(target.parent.glob(".tiny.*")), "no staging or old copy left beside it"
    assert boot.leftovers() == []
    return rec


def test_a_repo_is_listed_fetched_verified_and_published_once(tmp_path: Path, hub: FaultServer) -> None:
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    plan, detail = boot.run()
    rec = assert_repo(boot)
    assert rec["listed_by"] == "tree" and rec["manifest_source"] == f"hf://org/tiny?revision={PIN}"
    assert plan.models == {"speech/tiny": str(boot.models / "speech/tiny")}
    assert detail["fetched"] == ["speech/tiny"]
    trees = hub.requests("api/org/tiny/tree")
    assert len(trees) == 3  # 5 entries (a directory too), 2 a page
    assert hub.requests("org/tiny/README.md") == []
    for rel in WANTED:
        assert hub.bytes_sent(f"org/tiny/{rel}") == len(FILES[rel]), rel
    # A warm boot: the server hears nothing.
    before = len(hub.requests())
    plan2, detail2 = boot.run()
    assert len(hub.requests()) == before and detail2["fetched"] == []
    assert plan2.models == plan.models


def test_a_corrupted_repo_file_is_quarantined_and_only_it_is_fetched_again(
    tmp_path: Path, hub: FaultServer
) -> None:
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    boot.run()
    bad = boot.models / "speech/tiny/model.safetensors"
    bad.write_bytes(FILES["model.safetensors"][:-100])  # truncated in place
    hub.reset_log()
    boot.run()
    assert_repo(boot)
    (q,) = boot.quarantined()
    assert "model.safetensors" in q.name
    assert hub.requests("api/org/tiny/tree") == []  # the record gave the list
    assert hub.bytes_sent("org/tiny/model.safetensors") == len(FILES["model.safetensors"])
    assert hub.requests("org/tiny/config.json") == [] and hub.requests("org/tiny/sub/tokenizer.json") == []


def test_a_bad_file_from_the_hub_is_quarantined_and_the_repo_not_published(
    tmp_path: Path, hub: FaultServer
) -> None:
    from bootstrap.errors import WEIGHTS, BootstrapError

    hub.fault("org/tiny/sub/tokenizer.json", "html")
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    with pytest.raises(BootstrapError) as info:
        boot.run()
    assert info.value.exit_code == WEIGHTS and "tokenizer.json" in info.value.message
    assert not (boot.models / "speech/tiny").exists()
    assert "bytes" in info.value.message  # the page's size gave it away before any byte was kept
    # The next boot adopts the staging: only the bad file is fetched again.
    hub.clear_faults()
    hub.reset_log()
    boot.run()
    assert_repo(boot)
    assert hub.requests("org/tiny/model.safetensors") == []
    assert hub.requests("org/tiny/sub/tokenizer.json")


def test_an_interrupted_staging_is_adopted_and_only_a_bad_file_fetched(
    tmp_path: Path, hub: FaultServer
) -> None:
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    stage = boot.models / "speech" / ".tiny.deadbeef0000.stage"
    (stage / "files" / "sub").mkdir(parents=True)
    (stage / "header.json").write_text(
        json.dumps({"v": 1, "source": f"hf://org/tiny?revision={PIN}", "host": "elsewhere", "pid": 1})
    )
    (stage / "files" / "config.json").write_bytes(FILES["config.json"])
    (stage / "files" / "sub" / "tokenizer.json").write_bytes(b"garbage of another size")
    boot.run()
    assert_repo(boot)
    assert hub.requests("org/tiny/config.json") == []
    assert hub.requests("org/tiny/sub/tokenizer.json") and hub.requests("org/tiny/model.safetensors")
    assert len(boot.quarantined()) == 1


def test_a_mirror_serves_each_file_by_dest_and_path(tmp_path: Path, hub: FaultServer) -> None:
    mirror = tmp_path / "mirror" / "speech" / "tiny"
    for rel in WANTED:
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        (mirror / rel).write_bytes(FILES[rel])
    boot = Boot(
        tmp_path,
        repo_entry(files=WANTED, include=[]),
        HF_ENDPOINT=hub.url,
        BOOTSTRAP_MIRROR=str(tmp_path / "mirror"),
    )
    boot.run()
    rec = assert_repo(boot)
    assert rec["listed_by"] == "manifest"
    assert hub.requests() == []  # a mirror-only cold boot: `files` made the list


def test_only_selected_capabilities_are_fetched(tmp_path: Path, hub: FaultServer) -> None:
    boot = Boot(
        tmp_path, repo_entry().replace('capability = "t"', 'capability = "other"'), HF_ENDPOINT=hub.url
    )
    plan, _ = boot.run()
    assert plan.models == {} and hub.requests() == []


# -- RunPod's cached models --------------------------------------------------------------------


def make_cache(root: Path, revision: str, files: dict[str, bytes] = FILES) -> Path:
    """An HF cache tree as huggingface_hub writes it: snapshot symlinks into blobs/<id>."""
    repo = root / "models--org--tiny"
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = hashlib.sha256(data).hexdigest() if rel.endswith(".safetensors") else git_blob_id(data)
        (repo / "blobs" / blob).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def tree_state(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.lstat().st_mtime_ns) for p in root.rglob("*"))


def test_a_repo_in_the_hf_cache_at_the_pinned_revision_is_used_in_place(
    tmp_path: Path, hub: FaultServer
) -> None:
    cache = tmp_path / "hf-cache"
    snap = make_cache(cache, PIN)
    before = tree_state(cache)
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url, BOOTSTRAP_HF_CACHE=str(cache))
    plan, _ = boot.run()
    assert hub.requests() == []  # zero requests
    assert plan.models == {"speech/tiny": str(snap)}
    rec = boot.record("speech/tiny")
    assert rec["location"] == str(snap)
    assert {i["path"] for i in rec["files"]} == set(WANTED)
    assert not (boot.models / "speech/tiny").exists()  # never copied, linked or renamed across
    assert tree_state(cache) == before
    plan2, _ = boot.run()  # later boots: size + sniff of the cache's files, still no request
    assert plan2.models == plan.models and hub.requests() == []


def test_the_default_cache_is_under_the_volume(tmp_path: Path, hub: FaultServer) -> None:
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    snap = make_cache(boot.root / "huggingface-cache" / "hub", PIN)
    plan, _ = boot.run()
    assert plan.models == {"speech/tiny": str(snap)} and hub.requests() == []


def test_a_cached_repo_at_another_revision_is_not_used(tmp_path: Path, hub: FaultServer) -> None:
    cache = tmp_path / "hf-cache"
    make_cache(cache, OTHER)
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url, BOOTSTRAP_HF_CACHE=str(cache))
    plan, _ = boot.run()
    assert plan.models == {"speech/tiny": str(boot.models / "speech/tiny")}
    assert_repo(boot)
    assert hub.requests("api/org/tiny/tree")


def test_a_damaged_cached_repo_is_not_used_and_not_touched(tmp_path: Path, hub: FaultServer) -> None:
    cache = tmp_path / "hf-cache"
    snap = make_cache(cache, PIN)
    blob = (snap / "config.json").resolve()
    blob.write_bytes(b'{"tampered": true}\n')
    before = tree_state(cache)
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url, BOOTSTRAP_HF_CACHE=str(cache))
    plan, _ = boot.run()
    assert plan.models == {"speech/tiny": str(boot.models / "speech/tiny")}
    assert_repo(boot)
    assert tree_state(cache) == before


def test_a_file_entry_with_an_hf_source_uses_the_cache_too(tmp_path: Path, hub: FaultServer) -> None:
    cache = tmp_path / "hf-cache"
    snap = make_cache(cache, PIN)
    from tests.test_weights_fetch import entry

    boot = Boot(
        tmp_path,
        entry("w/model.safetensors", f"hf://org/tiny/model.safetensors?revision={PIN}", fmt="safetensors"),
        HF_ENDPOINT=hub.url,
        BOOTSTRAP_HF_CACHE=str(cache),
    )
    plan, _ = boot.run()
    assert plan.models == {"w/model.safetensors": str(snap / "model.safetensors")}
    assert hub.requests() == []
    assert not (boot.models / "w").exists()


# -- the manifest ------------------------------------------------------------------------------


def test_repo_entries_parse_and_bad_ones_are_config_errors() -> None:
    m = parse_all(repo_entry() + repo_entry("b", "https://mirror.example/b", files=["x.json"], include=[]))
    assert [r.dest for r in m.repos] == ["speech/tiny", "b"]
    assert m.repos[0].wants("sub/tokenizer.json") and not m.repos[0].wants("README.md")
    for bad, words in [
        (repo_entry(source="hf://org/tiny"), "revision"),
        (repo_entry(source=f"hf://org/tiny/file.json?revision={PIN}"), "revision"),
        (repo_entry(source="https://mirror.example/b"), "files"),
        (repo_entry(dest="./.verified/x"), "relative path"),
        (repo_entry(include="*.json"), "list"),
        (repo_entry() + repo_entry(), "twice"),
        (repo_entry() + repo_entry("speech/tiny/inner"), "inside"),
        (repo_entry(colour="red"), "unknown keys"),
    ]:
        with pytest.raises(ConfigError, match=words) as info:
            parse_all(bad)
        assert info.value.exit_code == CONFIG


def test_a_hub_that_cannot_be_reached_is_exit_13_naming_the_repo(tmp_path: Path) -> None:
    import socket

    from bootstrap.errors import WEIGHTS, BootstrapError
    from bootstrap.weights import FetchOptions
    from bootstrap.weights.sources import AddressPolicy
    from tests.test_weights_fetch import OPTS

    def no_dns(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT="https://hub.invalid")
    with pytest.raises(BootstrapError) as info:
        boot.run(FetchOptions(**{**OPTS.__dict__, "addresses": AddressPolicy(resolve=no_dns)}))
    assert info.value.exit_code == WEIGHTS
    assert "speech/tiny" in info.value.message and "does not resolve" in info.value.message
