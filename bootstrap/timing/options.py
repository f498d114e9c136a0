"""What one ``bootstrap timing`` run is asked to do: scenarios and options (parsed by the CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.errors import ConfigError

SCENARIOS = ("cold", "warm", "concurrent", "recover", "baseline")
HEALTH_JOB: dict[str, Any] = {"input": {"task": "health"}}


@dataclass(frozen=True)
class Scenario:
    name: str
    workers: int = 1

    @property
    def label(self) -> str:
        return f"concurrent {self.workers}" if self.name == "concurrent" else self.name


@dataclass
class Options:
    """What `run_timing` needs beyond the settings (from the command line)."""

    scenarios: list[Scenario]
    repeat: int = 1
    out: Path = Path("timing")
    #: where scratch volumes are made (default ``out/scratch``)
    scratch: Path | None = None
    #: the same directory as ``scratch`` seen through other mounts of one filesystem (other hosts)
    mounts: tuple[Path, ...] = ()
    #: ``concurrent`` workers spread round-robin over this many of ``scratch`` + ``mounts``
    hosts: int = 1
    #: pin each boot to this many cores of its own (`cpus_for`); None: no pinning
    cpus_per_boot: int | None = None
    job: dict[str, Any] = field(default_factory=lambda: dict(HEALTH_JOB))
    extras: str | None = None
    manifest: str | None = None
    mirror: str | None = None
    seed_cache: Path | None = None
    corrupt: str = "truncate"
    timeout_s: float = 3600.0
    keep: bool = False
    chart: bool = True


def parse_scenarios(tokens: Sequence[str]) -> list[Scenario]:
    """``["cold", "concurrent", "4", "warm"]`` → scenarios; ``concurrent`` takes an optional N [3]."""
    out: list[Scenario] = []
    items = list(tokens)
    i = 0
    while i < len(items):
        name = items[i].strip().lower()
        i += 1
        if name not in SCENARIOS:
            raise ConfigError(
                f"unknown timing scenario {name!r}",
                hint=f"scenarios are {', '.join(SCENARIOS)} (concurrent takes a worker count: concurrent 4)",
            )
        if name == "concurrent":
            workers = 3
            if i < len(items) and items[i].isdigit():
                workers = int(items[i])
                i += 1
            if workers < 1:
                raise ConfigError("concurrent needs at least 1 worker", hint="e.g. concurrent 4")
            out.append(Scenario(name, workers))
        else:
            out.append(Scenario(name))
    if not out:
        raise ConfigError("no timing scenario given", hint="e.g. bootstrap timing cold warm baseline")
    return out


def cpus_for(slot: int, per_boot: int | None, available: Sequence[int]) -> list[int] | None:
    """The cores boot ``slot`` is pinned to: ``per_boot`` of ``available``, slot n from the
    n-th block (wrapping round when there are not enough), or None for no pinning."""
    if per_boot is None:
        return None
    cores = sorted(available)
    if per_boot < 1 or per_boot > len(cores):
        raise ConfigError(
            f"--cpus-per-boot {per_boot}: this machine lets the boots use {len(cores)} core(s)",
            hint=f"give 1 to {len(cores)}",
        )
    return [cores[(slot * per_boot + j) % len(cores)] for j in range(per_boot)]


# -- the environment of a boot -------------------------------------------------------------
