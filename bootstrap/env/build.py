"""Building an environment as a transaction: temp dir, venv or clone, sync, smoke, READY, rename."""

from __future__ import annotations

# ruff: noqa: PTH104 - rename of whole trees reads clearer at the os level, as elsewhere in bootstrap
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap import fastfs
from bootstrap import interpreter as interp
from bootstrap.atomic import write_atomic, write_json_atomic
from bootstrap.childenv import child_environ
from bootstrap.env.clone import clone, closest_ready, new_distributions, site_packages
from bootstrap.env.estimate import estimate_install_bytes
from bootstrap.env.key import (
    READY,
    env_key,
    env_problem,
    env_python,
    failure_path,
    is_ready,
    key_inputs,
    pyvenv_home,
)
from bootstrap.env.leftovers import BROKEN_PREFIX, BUILDER_FILE, builder_heartbeat, discard, tmp_name
from bootstrap.errors import EnvBuildError, InsufficientDiskError, format_bytes
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume, disk_usage, fsync_dir, remove_tree, require_free

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


def uv_env(settings: Settings, volume: Volume, target: Path) -> dict[str, str]:
    env = child_environ(settings.environ, drop=("UV_LINK_MODE", "UV_COMPILE_BYTECODE"))
    env["UV_PROJECT_ENVIRONMENT"] = str(target)
    # The cache sits on the volume, beside envs/: same filesystem, so uv hard-links files from
    # it instead of copying (see `_sync` for why hardlink).
    env["UV_CACHE_DIR"] = str(volume.uv_cache)
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    env["UV_NO_PROGRESS"] = "1"
    return env


def run_uv(
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


def uv_error(proc: subprocess.CompletedProcess[str]) -> str:
    text = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
    return text[-ERROR_TAIL:]


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
    #: every file the smoke test's imports read (and the worker's start: `PREFETCH_MODULES`),
    #: for the prefetch list
    smoke_files: list[str] | None = None
    steps_ms: dict[str, float] = field(default_factory=dict)

    def run(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return run_uv(cmd, self.env, self.settings.project_dir, self.timeline)

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
                f"({format_bytes(free)} free now): {uv_error(proc)[-500:]}",
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


def build(
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
    b = _Build(settings, volume, timeline, uv, tmp, uv_env(settings, volume, tmp))
    try:
        with builder_heartbeat(tmp, settings):
            source = closest_ready(volume, inputs)
            with b.step("venv"):
                if source is not None:
                    timeline.log(f"cloning {source.name} by hard links (unchanged packages are reused)")
                    try:
                        clone(source, tmp)
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
                        raise EnvBuildError(f"uv venv failed: {uv_error(proc)}")
            problem = env_problem(tmp, python)
            if problem is not None:
                raise EnvBuildError(f"the new env's interpreter is not the expected one: {problem}")
            with b.step("sync"):
                kept, dropped = _install(b, list(settings.extras))
            with b.step("compile"):
                _compile(b)
            with b.step("smoke"):
                kept, dropped = _smoke(b, kept, dropped)
            with b.step("prefetch_list"):
                _write_prefetch_list(b)
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
            write_json_atomic(tmp / READY, record, indent=2, sort_keys=True)
        published = publish(tmp, final, timeline)
    except BaseException:
        discard(tmp)
        raise
    if dropped:
        write_json_atomic(
            failure_path(volume, key),
            {
                "at": time.time(),
                "published_key": published_key,
                "dropped": dropped,
                "worker": settings.worker_id,
            },
        )
    kept_t = tuple(e for e in settings.extras if e in kept)
    return EnvResult(published_key, final, env_python(final), not published, kept_t, dropped)


#: the prefetch list inside an env (`_write_prefetch_list`)
PREFETCH = ".prefetch"


def _write_marker_free(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (tmp / BUILDER_FILE).unlink()


def publish(tmp: Path, final: Path, timeline: Timeline) -> bool:
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
            return publish(tmp, final, timeline)
        timeline.log(f"another worker published {final.name} first; using theirs")
        discard(tmp)
        return False
    fsync_dir(final.parent)
    return True


def _install(b: _Build, extras: list[str]) -> tuple[list[str], dict[str, str]]:
    """Sync all extras; if that fails, find which optional ones to drop (required → exit 12)."""
    # Never uv's compile: on a slow-metadata volume (MooseFS) it is bound by one round trip per
    # file; `_compile` overlaps those waits (docs/moosefs.md: 1.91x local → 1.13x).
    compile_now = False
    proc = b.sync(extras, compile_bytecode=compile_now)
    if proc.returncode == 0:
        return extras, {}
    optional = [e for e in extras if b.settings.is_optional(e)]
    if not optional:
        raise EnvBuildError(
            f"uv sync failed for extras {','.join(extras) or '(base only)'}: {uv_error(proc)}",
            hint="read uv's error above; list the capability in BOOTSTRAP_OPTIONAL to start without it, "
            "or fix the dependency in pyproject.toml and `uv lock`",
        )
    kept = [e for e in extras if e not in optional]
    proc = b.sync(kept, compile_bytecode=compile_now)
    if proc.returncode != 0:
        raise EnvBuildError(
            f"uv sync failed for the required part ({','.join(kept) or 'base only'}): {uv_error(proc)}",
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
            dropped[cap] = f"uv sync --extra {cap} failed: {uv_error(proc)}"
            b.timeline.log(f"capability {cap} dropped: its packages do not install", level="warn")
            last_ok = False
    if not last_ok:  # an exact sync removes what the failed attempt left half-installed
        proc = b.sync(kept, compile_bytecode=compile_now)
        if proc.returncode != 0:
            raise EnvBuildError(f"uv sync failed: {uv_error(proc)}")
    return [e for e in extras if e in kept], dropped


#: threads per compile process: each mostly waits on the filesystem (`bootstrap.fastfs`)
COMPILE_THREADS = 32


def _fastfs(b: _Build, *args: str) -> list[str]:
    """``fastfs.py ARGS`` run by the new env's own Python (bytecode is version-specific)."""
    return [str(env_python(b.tmp)), str(Path(fastfs.__file__)), *args]


def _compile(b: _Build) -> None:
    """Bytecode for the new env, by `bootstrap.fastfs` with many threads in several processes.

    A fresh build compiles all of ``lib/``. A clone compiles only what its sync installed: the
    ``.py`` files in new ``RECORD``s; everything else came with its ``.pyc`` from the source env
    (hard links, still valid: same source mtime and size). If RECORDs cannot be read, the whole
    ``lib/`` again (up-to-date files are rewritten, which is only slower).
    """
    procs = str(max(2, os.cpu_count() or 2))
    whole = _fastfs(b, "compile", str(b.tmp / "lib"), str(COMPILE_THREADS), procs)
    if b.source is None:
        proc = _run_logged(whole, b)
        if proc.returncode != 0:
            raise EnvBuildError(
                f"compiling the env's bytecode failed: {proc.stderr.strip()[-ERROR_TAIL:]}",
                hint="the new env's Python cannot run bootstrap/fastfs.py: see boot.log",
            )
        return
    site = site_packages(b.tmp)
    files: list[str] = []
    try:
        for dist in new_distributions(b.source, b.tmp):
            for line in (dist / "RECORD").read_text(encoding="utf-8").splitlines():
                rel = line.split(",", 1)[0]
                if rel.endswith(".py") and not rel.startswith(".."):
                    files.append(str(site / rel))
    except OSError:
        b.compiled_files = None
        proc = _run_logged(whole, b)
    else:
        b.compiled_files = len(files)
        if not files:
            return
        proc = _run_logged(_fastfs(b, "compile-list", str(COMPILE_THREADS)), b, stdin="\n".join(files))
    if proc.returncode != 0:
        raise EnvBuildError(
            f"compiling the cloned env's new bytecode failed: {proc.stderr.strip()[-ERROR_TAIL:]}",
            hint="the new env's Python cannot run bootstrap/fastfs.py: see boot.log",
        )


def _run_logged(cmd: list[str], b: _Build, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    b.timeline.log("$ " + " ".join(cmd))
    env = child_environ(b.settings.environ, extra={"PYTHONDONTWRITEBYTECODE": "1"})
    proc = subprocess.run(
        cmd, input=stdin, env=env, cwd=b.tmp, capture_output=True, text=True, timeout=1800, check=False
    )
    if proc.returncode == 0:
        b.timeline.log(f"  compiled {proc.stdout.strip() or 0} file(s)")
    return proc


#: modules the worker imports at start beside the smoke test's (recorded by the smoke test)
PREFETCH_MODULES = ("worker.main", "runpod")


def _write_prefetch_list(b: _Build) -> None:
    """``<env>/.prefetch``: the env's files a worker start reads (paths relative to the env), for
    the detached reader `bootstrap.run` starts at boot. Only a hint: failing to make it is a
    warning, never a failed build."""
    if b.smoke_files is None:
        b.timeline.log("no prefetch list: the smoke test recorded no files", level="warn")
        return
    files = fastfs.existing(b.smoke_files, b.tmp)
    rel = sorted({str(Path(f).relative_to(b.tmp)) for f in files})
    # A new inode: a clone hard-linked the source env's list.
    write_atomic(b.tmp / PREFETCH, ("\n".join(rel) + "\n").encode())
    b.timeline.log(f"prefetch list: {len(rel)} file(s) a worker start reads")


def _smoke(b: _Build, kept: list[str], dropped: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Import every selected capability with the new env's Python; drop optional failures."""
    # PYTHONDONTWRITEBYTECODE: never write into the app dir or the env from here
    env = child_environ(
        b.settings.environ, pythonpath=[b.settings.app_dir], extra={"PYTHONDONTWRITEBYTECODE": "1"}
    )
    cmd = [
        str(env_python(b.tmp)),
        "-m",
        "worker.smoke",
        "--project",
        str(b.settings.project_dir),
        *(a for m in PREFETCH_MODULES for a in ("--record", m)),
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
    b.timeline.log(
        f"  smoke: {json.dumps({k: v for k, v in result.items() if k not in ('modules', 'files')})}"
    )
    files = result.get("files")
    b.smoke_files = [str(f) for f in files] if isinstance(files, list) else None
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
            raise EnvBuildError(f"uv sync failed: {uv_error(proc2)}")
    return kept, dropped


# -- clone --------------------------------------------------------------------------------------
