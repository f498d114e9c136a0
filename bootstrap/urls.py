"""URLs, one home: schemes, ``hf://`` references, credentials kept out of text, address checks.

Standard library only, and imported by the worker too (``worker.io`` judges job URLs with
`is_public_address`), so nothing here may import the rest of ``bootstrap``'s heavy parts.

- `scheme_of`: a URL's scheme, lower-cased (``HTTPS://`` is ``https``), or "" for a plain path.
- `HfRef` / `parse_hf`: ``hf://[datasets/|spaces/]ORG/REPO[/PATH]?revision=REV``; `HfRef.resolve_url`
  and `HfRef.tree_url` give the Hub's URLs for it.
- `scrub_passwords` and `shown`: ``scheme://user:password@host`` never reaches a log line; the
  password may itself hold ``@`` (the netloc ends at its *last* ``@``, as `urlsplit` reads it).
- `is_loopback_host` and `is_public_address`: the two address judgements; the second looks inside
  IPv6 forms that carry an IPv4 address (mapped, compatible, translated, NAT64, 6to4, Teredo).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

#: ``scheme://[user]:password@`` — the password runs to the netloc's last ``@`` (greedy, but
#: never past the end of the netloc: ``/``, ``?``, ``#`` or whitespace).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s:@]*):[^/?#\s]*@")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
HEX40 = re.compile(r"[0-9a-f]{40}")
HF_KINDS = ("datasets", "spaces")


def scheme_of(url: str) -> str:
    """The scheme of ``url`` lower-cased (schemes are case-insensitive), "" when it has none."""
    m = _SCHEME.match(url.strip())
    return m.group(1).lower() if m else ""


def scrub_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def shown(url: str) -> str:
    """A URL fit for logs: scheme, host, port and path only (no userinfo, no query, no fragment).

    Presigned URLs carry their credentials in the query string, mirrors in the userinfo.
    """
    try:
        p = urlsplit(url.strip())
        host = p.hostname or ""
        port = p.port
    except ValueError:
        return scrub_passwords(url.split("?", 1)[0])
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme_of(url) or p.scheme}://{netloc}{p.path}"


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what a credential is bound to."""
    p = urlsplit(url)
    scheme = p.scheme.lower()
    port = p.port if p.port is not None else {"https": 443, "http": 80}.get(scheme)
    return scheme, (p.hostname or "").lower(), port


@dataclass(frozen=True)
class HfRef:
    """A parsed ``hf://`` reference."""

    #: "" for a model, else "datasets" or "spaces"
    kind: str
    #: ``ORG/REPO``
    repo: str
    #: the file inside the repository ("" for a whole repository)
    path: str
    revision: str

    @property
    def pinned(self) -> bool:
        """Pinned to a 40-hex commit (so every boot gets the same bytes)."""
        return bool(HEX40.fullmatch(self.revision))

    @property
    def cache_dir_name(self) -> str:
        """The repository's directory in a Hugging Face cache: ``models--org--name``."""
        kind = {"": "models", "datasets": "datasets", "spaces": "spaces"}[self.kind]
        return f"{kind}--{self.repo.replace('/', '--')}"

    def resolve_url(self, endpoint: str, path: str | None = None) -> str:
        """The Hub's download URL of ``path`` (default: this reference's own file)."""
        prefix = f"{self.kind}/" if self.kind else ""
        inner = self.path if path is None else path
        return (
            f"{endpoint.rstrip('/')}/{prefix}{self.repo}/resolve/"
            f"{quote(self.revision, safe='')}/{quote(inner)}"
        )

    def tree_url(self, endpoint: str) -> str:
        """The Hub's recursive file listing at this revision (paginated by ``Link`` headers)."""
        kind = self.kind or "models"
        return (
            f"{endpoint.rstrip('/')}/api/{kind}/{self.repo}/tree/"
            f"{quote(self.revision, safe='')}?recursive=true"
        )

    def with_path(self, path: str) -> HfRef:
        return HfRef(self.kind, self.repo, path, self.revision)


class NotHfRef(ValueError):
    """The text is not a well-formed ``hf://`` reference; the message says how."""


def parse_hf(url: str, *, repo_only: bool = False) -> HfRef:
    """Parse ``hf://[datasets/|spaces/]ORG/REPO[/PATH]?revision=REV`` (revision default ``main``).

    ``repo_only``: the reference names a whole repository, so it has no PATH.
    """
    if scheme_of(url) != "hf":
        raise NotHfRef(f"{shown(url)!r} is not an hf:// reference")
    parts = urlsplit(url.strip())
    segments = [unquote(s) for s in (parts.netloc + parts.path).split("/") if s]
    kind = ""
    if segments and segments[0] in HF_KINDS:
        kind, segments = segments[0], segments[1:]
    if repo_only and len(segments) != 2:
        raise NotHfRef(f"{url!r} is not hf://ORG/REPO?revision=COMMIT")
    if not repo_only and len(segments) < 3:
        raise NotHfRef(f"{url!r} is not hf://ORG/REPO/PATH?revision=COMMIT")
    query = dict(parse_qsl(parts.query))
    revision = query.get("revision", "main")
    return HfRef(kind, "/".join(segments[:2]), "/".join(segments[2:]), revision)


def is_loopback_host(host: str) -> bool:
    """``localhost`` (and its subdomains) or a loopback address literal (``127.0.0.0/8``, ``::1``)."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


#: IPv6 prefixes whose low 32 bits are an IPv4 address the packet really goes to.
_EMBEDS_IPV4 = (
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated, RFC 4291)
)
#: Local-use NAT64 (RFC 8215): where the IPv4 sits depends on the operator's prefix length, so
#: nothing behind it can be judged public.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def is_public_address(addr: str) -> bool:
    """True only for globally routable unicast addresses.

    IPv6 forms that embed an IPv4 address are judged by that address: a NAT64 gateway or a
    dual stack delivers ``64:ff9b::7f00:1`` or ``::ffff:0:7f00:1`` to 127.0.0.1.
    """
    ip = ipaddress.ip_address(addr.split("%", 1)[0].strip("[]"))
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        for net in _EMBEDS_IPV4:
            if ip in net:
                return is_public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        if ip.sixtofour is not None:
            return is_public_address(str(ip.sixtofour))
        if ip.teredo is not None:
            return False
    return bool(ip.is_global) and not ip.is_multicast
