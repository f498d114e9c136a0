"""What gc and diagnose learn from the weights side: old repo revisions, the HF cache left alone."""

from __future__ import annotations

import json
from pathlib import Path

from bootstrap.manifest import load_all
from bootstrap.settings import Settings
from bootstrap.weights.inventory import cache_snapshots, entry_files, model_garbage, remove_garbage
from tests import test_weights_repo
from tests.httpserver import FaultServer
from tests.test_weights_fetch import Boot
from tests.test_weights_repo import FILES, PIN, WANTED, make_cache, repo_entry

hub = test_weights_repo.hub  # the HF-like server fixture

NEW = "2222222222222222222222222222222222222222"


def test_gc_finds_an_old_repo_revision_and_never_a_path_in_the_hf_cache(
    tmp_path: Path, hub: FaultServer
) -> None:
    cache = tmp_path / "hf-cache"
    snap = make_cache(cache, PIN)
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    boot.run()  # fetched into the volume (no cache configured)
    cached = Boot(tmp_path, repo_entry("speech/cached"), HF_ENDPOINT=hub.url, BOOTSTRAP_HF_CACHE=str(cache))
    cached.run()  # verified in the cache
    # The manifest moves the first repo to a new revision and drops the cached one.
    boot.manifest.write_text(repo_entry(source=f"hf://org/tiny?revision={NEW}"))
    settings = Settings.from_env({**boot.environ, "BOOTSTRAP_HF_CACHE": str(cache)})
    items = model_garbage(settings, boot.volume, models=True)
    by_path = {i.path: i for i in items}
    assert by_path[boot.models / "speech/tiny"].reason.startswith("an old revision")
    assert boot.volume.verified / "speech/tiny.json" in by_path
    assert boot.volume.verified / "speech/cached.json" in by_path
    assert not [i for i in items if str(i.path).startswith(str(cache))]
    assert model_garbage(settings, boot.volume, models=False) == []
    for item in items:
        assert remove_garbage(item, settings, boot.volume)
    assert not (boot.models / "speech/tiny").exists()
    assert all((snap / rel).read_bytes() == FILES[rel] for rel in FILES)  # the cache is untouched
    # A last guard: a path inside the cache is refused even if asked.
    from bootstrap.weights.inventory import Garbage

    assert not remove_garbage(Garbage("model", snap / "config.json", 1, "x"), settings, boot.volume)
    assert (snap / "config.json").exists()


def test_a_dead_workers_staging_is_garbage(tmp_path: Path, hub: FaultServer) -> None:
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    stage = boot.models / "speech" / ".tiny.deadbeef0000.stage"
    (stage / "files").mkdir(parents=True)
    (stage / "header.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "source": "x"}))
    import os

    os.utime(stage / "header.json", (1, 1))
    items = model_garbage(Settings.from_env(boot.environ), boot.volume, models=False)
    assert [(i.kind, i.path) for i in items] == [("leftover", stage)]


def test_diagnose_data_lists_each_repo_file_and_the_cache_snapshots(tmp_path: Path, hub: FaultServer) -> None:
    cache = tmp_path / "hf-cache"
    snap = make_cache(cache, PIN)
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    boot.run()
    (repo,) = load_all(boot.manifest).repos
    why, states = entry_files(boot.volume, repo)
    assert why is None
    assert sorted(s.path.relative_to(boot.models / "speech/tiny").as_posix() for s in states) == WANTED
    assert all(s.problem is None and not s.in_hf_cache for s in states)
    (boot.models / "speech/tiny/model.safetensors").write_bytes(b"short")
    why, states = entry_files(boot.volume, repo)
    assert why and [s.path.name for s in states if s.problem] == ["model.safetensors"]
    root, snaps = cache_snapshots(
        Settings.from_env({**boot.environ, "BOOTSTRAP_HF_CACHE": str(cache)}), boot.volume
    )
    assert root == cache
    assert [(s.repo, s.kind, s.revision, s.files) for s in snaps] == [("org/tiny", "models", PIN, len(FILES))]
    assert snaps[0].path == snap and snaps[0].bytes == sum(len(d) for d in FILES.values())
