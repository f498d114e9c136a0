from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SCRUBBED_PREFIXES


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No real credentials, no hub lookups, no Python downloads in any test."""
    for name in list(os.environ):
        if name.startswith(SCRUBBED_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UV_PYTHON_DOWNLOADS", "never")
    yield


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A fresh volume root: a real directory under tmp_path."""
    root = tmp_path / "runpod-volume"
    root.mkdir()
    return root
