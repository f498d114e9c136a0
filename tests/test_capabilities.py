from __future__ import annotations

from pathlib import Path

import pytest

from bootstrap.capabilities import capability_table, select
from bootstrap.errors import ConfigError
from tests.helpers import REPO, base_environ, run_bootstrap


def test_project_table_names_what_each_capability_needs() -> None:
    table = capability_table(REPO)
    assert table["faceswap"] == ()
    assert table["video"] == ("faceswap",)
    assert table["animate"] == ("video",)
    assert table["speech"] == ()


def test_closure_puts_needed_capabilities_first() -> None:
    table = capability_table(REPO)
    sel = select(("animate",), frozenset(), table)
    assert sel.extras == ("faceswap", "video", "animate")
    assert sel.optional == frozenset()


def test_implied_capability_is_optional_only_when_all_its_users_are() -> None:
    table = {"a": (), "b": ("a",), "c": ("a",)}
    assert select(("b",), frozenset({"b"}), table).optional == {"a", "b"}
    assert select(("b", "c"), frozenset({"b"}), table).optional == {"b"}
    # asked for by name: its own optional setting decides
    assert select(("a", "b"), frozenset({"b"}), table).optional == {"b"}


def test_unknown_capability_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        select(("faceswap", "tts"), frozenset(), capability_table(REPO))
    assert "tts" in str(info.value) and "speech" in str(info.value) and "faceswap" in str(info.value)
    assert info.value.exit_code == 2


def test_cycle_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="circle"):
        select(("a",), frozenset(), {"a": ("b",), "b": ("a",)})


def test_boot_with_unknown_extra_exits_2_before_any_env(volume: Path) -> None:
    proc = run_bootstrap(
        ["run", "--until", "env"],
        base_environ(BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="faceswap,nope"),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "nope" in proc.stderr and "known:" in proc.stderr
    assert not (volume / ".bootstrap" / "envs").exists() or not any(
        (volume / ".bootstrap" / "envs").iterdir()
    )
