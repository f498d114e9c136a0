"""``BOOTSTRAP_MIRROR`` and the http(s) rule every source URL obeys (SPEC §6).

Kept apart from `bootstrap.weights.sources` so preflight can check the mirror without importing
``http.client`` and ``ssl``: a warm boot, which fetches nothing, never pays for them.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from bootstrap.errors import ConfigError
from bootstrap.urls import is_loopback_host, scheme_of, scrub_passwords, shown


def check_http(url: str, what: str) -> None:
    """`ConfigError` (exit 2) unless ``url`` is https://, or plain http:// to a loopback host."""
    parts = urlsplit(url)
    scheme = scheme_of(url)
    if scheme == "http" and not is_loopback_host(parts.hostname or ""):
        raise ConfigError(
            f"{what} {shown(url)!r} is plain http:// to a non-loopback host",
            hint="use https:// (plain http is only accepted on 127.0.0.1 for tests)",
        )
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {shown(url)!r} is not an https:// URL", hint="use https://HOST/...")


def check_mirror(mirror: str) -> None:
    """`ConfigError` (exit 2) unless ``BOOTSTRAP_MIRROR`` is a directory, https://, s3:// or file://.

    Schemes are case-insensitive (``HTTPS://`` is https); anything else with ``://`` is refused
    rather than taken for a directory name (which would print its password in every path).
    """
    scheme = scheme_of(mirror)
    hint = "set BOOTSTRAP_MIRROR to a directory, an https:// base, s3://bucket/prefix or file:///dir"
    if not scheme:
        if "://" in mirror:
            raise ConfigError(
                f"BOOTSTRAP_MIRROR {scrub_passwords(mirror)!r} is not a URL or a directory", hint=hint
            )
        return
    if scheme in ("https", "http"):
        check_http(mirror, "BOOTSTRAP_MIRROR")
    elif scheme == "s3":
        if not urlsplit(mirror).netloc:
            raise ConfigError(f"BOOTSTRAP_MIRROR {shown(mirror)!r} is not s3://BUCKET[/PREFIX]", hint=hint)
    elif scheme != "file":
        raise ConfigError(f"BOOTSTRAP_MIRROR {shown(mirror)!r}: unsupported scheme {scheme!r}", hint=hint)


def mirror_url(mirror: str, dest: str) -> str:
    """Where ``BOOTSTRAP_MIRROR`` holds ``dest``: a directory, an https:// base or s3://bucket/prefix."""
    check_mirror(mirror)
    scheme = scheme_of(mirror)
    if scheme in ("https", "http", "s3"):
        return mirror.rstrip("/") + "/" + quote(dest)
    if scheme == "file":
        mirror = unquote(urlsplit(mirror).path)
    return Path(mirror, dest).resolve().as_uri()
