"""The weights manifest, ``worker/models.toml`` (SPEC §6): parsed and checked once.

Every mistake in it is a CONFIG error (exit 2) naming the entry, so a typo never turns into a
download of the wrong thing or a model path the worker cannot find (FAILURES F3).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from bootstrap.errors import ConfigError
from bootstrap.urls import NotHfRef, is_loopback_host, parse_hf

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


def _safe_relative(value: str, field: str, index: int) -> str:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts or value.startswith(".verified") or "\\" in value:
        raise ConfigError(
            f"manifest entry {index + 1}: {field} {value!r} must be a relative path inside models/ without '..'",
            hint="write dest like 'insightface/models/inswapper_128.onnx'",
        )
    return str(p)


def parse_manifest(text: str, *, origin: str = "models.toml") -> list[ModelFile]:
    """Parse and validate manifest text; raise `ConfigError` naming the first bad entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"{origin} is not valid TOML: {err}",
            hint="fix the syntax; every entry is a [[file]] table",
        ) from None
    entries = data.get("file", [])
    if not isinstance(entries, list):
        raise ConfigError(
            f"{origin}: 'file' must be an array of tables ([[file]])",
            hint="use [[file]] for each entry",
        )
    files: list[ModelFile] = []
    seen: set[str] = set()
    for i, raw in enumerate(entries):
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
        unpack = str(raw.get("unpack", ""))
        if fmt == "zip":
            if not unpack:
                raise ConfigError(
                    f"{origin}: {dest}: a zip needs 'unpack' (the directory to extract into)",
                    hint="e.g. unpack = 'insightface/models/buffalo_l'",
                )
            unpack = _safe_relative(unpack, "unpack", i)
        elif unpack:
            raise ConfigError(
                f"{origin}: {dest}: 'unpack' is only for format = 'zip'",
                hint="remove unpack or set format = 'zip'",
            )
        capability = str(raw.get("capability", "")).strip().lower()
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", capability):
            raise ConfigError(
                f"{origin}: {dest}: capability {capability!r} is missing or not a name",
                hint="name the capability (extra) that needs this file, e.g. 'faceswap'",
            )
        published = unpack or dest
        if published in seen:
            raise ConfigError(f"{origin}: {published} appears twice", hint="each dest must be unique")
        seen.add(published)
        files.append(ModelFile(dest, source, size, sha, fmt, unpack, capability))
    return files


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
    """Read and `parse_manifest` the file at ``path``; a missing file is a CONFIG error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"the weights manifest {path} does not exist",
            hint="set BOOTSTRAP_MANIFEST to the manifest's path (default worker/models.toml)",
        ) from None
    return parse_manifest(text, origin=str(path))


def selected(files: list[ModelFile], extras: tuple[str, ...]) -> list[ModelFile]:
    """Only files of selected capabilities are fetched (SPEC §6)."""
    return [f for f in files if f.capability in extras]
