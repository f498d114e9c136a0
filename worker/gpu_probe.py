"""``python -m worker.gpu_probe``: torch and onnxruntime as this environment's worker sees them.

Run by `bootstrap diagnose` with the env's own Python (bootstrap never imports either). The
onnxruntime session goes through `worker.device.new_session`, the path every worker session
takes, so diagnose reports what the worker will see. Prints one line, ``@@diagnose@@{json}``,
after whatever the libraries print themselves.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from typing import Any

MARKER = "@@diagnose@@"
#: A 69-byte ONNX model (one Identity node, opset 13): a real session proves which providers work.
PROBE_MODEL = "CAc6OwoQCgF4EgF5IghJZGVudGl0eRIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgBEgQKAggBQgQKABAN"


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:500]


def probe_torch() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import torch

        out = {"version": torch.__version__, "cuda": torch.version.cuda}
        out["available"] = bool(torch.cuda.is_available())
        if out["available"]:
            torch.zeros(1).cuda()
            out["device"] = torch.cuda.get_device_name(0)
    except Exception as err:
        out["error"] = _error(err)
    return out


def probe_onnxruntime() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        from worker import device

        ort = device.load_onnxruntime()
        out = {"version": ort.__version__, "available": list(ort.get_available_providers())}
        try:
            from onnxruntime.capi import build_and_package_info as info

            out["package"] = getattr(info, "package_name", None)
            out["cuda"] = getattr(info, "cuda_version", None)
        except ImportError:
            pass
        session = device.new_session(
            base64.b64decode(PROBE_MODEL), device.requested_providers(out["available"])
        )
        out["session"] = list(session.get_providers())
    except Exception as err:
        out["error"] = _error(err)
    return out


def main() -> int:
    out: dict[str, Any] = {}
    if importlib.util.find_spec("torch") is not None:
        out["torch"] = probe_torch()
    if importlib.util.find_spec("onnxruntime") is not None:
        out["onnxruntime"] = probe_onnxruntime()
    sys.stdout.write(f"\n{MARKER}{json.dumps(out)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
