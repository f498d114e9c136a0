"""What every pipeline module provides: ``load(ctx) -> Pipeline`` (warm-load, once, before the
first job) and ``Pipeline.run(job_input)`` (per job, off the event loop)."""

from __future__ import annotations

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
