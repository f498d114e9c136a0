"""`bootstrap render`: ``start.sh.tmpl`` → ``start.sh``, strictly (FAILURES F1).

Placeholders are ``{{NAME}}``; bash's own ``${…}`` is left alone. A placeholder without a value,
a malformed one, or a ``--set`` the template never uses is an error (exit 2): a template that
renders is a template that says exactly what it meant. The result is checked with ``bash -n``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from bootstrap.atomic import write_atomic
from bootstrap.errors import ConfigError
from bootstrap.settings import Settings

PLACEHOLDER = re.compile(r"\{\{([A-Z][A-Z0-9_]*)\}\}")
ANY_BRACES = re.compile(r"\{\{.*?\}\}|\{\{|\}\}")


def default_values(settings: Settings) -> dict[str, str]:
    """Values every template may use, shell-quoted."""
    console = Path(sys.executable).with_name("bootstrap")
    command = (
        shlex.quote(str(console)) if console.is_file() else f"{shlex.quote(sys.executable)} -m bootstrap"
    )
    return {
        "APP_DIR": shlex.quote(str(settings.app_dir)),
        "BOOTSTRAP": command,
        "PYTHON": shlex.quote(sys.executable),
    }


def render_text(
    template: str,
    values: Mapping[str, str],
    *,
    origin: str = "template",
    extra: frozenset[str] = frozenset(),
) -> str:
    """Substitute every ``{{NAME}}``; raise `ConfigError` for missing or malformed placeholders.

    ``extra`` names values given explicitly (``--set``): each must appear in the template.
    """
    names = PLACEHOLDER.findall(template)
    stripped = PLACEHOLDER.sub("", template)
    bad = ANY_BRACES.findall(stripped)
    if bad:
        raise ConfigError(
            f"{origin}: malformed placeholder(s) {sorted(set(bad))}",
            hint="placeholders are {{NAME}} in capitals, e.g. {{APP_DIR}}",
        )
    missing = sorted(set(names) - set(values))
    if missing:
        raise ConfigError(
            f"{origin}: no value for placeholder(s) {', '.join(missing)}",
            hint=f"give each with --set NAME=VALUE; known: {', '.join(sorted(values))}",
        )
    unused = sorted(extra - set(names))
    if unused:
        raise ConfigError(
            f"{origin}: --set {', '.join(unused)} is not used by the template",
            hint="check the name against the template's {{NAME}} placeholders",
        )
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_sets(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not PLACEHOLDER.fullmatch("{{" + name + "}}"):
            raise ConfigError(f"--set {pair!r} is not NAME=VALUE", hint="e.g. --set APP_DIR=/app")
        out[name] = value
    return out


def check_bash(path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        return
    proc = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(
            f"the rendered {path} is not valid bash: {proc.stderr.strip()}",
            hint="fix start.sh.tmpl",
        )


def render(settings: Settings, template: Path | None, output: Path | None, sets: list[str]) -> Path:
    """Render the template to ``output`` (executable), check it, and return the path."""
    template = template or settings.app_dir / "start.sh.tmpl"
    output = output or template.with_name("start.sh")
    try:
        text = template.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"template {template} does not exist", hint="pass --template PATH") from None
    given = parse_sets(sets)
    values = {**default_values(settings), **given}
    rendered = render_text(text, values, origin=str(template), extra=frozenset(given))
    # start.sh must be executable by the container; it is published only once bash parses it.
    return write_atomic(output, rendered, mode=0o755, check=check_bash)
