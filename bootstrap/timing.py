"""`bootstrap timing`: the cold-start timing script and the project's performance yardstick (SPEC §9).

Drives real boots end to end against scratch volumes — the rendered ``start.sh`` → ``bootstrap
run`` → the worker → its first job through the SDK's local API (``BOOTSTRAP_SERVE_API``) — and
reports per-phase times from each boot's own timeline (``logs/<worker-id>/boot.jsonl``).

Scenarios:

- ``cold``: an empty volume.
- ``warm``: everything on the volume (a cold boot first, untimed — or the volume the last
  ``cold`` or ``concurrent`` repeat of this run left — then the timed boots).
- ``concurrent N``: N workers at once on one empty volume; each is reported and the slowest
  stands for the repeat.
- ``recover``: a warm volume whose verified model file was corrupted (truncated, or overwritten
  with an error page of the same size): the boot must detect it, quarantine it and fetch again.
- ``baseline``: the recipe this project replaces, run the same way: ``python -m venv`` +
  ``pip install`` of the same pinned requirements on the volume, the weights downloaded with one
  stream and no verification, then the worker started directly.

Phases per boot (milliseconds): ``preflight env weights import warm`` are the ``ms`` of each
phase's ``end`` event; ``ready`` is the worker's ``ready`` event (boot start → ready);
``first_job`` is ready → the first job's answer; ``total`` is process start → that answer, on
this script's clock; ``startup`` is what ``total`` holds beyond the named phases (interpreter
starts, the ``exec``, the SDK's server coming up). ``--repeat K`` gives medians and min/max.

Output: a table on stdout, ``DIR/timing.json`` (every repeat of every scenario, and medians)
and ``DIR/timing.png`` (the phases per scenario as horizontal stacked bars; matplotlib comes
from the ``timing`` dependency group and is imported only to draw it).

Internal logic of one boot:

1. a fresh worker id, a free loopback port; ``start.sh`` started in its own process group;
2. poll the port (or the process's exit); POST the job to ``/runsync``; note the answer's time;
3. SIGTERM the process group (SIGKILL after a grace period);
4. read the boot's timeline from the volume and derive the phases.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.errors import ConfigError
from bootstrap.manifest import ModelFile, load_manifest, selected
from bootstrap.plan import Capability, Plan, write_plan
from bootstrap.settings import Settings
from bootstrap.timeline import read_events
from bootstrap.volume import Volume

#: Phases taken from the timeline's ``end`` events, in boot order.
BOOT_PHASES = ("preflight", "env", "weights", "import", "warm")
#: Every figure a boot records (``ready`` is cumulative; the others are durations).
PHASES = (*BOOT_PHASES, "ready", "first_job", "total")
#: The segments of a bar in the chart; they add up to ``total``.
SEGMENTS = (*BOOT_PHASES, "startup", "first_job")
SCENARIOS = ("cold", "warm", "concurrent", "recover", "baseline")
HEALTH_JOB: dict[str, Any] = {"input": {"task": "health"}}
STOP_GRACE_S = 10.0
#: Variables a boot gets from this script, never from the caller's environment.
_PER_BOOT = ("BOOTSTRAP_VOLUME", "BOOTSTRAP_SERVE_API", "BOOTSTRAP_WORKER_ID", "BOOTSTRAP_PLAN")


@dataclass(frozen=True)
class Scenario:
    name: str
    workers: int = 1

    @property
    def label(self) -> str:
        return f"concurrent {self.workers}" if self.name == "concurrent" else self.name


@dataclass
class Options:
    """What `run_timing` needs beyond the settings (from the command line)."""

    scenarios: list[Scenario]
    repeat: int = 1
    out: Path = Path("timing")
    scratch: Path | None = None
    job: dict[str, Any] = field(default_factory=lambda: dict(HEALTH_JOB))
    extras: str | None = None
    manifest: str | None = None
    mirror: str | None = None
    seed_cache: Path | None = None
    corrupt: str = "truncate"
    timeout_s: float = 3600.0
    keep: bool = False
    chart: bool = True


@dataclass
class Boot:
    """One measured boot."""

    worker_id: str
    ok: bool = False
    exit_code: int | None = None
    error: str | None = None
    phases: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(PHASES))
    job_status: str | None = None
    health: str | None = None
    job_ms: float | None = None
    env_reused: bool | None = None
    quarantined: int | None = None
    log: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_scenarios(tokens: Sequence[str]) -> list[Scenario]:
    """``["cold", "concurrent", "4", "warm"]`` → scenarios; ``concurrent`` takes an optional N [3]."""
    out: list[Scenario] = []
    items = list(tokens)
    i = 0
    while i < len(items):
        name = items[i].strip().lower()
        i += 1
        if name not in SCENARIOS:
            raise ConfigError(
                f"unknown timing scenario {name!r}",
                hint=f"scenarios are {', '.join(SCENARIOS)} (concurrent takes a worker count: concurrent 4)",
            )
        if name == "concurrent":
            workers = 3
            if i < len(items) and items[i].isdigit():
                workers = int(items[i])
                i += 1
            if workers < 1:
                raise ConfigError("concurrent needs at least 1 worker", hint="e.g. concurrent 4")
            out.append(Scenario(name, workers))
        else:
            out.append(Scenario(name))
    if not out:
        raise ConfigError("no timing scenario given", hint="e.g. bootstrap timing cold warm baseline")
    return out


# -- the environment of a boot -------------------------------------------------------------


def boot_environ(
    settings: Settings, opts: Options, volume: Path, worker_id: str, port: int
) -> dict[str, str]:
    """The caller's environment, the pass-through options, and this boot's volume, id and port."""
    env = {k: v for k, v in settings.environ.items() if k not in _PER_BOOT}
    if opts.extras is not None:
        env["BOOTSTRAP_EXTRAS"] = opts.extras
    if opts.manifest is not None:
        env["BOOTSTRAP_MANIFEST"] = str(Path(opts.manifest).resolve())
    if opts.mirror is not None:
        env["BOOTSTRAP_MIRROR"] = opts.mirror
    env["BOOTSTRAP_VOLUME"] = str(volume)
    env["BOOTSTRAP_SERVE_API"] = f"127.0.0.1:{port}"
    env["BOOTSTRAP_WORKER_ID"] = worker_id
    env.setdefault("BOOTSTRAP_LOG_FORMAT", "json")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_volume(scratch: Path, name: str, seed_cache: Path | None) -> Path:
    """An empty volume directory; with a seed cache, its uv cache hard-linked in ("warm uv cache")."""
    root = scratch / f"vol-{name}-{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True)
    if seed_cache is not None:
        target = root / ".bootstrap" / "uv-cache"
        target.parent.mkdir(parents=True)
        # Hard links cost no space and no time; the cache's files are never modified in place.
        proc = subprocess.run(["cp", "-al", str(seed_cache), str(target)], capture_output=True, check=False)
        if proc.returncode != 0:  # another filesystem: a copy, slower but the same contents
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(seed_cache, target, symlinks=True)
    return root


# -- driving one boot ----------------------------------------------------------------------


def post_job(url: str, job: Mapping[str, Any], timeout_s: float) -> tuple[int, Any]:
    req = urllib.request.Request(  # noqa: S310 - a loopback http:// URL this module built
        url, data=json.dumps(job).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - as above
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        body = err.read()
        with contextlib.suppress(ValueError):
            return int(err.code), json.loads(body or b"null")
        return int(err.code), body.decode(errors="replace")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the boot's process group, SIGKILL it after a grace period."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE_S)


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def drive(
    argv: list[str],
    env: Mapping[str, str],
    *,
    cwd: Path,
    volume: Path,
    worker_id: str,
    port: int,
    job: Mapping[str, Any],
    log: Path,
    timeout_s: float,
    started: float | None = None,
) -> Boot:
    """Start a boot, wait for its local API, send the first job, stop it, and read its timeline.

    ``started`` (``time.time()``) lets a caller count work done before this process (baseline).
    """
    boot = Boot(worker_id=worker_id, log=str(log))
    t0 = time.time() if started is None else started
    deadline = time.monotonic() + timeout_s
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            answered = _first_job(proc, boot, port, job, deadline)
        finally:
            stop_group(proc)
    events = read_events(volume / ".bootstrap" / "logs" / worker_id / "boot.jsonl")
    boot.phases = phases_from(events, t0, answered)
    boot.env_reused = next(
        (e.get("detail", {}).get("reused") for e in events if e["phase"] == "env" and e["event"] == "end"),
        None,
    )
    boot.job_ms = next((e.get("ms") for e in events if e["phase"] == "job" and e["event"] == "end"), None)
    if not boot.ok and boot.error is None:
        fail = next((e for e in events if e["event"] == "fail"), None)
        if fail is not None:
            d = fail.get("detail", {})
            boot.error = f"{fail['phase']} failed: {d.get('name')} ({d.get('code')}): {d.get('error')}"
        else:
            boot.error = "the boot failed:\n" + _tail(log)
    if boot.ok and boot.phases.get("ready") is None:
        boot.ok, boot.error = False, "the worker answered but its timeline has no ready event"
    return boot


def _first_job(
    proc: subprocess.Popen[bytes], boot: Boot, port: int, job: Mapping[str, Any], deadline: float
) -> float | None:
    """Wait for the local API, POST the job; returns the answer's ``time.time()`` or None."""
    while True:
        code = proc.poll()
        if code is not None:
            boot.exit_code = code
            return None
        if time.monotonic() > deadline:
            boot.error = "timed out waiting for the worker's local API"
            return None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.02)
    remaining = max(1.0, deadline - time.monotonic())
    try:
        status, body = post_job(f"http://127.0.0.1:{port}/runsync", job, remaining)
    except (OSError, ValueError) as err:
        boot.error = f"the first job got no answer: {type(err).__name__}: {err}"
        boot.exit_code = proc.poll()
        return None
    answered = time.time()
    boot.job_status = body.get("status") if isinstance(body, dict) else None
    output = body.get("output") if isinstance(body, dict) else None
    if isinstance(output, dict) and isinstance(output.get("status"), str):
        boot.health = output["status"]
    if status == 200 and boot.job_status == "COMPLETED":
        boot.ok = True
    else:
        boot.error = f"the first job answered HTTP {status}: {json.dumps(body)[:800]}"
    return answered


def phases_from(
    events: list[dict[str, Any]], started: float, answered: float | None
) -> dict[str, float | None]:
    """A boot's phases (ms) from its timeline events; None for a phase that never ended."""
    out: dict[str, float | None] = dict.fromkeys(PHASES)
    ready_ts: float | None = None
    for e in events:
        if e.get("event") != "end":
            continue
        phase = e.get("phase")
        if phase in BOOT_PHASES and out[phase] is None:
            out[phase] = float(e.get("ms", 0.0))
        elif phase == "ready" and ready_ts is None:
            ready_ts = float(e["ts"])
            out["ready"] = float(e["ms"]) if e.get("ms") is not None else (ready_ts - started) * 1000
    if answered is not None:
        out["total"] = round((answered - started) * 1000, 1)
        if ready_ts is not None:
            out["first_job"] = round(max(0.0, answered - ready_ts) * 1000, 1)
    return out


def startup_ms(phases: Mapping[str, float | None]) -> float | None:
    """What ``total`` holds beyond the named phases (interpreters, exec, the SDK's server)."""
    total = phases.get("total")
    if total is None:
        return None
    named = sum(phases.get(p) or 0.0 for p in (*BOOT_PHASES, "first_job"))
    return round(max(0.0, total - named), 1)


# -- scenarios -----------------------------------------------------------------------------


class Runner:
    """Runs the scenarios of one ``bootstrap timing`` invocation."""

    def __init__(self, settings: Settings, opts: Options, *, say: Callable[[str], None] = print) -> None:
        from bootstrap.render import render

        self.settings = settings
        self.opts = opts
        self.say = say
        self.out = opts.out.resolve()
        self.scratch = (opts.scratch or self.out / "scratch").resolve()
        self.logs = self.out / "logs"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start_sh = render(settings, None, self.scratch / "start.sh", [])
        self._warm: Path | None = None
        self._made: list[Path] = []
        # The settings a boot sees (extras, manifest, mirror after the pass-through options).
        self.boot_settings = Settings.from_env(boot_environ(settings, opts, self.scratch, "timing", 1))

    # volumes
    def volume(self, name: str) -> Path:
        root = new_volume(self.scratch, name, self.opts.seed_cache)
        self._made.append(root)
        return root

    def cleanup(self) -> None:
        if self.opts.keep:
            return
        for root in self._made:
            shutil.rmtree(root, ignore_errors=True)

    def worker_id(self, scenario: str, rep: int, n: int = 0) -> str:
        return f"timing-{scenario}-r{rep}-w{n}-{uuid.uuid4().hex[:6]}"

    def boot(self, volume: Path, worker_id: str) -> Boot:
        port = free_port()
        env = boot_environ(self.settings, self.opts, volume, worker_id, port)
        return drive(
            [str(self.start_sh)],
            env,
            cwd=self.settings.app_dir,
            volume=volume,
            worker_id=worker_id,
            port=port,
            job=self.opts.job,
            log=self.logs / f"{worker_id}.out",
            timeout_s=self.opts.timeout_s,
        )

    def warm_volume(self) -> tuple[Path | None, Boot | None]:
        """A volume holding everything (made by one untimed cold boot), shared by warm and recover."""
        if self._warm is None:
            root = self.volume("warm")
            prep = self.boot(root, self.worker_id("prepare", 0))
            if not prep.ok:
                return None, prep
            self._warm = root
        return self._warm, None

    # scenarios
    def run(self, scenario: Scenario, rep: int) -> dict[str, Any]:
        """One repeat of a scenario: ``{"ok", "phases", "boots"}`` (phases of the slowest boot)."""
        boots: list[Boot]
        if scenario.name == "cold":
            root = self.volume("cold")
            boots = [self.boot(root, self.worker_id("cold", rep))]
            if boots[0].ok:
                self._warm = root  # the next warm boot needs no untimed preparation
        elif scenario.name == "warm":
            boots = [self.warm(rep)]
        elif scenario.name == "concurrent":
            boots = self.concurrent(scenario.workers, rep)
        elif scenario.name == "recover":
            boots = [self.recover(rep)]
        else:
            boots = [self.baseline(rep)]
        for b in boots:
            b.phases["startup"] = startup_ms(b.phases)
        ok = all(b.ok for b in boots)
        slowest = max(boots, key=lambda b: b.phases.get("total") or float("inf"))
        return {"ok": ok, "phases": dict(slowest.phases), "boots": [b.to_json() for b in boots]}

    def concurrent(self, workers: int, rep: int) -> list[Boot]:
        """N boots at once on one empty volume; once all succeed it is a warm volume too."""
        root = self.volume(f"concurrent{workers}")
        results: list[Boot | None] = [None] * workers
        ids = [self.worker_id("concurrent", rep, n) for n in range(workers)]

        def one(n: int) -> None:
            results[n] = self.boot(root, ids[n])

        threads = [threading.Thread(target=one, args=(n,), name=f"timing-{n}") for n in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        boots = [b or Boot(worker_id=ids[n], error="the boot thread died") for n, b in enumerate(results)]
        if all(b.ok for b in boots):
            self._warm = root
        return boots

    def warm(self, rep: int) -> Boot:
        root, failed = self.warm_volume()
        if root is None:
            assert failed is not None
            return failed
        return self.boot(root, self.worker_id("warm", rep))

    def recover(self, rep: int) -> Boot:
        root, failed = self.warm_volume()
        if root is None:
            assert failed is not None
            return failed
        worker_id = self.worker_id("recover", rep)
        try:
            victim = corrupt_one(Volume(root, "timing"), self.opts.corrupt)
        except ConfigError as err:
            return Boot(worker_id=worker_id, error=f"{err.message} ({err.hint})")
        self.say(f"  recover: corrupted {victim} ({self.opts.corrupt})")
        before = count_files(Volume(root, "timing").quarantine)
        boot = self.boot(root, worker_id)
        boot.quarantined = count_files(Volume(root, "timing").quarantine) - before
        if boot.ok and boot.quarantined < 1:
            boot.ok = False
            boot.error = f"the corrupted {victim} was not detected: nothing was quarantined"
        return boot

    def baseline(self, rep: int) -> Boot:
        root = self.volume("baseline")
        return run_baseline(self, root, self.worker_id("baseline", rep))


def count_files(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(len(files) for _, _, files in os.walk(path))


def corrupt_one(volume: Volume, how: str) -> str:
    """Corrupt the first verified single model file on the volume; returns its dest.

    ``truncate`` halves it; ``overwrite`` replaces its bytes with an HTML error page padded to
    the same size (FAILURES F6, with the size still matching).
    """
    records = sorted(volume.verified.rglob("*.json")) if volume.verified.is_dir() else []
    for record in records:
        dest = str(record.relative_to(volume.verified))[: -len(".json")]
        target = volume.models / dest
        if not target.is_file():
            continue  # an unpacked zip's directory: pick a single file instead
        size = target.stat().st_size
        if how == "overwrite":
            page = b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>\n"
            data = (page * (size // len(page) + 1))[:size]
        else:
            data = target.read_bytes()[: size // 2]
        # A new inode: the verified file may share its inode with a mirror or another volume.
        tmp = target.with_name(f".{target.name}.corrupt")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return dest
    raise ConfigError(
        "recover needs a verified model file on the volume, and there is none",
        hint="select a capability with model files (--extras) and a manifest listing them (--manifest)",
    )


# -- the baseline recipe -------------------------------------------------------------------


def export_requirements(settings: Settings, extras: Sequence[str], target: Path) -> Path:
    """The same pins as the env, as a requirements.txt (``uv export``; untimed: an image has it)."""
    from bootstrap.env import find_uv

    cmd = [find_uv(), "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--no-header"]
    for extra in extras:
        cmd += ["--extra", extra]
    env = {k: v for k, v in settings.environ.items() if k != "VIRTUAL_ENV"}
    proc = subprocess.run(cmd, cwd=settings.project_dir, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(
            f"uv export failed: {proc.stderr.strip()[-1500:]}", hint="check uv.lock and --extras"
        )
    target.write_text(proc.stdout, encoding="utf-8")
    return target


def plain_url(f: ModelFile, mirror: str | None, environ: Mapping[str, str]) -> str:
    """Where the plain recipe downloads a file from: the mirror by dest, else the file's source."""
    if mirror:
        if "://" not in mirror:
            return Path(mirror, f.dest).resolve().as_uri()
        if mirror.startswith(("http://", "https://", "file://")):
            return mirror.rstrip("/") + "/" + urllib.parse.quote(f.dest)
        raise ConfigError(
            f"baseline cannot download from {mirror}", hint="give a directory or https:// mirror"
        )
    parts = urllib.parse.urlsplit(f.source)
    if parts.scheme == "hf":
        path = parts.path.lstrip("/").split("/")
        repo, inner = f"{parts.netloc}/{path[0]}", "/".join(path[1:])
        revision = urllib.parse.parse_qs(parts.query).get("revision", ["main"])[0]
        endpoint = environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{repo}/resolve/{revision}/{inner}"
    if parts.scheme in ("https", "http", "file"):
        return f.source
    raise ConfigError(
        f"baseline cannot download {f.source}", hint="give a directory or https:// mirror (--mirror)"
    )


def download_plain(url: str, target: Path, environ: Mapping[str, str]) -> int:
    """One stream, no verification: what ``wget``/``urlretrieve`` in a start script does."""
    target.parent.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request(url)  # noqa: S310 - the operator's own mirror or manifest source
    token = environ.get("HF_TOKEN")
    if token and "huggingface" in url:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as resp, open(target, "wb") as out:  # noqa: S310 - the operator's own sources
        shutil.copyfileobj(resp, out, 1024 * 1024)
    return target.stat().st_size


def run_baseline(runner: Runner, root: Path, worker_id: str) -> Boot:
    """``python -m venv`` + ``pip install``, single-stream weights, then the worker started directly."""
    from bootstrap.env import interpreter_identity
    from bootstrap.run import worker_environ

    settings, bs = runner.settings, runner.boot_settings
    base = root / "baseline"
    base.mkdir(parents=True)
    log = runner.logs / f"{worker_id}.out"
    boot = Boot(worker_id=worker_id, log=str(log))
    try:
        requirements = export_requirements(settings, bs.extras, root / "requirements.txt")
        files = selected(load_manifest(bs.manifest), bs.extras)
    except ConfigError as err:
        boot.error = f"{err.message} ({err.hint})"
        return boot
    env = {k: v for k, v in settings.environ.items() if k not in ("VIRTUAL_ENV", *_PER_BOOT)}
    env["PIP_CACHE_DIR"] = str(base / "pip-cache")  # empty, as on a fresh container
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    venv = base / "venv"
    python = interpreter_identity()["path"]
    t0 = time.time()
    with open(log, "wb") as out:
        for cmd in (
            [python, "-m", "venv", str(venv)],
            # --no-deps: the export is the full pinned closure, as uv installs it (the project's
            # dependency overrides drop packages a re-resolving pip would pull back in).
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-r", str(requirements)],
        ):
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.run(cmd, env=env, cwd=base, stdout=out, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                boot.exit_code = proc.returncode
                boot.error = f"baseline env failed: {' '.join(cmd[:4])}…\n{_tail(log)}"
                return boot
    t_env = time.time()
    models: dict[str, str] = {}
    try:
        for f in files:
            target = base / "models" / f.dest
            download_plain(plain_url(f, bs.mirror, settings.environ), target, settings.environ)
            if f.format == "zip":
                with zipfile.ZipFile(target) as z:
                    z.extractall(base / "models" / f.unpack)  # the plain recipe: unchecked on purpose
                target.unlink()
            models[f.published_dest] = str(base / "models" / f.published_dest)
    except (OSError, ValueError, zipfile.BadZipFile, ConfigError) as err:
        boot.error = f"baseline weights failed: {err}"
        return boot
    t_weights = time.time()
    plan = Plan(
        worker_id=worker_id,
        volume=str(root),
        app_dir=str(settings.app_dir),
        env_key="baseline",
        env_path=str(venv),
        python=str(venv / "bin" / "python"),
        env_reused=False,
        capabilities={c: Capability(required=not bs.is_optional(c)) for c in bs.extras},
        models=models,
        boot_started=t0,
    )
    plan_path = root / "baseline" / "plan.json"
    write_plan(plan_path, plan)
    port = free_port()
    wsettings = Settings.from_env(boot_environ(settings, runner.opts, root, worker_id, port))
    boot = drive(
        [str(venv / "bin" / "python"), "-m", "worker", "--plan", str(plan_path)],
        worker_environ(wsettings, plan_path),
        cwd=settings.app_dir,
        volume=root,
        worker_id=worker_id,
        port=port,
        job=runner.opts.job,
        log=log.with_suffix(".worker.out"),
        timeout_s=runner.opts.timeout_s,
        started=t0,
    )
    boot.phases["env"] = round((t_env - t0) * 1000, 1)
    boot.phases["weights"] = round((t_weights - t_env) * 1000, 1)
    boot.env_reused = False
    return boot


# -- summaries, table, chart ---------------------------------------------------------------


def summarize(repeats: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Median, min and max per phase over the repeats that succeeded."""
    good = [r["phases"] for r in repeats if r["ok"]]
    out: dict[str, dict[str, float | None]] = {"median": {}, "min": {}, "max": {}}
    for phase in (*PHASES, "startup"):
        values = [float(p[phase]) for p in good if p.get(phase) is not None]
        out["median"][phase] = round(statistics.median(values), 1) if values else None
        out["min"][phase] = min(values) if values else None
        out["max"][phase] = max(values) if values else None
    return out


def _cell(results: Mapping[str, Any], phase: str, spread: bool) -> str:
    med = results["median"].get(phase)
    if med is None:
        return "–"
    text = f"{med / 1000:.2f}"
    if spread:
        text += f" [{results['min'][phase] / 1000:.2f}–{results['max'][phase] / 1000:.2f}]"
    return text


def table(report: Mapping[str, Any]) -> str:
    """The readable table: seconds per phase (median [min–max] with repeats), and × baseline."""
    spread = int(report["config"]["repeat"]) > 1
    heads = ["scenario", *SEGMENTS, "total", "× baseline"]
    base = next((s for s in report["scenarios"] if s["name"] == "baseline"), None)
    base_total = base["median"].get("total") if base else None
    rows = []
    for s in report["scenarios"]:
        label = s["label"] + ("" if s["ok"] else " (FAILED)")
        row = [label, *[_cell(s, p, spread) for p in (*SEGMENTS, "total")]]
        total = s["median"].get("total")
        row.append(f"{total / base_total:.2f}×" if total and base_total else "–")
        rows.append(row)
        for n, w in enumerate(s.get("per_worker", [])):
            wrow = [f"  #{n + 1} of {s['workers']}", *[_cell(w, p, spread) for p in (*SEGMENTS, "total")], ""]
            rows.append(wrow)
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    lines.append(
        f"seconds; median of {report['config']['repeat']} repeat(s)" + (" [min–max]" if spread else "")
    )
    return "\n".join(lines)


COLORS = {
    "preflight": "#9e9e9e",
    "env": "#1f77b4",
    "weights": "#ff7f0e",
    "import": "#2ca02c",
    "warm": "#d62728",
    "startup": "#bcbd22",
    "first_job": "#9467bd",
}
LABELS = {"first_job": "first job", "startup": "startup (interpreters, exec, API)"}


def chart(report: Mapping[str, Any], path: Path) -> Path:
    """The waterfall: one horizontal bar per scenario, its phases stacked in boot order.

    Each bar is the scenario's median phases; a whisker spans the min–max of the totals; the
    label at the end gives the total and its ratio to the baseline's.
    """
    import matplotlib  # the `timing` dependency group; never needed by a boot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in report["scenarios"] if s["median"].get("total") is not None]
    base = next((s["median"]["total"] for s in scenarios if s["name"] == "baseline"), None)
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.7 * max(1, len(scenarios))), dpi=130)
    ys = list(range(len(scenarios)))[::-1]
    longest = max((s["max"].get("total") or s["median"]["total"] for s in scenarios), default=1.0) / 1000
    for seg in SEGMENTS:
        for y, s in zip(ys, scenarios, strict=True):
            med = s["median"]
            left = sum((med.get(p) or 0.0) for p in SEGMENTS[: SEGMENTS.index(seg)]) / 1000
            width = (med.get(seg) or 0.0) / 1000
            label = LABELS.get(seg, seg) if y == ys[0] else None
            ax.barh(
                y, width, left=left, height=0.62, color=COLORS[seg], edgecolor="white", lw=0.6, label=label
            )
            if width > 0.035 * longest:
                ax.text(
                    left + width / 2, y, f"{width:.1f}", ha="center", va="center", fontsize=8, color="white"
                )
    for y, s in zip(ys, scenarios, strict=True):
        total = s["median"]["total"] / 1000
        lo, hi = (
            (s["min"].get("total") or total * 1000) / 1000,
            (s["max"].get("total") or total * 1000) / 1000,
        )
        if hi > lo:
            whisker = [[total - lo], [hi - total]]
            # Just above the bar, clear of the segment labels: min–max of the totals.
            ax.errorbar(total, y + 0.38, xerr=whisker, fmt="none", ecolor="#333333", capsize=2, lw=1)
        text = f"{total:.1f} s"
        if base and s["name"] != "baseline":
            text += f"  ({total * 1000 / base:.2f}× baseline)"
        ax.text(total + longest * 0.012, y, text, va="center", fontsize=9, fontweight="bold")
    ax.set_yticks(ys, [s["label"] + ("" if s["ok"] else " (failed)") for s in scenarios])
    ax.set_xlim(0, longest * 1.3)
    ax.set_xlabel("seconds from container start to the first job's answer")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if scenarios:
        ax.legend(
            loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(SEGMENTS), fontsize=8, frameon=False
        )
    else:
        ax.text(0.5, 0.5, "no boot succeeded", transform=ax.transAxes, ha="center", va="center")
    machine, config = report["machine"], report["config"]
    extras = ",".join(config["extras"]) or "base only"
    fig.suptitle(
        f"bootstrap cold start by phase — median of {config['repeat']}, extras: {extras}\n"
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, {report['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_start": _load_avg(),
    }


def _load_avg() -> list[float] | None:
    """The 1/5/15-minute load averages: other work on the machine skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- entry point ---------------------------------------------------------------------------


def run_timing(settings: Settings, opts: Options, *, say: Callable[[str], None] = print) -> int:
    """Run every scenario ``opts.repeat`` times; write the JSON and the chart; print the table.

    Returns 0 when every boot succeeded, 1 otherwise.
    """
    if opts.repeat < 1:
        raise ConfigError("--repeat must be at least 1", hint="e.g. --repeat 3")
    if opts.seed_cache is not None and not opts.seed_cache.is_dir():
        raise ConfigError(
            f"--seed-cache {opts.seed_cache} is not a directory", hint="give a uv cache directory"
        )
    draw = opts.chart and importlib.util.find_spec("matplotlib") is not None
    if opts.chart and not draw:
        say(
            "note: no chart — matplotlib is missing (`uv sync --group timing`); the table and JSON still come"
        )
    runner = Runner(settings, opts, say=say)
    bs = runner.boot_settings
    report: dict[str, Any] = {
        "version": 1,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "repeat": opts.repeat,
            "extras": list(bs.extras),
            "manifest": str(bs.manifest),
            "mirror": bs.mirror,
            "job": job_summary(opts.job),
            "seed_cache": str(opts.seed_cache) if opts.seed_cache else None,
            "corrupt": opts.corrupt,
            "scratch": str(runner.scratch),
        },
        "phases": [*PHASES, "startup"],
        "scenarios": [],
    }
    try:
        for scenario in opts.scenarios:
            repeats = []
            for rep in range(opts.repeat):
                say(f"{scenario.label}: repeat {rep + 1}/{opts.repeat} …")
                result = runner.run(scenario, rep)
                for b in result["boots"]:
                    if not b["ok"]:
                        say(f"  {b['worker_id']} FAILED (exit {b['exit_code']}): {b['error']}")
                        say(f"  its output: {b['log']}")
                total = result["phases"].get("total")
                say(f"  {'ok' if result['ok'] else 'FAILED'}" + (f", {total / 1000:.2f} s" if total else ""))
                repeats.append(result)
            entry: dict[str, Any] = {
                "name": scenario.name,
                "label": scenario.label,
                "workers": scenario.workers,
                "ok": all(r["ok"] for r in repeats),
                "repeats": repeats,
                **summarize(repeats),
            }
            if scenario.name == "concurrent" and scenario.workers > 1:
                entry["per_worker"] = per_worker(repeats, scenario.workers)
            report["scenarios"].append(entry)
    finally:
        if not opts.keep:
            say("removing the scratch volumes …")
        runner.cleanup()
    report["machine"]["load_avg_end"] = _load_avg()
    opts.out.mkdir(parents=True, exist_ok=True)
    json_path = opts.out / "timing.json"
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    say("")
    say(table(report))
    m = report["machine"]
    load = f"load average {(m['load_avg_start'] or ['?'])[0]} → {(m['load_avg_end'] or ['?'])[0]}"
    say(f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {load}; {report['date']}")
    say(f"\nwrote {json_path}")
    if draw:
        say(f"wrote {chart(report, opts.out / 'timing.png')}")
    return 0 if all(s["ok"] for s in report["scenarios"]) else 1


def per_worker(repeats: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Concurrent boots ranked by total within each repeat (#1 fastest), then summarized by rank."""
    ranked: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    for r in repeats:
        boots = sorted(r["boots"], key=lambda b: b["phases"].get("total") or float("inf"))
        for n, b in enumerate(boots):
            ranked[n].append({"ok": b["ok"], "phases": b["phases"]})
    return [summarize(rank) for rank in ranked]


def job_summary(job: Mapping[str, Any]) -> Any:
    """The job as the report records it: whole when small, else its task, keys and size."""
    text = json.dumps(job)
    if len(text) <= 2000:
        return job
    inp = job.get("input") or {}
    return {"task": inp.get("task", "faceswap"), "keys": sorted(inp), "bytes": len(text)}


def options_from_args(args: Any) -> Options:
    """The command line (`bootstrap.cli`) → `Options`."""
    job = dict(HEALTH_JOB)
    if args.job:
        raw = args.job
        if raw.startswith("@"):  # a file: a real job's base64 images outgrow one argument (128 KiB)
            try:
                raw = Path(raw[1:]).read_text(encoding="utf-8")
            except OSError as err:
                raise ConfigError(f"--job {args.job}: {err}", hint="give --job JSON or --job @FILE") from None
        try:
            job = json.loads(raw)
        except ValueError as err:
            raise ConfigError(
                f"--job is not JSON: {err}", hint='e.g. --job \'{"input": {"task": "health"}}\''
            ) from None
        if not isinstance(job, dict) or not isinstance(job.get("input"), dict):
            raise ConfigError(
                "--job must be a RunPod job object with an 'input' object", hint='e.g. {"input": {...}}'
            )
    return Options(
        scenarios=parse_scenarios(args.scenario),
        repeat=args.repeat,
        out=Path(args.out),
        scratch=Path(args.scratch) if args.scratch else None,
        job=job,
        extras=args.extras,
        manifest=args.manifest,
        mirror=args.mirror,
        seed_cache=Path(args.seed_cache).resolve() if args.seed_cache else None,
        corrupt=args.corrupt,
        timeout_s=args.timeout,
        keep=args.keep,
        chart=not args.no_chart,
    )
