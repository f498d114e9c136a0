"""start.sh is rendered, strict and checked (FAILURES F1); the image's Dockerfile is sane (F2)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bootstrap.errors import ConfigError
from bootstrap.render import render_text
from tests.helpers import REPO, base_environ, run_bootstrap


def _bin(name: str) -> str:
    path = shutil.which(name) or str(Path(os.sys.executable).with_name(name))  # type: ignore[attr-defined]
    assert Path(path).exists(), f"{name} not installed (dev dependency)"
    return path


def test_rendered_start_sh_passes_bash_n_and_shellcheck(tmp_path: Path) -> None:
    out = tmp_path / "start.sh"
    proc = run_bootstrap(["render", "--output", str(out)], base_environ())
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "{{" not in text and "}}" not in text
    assert os.access(out, os.X_OK)
    subprocess.run(["bash", "-n", str(out)], check=True)
    sc = subprocess.run([_bin("shellcheck"), "--severity=style", str(out)], capture_output=True, text=True)
    assert sc.returncode == 0, sc.stdout
    # No logic beyond exec: the only commands are set, cd and exec of bootstrap run.
    commands = [
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[0] == "set -euo pipefail"
    assert commands[1].startswith("cd ")
    assert re.fullmatch(r'exec .*bootstrap run "\$@"', commands[-1]), commands[-1]
    assert len(commands) == 3


def test_bad_template_exits_2_with_a_hint(tmp_path: Path) -> None:
    template = tmp_path / "start.sh.tmpl"
    template.write_text("#!/usr/bin/env bash\nexec {{BOOTSTRAP}} run --volume {{VOLUME_PATH}}\n")
    proc = run_bootstrap(
        ["render", "--template", str(template), "--output", str(tmp_path / "start.sh")], base_environ()
    )
    assert proc.returncode == 2
    assert "no value for placeholder(s) VOLUME_PATH" in proc.stderr
    assert "hint: give each with --set NAME=VALUE" in proc.stderr
    assert not (tmp_path / "start.sh").exists()
    # Given the value, it renders; bash's own ${...} is left alone.
    template.write_text(
        '#!/usr/bin/env bash\necho "${HOME}"\nexec {{BOOTSTRAP}} run --volume {{VOLUME_PATH}}\n'
    )
    proc = run_bootstrap(["render", "--template", str(template), "--set", "VOLUME_PATH=/v"], base_environ())
    assert proc.returncode == 0, proc.stderr
    assert 'echo "${HOME}"' in (tmp_path / "start.sh").read_text()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("exec {{ BOOTSTRAP }}", "malformed placeholder"),
        ("exec {{bootstrap}}", "malformed placeholder"),
        ("exec {{BOOTSTRAP}", "malformed placeholder"),
        ("exec {{NOPE}}", "no value for placeholder(s) NOPE"),
    ],
)
def test_render_text_is_strict(template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        render_text(template, {"BOOTSTRAP": "b"})


def test_unused_set_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not used by the template"):
        render_text("exec {{BOOTSTRAP}}", {"BOOTSTRAP": "b", "APP_DIR": "/x"}, extra=frozenset({"APP_DIR"}))


def test_rendered_script_that_is_not_bash_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "t.tmpl"
    template.write_text("#!/usr/bin/env bash\nif then fi {{BOOTSTRAP}}\n")
    proc = run_bootstrap(["render", "--template", str(template)], base_environ())
    assert proc.returncode == 2
    assert "is not valid bash" in proc.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path / "start.sh").exists()


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile.runpod").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_every_copy_source_exists_in_the_repository() -> None:
    copies = [rest for word, rest in _dockerfile_instructions() if word in {"COPY", "ADD"}]
    assert copies
    for rest in copies:
        parts = [p for p in rest.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} is not in the repository (FAILURES F2)"
            assert not (REPO / ".dockerignore").exists() or src not in (REPO / ".dockerignore").read_text()


def test_image_is_slim_and_renders_start_sh_at_build() -> None:
    instructions = _dockerfile_instructions()
    text = " ".join(rest for _, rest in instructions).lower()
    assert instructions[0][0] == "FROM" and "slim" in instructions[0][1]
    for heavy in ("torch", "onnxruntime", "insightface", "huggingface-cli", "wget ", "curl "):
        assert heavy not in text, f"the image must not carry {heavy.strip()}"
    assert "bootstrap render" in text and "bash -n" in text
    assert instructions[-1] == ("CMD", '["/app/start.sh"]')
    # Build-time RUN steps never touch a volume (FAILURES F1).
    for word, rest in instructions:
        if word == "RUN":
            assert "runpod-volume" not in rest and "/workspace" not in rest and "bootstrap run" not in rest


def test_hadolint_passes() -> None:
    proc = subprocess.run([_bin("hadolint"), str(REPO / "Dockerfile.runpod")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_images_bootstrap_requirements_export_works() -> None:
    """The Dockerfile installs bootstrap's group from uv.lock with exactly this command."""
    proc = subprocess.run(
        ["uv", "export", "--frozen", "--only-group", "bootstrap", "--no-hashes", "--no-emit-project"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=base_environ(),
    )
    assert proc.returncode == 0, proc.stderr
    names = {line.split("==")[0] for line in proc.stdout.splitlines() if "==" in line}
    assert {"uv", "filelock", "psutil", "boto3"} <= names
    assert not names & {"torch", "onnxruntime", "onnxruntime-gpu", "runpod", "insightface"}
