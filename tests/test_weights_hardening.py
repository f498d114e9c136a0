"""Issue 12, the weights side: what a security review and a fault audit of the boot found.

Every test drives the product's own code (the weights phase in-process, or a real ``bootstrap``
process) against servers on loopback; address checks are tested by calling them, never by
connecting anywhere else.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bootstrap import urls
from bootstrap.errors import CONFIG, DISK, WEIGHTS, BootstrapError, ConfigError
from bootstrap.manifest import load_manifest, parse_manifest
from bootstrap.plan import Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.weights import FetchOptions, ensure_weights, validate_weights
from bootstrap.weights.protocol import SourceFailed
from bootstrap.weights.sources import AddressPolicy, HTTPSource
from tests.helpers import base_environ, can_mount_tmpfs, read_jsonl, run_bootstrap, tmpfs
from tests.httpserver import FaultServer
from tests.test_weights_fetch import MODEL, OPTS, PIN, Boot, assert_nothing_published, assert_published, entry
from tests.test_weights_verify import onnx_bytes


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "srv"
    (root / "mirror" / "m").mkdir(parents=True)
    (root / "m.onnx").write_bytes(MODEL)
    (root / "mirror" / "m" / "m.onnx").write_bytes(MODEL)
    with FaultServer(root) as srv:
        yield srv


# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    [
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of the cloud metadata address 169.254.169.254
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::808:808",  # local-use NAT64 (RFC 8215): never judged public
        "64:ff9b:1:ffff::1",
        "::ffff:127.0.0.1",
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    ],
)
def test_ipv6_forms_that_embed_a_private_ipv4_are_not_public(addr: str) -> None:
    assert not urls.is_public_address(addr)


def test_public_forms_stay_public() -> None:
    for addr in ("8.8.8.8", "64:ff9b::808:808", "::ffff:8.8.8.8", "2606:4700:4700::1111"):
        assert urls.is_public_address(addr), addr


# -- schemes and passwords ---------------------------------------------------------------------


def test_password_with_at_is_scrubbed() -> None:
    text = "mirror HTTPS://user:p@ss@w0rd@host.example/x failed"
    assert urls.scrub_passwords(text) == "mirror HTTPS://user:***@host.example/x failed"
    assert urls.shown("HTTPS://user:p@ss@host.example:8443/x?sig=1") == "https://host.example:8443/x"


def test_upper_case_mirror_scheme_is_a_url_and_its_password_is_never_shown(
    tmp_path: Path, server: FaultServer
) -> None:
    mirror = f"HTTP://user:s3cr@t-pass@127.0.0.1:{server.port}/mirror"
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"), BOOTSTRAP_MIRROR=mirror)
    boot.run()
    rec = assert_published(boot)
    assert rec["source"] == f"http://127.0.0.1:{server.port}/mirror/m/m.onnx"
    rows = server.requests("mirror/m/m.onnx")
    assert rows and all(r.auth for r in rows)  # basic auth from the userinfo, to that origin only
    assert server.requests("m.onnx") == []
    out = boot.stream.getvalue() + json.dumps(rec)
    assert "s3cr@t-pass" not in out and "t-pass" not in out


@pytest.mark.parametrize(
    "mirror",
    ["FTP://user:s3cr@t-pass@host.example/x", "gopher://h/x", "HTTP://user:s3cr@t-pass@example.com/m"],
)
def test_unknown_or_plain_http_mirror_is_exit_2_without_its_password(tmp_path: Path, mirror: str) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", "https://example.com/m.onnx"), BOOTSTRAP_MIRROR=mirror)
    with pytest.raises(ConfigError) as info:
        boot.run()
    assert info.value.exit_code == CONFIG
    assert "t-pass" not in info.value.message + info.value.hint


# -- redirects and credentials -----------------------------------------------------------------


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def test_a_redirect_from_a_public_host_to_localhost_is_refused(tmp_path: Path) -> None:
    if not _can_bind("127.0.0.2"):
        pytest.skip("127.0.0.2 cannot be bound here")
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "m.onnx").write_bytes(MODEL)
    (tmp_path / "outer").mkdir()
    with FaultServer(tmp_path / "inner") as inner, FaultServer(tmp_path / "outer", host="127.0.0.2") as outer:
        outer.fault("m.onnx", "redirect", location=f"http://localhost:{inner.port}/m.onnx")
        # 127.0.0.2 stands in for a public host: the policy judges it so; localhost stays loopback.
        policy = AddressPolicy(is_public=lambda a: a == "127.0.0.2" or urls.is_public_address(a))
        boot = Boot(tmp_path, entry("m/m.onnx", f"{outer.url}/m.onnx"))
        with pytest.raises(BootstrapError) as info:
            boot.run(FetchOptions(**{**OPTS.__dict__, "addresses": policy}))
        assert info.value.exit_code == WEIGHTS
        assert "localhost" in info.value.message and "refused" in info.value.message
        assert inner.requests() == []
        assert_nothing_published(boot)


def test_every_hop_is_checked_by_address_not_by_name() -> None:
    fake = {
        "weights.example": ["93.184.215.14"],
        "evil.example": ["169.254.169.254"],
        "ok.example": ["8.8.4.4"],
    }
    policy = AddressPolicy(resolve=lambda host, port: fake[host])
    src = HTTPSource("https://weights.example/m.onnx", policy=policy)
    assert src.checked_addresses("https://weights.example/m.onnx") == ["93.184.215.14"]
    assert src.checked_addresses("https://ok.example/x") == ["8.8.4.4"]
    with pytest.raises(SourceFailed, match=r"169\.254\.169\.254"):
        src.checked_addresses("https://evil.example/latest/meta-data")


def test_hf_token_only_goes_to_the_same_scheme_host_and_port(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    (root / "org" / "repo").mkdir(parents=True)
    (root / "org" / "repo" / "m.onnx").write_bytes(MODEL)
    with FaultServer(root, hf=True) as cdn, FaultServer(root, hf=True, cdn=cdn.url) as hub:
        assert cdn.url.split(":")[1] == hub.url.split(":")[1]  # same host, another port
        boot = Boot(
            tmp_path,
            entry("m/m.onnx", f"hf://org/repo/m.onnx?revision={PIN}"),
            HF_ENDPOINT=hub.url,
            HF_TOKEN="hf_secret_token_value",
        )
        boot.run()
        assert_published(boot)
        assert hub.requests() and all(r.auth for r in hub.requests())
        assert cdn.requests() and not any(r.auth for r in cdn.requests())


# -- a source that announces no size -----------------------------------------------------------


@contextlib.contextmanager
def no_garbage_collection() -> Iterator[None]:
    """What the code leaves open stays open: the collector cannot close it behind the test."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def sockets_to(port: int) -> list[Any]:
    """This process's TCP connections to ``port`` on loopback that are still open."""
    return [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port]


def test_a_source_without_size_has_a_byte_cap(tmp_path: Path, server: FaultServer) -> None:
    server.fault("m.onnx", "no_length")
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    with pytest.raises(BootstrapError) as info, no_garbage_collection():
        boot.run(FetchOptions(**{**OPTS.__dict__, "max_unknown_bytes": 100_000}))
    # The refused body owned its socket (Connection: close): closed on the way out, not by the GC.
    assert sockets_to(server.port) == []
    assert info.value.exit_code == WEIGHTS and "without announcing a size" in info.value.message
    assert_nothing_published(boot)
    assert boot.leftovers() == [] and not list((boot.models / "m").glob(".*"))
    # Under the cap the same source is fine.
    boot.run()
    assert_published(boot)


def test_a_source_without_size_keeps_the_reserve_free(tmp_path: Path) -> None:
    if not can_mount_tmpfs():
        pytest.skip("needs root to mount a tmpfs")
    big = onnx_bytes(3_000_000, seed=4)  # ~12 MB
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "big.onnx").write_bytes(big)
    with FaultServer(tmp_path / "srv") as srv, tmpfs(tmp_path / "small", "16m") as small:
        srv.fault("big.onnx", "no_length")
        boot = Boot(small, entry("m/big.onnx", f"{srv.url}/big.onnx"), BOOTSTRAP_MIN_FREE_GB="0.008")
        with pytest.raises(BootstrapError) as info, no_garbage_collection():
            boot.run()
        assert sockets_to(srv.port) == []
        assert info.value.exit_code == DISK, info.value.message
        assert "bytes" in info.value.message
        assert_nothing_published(boot, "m/big.onnx")
        assert not list((boot.models / "m").glob(".*"))


# -- the manifest ------------------------------------------------------------------------------


def test_a_manifest_that_is_not_utf8_or_is_a_directory_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[[file]]\ndest = "caf\xe9"\n'.encode("latin-1"))
    for path, words in ((bad, "UTF-8"), (tmp_path, "directory")):
        with pytest.raises(ConfigError, match=words) as info:
            load_manifest(path)
        assert info.value.exit_code == CONFIG and info.value.hint


@pytest.mark.parametrize("dest", ["./.verified/x", ".//.verified/x", ".", "./"])
def test_dest_is_checked_after_normalising(dest: str) -> None:
    with pytest.raises(ConfigError, match="relative path"):
        parse_manifest(f'[[file]]\ndest = "{dest}"\nsource = "file:///x"\nformat = "raw"\ncapability = "c"\n')


def test_an_entry_inside_another_entrys_directory_is_refused() -> None:
    text = (
        '[[file]]\ndest = "a.zip"\nsource = "file:///a.zip"\nformat = "zip"\nunpack = "pack"\ncapability = "c"\n'
        '[[file]]\ndest = "pack/x.onnx"\nsource = "file:///x"\nformat = "onnx"\ncapability = "c"\n'
    )
    with pytest.raises(ConfigError, match="inside pack"):
        parse_manifest(text)


@pytest.mark.parametrize(
    "members",
    [
        {"det.onnx": None, ".owner": b"{}"},
        {"det.onnx": None, "sub/.x.abc.part": b"x"},
        {"det.onnx": None, "a": b"x", "a/b.onnx": None},
    ],
)
def test_zip_member_named_like_a_marker_or_a_file_dir_clash_is_a_bad_file(
    tmp_path: Path, server: FaultServer, members: dict[str, bytes | None]
) -> None:
    model = onnx_bytes(2000, seed=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, model if data is None else data)
    (server.root / "z.zip").write_bytes(buf.getvalue())
    boot = Boot(tmp_path, entry("z.zip", f"{server.url}/z.zip", fmt="zip", unpack="z"))
    with pytest.raises(BootstrapError) as info:
        boot.run()
    assert info.value.exit_code == WEIGHTS, info.value.message
    assert len(boot.quarantined()) == 1 and not (boot.models / "z").exists()
    assert boot.leftovers() == []


def test_validate_checks_manifest_and_mirror_up_front(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(
        '[[file]]\ndest = "x"\nsource = "ftp://h/x"\nformat = "raw"\ncapability = "c"\n'
    )
    with pytest.raises(ConfigError):
        validate_weights(Settings.from_env({"BOOTSTRAP_MANIFEST": str(tmp_path / "m.toml")}))
    (tmp_path / "ok.toml").write_text(entry("m/m.onnx", "file:///x"))
    with pytest.raises(ConfigError):
        validate_weights(
            Settings.from_env(
                {"BOOTSTRAP_MANIFEST": str(tmp_path / "ok.toml"), "BOOTSTRAP_MIRROR": "ftp://h/"}
            )
        )


@pytest.mark.parametrize("what", ["manifest", "mirror"])
def test_a_bad_manifest_or_mirror_stops_the_boot_in_preflight(tmp_path: Path, what: str) -> None:
    """A real ``bootstrap run``: exit 2 before the env phase starts (no env is built first)."""
    volume = tmp_path / "vol"
    volume.mkdir()
    man = tmp_path / "models.toml"
    man.write_text(
        entry("m/m.onnx", "ftp://h/x" if what == "manifest" else "file:///x", capability="faceswap")
    )
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_MANIFEST=str(man),
        BOOTSTRAP_WORKER_ID="pre",
        BOOTSTRAP_MIN_FREE_GB="0",
        **({"BOOTSTRAP_MIRROR": "FTP://u:pw-s3cret@h/x"} if what == "mirror" else {}),
    )
    proc = run_bootstrap(["run", "--until", "weights"], env, timeout=120)
    assert proc.returncode == CONFIG, proc.stdout[-2000:] + proc.stderr[-2000:]
    events = read_jsonl(volume / ".bootstrap" / "logs" / "pre" / "boot.jsonl")
    assert {e["phase"] for e in events} == {"preflight"}
    assert (
        not list((volume / ".bootstrap" / "envs").glob("*"))
        if (volume / ".bootstrap" / "envs").exists()
        else True
    )
    assert "pw-s3cret" not in proc.stdout + proc.stderr


# -- failures ----------------------------------------------------------------------------------


def test_a_failing_required_file_does_not_abandon_the_others(tmp_path: Path, server: FaultServer) -> None:
    big = onnx_bytes(1_000_000, seed=5)  # ~4 MB, slow: still running when the bad ones fail
    (server.root / "big.onnx").write_bytes(big)
    server.set_rate(2_000_000)
    boot = Boot(
        tmp_path,
        entry("m/big.onnx", f"{server.url}/big.onnx")
        + entry("m/gone.onnx", f"{server.url}/gone.onnx")
        + entry("m/also-gone.onnx", f"{server.url}/also-gone.onnx"),
    )
    settings = Settings.from_env(boot.environ)
    out = io.StringIO()
    plan = Plan("w1", str(boot.root), "/app")
    timeline = Timeline("w1", log_format="text", stream=out)
    with pytest.raises(BootstrapError) as info:
        ensure_weights(settings, boot.volume, timeline, plan, {}, options=OPTS)
    assert info.value.exit_code == WEIGHTS
    assert "m/gone.onnx" in info.value.message and "m/also-gone.onnx" in info.value.message
    assert "m/big.onnx" not in info.value.message
    assert_published(boot, "m/big.onnx", big)
    lines = out.getvalue().splitlines()
    # Every file is reported, as `bootstrap prepare` prints it.
    assert any("m/big.onnx: ok, fetched from" in line for line in lines)
    assert any("m/gone.onnx: FAILED" in line for line in lines)
    assert any("m/also-gone.onnx: FAILED" in line for line in lines)


def test_a_host_that_does_not_resolve_fails_fast_and_is_named_once(tmp_path: Path) -> None:
    def no_dns(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    url = "https://weights.invalid/m.onnx"
    boot = Boot(tmp_path, entry("m/m.onnx", url))
    t0 = time.monotonic()
    with pytest.raises(BootstrapError) as info:
        boot.run(
            FetchOptions(**{**OPTS.__dict__, "addresses": AddressPolicy(resolve=no_dns), "backoff_s": 1.0})
        )
    assert time.monotonic() - t0 < 1.0  # no retries
    assert info.value.message.count("weights.invalid") == 1, info.value.message
    assert "resolve" in info.value.message
