"""Phase ``env``: a content-addressed Python environment on the volume, built with uv (SPEC §5).

An environment lives in ``envs/<key>/`` where ``<key>`` hashes everything it depends on (see
`key_inputs`). It is usable only while it holds ``READY`` and is never changed once published:
a new input gives a new key. Many workers on many hosts share it.

Build as a transaction (FAILURES F12, F13):

1. a unique temp directory ``envs/.tmp-<key>-<worker>-<pid>-<rand>`` (same filesystem, so the
   publish is one ``rename``); a ``.builder`` file in it names host and pid and is touched as a
   heartbeat, so leftovers of dead builders can be told from live builds;
2. ``uv venv --relocatable`` (console scripts and ``python -m`` work after the rename) — or, when
   a READY env with the same interpreter exists, a hard-link clone of it (files uv or we may
   rewrite are copied, never linked, so a published env is never modified);
3. ``uv sync --frozen --no-install-project --no-dev --extra …`` with uv's cache on the volume;
4. bytecode compiled (by uv on a fresh venv; by ``compileall`` on a clone, which skips every
   ``.pyc`` that is already up to date);
5. an import smoke test of every selected capability with the NEW env's Python (FAILURES F4, F5);
6. ``os.sync``, ``READY`` written last and fsynced, one ``rename`` onto ``envs/<key>``. If the
   target exists another builder won the race: we discard ours and use theirs.

The lease ``env-<key>`` only keeps workers from building the same env twice; correctness never
depends on it (``BOOTSTRAP_LOCKS=off`` still publishes exactly one good env).

Degradation (F9): a capability in ``BOOTSTRAP_OPTIONAL`` whose packages fail to install or import
is dropped; the env is published under the key of what it holds, the failure is recorded in
``envs/.failed-<full key>.json``, and later boots reuse the degraded env for up to
`RETRY_FULL_AFTER_S` before trying the full set again.
"""

from __future__ import annotations

from bootstrap.env.build import ERROR_TAIL, EnvResult
from bootstrap.env.clone import INSTALLER_WRITES, new_distributions
from bootstrap.env.estimate import INSTALL_FACTOR, estimate_install_bytes
from bootstrap.env.key import (
    FAILED_PREFIX,
    LAYOUT_VERSION,
    READY,
    RETRY_FULL_AFTER_S,
    env_key,
    env_python,
    failure_path,
    find_uv,
    interpreter_identity,
    is_ready,
    key_inputs,
    pyvenv_home,
    read_failure,
    read_ready,
    resolve_interpreter,
)
from bootstrap.env.leftovers import (
    BROKEN_PREFIX,
    BUILDER_FILE,
    TMP_PREFIX,
    TRASH,
    _host,
    clean_leftovers,
    leftover_is_dead,
    parse_tmp_name,
    tmp_name,
)
from bootstrap.env.phase import ensure_env
from bootstrap.volume import remove_tree

__all__ = [
    "BROKEN_PREFIX",
    "BUILDER_FILE",
    "ERROR_TAIL",
    "FAILED_PREFIX",
    "INSTALLER_WRITES",
    "INSTALL_FACTOR",
    "LAYOUT_VERSION",
    "READY",
    "RETRY_FULL_AFTER_S",
    "TMP_PREFIX",
    "TRASH",
    "EnvResult",
    "_host",
    "clean_leftovers",
    "ensure_env",
    "env_key",
    "env_python",
    "estimate_install_bytes",
    "failure_path",
    "find_uv",
    "interpreter_identity",
    "is_ready",
    "key_inputs",
    "leftover_is_dead",
    "new_distributions",
    "parse_tmp_name",
    "pyvenv_home",
    "read_failure",
    "read_ready",
    "remove_tree",
    "resolve_interpreter",
    "tmp_name",
]
