"""The environment of every child process bootstrap starts: the one builder, and what it drops.

The raw process environment is used only here, as the base: uv, the managed interpreter's
install, the import smoke test, diagnose's probes, the worker and the timing script's boots all
get theirs from `child_environ`. What it removes:

- always: what would point a child's Python at another environment (``VIRTUAL_ENV``,
  ``PYTHONHOME``, ``PYTHONPATH``); a child that needs the app importable is given it;
- unless asked for: the weights' own credentials (``HF_TOKEN`` and the other hub tokens,
  ``AWS_*`` — used only by the weights phase for ``hf://`` and ``s3://`` sources), so a job,
  or a package's build script, can never reach them; the worker uploads with ``BUCKET_*``;
- for probes: every secret-named variable (`bootstrap.settings.is_secret_name`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from bootstrap.settings import is_secret_name

#: variables that point a Python at another interpreter, environment or package path
ISOLATION = ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")
#: what only the weights phase uses: the hub's tokens and the AWS chain of ``s3://`` sources
WEIGHTS_CREDENTIALS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN")
WEIGHTS_CREDENTIAL_PREFIXES = ("AWS_",)


def is_weights_credential(name: str) -> bool:
    return name in WEIGHTS_CREDENTIALS or name.startswith(WEIGHTS_CREDENTIAL_PREFIXES)


def child_environ(
    base: Mapping[str, str],
    *,
    pythonpath: Sequence[Path | str] = (),
    inherit_pythonpath: bool = False,
    weights_credentials: bool = False,
    secrets: bool = True,
    drop: Iterable[str] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``base`` for a child: isolated, without the weights' credentials, with ``extra`` set.

    ``pythonpath`` goes first on the child's ``PYTHONPATH`` (``inherit_pythonpath`` keeps the
    caller's after it); ``weights_credentials`` keeps ``HF_TOKEN``/``AWS_*`` (a child that runs
    a whole boot); ``secrets=False`` drops every secret-named variable (a probe); ``drop`` names
    more to remove.
    """
    dropped = set(ISOLATION) | set(drop)
    env = {
        k: v
        for k, v in base.items()
        if k not in dropped
        and (weights_credentials or not is_weights_credential(k))
        and (secrets or not is_secret_name(k))
    }
    paths = [str(p) for p in pythonpath]
    if inherit_pythonpath and base.get("PYTHONPATH"):
        paths.append(base["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env
