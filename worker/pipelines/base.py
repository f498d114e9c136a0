"""What every pipeline module provides: ``load(ctx) -> Pipeline`` (warm-load, once, before the
first job) and ``Pipeline.run(job_input)`` (per job, off the event loop)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from bootstrap.settings import Settings


@dataclass(frozen=True)
class LoadContext:
    settings: Settings
    #: manifest dest (or unpack dir) → absolute path on the volume, from the plan
    models: dict[str, str]
    env_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def model_path(self, dest: str) -> str:
        """The path of a manifest entry; a clear error naming expected and found (FAILURES F3)."""
        try:
            return self.models[dest]
        except KeyError:
            found = ", ".join(sorted(self.models)) or "none"
            raise FileNotFoundError(
                f"model {dest!r} is not in the plan (found: {found}); check worker/models.toml's dest"
            ) from None


class Pipeline(Protocol):
    name: str

    def run(self, job_input: dict[str, Any]) -> dict[str, Any]: ...

    def device(self) -> dict[str, Any]: ...


class Stages:
    """Milliseconds per stage of one job (``ms`` in the result); a stage entered twice adds up."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round(self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1000, 1)
