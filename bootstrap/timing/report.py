"""The timing report as data: repeats, per-phase summaries, the machine, and the readable table.

``TimingReport.to_json`` is ``DIR/timing.json`` (``version`` 1): every repeat of every scenario,
and the median, min and max of each phase over the repeats that succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.atomic import write_atomic
from bootstrap.timing.boot import PHASES, SEGMENTS, Boot

#: milliseconds per phase; None for a phase that never ended
Phases = dict[str, float | None]
#: every figure the report summarizes: the phases and the startup a boot derives from them
FIGURES = (*PHASES, "startup")


@dataclass
class Repeat:
    """One repeat of a scenario: whether every boot succeeded, and the phases of the slowest."""

    ok: bool
    phases: Phases
    boots: list[Boot] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "phases": dict(self.phases), "boots": [b.to_json() for b in self.boots]}


@dataclass
class Summary:
    """Median, min and max per figure over the repeats that succeeded (None: no value)."""

    median: Phases
    min: Phases
    max: Phases

    def to_json(self) -> dict[str, Phases]:
        return {"median": dict(self.median), "min": dict(self.min), "max": dict(self.max)}


@dataclass
class ScenarioResult:
    name: str
    label: str
    ok: bool
    summary: Summary
    workers: int = 1
    repeats: list[Repeat] = field(default_factory=list)
    #: concurrent boots ranked by total within each repeat (#1 fastest), summarized by rank
    per_worker: list[Summary] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            "workers": self.workers,
            "ok": self.ok,
            "repeats": [r.to_json() for r in self.repeats],
            **self.summary.to_json(),
        }
        if self.per_worker:
            out["per_worker"] = [w.to_json() for w in self.per_worker]
        return out


@dataclass
class Machine:
    """Where it ran: the load averages say how much other work skewed every figure."""

    host: str
    cpu: str
    cores: int | None
    memory_gb: float | None
    kernel: str
    python: str
    load_avg_start: list[float] | None
    load_avg_end: list[float] | None = None


@dataclass
class TimingConfig:
    repeat: int
    extras: list[str] = field(default_factory=list)
    manifest: str = ""
    mirror: str | None = None
    job: Any = None
    seed_cache: str | None = None
    corrupt: str = "truncate"
    scratch: str = ""
    #: each host's view of ``scratch`` (``--hosts``; one entry without it)
    hosts: list[str] = field(default_factory=list)


@dataclass
class TimingReport:
    date: str
    machine: Machine
    config: TimingConfig
    scenarios: list[ScenarioResult] = field(default_factory=list)
    version: int = 1

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.scenarios)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "date": self.date,
            "machine": dict(self.machine.__dict__),
            "config": dict(self.config.__dict__),
            "phases": list(FIGURES),
            "scenarios": [s.to_json() for s in self.scenarios],
        }

    def write(self, path: Path) -> Path:
        write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


def summarize(repeats: list[Repeat]) -> Summary:
    """Median, min and max per phase over the repeats that succeeded."""
    good = [r.phases for r in repeats if r.ok]
    out = Summary({}, {}, {})
    for phase in FIGURES:
        values = [float(v) for p in good if (v := p.get(phase)) is not None]
        out.median[phase] = round(statistics.median(values), 1) if values else None
        out.min[phase] = min(values) if values else None
        out.max[phase] = max(values) if values else None
    return out


def per_worker(repeats: list[Repeat], workers: int) -> list[Summary]:
    """Concurrent boots ranked by total within each repeat (#1 fastest), then summarized by rank."""
    ranked: list[list[Repeat]] = [[] for _ in range(workers)]
    for r in repeats:
        boots = sorted(r.boots, key=lambda b: b.phases.get("total") or float("inf"))
        for n, b in enumerate(boots):
            ranked[n].append(Repeat(b.ok, b.phases))
    return [summarize(rank) for rank in ranked]


def _cell(results: Summary, phase: str, spread: bool) -> str:
    med = results.median.get(phase)
    if med is None:
        return "–"
    text = f"{med / 1000:.2f}"
    lo, hi = results.min.get(phase), results.max.get(phase)
    if spread and lo is not None and hi is not None:
        text += f" [{lo / 1000:.2f}–{hi / 1000:.2f}]"
    return text


def _aligned(row: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
    )


def table(report: TimingReport) -> str:
    """The readable table: seconds per phase (median [min–max] with repeats), and × baseline."""
    spread = report.config.repeat > 1
    heads = ["scenario", *SEGMENTS, "total", "× baseline"]
    base = next((s for s in report.scenarios if s.name == "baseline"), None)
    base_total = base.summary.median.get("total") if base else None
    rows = []
    for s in report.scenarios:
        label = s.label + ("" if s.ok else " (FAILED)")
        row = [label, *[_cell(s.summary, p, spread) for p in (*SEGMENTS, "total")]]
        total = s.summary.median.get("total")
        row.append(f"{total / base_total:.2f}×" if total and base_total else "–")
        rows.append(row)
        for n, w in enumerate(s.per_worker):
            rows.append(
                [f"  #{n + 1} of {s.workers}", *[_cell(w, p, spread) for p in (*SEGMENTS, "total")], ""]
            )
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    lines = [_aligned(heads, widths), "  ".join("-" * w for w in widths)]
    lines += [_aligned(r, widths) for r in rows]
    lines.append(f"seconds; median of {report.config.repeat} repeat(s)" + (" [min–max]" if spread else ""))
    return "\n".join(lines)


def machine_info() -> Machine:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    return Machine(
        host=platform.node(),
        cpu=cpu,
        cores=os.cpu_count(),
        memory_gb=mem_gb,
        kernel=platform.release(),
        python=platform.python_version(),
        load_avg_start=load_avg(),
    )


def load_avg() -> list[float] | None:
    """The 1/5/15-minute load averages: other work on the machine skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def job_summary(job: Mapping[str, Any]) -> Any:
    """The job as the report records it: whole when small, else its task, keys and size."""
    text = json.dumps(job)
    if len(text) <= 2000:
        return job
    inp = job.get("input") or {}
    return {"task": inp.get("task", "faceswap"), "keys": sorted(inp), "bytes": len(text)}
