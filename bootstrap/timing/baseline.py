"""The baseline: the recipe this project replaces (venv + pip, one-stream weights, the worker started directly)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bootstrap.childenv import child_environ
from bootstrap.env import find_uv, interpreter_identity
from bootstrap.errors import ConfigError
from bootstrap.manifest import ModelFile, load_manifest, selected
from bootstrap.plan import Capability, Plan, write_plan
from bootstrap.settings import HF_DEFAULT_ENDPOINT, HF_ENDPOINT, HF_TOKEN, Settings
from bootstrap.timing.boot import PER_BOOT, Boot, boot_environ, drive, free_port, tail
from bootstrap.urls import parse_hf, scheme_of

if TYPE_CHECKING:
    from bootstrap.timing.scenarios import Runner


def export_requirements(settings: Settings, extras: Sequence[str], target: Path) -> Path:
    """The same pins as the env, as a requirements.txt (``uv export``; untimed: an image has it)."""
    cmd = [find_uv(), "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--no-header"]
    for extra in extras:
        cmd += ["--extra", extra]
    env = child_environ(settings.environ)
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
    scheme = scheme_of(f.source)
    if scheme == "hf":
        return parse_hf(f.source).resolve_url(environ.get(HF_ENDPOINT) or HF_DEFAULT_ENDPOINT)
    if scheme in ("https", "http", "file"):
        return f.source
    raise ConfigError(
        f"baseline cannot download {f.source}", hint="give a directory or https:// mirror (--mirror)"
    )


def download_plain(url: str, target: Path, environ: Mapping[str, str]) -> int:
    """One stream, no verification: what ``wget``/``urlretrieve`` in a start script does."""
    target.parent.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request(url)  # noqa: S310 - the operator's own mirror or manifest source
    token = environ.get(HF_TOKEN)
    if token and "huggingface" in url:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as resp, open(target, "wb") as out:  # noqa: S310 - the operator's own sources
        shutil.copyfileobj(resp, out, 1024 * 1024)
    return target.stat().st_size


def run_baseline(runner: Runner, root: Path, worker_id: str) -> Boot:
    """``python -m venv`` + ``pip install``, single-stream weights, then the worker started directly."""
    from bootstrap.run import worker_environ  # run imports the whole boot: only when a baseline runs

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
    env = child_environ(settings.environ, drop=PER_BOOT)
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
                boot.error = f"baseline env failed: {' '.join(cmd[:4])}…\n{tail(log)}"
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
    port = free_port()
    wsettings = Settings.from_env(boot_environ(settings, runner.opts, root, worker_id, port))
    plan.carry(wsettings)
    write_plan(plan_path, plan)
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
