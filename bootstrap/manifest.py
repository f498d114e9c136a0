"""The weights manifest, ``worker/models.toml`` (SPEC §6): parsed and checked once.

Every mistake in it is a CONFIG error (exit 2) naming the entry, so a typo never turns into a
download of the wrong thing or a model path the worker cannot find (FAILURES F3).
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from bootstrap.errors import ConfigError
from bootstrap.urls import NotHfRef, is_loopback_host, parse_hf, scheme_of, shown

FORMATS = ("onnx", "safetensors", "zip", "raw")
SCHEMES = ("hf", "https", "http", "s3", "file")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelFile:
    """One ``[[file]]`` entry."""

    dest: str
    source: str
    size: int
    sha256: str
    format: str
    unpack: str
    capability: str

    @property
    def published_dest(self) -> str:
        """What the worker is handed: the unpack directory for a zip, else ``dest``."""
        return self.unpack if self.format == "zip" else self.dest


@dataclass(frozen=True)
class ModelRepo:
    """One ``[[repo]]`` entry: a whole repository published as one directory (SPEC §6)."""

    dest: str
    source: str
    #: globs over the repository's paths (``fnmatch``: ``*`` also crosses ``/``); empty: every file
    include: tuple[str, ...]
    #: an explicit file list, for sources that cannot list (a mirror, https, s3, file)
    files: tuple[str, ...]
    capability: str

    @property
    def published_dest(self) -> str:
        return self.dest

    def wants(self, path: str) -> bool:
        """Is ``path`` one of this entry's files (by ``files``, else by ``include``)?"""
        if self.files:
            return path in self.files
        return not self.include or any(fnmatch.fnmatchcase(path, g) for g in self.include)


@dataclass(frozen=True)
class Manifest:
    files: tuple[ModelFile, ...]
    repos: tuple[ModelRepo, ...]

    def selected(self, extras: tuple[str, ...]) -> list[ModelFile | ModelRepo]:
        """Only entries of selected capabilities are fetched (SPEC §6), files first."""
        every: list[ModelFile | ModelRepo] = [*self.files, *self.repos]
        return [e for e in every if e.capability in extras]


def _safe_relative(value: str, field: str, index: int) -> str:
    """``value`` normalised (``./a//b`` is ``a/b``), then checked: relative, no ``..``, not
    inside ``.verified/`` and not ``.``, so ``./.verified/x`` is refused like ``.verified/x``."""
    p = PurePosixPath(value)
    norm = str(p)
    if (
        not value
        or "\\" in value
        or p.is_absolute()
        or ".." in p.parts
        or norm in ("", ".")
        or p.parts[0] == ".verified"
    ):
        raise ConfigError(
            f"manifest entry {index + 1}: {field} {value!r} must be a relative path inside models/ without '..'",
            hint="write dest like 'insightface/models/inswapper_128.onnx'",
        )
    return norm


def parse_manifest(text: str, *, origin: str = "models.toml") -> list[ModelFile]:
    """The ``[[file]]`` entries of manifest text (every entry validated; `parse_all` has both kinds)."""
    return list(parse_all(text, origin=origin).files)


def parse_all(text: str, *, origin: str = "models.toml") -> Manifest:
    """Parse and validate manifest text; raise `ConfigError` naming the first bad entry."""
    data = _load_toml(text, origin)
    seen: set[str] = set()
    files = _parse_files(data.get("file", []), origin, seen)
    repos = _parse_repos(data.get("repo", []), origin, seen, len(files))
    _check_overlaps([f.published_dest for f in files] + [r.dest for r in repos], origin)
    return Manifest(tuple(files), tuple(repos))


def _load_toml(text: str, origin: str) -> dict[str, Any]:
    """The manifest's TOML, holding only ``file`` and ``repo`` tables."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"{origin} is not valid TOML: {err}",
            hint="fix the syntax; every entry is a [[file]] table",
        ) from None
    unknown_tables = set(data) - {"file", "repo"}
    if unknown_tables:
        raise ConfigError(
            f"{origin}: unknown tables {sorted(unknown_tables)}",
            hint="the manifest holds [[file]] and [[repo]] entries only",
        )
    return data


def _parse_files(entries: object, origin: str, seen: set[str]) -> list[ModelFile]:
    """Every ``[[file]]`` entry, each published dest unique (added to ``seen``)."""
    if not isinstance(entries, list):
        raise ConfigError(
            f"{origin}: 'file' must be an array of tables ([[file]])",
            hint="use [[file]] for each entry",
        )
    files: list[ModelFile] = []
    for i, raw in enumerate(entries):
        f = _parse_file(raw, i, origin)
        if f.published_dest in seen:
            raise ConfigError(f"{origin}: {f.published_dest} appears twice", hint="each dest must be unique")
        seen.add(f.published_dest)
        files.append(f)
    return files


def _parse_file(raw: object, i: int, origin: str) -> ModelFile:
    """One ``[[file]]`` entry (the ``i``-th, from 0), validated."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: entry {i + 1} is not a table", hint="use [[file]] tables")
    unknown = set(raw) - {"dest", "source", "size", "sha256", "format", "unpack", "capability"}
    if unknown:
        raise ConfigError(
            f"{origin}: entry {i + 1} has unknown keys {sorted(unknown)}",
            hint="keys are dest, source, size, sha256, format, unpack, capability",
        )
    dest = _safe_relative(str(raw.get("dest", "")), "dest", i)
    source = str(raw.get("source", ""))
    scheme = urlsplit(source).scheme
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{origin}: {dest}: source {source!r} is not hf://, https://, s3:// or file://",
            hint="give the file's real source URL",
        )
    _check_source(source, dest, origin)
    size = raw.get("size", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ConfigError(
            f"{origin}: {dest}: size must be a non-negative integer (0 = unknown)",
            hint="size = 0 when the source does not publish it",
        )
    sha = str(raw.get("sha256", "")).lower()
    if sha and not _HEX64.fullmatch(sha):
        raise ConfigError(
            f"{origin}: {dest}: sha256 {sha!r} is not 64 hex digits",
            hint="leave sha256 empty unless the source publishes it",
        )
    fmt = str(raw.get("format", "raw"))
    if fmt not in FORMATS:
        raise ConfigError(
            f"{origin}: {dest}: format {fmt!r} is not one of {', '.join(FORMATS)}",
            hint="pick the file's real format",
        )
    unpack = _unpack(str(raw.get("unpack", "")), fmt, dest, i, origin)
    capability = str(raw.get("capability", "")).strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", capability):
        raise ConfigError(
            f"{origin}: {dest}: capability {capability!r} is missing or not a name",
            hint="name the capability (extra) that needs this file, e.g. 'faceswap'",
        )
    return ModelFile(dest, source, size, sha, fmt, unpack, capability)


def _unpack(unpack: str, fmt: str, dest: str, i: int, origin: str) -> str:
    """A zip's ``unpack`` directory (required, normalised); anything else has none."""
    if fmt == "zip":
        if not unpack:
            raise ConfigError(
                f"{origin}: {dest}: a zip needs 'unpack' (the directory to extract into)",
                hint="e.g. unpack = 'insightface/models/buffalo_l'",
            )
        return _safe_relative(unpack, "unpack", i)
    if unpack:
        raise ConfigError(
            f"{origin}: {dest}: 'unpack' is only for format = 'zip'",
            hint="remove unpack or set format = 'zip'",
        )
    return unpack


def _capability(raw: dict[str, object], dest: str, origin: str) -> str:
    capability = str(raw.get("capability", "")).strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", capability):
        raise ConfigError(
            f"{origin}: {dest}: capability {capability!r} is missing or not a name",
            hint="name the capability (extra) that needs this entry, e.g. 'faceswap'",
        )
    return capability


def _strings(raw: dict[str, object], key: str, dest: str, origin: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"{origin}: {dest}: {key} must be a list of non-empty strings",
            hint=f'e.g. {key} = ["*.json", "*.safetensors"]',
        )
    return tuple(value)


def _parse_repos(entries: object, origin: str, seen: set[str], offset: int) -> list[ModelRepo]:
    if not isinstance(entries, list):
        raise ConfigError(f"{origin}: 'repo' must be an array of tables ([[repo]])", hint="use [[repo]]")
    repos: list[ModelRepo] = []
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: repo entry {i + 1} is not a table", hint="use [[repo]] tables")
        unknown = set(raw) - {"dest", "source", "include", "files", "capability"}
        if unknown:
            raise ConfigError(
                f"{origin}: repo entry {i + 1} has unknown keys {sorted(unknown)}",
                hint="keys are dest, source, include, files, capability",
            )
        dest = _safe_relative(str(raw.get("dest", "")), "dest", offset + i)
        source = str(raw.get("source", ""))
        scheme = scheme_of(source)
        if scheme not in SCHEMES:
            raise ConfigError(
                f"{origin}: {dest}: source {shown(source)!r} is not hf://, https://, s3:// or file://",
                hint="give the repository's source: hf://ORG/REPO?revision=<40-hex commit> or a base URL",
            )
        include = _strings(raw, "include", dest, origin)
        files = tuple(
            _safe_relative(p, f"files entry of {dest}", offset + i)
            for p in _strings(raw, "files", dest, origin)
        )
        if scheme == "hf":
            try:
                ref = parse_hf(source, repo_only=True)
            except NotHfRef:
                ref = None
            if ref is None or not ref.pinned:
                raise ConfigError(
                    f"{origin}: {dest}: source {source!r} must be hf://ORG/REPO?revision=<40-hex commit>",
                    hint="pin the repository to a commit so every boot gets the same files",
                )
        else:
            _check_source(source.rstrip("/") + "/x", dest, origin)
            if not files:
                raise ConfigError(
                    f"{origin}: {dest}: a repository from {scheme}:// cannot be listed: give files = [...]",
                    hint="list the repository's paths in files, or use an hf:// source (its tree is listed)",
                )
        if dest in seen:
            raise ConfigError(f"{origin}: {dest} appears twice", hint="each dest must be unique")
        seen.add(dest)
        repos.append(ModelRepo(dest, source, include, files, _capability(raw, dest, origin)))
    return repos


def _check_overlaps(published: list[str], origin: str) -> None:
    """No published path may lie inside another (a file inside a repo's or a zip's directory)."""
    every = set(published)
    for b in published:
        a = next((str(p) for p in PurePosixPath(b).parents if str(p) in every), None)
        if a is not None:
            raise ConfigError(
                f"{origin}: {b} lies inside {a}, which another entry publishes",
                hint="give each entry its own path; one entry's directory cannot hold another's files",
            )


def _check_source(source: str, dest: str, origin: str) -> None:
    """The source's shape: hf:// pinned to a commit, s3://bucket/key, https (http on loopback only)."""
    parts = urlsplit(source)
    if parts.scheme == "hf":
        try:
            pinned = parse_hf(source).pinned
        except NotHfRef:
            pinned = False
        if not pinned:
            raise ConfigError(
                f"{origin}: {dest}: source {source!r} must be hf://ORG/REPO/PATH?revision=<40-hex commit>",
                hint="pin the Hub file to a commit (the repo's 'History' page gives it), so every boot gets the same bytes",
            )
    elif parts.scheme == "s3":
        if not parts.netloc or not parts.path.strip("/"):
            raise ConfigError(
                f"{origin}: {dest}: source {source!r} is not s3://BUCKET/KEY",
                hint="e.g. s3://my-bucket/models/x.onnx",
            )
    elif parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        if not host:
            raise ConfigError(
                f"{origin}: {dest}: source {source!r} has no host", hint="give a full https:// URL"
            )
        if parts.scheme == "http" and not is_loopback_host(host):
            raise ConfigError(
                f"{origin}: {dest}: source {source!r} is plain http://",
                hint="use https:// (plain http is only accepted on loopback, for tests)",
            )
    elif parts.scheme == "file" and not parts.path.startswith("/"):
        raise ConfigError(
            f"{origin}: {dest}: source {source!r} needs an absolute path", hint="file:///abs/path"
        )


def load_manifest(path: Path) -> list[ModelFile]:
    """The ``[[file]]`` entries of the manifest at ``path`` (`load_all` has the ``[[repo]]`` ones too)."""
    return list(load_all(path).files)


def load_all(path: Path) -> Manifest:
    """Read and `parse_all` the file at ``path``; any problem reading it is a CONFIG error."""
    hint = "set BOOTSTRAP_MANIFEST to the manifest's path (default worker/models.toml)"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"the weights manifest {path} does not exist", hint=hint) from None
    except IsADirectoryError:
        raise ConfigError(f"the weights manifest {path} is a directory, not a file", hint=hint) from None
    except OSError as err:
        raise ConfigError(
            f"the weights manifest {path} cannot be read: {err.strerror or err}", hint=hint
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"the weights manifest {path} is not UTF-8 text (byte {err.start})",
            hint="save the manifest as UTF-8 (TOML requires it)",
        ) from None
    return parse_all(text, origin=str(path))


def selected(files: list[ModelFile], extras: tuple[str, ...]) -> list[ModelFile]:
    """Only files of selected capabilities are fetched (SPEC §6)."""
    return [f for f in files if f.capability in extras]
