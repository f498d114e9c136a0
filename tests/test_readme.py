"""The README's tables and commands are the contract users read: keep them true."""

from __future__ import annotations

from bootstrap import errors
from bootstrap.cli import build_parser
from bootstrap.settings import KNOWN
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def test_exit_code_table_is_the_codes_table() -> None:
    for e in errors.EXIT_CODES:
        assert f"| {e.code} | `{e.name}` | {e.meaning} | {e.todo} |" in README


def test_every_setting_is_documented() -> None:
    for name in KNOWN:
        assert f"`{name}`" in README, name


def test_every_wired_command_is_documented_and_the_two_commands_are_there() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"`bootstrap {name}" in README, name
    assert "python -m pip install uv && python -m uv run bootstrap serve" in README
    assert "python -m pip install uv && python -m uv run pytest" in README
    assert "python -m uv run pytest" in (REPO / ".ci" / "run").read_text()
