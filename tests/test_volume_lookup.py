"""BOOTSTRAP_VOLUME naming a missing directory: `serve` (a local run) creates it, `run` refuses it."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import base_environ, run_bootstrap


def _project(tmp_path: Path) -> Path:
    """A project with no capabilities and no uv.lock: a boot gets past the volume, then fails in env."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "p"\nversion = "0"\n')
    return project


def test_serve_creates_a_missing_volume_directory(tmp_path: Path) -> None:
    volume = tmp_path / "not" / "yet"
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="", BOOTSTRAP_PROJECT_DIR=str(_project(tmp_path))
    )
    proc = run_bootstrap(["serve", "--port", "1"], env, cwd=tmp_path)
    assert volume.is_dir() and (volume / ".bootstrap" / "envs").is_dir(), proc.stderr
    assert proc.returncode == 12, proc.stderr  # past the volume and preflight: no uv.lock in env


def test_run_refuses_a_missing_volume_directory(tmp_path: Path) -> None:
    volume = tmp_path / "not" / "mounted"
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="", BOOTSTRAP_PROJECT_DIR=str(_project(tmp_path))
    )
    proc = run_bootstrap(["run"], env, cwd=tmp_path)
    assert proc.returncode == 10, proc.stderr
    assert "does not exist" in proc.stderr
    assert not volume.exists()
