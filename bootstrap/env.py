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

# ruff: noqa: PTH104, PTH202 - rename/link/symlink of whole trees read clearer at the os level, as elsewhere in bootstrap
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap import interpreter as interp
from bootstrap import lease as leases
from bootstrap.errors import EnvBuildError, InsufficientDiskError, format_bytes
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume, disk_usage, fsync_dir, remove_tree, require_free

LAYOUT_VERSION = 2
READY = "READY"
TMP_PREFIX = ".tmp-"
FAILED_PREFIX = ".failed-"
BROKEN_PREFIX = ".broken-"
BUILDER_FILE = ".builder"
TRASH = "trash-"
#: files of a ``*.dist-info`` an installer writes (the rest is the wheel's own, never rewritten)
INSTALLER_WRITES = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "uv_cache.json")
#: a degraded env is reused this long before a boot tries the full set of extras again
RETRY_FULL_AFTER_S = 600.0
#: installed bytes per wheel byte: unzipped files plus bytecode (wheels compress about 2-3x)
INSTALL_FACTOR = 3.0
#: uv's error text kept in a dropped capability's reason
ERROR_TAIL = 2000


@dataclass
class EnvResult:
    key: str
    path: Path
    python: Path
    reused: bool
    extras: tuple[str, ...]
    #: capability → why it was dropped (uv's or the smoke test's own error)
    dropped: dict[str, str] = field(default_factory=dict)


# -- the key ------------------------------------------------------------------------------------


def find_uv() -> str:
    """The uv binary: the one the ``uv`` Python package ships (the pinned version), else PATH's."""
    with contextlib.suppress(Exception):  # not installed as a package: look on PATH
        from uv import find_uv_bin  # type: ignore[import-not-found,unused-ignore]

        return str(find_uv_bin())
    found = shutil.which("uv")
    if found:
        return found
    raise EnvBuildError("uv is not installed", hint="pip install uv (the image installs it)")


def interpreter_identity() -> dict[str, str]:
    """What the key records of the image's interpreter (the one running bootstrap)."""
    return interp.system_interpreter().identity()


def resolve_interpreter(settings: Settings, volume_root: Path | None) -> interp.Interpreter | None:
    """The interpreter envs are built from; None when managed and not installed yet."""
    if settings.python != "managed":
        return interp.system_interpreter()
    if volume_root is None:
        return None
    return interp.managed_interpreter(volume_root, interp.managed_request(settings))


def _libc() -> str:
    name, version = platform.libc_ver()
    return f"{name}-{version}" if name else "unknown"


def key_inputs(
    settings: Settings,
    extras: tuple[str, ...],
    *,
    python: interp.Interpreter | None = None,
) -> dict[str, Any]:
    """Everything an env depends on (SPEC §5): uv.lock, extras, interpreter, platform, libc, layout.

    For ``BOOTSTRAP_PYTHON=managed`` the interpreter is the one on the volume (its path relative
    to the volume root); if none is installed yet the identity says so, and no env matches.
    """
    lock = settings.project_dir / "uv.lock"
    try:
        lock_hash = hashlib.sha256(lock.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise EnvBuildError(
            f"{lock} is missing", hint="run `uv lock` in the project and commit uv.lock"
        ) from None
    if python is None:
        python = resolve_interpreter(settings, interp.volume_root_guess(settings))
    identity = (
        python.identity()
        if python is not None
        else {
            "implementation": "cpython",
            "version": f"{interp.managed_request(settings)} (not installed)",
            "abi": "unknown",
            "path": "",
        }
    )
    return {
        "layout": LAYOUT_VERSION,
        "uv_lock": lock_hash,
        "extras": sorted(extras),
        "python": identity,
        "platform": f"{sys.platform}-{platform.machine()}",
        "libc": _libc(),
    }


def env_key(inputs: dict[str, Any]) -> str:
    """A short, stable hash of the key inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def is_ready(path: Path) -> bool:
    """True when ``path`` is a published environment (READY is written last, before the rename)."""
    return (path / READY).is_file()


def read_ready(path: Path) -> dict[str, Any] | None:
    """The READY record of an env, or None."""
    try:
        data = json.loads((path / READY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pyvenv_home(env_dir: Path) -> str | None:
    """``home`` from an env's ``pyvenv.cfg``."""
    try:
        for line in (env_dir / "pyvenv.cfg").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "home":
                return value.strip()
    except OSError:
        return None
    return None


# -- disk estimate ------------------------------------------------------------------------------


def _platform_tags() -> tuple[str, ...]:
    """Substrings a wheel's platform tag must contain to install here."""
    machine = platform.machine().lower()
    if sys.platform.startswith("linux"):
        libc = "musllinux" if platform.libc_ver()[0] != "glibc" else "manylinux"
        return (f"{libc}", "linux")
    if sys.platform == "darwin":
        return ("macosx",)
    if sys.platform == "win32":
        return ("win",)
    return (machine,)


def _wheel_fits(filename: str) -> bool:
    parts = filename.removesuffix(".whl").split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    machine = platform.machine().lower()
    if plat != "any" and (machine not in plat or not plat.startswith(_platform_tags())):
        return False
    cp = f"cp{sys.version_info.major}{sys.version_info.minor}"
    pys = py.split(".")
    if not any(p in (cp, f"py{sys.version_info.major}", "py2.py3") for p in pys) and not (
        abi == "abi3" and any(p.startswith("cp3") for p in pys)
    ):
        return False
    return abi in ("none", "abi3") or cp in abi


def _lock_graph(lock: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    packages = {str(p.get("name")): p for p in lock.get("package", [])}
    root = next(
        (
            p
            for p in lock.get("package", [])
            if "virtual" in p.get("source", {}) or "editable" in p.get("source", {})
        ),
        None,
    )
    return packages, root


def estimate_install_bytes(lock_path: Path, extras: tuple[str, ...]) -> tuple[int, int]:
    """(estimated installed bytes, number of packages) for the project's base plus ``extras``.

    Walks uv.lock from the project's dependencies and the extras' (ignoring markers, so a
    package behind a marker for another platform counts: an overestimate is the safe side), and
    sums for each the size of the wheel that fits this platform (the lock's ``size``, else the
    local file's), times `INSTALL_FACTOR`.
    """
    lock = tomllib.loads(lock_path.read_text(encoding="utf-8"))
    packages, root = _lock_graph(lock)
    todo: list[str] = []
    if root is not None:
        todo += [str(d["name"]) for d in root.get("dependencies", [])]
        for extra in extras:
            todo += [str(d["name"]) for d in root.get("optional-dependencies", {}).get(extra, [])]
    seen: set[str] = set()
    total = 0
    while todo:
        name = todo.pop()
        if name in seen or name not in packages:
            continue
        seen.add(name)
        pkg = packages[name]
        todo += [str(d["name"]) for d in pkg.get("dependencies", [])]
        for deps in pkg.get("optional-dependencies", {}).values():  # any extra of a dependency
            todo += [str(d["name"]) for d in deps]
        wheels = pkg.get("wheels", [])
        size = 0
        for wheel in wheels:
            ref = str(wheel.get("url") or wheel.get("path") or wheel.get("filename") or "")
            if _wheel_fits(ref.rsplit("/", 1)[-1]):
                size = int(wheel.get("size") or 0)
                if not size and wheel.get("path"):
                    with contextlib.suppress(OSError):
                        size = os.path.getsize(_lock_relative(lock_path, str(wheel["path"])))
                break
        if not size and "sdist" in pkg:
            size = int(pkg["sdist"].get("size") or 0)
        total += size
    return int(total * INSTALL_FACTOR), len(seen)


def _lock_relative(lock_path: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else lock_path.parent / p


# -- helpers ------------------------------------------------------------------------------------


def _uv_env(settings: Settings, volume: Volume, target: Path) -> dict[str, str]:
    env = dict(settings.environ)
    for name in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "UV_LINK_MODE", "UV_COMPILE_BYTECODE"):
        env.pop(name, None)
    env["UV_PROJECT_ENVIRONMENT"] = str(target)
    # The cache sits on the volume, beside envs/: same filesystem, so uv hard-links files from
    # it instead of copying (see `_sync` for why hardlink).
    env["UV_CACHE_DIR"] = str(volume.uv_cache)
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    env["UV_NO_PROGRESS"] = "1"
    return env


def _run(
    cmd: list[str], env: dict[str, str], cwd: Path, timeline: Timeline
) -> subprocess.CompletedProcess[str]:
    """Run uv, streaming its output into the boot log line by line as it comes (a cold build
    takes minutes: a silent one looks hung in RunPod's log view), and keep it for errors."""
    timeline.log("$ " + " ".join(cmd))
    with subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
    ) as proc:
        out: list[str] = []

        def pump_stdout() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.append(line)
                timeline.log(f"  {line.rstrip()}")

        reader = threading.Thread(target=pump_stdout, name="uv-stdout", daemon=True)
        reader.start()
        err: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            timeline.log(f"  {line.rstrip()}")
        returncode = proc.wait()
        reader.join()
    return subprocess.CompletedProcess(cmd, returncode, "".join(out), "".join(err))


def _uv_error(proc: subprocess.CompletedProcess[str]) -> str:
    text = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
    return text[-ERROR_TAIL:]


def _site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python*/site-packages"))
    return found[0] if found else env / "lib" / "site-packages"


@contextlib.contextmanager
def _builder_heartbeat(tmp: Path, settings: Settings) -> Iterator[None]:
    """Write ``.builder`` (host, pid, worker) and touch it every TTL/3 while we build."""
    marker = tmp / BUILDER_FILE
    marker.write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "worker": settings.worker_id}),
        encoding="utf-8",
    )
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(0.5, settings.lease_ttl_s / 3)):
            with contextlib.suppress(OSError):
                os.utime(marker)

    thread = threading.Thread(target=beat, name="env-builder-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _host() -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname())


def tmp_name(key: str) -> str:
    """``.tmp-<key16>-<host>-<pid>-<rand>``: unique, and names its builder even before ``.builder`` exists."""
    return f"{TMP_PREFIX}{key[:16]}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def parse_tmp_name(name: str) -> dict[str, Any]:
    """key prefix, host and pid from a temp dir's name (empty for trash and foreign names)."""
    body = name[len(TMP_PREFIX) :]
    if not name.startswith(TMP_PREFIX) or body.startswith(TRASH) or len(body) < 18:
        return {}
    parts = body[17:].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return {}
    return {"key": body[:16], "host": parts[0], "pid": int(parts[1])}


def leftover_is_dead(tmp: Path, stale_after_s: float, now: float | None = None) -> bool:
    """A temp dir whose builder is gone: a dead pid on this host, or no heartbeat for a while.

    Trash (``.tmp-trash-*``) is always dead: it is only ever being deleted.
    """
    if tmp.name.startswith(TMP_PREFIX + TRASH):
        return True
    marker = tmp / BUILDER_FILE
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        mtime = marker.stat().st_mtime
    except (OSError, ValueError):
        try:
            mtime = tmp.stat().st_mtime
        except OSError:
            return False
        named = parse_tmp_name(tmp.name)
        same_host = named.get("host") == _host()
        info = {"host": socket.gethostname(), "pid": named["pid"]} if same_host else {}
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if info["pid"] == os.getpid():
            return False
        if not leases._pid_alive(info["pid"]):
            return True
    return (now if now is not None else time.time()) - mtime > stale_after_s


def clean_leftovers(volume: Volume, timeline: Timeline | None, stale_after_s: float) -> list[Path]:
    """Remove temp dirs of dead builders in ``envs/`` (renamed aside first, then deleted)."""
    removed: list[Path] = []
    if not volume.envs.is_dir():
        return removed
    for p in volume.envs.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir() and leftover_is_dead(p, stale_after_s):
            _discard(p)
            removed.append(p)
            if timeline is not None:
                timeline.log(f"removed a dead builder's leftover {p.name}")
    return removed


def _discard(path: Path) -> None:
    """Rename out of the way (a trash name nobody reuses), then delete."""
    trash = path.with_name(f"{TMP_PREFIX}{TRASH}{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    remove_tree(trash)


# -- reuse --------------------------------------------------------------------------------------


def _check_home(path: Path, python: interp.Interpreter) -> str | None:
    """None when ``pyvenv.cfg`` home is the interpreter's directory; else what is wrong."""
    home = pyvenv_home(path)
    want = str(python.executable.parent)
    if home is None:
        return f"{path}/pyvenv.cfg has no home"
    if home != want and os.path.realpath(home) != os.path.realpath(want):
        return f"{path}/pyvenv.cfg home is {home}, expected {want}"
    if not Path(home).is_dir():
        return f"{path}/pyvenv.cfg home {home} does not exist"
    return None


def _failure_path(volume: Volume, full_key: str) -> Path:
    return volume.envs / f"{FAILED_PREFIX}{full_key}.json"


def _recent_failure(volume: Volume, full_key: str) -> dict[str, Any] | None:
    path = _failure_path(volume, full_key)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or time.time() - float(record.get("at", 0)) > RETRY_FULL_AFTER_S:
        return None
    return record


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- the phase ----------------------------------------------------------------------------------


def ensure_env(settings: Settings, volume: Volume, timeline: Timeline, detail: dict[str, Any]) -> EnvResult:
    """Reuse the READY environment for this key, or build and publish it.

    Internal logic:

    1. the interpreter (managed: installed into ``python/`` under a lease) and the full key;
    2. READY with the expected ``pyvenv.cfg`` home → reuse; a READY env whose home is wrong is
       renamed aside (never repaired in place) and rebuilt;
    3. a degraded env for this key that failed less than `RETRY_FULL_AFTER_S` ago → reuse it;
    4. the lease ``env-<key>``, waiting while another worker builds (``done`` ends the wait);
    5. recheck, remove dead builders' leftovers, check disk, build, publish.
    """
    uv = find_uv()
    python = _interpreter(settings, volume, timeline, uv)
    extras = settings.extras
    inputs = key_inputs(settings, extras, python=python)
    key = env_key(inputs)
    final = volume.envs / key
    detail["key"] = key
    detail["python"] = f"{python.implementation} {python.version}"

    def reusable() -> EnvResult | None:
        if is_ready(final):
            problem = _check_home(final, python)
            if problem is None:
                return EnvResult(key, final, final / "bin" / "python", True, extras)
            timeline.log(f"not reusing {final}: {problem}; moving it aside and rebuilding", level="warn")
            with contextlib.suppress(OSError):
                os.rename(final, volume.envs / f"{BROKEN_PREFIX}{key}-{uuid.uuid4().hex[:8]}")
        failure = _recent_failure(volume, key)
        if failure is not None:
            held = volume.envs / str(failure.get("published_key"))
            dropped = {str(k): str(v) for k, v in (failure.get("dropped") or {}).items()}
            still_optional = all(settings.is_optional(c) for c in dropped)  # else: build, and fail
            if still_optional and is_ready(held) and _check_home(held, python) is None:
                kept = tuple(e for e in extras if e not in dropped)
                return EnvResult(
                    str(failure["published_key"]), held, held / "bin" / "python", True, kept, dropped
                )
        return None

    found = reusable()
    if found is None:
        owner = f"{settings.worker_id}:{os.getpid()}"
        lease = leases.acquire(
            volume.leases,
            f"env-{key}",
            owner=owner,
            ttl_s=settings.lease_ttl_s,
            timeout_s=settings.lock_timeout_s,
            timeline=timeline,
            phase="env",
            done=lambda: is_ready(final) or _recent_failure(volume, key) is not None,
            enabled=settings.locks,
        )
        try:
            found = reusable()
            if found is None:
                clean_leftovers(volume, timeline, stale_after_s=max(60.0, 4 * settings.lease_ttl_s))
                found = _build(settings, volume, timeline, uv, python, inputs, key)
        finally:
            if lease is not None:
                lease.release()
    detail["reused"] = found.reused
    if found.key != key:
        detail["published_key"] = found.key
    if found.dropped:
        detail["dropped"] = sorted(found.dropped)
    return found


def _interpreter(settings: Settings, volume: Volume, timeline: Timeline, uv: str) -> interp.Interpreter:
    """The interpreter to build from; installs the managed one under a lease when missing."""
    if settings.python != "managed":
        return interp.system_interpreter()
    request = interp.managed_request(settings)
    found = interp.managed_interpreter(volume.root, request)
    if found is not None:
        return found
    volume.python.mkdir(parents=True, exist_ok=True)
    lease = leases.acquire(
        volume.leases,
        f"python-{request}",
        owner=f"{settings.worker_id}:{os.getpid()}",
        ttl_s=settings.lease_ttl_s,
        timeout_s=settings.lock_timeout_s,
        timeline=timeline,
        phase="env",
        done=lambda: interp.find_managed(volume.root, request) is not None,
        enabled=settings.locks,
    )
    try:
        if interp.find_managed(volume.root, request) is None:
            argv, extra = interp.install_command(uv, volume, request)
            env = dict(settings.environ)
            env.update(extra)
            proc = _run(argv, env, settings.project_dir, timeline)
            if proc.returncode != 0:
                raise EnvBuildError(
                    f"uv python install {request} failed: {_uv_error(proc)}",
                    hint="uv downloads Python from GitHub: allow that, set UV_PYTHON_INSTALL_MIRROR, "
                    "or use BOOTSTRAP_PYTHON=system",
                )
    finally:
        if lease is not None:
            lease.release()
    found = interp.managed_interpreter(volume.root, request)
    if found is None:
        raise EnvBuildError(
            f"uv python install {request} finished but no interpreter is in {volume.python}",
            hint="run `bootstrap diagnose`; or use BOOTSTRAP_PYTHON=system",
        )
    return found


@dataclass
class _Build:
    settings: Settings
    volume: Volume
    timeline: Timeline
    uv: str
    tmp: Path
    env: dict[str, str]
    #: the READY env this build was cloned from
    source: Path | None = None
    #: .py files compiled after a clone (None: whole site-packages)
    compiled_files: int | None = None
    steps_ms: dict[str, float] = field(default_factory=dict)

    def run(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return _run(cmd, self.env, self.settings.project_dir, self.timeline)

    def sync(self, extras: list[str], *, compile_bytecode: bool) -> subprocess.CompletedProcess[str]:
        # Hardlink mode: the cache and envs/ are on the same filesystem (the volume), so every
        # installed file is a hard link to the cache's copy — no bytes copied, one inode shared
        # by every env, and (unlike symlink mode) an env stays whole if the cache is pruned.
        # Files are never modified after install, so sharing inodes is safe. Reflinks (clone
        # mode) are not supported on the network filesystem; copy mode would double the space.
        cmd = [self.uv, "sync", "--frozen", "--no-install-project", "--no-dev", "--link-mode", "hardlink"]
        if compile_bytecode:
            cmd.append("--compile-bytecode")
        for extra in extras:
            cmd += ["--extra", extra]
        proc = self.run(cmd)
        if proc.returncode != 0 and "No space left on device" in proc.stdout + proc.stderr:
            # A full disk is no fault of a capability: never degrade for it, say exit 11.
            free = disk_usage(self.tmp).free
            raise InsufficientDiskError(
                f"the disk holding {self.tmp.parent} filled up while uv installed the environment "
                f"({format_bytes(free)} free now): {_uv_error(proc)[-500:]}",
                hint="grow the volume, free space with `bootstrap gc`, or raise BOOTSTRAP_MIN_FREE_GB so the "
                "check before the build keeps more in reserve",
            )
        return proc

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.steps_ms[name] = round((time.monotonic() - t0) * 1000, 1)


def _build(
    settings: Settings,
    volume: Volume,
    timeline: Timeline,
    uv: str,
    python: interp.Interpreter,
    inputs: dict[str, Any],
    key: str,
) -> EnvResult:
    """Build into a temp dir and publish it (see the module docstring for the steps)."""
    lock = settings.project_dir / "uv.lock"
    needed, count = estimate_install_bytes(lock, settings.extras)
    volume.envs.mkdir(parents=True, exist_ok=True)
    du = require_free(
        volume.envs, needed, settings.min_free_bytes, what=f"the environment ({count} packages)"
    )
    timeline.log(
        f"env {key}: building; about {needed / 1e6:.1f} MB for {count} packages, {du.free / 1e9:.2f} GB free"
    )
    tmp = volume.envs / tmp_name(key)
    tmp.mkdir()
    t0 = time.time()
    b = _Build(settings, volume, timeline, uv, tmp, _uv_env(settings, volume, tmp))
    try:
        with _builder_heartbeat(tmp, settings):
            source = _closest_ready(volume, inputs)
            with b.step("venv"):
                if source is not None:
                    timeline.log(f"cloning {source.name} by hard links (unchanged packages are reused)")
                    try:
                        _clone(source, tmp)
                        b.source = source
                    except (OSError, EnvBuildError) as err:
                        # e.g. no GNU cp, or a filesystem without hard links: build from scratch
                        timeline.log(f"clone failed ({err}); building from scratch", level="warn")
                        for entry in tmp.iterdir():
                            if entry.name == BUILDER_FILE:
                                continue
                            if entry.is_dir() and not entry.is_symlink():
                                remove_tree(entry)
                            else:
                                entry.unlink()
                        source = None
                if source is None:
                    proc = b.run(
                        [
                            uv,
                            "venv",
                            "--quiet",
                            "--allow-existing",
                            "--relocatable",
                            "--python",
                            str(python.executable),
                            str(tmp),
                        ]
                    )
                    if proc.returncode != 0:
                        raise EnvBuildError(f"uv venv failed: {_uv_error(proc)}")
            problem = _check_home(tmp, python)
            if problem is not None:
                raise EnvBuildError(f"the new env's interpreter is not the expected one: {problem}")
            with b.step("sync"):
                kept, dropped = _install(b, list(settings.extras))
            if b.source is not None:
                with b.step("compile"):
                    _compile(b)
            with b.step("smoke"):
                kept, dropped = _smoke(b, kept, dropped)
            _write_marker_free(tmp)
            published_key = key if not dropped else env_key(key_inputs(settings, tuple(kept), python=python))
            final = volume.envs / published_key
            record = {
                "key": published_key,
                "inputs": {**inputs, "extras": sorted(kept)},
                "extras": sorted(kept),
                "dropped": dropped,
                "requested_key": key,
                "uv": subprocess.run(
                    [uv, "--version"], capture_output=True, text=True, check=False
                ).stdout.strip(),
                "python": str(python.executable),
                "home": pyvenv_home(tmp),
                "built_at": t0,
                "build_s": round(time.time() - t0, 2),
                "steps_ms": b.steps_ms,
                "cloned_from": source.name if source is not None else None,
                "compiled_files": b.compiled_files,
                "builder": settings.worker_id,
                "host": socket.gethostname(),
            }
            # Every file of the env reaches the disk before READY does: a crash can then never
            # leave a READY env with missing bytes. One sync() is far cheaper than an fsync per file.
            os.sync()
            with open(tmp / READY, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
        published = _publish(tmp, final, timeline)
    except BaseException:
        _discard(tmp)
        raise
    if dropped:
        _write_json(
            _failure_path(volume, key),
            {
                "at": time.time(),
                "published_key": published_key,
                "dropped": dropped,
                "worker": settings.worker_id,
            },
        )
    kept_t = tuple(e for e in settings.extras if e in kept)
    return EnvResult(published_key, final, final / "bin" / "python", not published, kept_t, dropped)


def _write_marker_free(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (tmp / BUILDER_FILE).unlink()


def _publish(tmp: Path, final: Path, timeline: Timeline) -> bool:
    """One rename of the temp dir onto ``final``; False if another builder published first."""
    try:
        os.rename(tmp, final)
    except OSError:
        # rename(2) refuses a non-empty target directory (ENOTEMPTY/EEXIST): someone else's
        # READY env is there. Theirs is as good as ours (same key): drop ours, use theirs.
        if not is_ready(final):
            # Not made by a builder (READY is inside before the rename): set it aside, retry once.
            timeline.log(f"{final} exists without READY: moving it aside", level="warn")
            os.rename(final, final.with_name(f"{BROKEN_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"))
            return _publish(tmp, final, timeline)
        timeline.log(f"another worker published {final.name} first; using theirs")
        _discard(tmp)
        return False
    fsync_dir(final.parent)
    return True


def _install(b: _Build, extras: list[str]) -> tuple[list[str], dict[str, str]]:
    """Sync all extras; if that fails, find which optional ones to drop (required → exit 12)."""
    compile_now = b.source is None
    proc = b.sync(extras, compile_bytecode=compile_now)
    if proc.returncode == 0:
        return extras, {}
    optional = [e for e in extras if b.settings.is_optional(e)]
    if not optional:
        raise EnvBuildError(
            f"uv sync failed for extras {','.join(extras) or '(base only)'}: {_uv_error(proc)}",
            hint="read uv's error above; list the capability in BOOTSTRAP_OPTIONAL to start without it, "
            "or fix the dependency in pyproject.toml and `uv lock`",
        )
    kept = [e for e in extras if e not in optional]
    proc = b.sync(kept, compile_bytecode=compile_now)
    if proc.returncode != 0:
        raise EnvBuildError(
            f"uv sync failed for the required part ({','.join(kept) or 'base only'}): {_uv_error(proc)}",
            hint="read uv's error above; fix the dependency in pyproject.toml and `uv lock`",
        )
    dropped: dict[str, str] = {}
    last_ok = True
    for cap in optional:
        proc = b.sync([*kept, cap], compile_bytecode=compile_now)
        if proc.returncode == 0:
            kept.append(cap)
            last_ok = True
        else:
            dropped[cap] = f"uv sync --extra {cap} failed: {_uv_error(proc)}"
            b.timeline.log(f"capability {cap} dropped: its packages do not install", level="warn")
            last_ok = False
    if not last_ok:  # an exact sync removes what the failed attempt left half-installed
        proc = b.sync(kept, compile_bytecode=compile_now)
        if proc.returncode != 0:
            raise EnvBuildError(f"uv sync failed: {_uv_error(proc)}")
    return [e for e in extras if e in kept], dropped


def _compile(b: _Build) -> None:
    """Bytecode for what the clone's sync installed: the ``.py`` files in new ``RECORD``s.

    Everything else came with its ``.pyc`` from the source env (hard links, still valid: same
    source mtime and size). Falls back to compileall over site-packages, which skips up-to-date
    files, if RECORDs cannot be read.
    """
    site = _site_packages(b.tmp)
    files: list[str] = []
    try:
        for dist in new_distributions(b.source, b.tmp) if b.source is not None else []:
            for line in (dist / "RECORD").read_text(encoding="utf-8").splitlines():
                rel = line.split(",", 1)[0]
                if rel.endswith(".py") and not rel.startswith(".."):
                    files.append(str(site / rel))
        targets = files
    except OSError:
        targets = [str(site)]
    b.compiled_files = len(files) if targets is files else None
    if not targets:
        return
    listing = b.tmp / ".compile-list"
    listing.write_text("\n".join(targets) + "\n", encoding="utf-8")
    proc = b.run([str(b.tmp / "bin" / "python"), "-m", "compileall", "-q", "-j", "0", "-i", str(listing)])
    listing.unlink()
    if proc.returncode != 0:
        b.timeline.log("compileall reported errors (files that do not compile are skipped)", level="warn")


def _smoke(b: _Build, kept: list[str], dropped: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Import every selected capability with the new env's Python; drop optional failures."""
    env = dict(b.settings.environ)
    for name in ("VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(b.settings.app_dir)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # never write into the app dir or the env from here
    cmd = [
        str(b.tmp / "bin" / "python"),
        "-m",
        "worker.smoke",
        "--project",
        str(b.settings.project_dir),
        *kept,
    ]
    b.timeline.log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=b.tmp, capture_output=True, text=True, timeout=600, check=False)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EnvBuildError(
            f"the import smoke test did not run: {proc.stderr.strip()[-ERROR_TAIL:]}",
            hint="the new env's Python cannot run the worker's smoke test: see boot.log",
        ) from None
    b.timeline.log(f"  smoke: {json.dumps(result)}")
    if result.get("base"):
        raise EnvBuildError(
            f"the worker's base does not import in the new env: {result['base']}",
            hint="a missing system library or module: fix the image or the lock (FAILURES F4/F5)",
        )
    failed = {str(k): str(v) for k, v in (result.get("capabilities") or {}).items() if v}
    required = [c for c in failed if not b.settings.is_optional(c)]
    if required:
        raise EnvBuildError(
            "capability " + "; ".join(f"{c} does not import in the new env: {failed[c]}" for c in required),
            hint="a missing system library or module; list the capability in BOOTSTRAP_OPTIONAL to start "
            "without it, or fix the image or the lock",
        )
    if failed:
        for cap, why in failed.items():
            dropped[cap] = f"import smoke test failed: {why}"
            b.timeline.log(f"capability {cap} dropped: {why}", level="warn")
        kept = [e for e in kept if e not in failed]
        proc2 = b.sync(kept, compile_bytecode=False)  # remove what the dropped ones installed
        if proc2.returncode != 0:
            raise EnvBuildError(f"uv sync failed: {_uv_error(proc2)}")
    return kept, dropped


# -- clone --------------------------------------------------------------------------------------


def _closest_ready(volume: Volume, inputs: dict[str, Any]) -> Path | None:
    """The READY env with the same interpreter, platform and layout: most extras in common, newest."""
    best: tuple[int, float] | None = None
    found: Path | None = None
    if not volume.envs.is_dir():
        return None
    for p in volume.envs.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        rec = read_ready(p)
        if rec is None:
            continue
        theirs = rec.get("inputs") or {}
        if any(theirs.get(k) != inputs.get(k) for k in ("python", "platform", "libc", "layout")):
            continue
        common = len(set(theirs.get("extras") or []) & set(inputs.get("extras") or []))
        score = (common, float(rec.get("built_at") or 0))
        if best is None or score > best:
            best, found = score, p
    return found


def _private_copy(path: Path) -> None:
    """Replace a hard link by a private copy (temp name + rename; the other link is untouched)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.copy")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)


def _clone(src: Path, dst: Path) -> None:
    """Copy ``src`` into ``dst`` with hard links, then make private copies of what may be rewritten.

    A published env is never modified: uv replaces a package by unlinking its files and linking
    new ones, which leaves the other link (in ``src``) untouched; everything uv could open for
    writing in place — ``bin/``, ``pyvenv.cfg``, the top of site-packages (``*.pth``) and the
    installer-written files of every ``*.dist-info`` — becomes a private copy here.
    """
    entries = [str(e) for e in sorted(src.iterdir()) if e.name not in (READY, BUILDER_FILE)]
    # cp (C) links ~20k files in well under a second; a Python walk takes several.
    proc = subprocess.run(
        ["cp", "-a", "--link", *entries, str(dst)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise EnvBuildError(f"cloning {src} failed: {proc.stderr.strip()[-1000:]}")
    site = _site_packages(dst)
    for dirpath, dirnames, filenames in os.walk(dst):
        here = Path(dirpath)
        if here == site:  # below site-packages only the metadata an installer writes is copied
            for dist in dirnames:
                if dist.endswith(".dist-info"):
                    for name in INSTALLER_WRITES:
                        if (here / dist / name).is_file():
                            _private_copy(here / dist / name)
            dirnames[:] = []
        for name in filenames:
            path = here / name
            if path.is_symlink() or (here == dst and name == BUILDER_FILE):
                continue
            _private_copy(path)


def new_distributions(before: Path, after: Path) -> list[Path]:
    """``*.dist-info`` dirs in ``after``'s site-packages that ``before``'s does not have."""
    old = {p.name for p in _site_packages(before).glob("*.dist-info")}
    return sorted(p for p in _site_packages(after).glob("*.dist-info") if p.name not in old)
