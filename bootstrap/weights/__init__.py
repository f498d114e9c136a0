"""Phase ``weights``: the manifest's files, fetched, verified and published on the volume (SPEC §6).

Modules, in the order a file meets them:

- `bootstrap.weights.sources`  — ``hf://``, ``https://``, ``s3://``, ``file://`` and the mirror
- `bootstrap.weights.transfer` — parallel byte ranges, ``pwrite``, the resume journal, sha256
- `bootstrap.weights.verify`   — sniff and format checks (ONNX, safetensors, zip) by hand
- `bootstrap.weights.records`  — ``.verified`` records, the warm check, quarantine
- `bootstrap.weights.fetch`    — one file: its lease, sources in order, disk checks, publish
- `bootstrap.weights.phase`    — the phase: warm path, files at once, failures gathered
- `bootstrap.weights.progress` — a bar on a terminal, ``progress`` events otherwise
"""

from __future__ import annotations

from bootstrap.errors import WeightsError
from bootstrap.weights.fetch import lease_name
from bootstrap.weights.phase import ensure_weights
from bootstrap.weights.phase import validate as validate_weights
from bootstrap.weights.records import verified_record_path, why_unverified
from bootstrap.weights.transfer import FetchOptions

__all__ = [
    "FetchOptions",
    "WeightsError",
    "ensure_weights",
    "lease_name",
    "validate_weights",
    "verified_record_path",
    "why_unverified",
]
