"""The worker's capabilities: each is an optional-dependency group in pyproject.toml and a
pipeline module here. Standard library only: bootstrap's import smoke test reads it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CapabilitySpec:
    name: str
    #: the task name jobs use (``input.task``)
    task: str
    #: third-party modules the capability needs; imported by the env's smoke test
    modules: tuple[str, ...]
    #: the pipeline module (has ``load(ctx) -> Pipeline``)
    pipeline: str
    #: further task names served by the same pipeline (``speech``: ``tts`` and ``transcribe``)
    also: tuple[str, ...] = ()
    #: system programs it runs (from the image, not the env): `bootstrap diagnose` checks them
    programs: tuple[str, ...] = ()
    #: it encodes video, so NVENC or its CPU fallback matters (diagnose's gpu section)
    encodes_video: bool = False

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.task, *self.also)


#: Always installed: the worker's base.
BASE_MODULES: tuple[str, ...] = ("runpod", "numpy", "PIL")

CAPABILITIES: dict[str, CapabilitySpec] = {}


def register(spec: CapabilitySpec) -> None:
    CAPABILITIES[spec.name] = spec


def by_task(task: str) -> CapabilitySpec | None:
    for spec in CAPABILITIES.values():
        if task in spec.tasks:
            return spec
    return None


def needing_programs(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Of the capabilities ``names``, those that run system programs: name → programs."""
    return {n: CAPABILITIES[n].programs for n in names if n in CAPABILITIES and CAPABILITIES[n].programs}
