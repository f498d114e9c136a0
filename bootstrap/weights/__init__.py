"""Phase ``weights``: the manifest's files, fetched, verified and published on the volume (SPEC §6).

Modules, in the order a file meets them:

- `bootstrap.weights.mirror`   — ``BOOTSTRAP_MIRROR`` and the https rule (no sockets imported)
- `bootstrap.weights.protocol` — what a source is to the fetcher, and how it fails
- `bootstrap.weights.sources`  — ``hf://`` and ``https://``, and `make_source` for every scheme
- `bootstrap.weights.s3source`, `bootstrap.weights.filesource` — ``s3://``, ``file://``
- `bootstrap.weights.transfer` — parallel byte ranges, ``pwrite``, the resume journal, sha256
- `bootstrap.weights.verify`   — sniff and format checks (ONNX, safetensors, zip) by hand
- `bootstrap.weights.records`  — ``.verified`` records, the warm check, quarantine
- `bootstrap.weights.fetch`    — one file: its lease, sources in order, disk checks, publish
- `bootstrap.weights.phase`    — the phase: warm path, files at once, failures gathered
- `bootstrap.weights.progress` — a bar on a terminal, ``progress`` events otherwise

A warm boot imports only `phase` and `records` (and what they need): the names below that belong
to the fetcher are loaded on first use, so ``http.client``, ``ssl`` and ``boto3`` stay out of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bootstrap.errors import WeightsError
from bootstrap.weights.phase import ensure_weights
from bootstrap.weights.phase import validate as validate_weights
from bootstrap.weights.records import verified_record_path, why_unverified

if TYPE_CHECKING:
    from bootstrap.weights.fetch import lease_name
    from bootstrap.weights.transfer import FetchOptions

_LAZY = {"FetchOptions": "bootstrap.weights.transfer", "lease_name": "bootstrap.weights.fetch"}


def __getattr__(name: str) -> Any:
    """The fetcher's names, imported on first use (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FetchOptions",
    "WeightsError",
    "ensure_weights",
    "lease_name",
    "validate_weights",
    "verified_record_path",
    "why_unverified",
]
