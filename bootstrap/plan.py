"""The plan: what `bootstrap run` hands the worker in ``state/<worker-id>.json`` (SPEC §5).

Written atomically (temp name, fsync, rename) by bootstrap just before it execs the worker;
read once by the worker. It is the one channel from the boot to the worker: model paths
(FAILURES F3), capability states (`Capability`, the one capability-status type), and the
settings as the boot resolved them (worker id, log format, serve API, the capability closure,
limits), so the worker parses no setting of the boot's again. Secrets are never written here:
the worker takes credentials (``BUCKET_*``) from its environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.atomic import write_json_atomic
from bootstrap.settings import Settings
from bootstrap.timeline import scrub_data, secret_values

PLAN_VERSION = 1
#: Settings fields the plan never carries: what only describes the environment, credentials,
#: and every secret (a field kept out of ``repr``): the worker reads those from its environment.
#: A carried secret would only arrive scrubbed — a webhook signed with the placeholder.
NOT_CARRIED = frozenset(
    {"environ", "sources", "hf_token", "hf_endpoint", "aws_endpoint_url", "bucket", "mirror"}
    | {f.name for f in dataclasses.fields(Settings) if not f.repr}
)


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
    #: the boot's resolved settings (`carry`), minus `NOT_CARRIED`: JSON values by field name
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def carry(self, settings: Settings) -> None:
        """Record ``settings`` as the boot resolved them, for `worker_settings`."""
        carried = {
            f.name: _to_json(getattr(settings, f.name))
            for f in dataclasses.fields(settings)
            if f.name not in NOT_CARRIED
        }
        # the plan lives on a shared volume: no secret's value, no password inside a URL
        self.settings = scrub_data(carried, secret_values(settings.environ))

    def worker_settings(self, environ: Mapping[str, str] | None = None) -> Settings:
        """The worker's settings: the boot's, carried here; ``environ`` (default: the process
        environment) only supplies what the plan does not carry (credentials, new fields)."""
        return Settings.from_env(os.environ if environ is None else environ, **self._carried())

    def _carried(self) -> dict[str, Any]:
        types = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
        return {k: _from_json(types[k], v) for k, v in self.settings.items() if k in types}

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


def _to_json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _from_json(annotation: str, value: Any) -> Any:
    """A carried value back as its Settings field's type (paths, tuples, frozensets)."""
    if value is None:
        return None
    kind = annotation.split("[", 1)[0].split("|", 1)[0].strip()
    if kind == "Path":
        return Path(value)
    if kind == "frozenset":
        return frozenset(value)
    if kind == "tuple":
        return tuple(value)
    return value


def write_plan(path: Path, plan: Plan) -> None:
    write_json_atomic(path, plan.to_json(), indent=2, sort_keys=True)


def read_plan(path: Path) -> Plan:
    return Plan.from_json(json.loads(path.read_text(encoding="utf-8")))
