"""Which capabilities a boot installs, fetches and loads: the closure of ``BOOTSTRAP_EXTRAS``.

A capability is a key of the project's ``[project.optional-dependencies]``. One capability may
need another by naming the project itself with that extra (``volume-worker[faceswap]`` inside
``video``); uv installs the packages of both, and the boot must also fetch the other's models and
load its pipeline, so the needed ones join the selection. Internal logic:

1. read the extras table of ``<project_dir>/pyproject.toml`` (standard library only);
2. refuse a requested name that is not a key (exit 2, listing the known ones);
3. add what each selected capability needs, depth first, needed ones before their users;
4. a capability that joined only because others need it is optional exactly when every
   capability that needs it is optional.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bootstrap.errors import ConfigError

_SELF_REF = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*\[([^\]]*)\]")


@dataclass(frozen=True)
class Selection:
    #: every capability to install, fetch and load; needed ones come before their users
    extras: tuple[str, ...]
    #: the capabilities whose failure degrades instead of stopping the boot
    optional: frozenset[str]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def capability_table(project_dir: Path) -> dict[str, tuple[str, ...]]:
    """Capability → the other capabilities it needs, from the project's pyproject.toml."""
    path = project_dir / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(
            f"cannot read the capabilities from {path}: {err}",
            hint="BOOTSTRAP_PROJECT_DIR must name the worker project (the directory with pyproject.toml)",
        ) from err
    project = data.get("project", {})
    me = _normal(str(project.get("name", "")))
    table: dict[str, tuple[str, ...]] = {}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        needs: list[str] = []
        for req in reqs:
            m = _SELF_REF.match(str(req))
            if m and _normal(m.group(1)) == me:
                needs += [n.strip() for n in m.group(2).split(",") if n.strip()]
        table[str(extra)] = tuple(needs)
    return table


def select(
    requested: tuple[str, ...], optional: frozenset[str], table: dict[str, tuple[str, ...]]
) -> Selection:
    """The closure of ``requested`` over ``table`` (see the module docstring)."""
    unknown = [n for n in requested if n not in table]
    if unknown:
        known = ", ".join(sorted(table)) or "none"
        raise ConfigError(
            f"BOOTSTRAP_EXTRAS names unknown capabilities: {', '.join(unknown)} (known: {known})",
            hint="set BOOTSTRAP_EXTRAS to a comma list of known capabilities (empty: only the base worker)",
        )
    order: list[str] = []
    needed_by: dict[str, set[str]] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            raise ConfigError(
                f"capabilities need each other in a circle: {' -> '.join((*trail, name))}",
                hint="fix [project.optional-dependencies] in pyproject.toml",
            )
        for dep in table.get(name, ()):
            needed_by.setdefault(dep, set()).add(name)
            visit(dep, (*trail, name))
        if name not in order:
            order.append(name)

    for name in requested:
        visit(name, ())
    opt = set(optional)
    # Decide implied capabilities from their users, users first (reverse of `order`).
    for name in reversed(order):
        if name in requested:
            continue
        users = needed_by.get(name, set())
        if users and all(u in opt for u in users):
            opt.add(name)
        else:
            opt.discard(name)
    return Selection(extras=tuple(order), optional=frozenset(opt))
