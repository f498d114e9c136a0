"""The env's import smoke test: run with the new environment's Python before it is published.

``python -m worker.smoke CAP…`` imports the base modules, then each capability's modules and
pipeline module, and prints one JSON object: ``{"base": null | error, "capabilities": {cap:
null | error}}``. A missing system library (libGL) or module shows up here, at build time,
not at the first job (FAILURES F4, F5).
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback

from worker import pipelines  # noqa: F401 - registers the capabilities
from worker.capabilities import BASE_MODULES, CAPABILITIES


def _try(modules: list[str]) -> str | None:
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as err:
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            return f"import {name}: {last}"
    return None


def main(argv: list[str]) -> int:
    result: dict[str, object] = {"base": _try(list(BASE_MODULES)), "capabilities": {}}
    caps: dict[str, str | None] = {}
    for cap in argv:
        spec = CAPABILITIES.get(cap)
        if spec is None:
            caps[cap] = f"no pipeline is registered for capability {cap!r}"
            continue
        caps[cap] = _try([*spec.modules, spec.pipeline])
    result["capabilities"] = caps
    print(json.dumps(result))
    return 0 if result["base"] is None and all(v is None for v in caps.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
