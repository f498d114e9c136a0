from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SCRUBBED_PREFIXES
from tests.moosefs import moosefs_fixture  # noqa: F401 - one session MooseFS (`moosefs`) for every module


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No real credentials, no hub lookups, no Python downloads in any test; and what a test's
    libraries put in ``os.environ`` (transformers' pipelines set TOKENIZERS_PARALLELISM) is undone,
    so no test sees another's environment."""
    for name in list(os.environ):
        if name.startswith(SCRUBBED_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UV_PYTHON_DOWNLOADS", "never")
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A fresh volume root: a real directory under tmp_path."""
    root = tmp_path / "runpod-volume"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def env_volume_factory(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Clone a volume whose environment for ``extras`` is already built (by the product).

    The first call per extras set runs a real ``bootstrap run --until env`` on a template
    volume; each call then hard-links that volume's ``.bootstrap`` into the test's volume
    (``cp -al``). Envs are immutable once READY, so sharing their files is safe — the same
    reason the product itself may hard-link between environments.
    """
    import subprocess

    from tests.helpers import base_environ, run_bootstrap, seed_uv_cache

    templates: dict[tuple[str, ...], Path] = {}

    def make(volume: Path, extras: tuple[str, ...] = ()) -> Path:
        key = tuple(sorted(extras))
        if key not in templates:
            template = tmp_path_factory.mktemp("env-template") / "volume"
            template.mkdir()
            seed_uv_cache(template, key)
            proc = run_bootstrap(
                ["run", "--until", "env"],
                base_environ(
                    BOOTSTRAP_VOLUME=str(template),
                    BOOTSTRAP_EXTRAS=",".join(key),
                    BOOTSTRAP_WORKER_ID="template",
                ),
                timeout=3000,  # a torch env (uv sync + bytecode) on a loaded machine
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            templates[key] = template
        volume.mkdir(parents=True, exist_ok=True)
        src = templates[key] / ".bootstrap"
        dst = volume / ".bootstrap"
        assert not dst.exists(), f"{dst} already exists"
        subprocess.run(["cp", "-al", str(src), str(dst)], check=True)
        for sub in ("logs", "state", "leases"):
            subprocess.run(["rm", "-rf", str(dst / sub)], check=True)
        return volume

    return make


@pytest.fixture(scope="session")
def torch_env_volume(env_volume_factory):  # type: ignore[no-untyped-def]
    """Clone the session's ONE torch environment (speech, video and animate together, built
    once by the product through `env_volume_factory`) into a test's volume.

    A boot that selects fewer of them (``BOOTSTRAP_EXTRAS=speech``) then clones this env and lets
    uv remove what it does not need, instead of installing torch again.
    """
    from tests.helpers import TORCH_EXTRAS

    def make(volume: Path) -> Path:
        return env_volume_factory(volume, TORCH_EXTRAS)  # type: ignore[no-any-return]

    return make
