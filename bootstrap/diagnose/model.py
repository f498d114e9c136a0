"""The report as data: `Status`, `Check`, `Section`, `Report` (SPEC §8's JSON object)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bootstrap import errors
from bootstrap.timeline import scrub_data

REPORT_VERSION = 1

#: Section names, in the order of SPEC §8 (and of the JSON report).
SECTIONS = ("platform", "volume", "env", "leases", "weights", "gpu", "last_boot", "settings")


class Status(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    BROKEN = "broken"
    UNKNOWN = "unknown"


#: Worst first: how sections and checks are ordered for people.
SEVERITY: Mapping[Status, int] = {Status.BROKEN: 3, Status.DEGRADED: 2, Status.UNKNOWN: 1, Status.OK: 0}


@dataclass(frozen=True)
class Check:
    """One finding. Anything not ok says what to do in ``hint``."""

    name: str
    status: Status
    detail: str
    hint: str | None = None
    #: last-boot checks only: the boot's exit code and its name (None when it did not exit)
    exit_code: int | None = None
    exit_name: str | None = None

    def __post_init__(self) -> None:
        if self.status is not Status.OK and not self.hint:
            raise ValueError(f"check {self.name!r} is {self.status} but says nothing to do")


@dataclass
class Section:
    name: str
    checks: list[Check] = field(default_factory=list)
    #: checks carry exit_code/exit_name (the last-boot section)
    carries_exit: bool = False
    #: wall time spent collecting it (for the benchmark; not part of the JSON contract)
    ms: float = 0.0

    @property
    def status(self) -> Status:
        if not self.checks:
            return Status.UNKNOWN
        return max((c.status for c in self.checks), key=SEVERITY.__getitem__)


@dataclass
class Report:
    sections: list[Section]
    #: diagnose's own bugs (a section that raised): the command exits 1 unless something is broken
    internal_errors: list[str] = field(default_factory=list)
    #: values never to print (secret-named variables' values)
    secrets: tuple[str, ...] = ()

    @property
    def status(self) -> Status:
        found = {c.status for s in self.sections for c in s.checks}
        if Status.BROKEN in found:
            return Status.BROKEN
        if Status.DEGRADED in found:
            return Status.DEGRADED
        return Status.OK

    def section(self, name: str) -> Section:
        return next(s for s in self.sections if s.name == name)

    @property
    def exit_code(self) -> int:
        """3 when something is broken, 1 for diagnose's own bug, else 0 (SPEC §2)."""
        if self.status is Status.BROKEN:
            return 3
        return errors.INTERNAL if self.internal_errors else 0

    def to_json(self) -> dict[str, Any]:
        """The report as SPEC §8's object, secrets scrubbed from every string."""
        sections = []
        for s in self.sections:
            checks = []
            for c in s.checks:
                item: dict[str, Any] = {
                    "name": c.name,
                    "status": str(c.status),
                    "detail": c.detail,
                    "hint": c.hint,
                }
                if s.carries_exit:
                    item["exit_code"] = c.exit_code
                    item["exit_name"] = c.exit_name
                checks.append(item)
            sections.append({"name": s.name, "status": str(s.status), "checks": checks})
        data = {"report_version": REPORT_VERSION, "status": str(self.status), "sections": sections}
        scrubbed: dict[str, Any] = scrub_data(data, self.secrets)
        return scrubbed
