"""The plan: what `bootstrap run` hands the worker in ``state/<worker-id>.json`` (SPEC §5).

Written atomically (temp name, fsync, rename) by bootstrap just before it execs the worker;
read once by the worker. It is the one place model paths reach the worker (FAILURES F3).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.atomic import write_json_atomic

PLAN_VERSION = 1


@dataclass
class Capability:
    #: "ok" | "degraded" | "unavailable"
    status: str = "ok"
    required: bool = True
    reason: str | None = None


@dataclass
class Plan:
    worker_id: str
    volume: str
    app_dir: str
    env_key: str | None = None
    env_path: str | None = None
    python: str | None = None
    env_reused: bool | None = None
    #: capability name → status; selected capabilities only
    capabilities: dict[str, Capability] = field(default_factory=dict)
    #: manifest dest (or unpack dir) → absolute path of the verified file or directory
    models: dict[str, str] = field(default_factory=dict)
    boot_ms: dict[str, float] = field(default_factory=dict)
    boot_started: float = 0.0
    #: set when a boot error is to be served (BOOTSTRAP_ON_FATAL=serve-error): code/name/error/hint
    fatal: dict[str, Any] | None = None
    version: int = PLAN_VERSION

    def degrade(self, capability: str, reason: str) -> None:
        cap = self.capabilities.setdefault(capability, Capability())
        cap.status = "unavailable"
        cap.reason = reason if not cap.reason else f"{cap.reason}; {reason}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        caps = {k: Capability(**v) for k, v in (data.get("capabilities") or {}).items()}
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "capabilities"}
        return cls(capabilities=caps, **fields)


def write_plan(path: Path, plan: Plan) -> None:
    write_json_atomic(path, plan.to_json(), indent=2, sort_keys=True)


def read_plan(path: Path) -> Plan:
    return Plan.from_json(json.loads(path.read_text(encoding="utf-8")))
