"""Phase ``weights`` in-process against real servers on loopback: the FaultServer and moto's S3.

Every fault is either survived (the file is published intact) or detected (nothing published,
the bad bytes in quarantine/, a required failure raising exit 13).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.errors import DISK, WEIGHTS, BootstrapError, InsufficientDiskError
from bootstrap.plan import Capability, Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume
from bootstrap.weights import FetchOptions, ensure_weights, verified_record_path, why_unverified
from bootstrap.weights.transfer import write_journal
from tests.helpers import can_mount_tmpfs, free_port, tmpfs
from tests.httpserver import FaultServer
from tests.test_weights_verify import onnx_bytes, zip_bytes

OPTS = FetchOptions(
    connections=4,
    piece_bytes=256 * 1024,
    timeout_s=5,
    retries=3,
    backoff_s=0.05,
    max_retry_after_s=5,
    sync_every_s=0.1,
    progress_every_s=0.2,
)
MODEL = onnx_bytes(400_000, seed=1)  # ~1.6 MB: several pieces
SHA = hashlib.sha256(MODEL).hexdigest()
PIN = "4dccd71e17017ccad11b92171f5f24aa408a1407"


def entry(dest: str, source: str, fmt: str = "onnx", capability: str = "t", **kw: Any) -> str:
    lines = [
        "[[file]]",
        f'dest = "{dest}"',
        f'source = "{source}"',
        f'format = "{fmt}"',
        f'capability = "{capability}"',
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in kw.items()]
    return "\n".join(lines) + "\n"


class Boot:
    """One in-process weights phase on a real volume directory."""

    def __init__(self, tmp_path: Path, manifest: str, *, extras: str = "t", **env: str) -> None:
        self.root = tmp_path / "volume"
        self.root.mkdir(exist_ok=True)
        self.manifest = tmp_path / "models.toml"
        self.manifest.write_text(manifest)
        self.environ = {
            "BOOTSTRAP_VOLUME": str(self.root),
            "BOOTSTRAP_MANIFEST": str(self.manifest),
            "BOOTSTRAP_EXTRAS": extras,
            "BOOTSTRAP_MIN_FREE_GB": "0",
            "BOOTSTRAP_WORKER_ID": "w1",
            "BOOTSTRAP_LEASE_TTL_S": "5",
            "BOOTSTRAP_LOCK_TIMEOUT_S": "60",
            **env,
        }
        self.volume = Volume(self.root, "BOOTSTRAP_VOLUME")
        self.volume.make_layout()
        self.stream = io.StringIO()

    def run(self, options: FetchOptions = OPTS) -> tuple[Plan, dict[str, Any]]:
        settings = Settings.from_env(self.environ)
        timeline = Timeline("w1", log_format="json", stream=self.stream)
        plan = Plan("w1", str(self.root), "/app")
        plan.capabilities = {c: Capability(required=not settings.is_optional(c)) for c in settings.extras}
        detail: dict[str, Any] = {}
        ensure_weights(settings, self.volume, timeline, plan, detail, options=options)
        return plan, detail

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.stream.getvalue().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if "phase" in item and (event is None or item["event"] == event):
                out.append(item)
        return out

    @property
    def models(self) -> Path:
        return self.volume.models

    def record(self, dest: str) -> dict[str, Any]:
        return json.loads(verified_record_path(self.volume, dest).read_text())

    def quarantined(self) -> list[Path]:
        return sorted(p for p in self.volume.quarantine.iterdir() if not p.name.endswith(".json"))

    def leftovers(self) -> list[Path]:
        """Anything under models/ that is not a published file or record."""
        return [p for p in self.models.rglob("*") if p.name.endswith((".part", ".unpack", ".tmp", ".new"))]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultServer]:
    root = tmp_path / "srv"
    (root / "mirror" / "m").mkdir(parents=True)
    (root / "m.onnx").write_bytes(MODEL)
    (root / "mirror" / "m" / "m.onnx").write_bytes(MODEL)
    with FaultServer(root) as srv:
        yield srv


def assert_published(boot: Boot, dest: str = "m/m.onnx", data: bytes = MODEL) -> dict[str, Any]:
    path = boot.models / dest
    assert path.read_bytes() == data
    rec = boot.record(dest)
    assert rec["size"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert rec["verified_at"] and rec["source"]
    assert boot.leftovers() == []
    return rec


def assert_nothing_published(boot: Boot, dest: str = "m/m.onnx") -> None:
    assert not (boot.models / dest).exists()
    assert not verified_record_path(boot.volume, dest).exists()


# -- good paths --------------------------------------------------------------------------------


def test_fetch_publishes_verified_file_and_warm_boot_makes_no_request(
    tmp_path: Path, server: FaultServer
) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    plan, detail = boot.run()
    rec = assert_published(boot)
    assert rec["sha256_from"] == "computed" and rec["format"] == "onnx"
    assert plan.models == {"m/m.onnx": str(boot.models / "m/m.onnx")}
    assert detail["fetched"] == ["m/m.onnx"]
    gets = server.requests("m.onnx", method="GET")
    assert len(gets) >= 2  # several ranges
    assert all(r.status == 206 for r in gets)
    assert server.bytes_sent("m.onnx") == len(MODEL)
    # A warm boot: the server is still up, and hears nothing.
    before = len(server.requests())
    plan2, detail2 = boot.run()
    assert len(server.requests()) == before
    assert plan2.models == plan.models and detail2["fetched"] == []


def test_warm_boot_with_server_stopped(tmp_path: Path, server: FaultServer) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    boot.run()
    server.stop()
    plan, _ = boot.run()
    assert plan.models["m/m.onnx"] == str(boot.models / "m/m.onnx")


def test_manifest_sha256_and_size_are_enforced_and_recorded(tmp_path: Path, server: FaultServer) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx", size=len(MODEL), sha256=SHA))
    boot.run()
    assert assert_published(boot)["sha256_from"] == "manifest"


def test_progress_events(tmp_path: Path, server: FaultServer) -> None:
    server.set_rate(1_000_000)  # 4 connections → about 1.6 s
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    boot.run()
    progress = boot.events("progress")
    assert progress, boot.stream.getvalue()[-2000:]
    for e in progress:
        assert e["phase"] == "weights"
        assert set(e["detail"]) == {"bytes", "total", "bytes_per_s", "eta_s"}
        assert e["detail"]["total"] == len(MODEL)
    assert progress[-1]["detail"]["bytes"] == len(MODEL)


def test_progress_bar_on_a_terminal() -> None:
    from bootstrap.weights.progress import Progress

    out = io.StringIO()
    progress = Progress(None, stream=out, tty=True)
    progress.expect(2_000_000)
    progress.add(1_000_000)
    progress.emit()
    assert out.getvalue().startswith("\rweights [###############...............]  50.0% 1/2 MB")


# -- faults that must be survived --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("cut", {"at": 1000, "times": 3, "methods": ("GET",)}),
        ("status", {"status": 503, "times": 3}),
        ("status", {"status": 429, "retry_after": "1", "times": 2}),
        ("ignore_range", {}),
        ("wrong_length", {"delta": -100, "times": 2, "methods": ("GET",)}),
    ],
)
def test_transient_faults_are_survived(
    tmp_path: Path, server: FaultServer, kind: str, kw: dict[str, Any]
) -> None:
    fault = server.fault("m.onnx", kind, **kw)
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    boot.run()
    assert_published(boot)
    assert fault.used >= 1
    assert boot.quarantined() == []
    if kind == "status" and kw["status"] == 429:
        # Retry-After: 1 was honoured: nothing asked again within the second after a 429.
        rows = server.requests("m.onnx")
        assert [r.status for r in rows[:2]] == [429, 429]


def test_retry_after_delays_the_next_request(tmp_path: Path, server: FaultServer) -> None:
    server.fault("m.onnx", "status", status=429, retry_after="1", times=1, methods=("HEAD",))
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    t0 = time.monotonic()
    boot.run()
    assert time.monotonic() - t0 >= 1.0  # the protocol bound the server asked for
    assert_published(boot)


# -- faults that must be detected --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lfs_pointer", "html", "json_error", "gzip"])
def test_bad_content_is_quarantined_and_required_failure_exits_13(
    tmp_path: Path, server: FaultServer, kind: str
) -> None:
    server.fault("m.onnx", kind)
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    with pytest.raises(BootstrapError) as info:
        boot.run()
    assert info.value.exit_code == WEIGHTS
    assert "m/m.onnx" in info.value.message and info.value.hint
    assert_nothing_published(boot)
    (bad,) = boot.quarantined()
    reason = json.loads(bad.with_name(bad.name + ".json").read_text())
    assert reason["dest"] == "m/m.onnx" and reason["reason"]
    assert boot.leftovers() == []


@pytest.mark.parametrize("kind", ["lfs_pointer", "html", "gzip", "cut"])
def test_bad_mirror_falls_back_to_the_source(tmp_path: Path, server: FaultServer, kind: str) -> None:
    server.fault("mirror/m/m.onnx", kind, at=5000)
    boot = Boot(
        tmp_path,
        entry("m/m.onnx", f"{server.url}/m.onnx"),
        BOOTSTRAP_MIRROR=f"{server.url}/mirror",
    )
    boot.run()
    rec = assert_published(boot)
    assert rec["source"] == f"{server.url}/m.onnx"
    assert server.requests("mirror/m/m.onnx"), "the mirror is tried first"
    if kind != "cut":
        assert len(boot.quarantined()) == 1


def test_mirror_is_used_first(tmp_path: Path, server: FaultServer) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"), BOOTSTRAP_MIRROR=f"{server.url}/mirror")
    boot.run()
    assert boot.record("m/m.onnx")["source"] == f"{server.url}/mirror/m/m.onnx"
    assert server.requests("m.onnx") == []


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("cut", {"at": 1000}),  # every body truncated
        ("wrong_length", {"delta": 100}),  # Content-Length says more than is sent
        ("status", {"status": 404}),
        ("status", {"status": 503}),
    ],
)
def test_permanent_faults_fail_without_publishing(
    tmp_path: Path, server: FaultServer, kind: str, kw: dict[str, Any]
) -> None:
    server.fault("m.onnx", kind, **kw)
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    with pytest.raises(BootstrapError) as info:
        boot.run()
    assert info.value.exit_code == WEIGHTS
    assert_nothing_published(boot)


def test_wrong_sha256_is_quarantined(tmp_path: Path, server: FaultServer) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx", sha256="0" * 64))
    with pytest.raises(BootstrapError, match="sha256"):
        boot.run()
    assert_nothing_published(boot)
    assert len(boot.quarantined()) == 1


def test_wrong_size_from_server_is_detected(tmp_path: Path, server: FaultServer) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx", size=len(MODEL) + 1))
    with pytest.raises(BootstrapError, match="bytes"):
        boot.run()
    assert_nothing_published(boot)


def test_optional_capability_degrades(tmp_path: Path, server: FaultServer) -> None:
    server.fault("m.onnx", "html")
    (server.root / "ok.onnx").write_bytes(MODEL)
    boot = Boot(
        tmp_path,
        entry("m/m.onnx", f"{server.url}/m.onnx", capability="opt")
        + entry("ok.onnx", f"{server.url}/ok.onnx"),
        extras="t,opt",
        BOOTSTRAP_OPTIONAL="opt",
    )
    plan, detail = boot.run()
    assert plan.capabilities["opt"].status == "unavailable"
    assert "m/m.onnx" in (plan.capabilities["opt"].reason or "")
    assert plan.capabilities["t"].status == "ok"
    assert list(plan.models) == ["ok.onnx"]
    assert detail["failed"] == ["m/m.onnx"]


# -- the volume as it is found -----------------------------------------------------------------


def test_corrupted_published_file_is_quarantined_and_fetched_again(
    tmp_path: Path, server: FaultServer
) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    boot.run()
    path = boot.models / "m/m.onnx"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    from bootstrap.manifest import load_manifest

    (f,) = load_manifest(boot.manifest)
    assert "sniff" in (why_unverified(boot.volume, f) or "") or "bytes" in (
        why_unverified(boot.volume, f) or ""
    )
    boot.run()
    assert_published(boot)
    assert len(boot.quarantined()) == 1


def test_a_file_without_record_is_not_trusted(tmp_path: Path, server: FaultServer) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    (boot.models / "m").mkdir(parents=True)
    (boot.models / "m/m.onnx").write_bytes(MODEL[:1000])
    boot.run()
    assert_published(boot)


def test_bad_journal_is_caught_by_the_whole_file_check(tmp_path: Path, server: FaultServer) -> None:
    """A journal claiming garbage bytes: the sha256 fails, the part is quarantined, a fresh fetch wins."""
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx", sha256=SHA))
    part = boot.models / "m" / ".m.onnx.deadbeef0000.part"
    part.mkdir(parents=True)
    (part / "data").write_bytes(b"\0" * (len(MODEL) // 2))
    header = {
        "v": 1,
        "size": len(MODEL),
        "sha256": SHA,
        "etag": None,
        "source": "x",
        "host": "elsewhere",
        "pid": 1,
    }
    write_journal(part / "journal", header, [(0, len(MODEL) // 2)])
    boot.run()
    assert_published(boot)
    assert len(boot.quarantined()) == 1
    assert server.bytes_sent("m.onnx") == len(MODEL) - len(MODEL) // 2 + len(MODEL)


def test_interrupted_download_is_resumed_from_its_journal(tmp_path: Path, server: FaultServer) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx", sha256=SHA))
    part = boot.models / "m" / ".m.onnx.deadbeef0000.part"
    part.mkdir(parents=True)
    half = len(MODEL) // 2
    (part / "data").write_bytes(MODEL[:half])
    header = {
        "v": 1,
        "size": len(MODEL),
        "sha256": SHA,
        "etag": None,
        "source": "x",
        "host": "elsewhere",
        "pid": 1,
    }
    write_journal(part / "journal", header, [(0, half)])
    _, detail = boot.run()
    assert_published(boot)
    assert server.bytes_sent("m.onnx") == len(MODEL) - half
    assert detail["bytes_resumed"] == half


def test_disk_too_small_exits_11_before_any_download(tmp_path: Path, server: FaultServer) -> None:
    if not can_mount_tmpfs():
        pytest.skip("needs root to mount a tmpfs")
    with tmpfs(tmp_path / "small", "1m") as small:
        boot = Boot(small, entry("m/m.onnx", f"{server.url}/m.onnx"))
        with pytest.raises(InsufficientDiskError) as info:
            boot.run()
        assert info.value.exit_code == DISK
        assert "bytes" in info.value.message and str(small) in info.value.message
        assert server.requests("m.onnx", method="GET") == []
        assert list(boot.models.rglob("*")) == [boot.volume.verified]


def test_a_live_lease_holder_bounds_the_wait_with_exit_14(tmp_path: Path, server: FaultServer) -> None:
    import socket

    from bootstrap.errors import LOCK
    from bootstrap.weights import lease_name

    holder = subprocess.Popen(["sleep", "60"])
    try:
        boot = Boot(
            tmp_path,
            entry("m/m.onnx", f"{server.url}/m.onnx"),
            BOOTSTRAP_LOCK_TIMEOUT_S="1",
            BOOTSTRAP_LEASE_TTL_S="30",
        )
        record = {
            "name": "x",
            "owner": "other:1",
            "host": socket.gethostname(),
            "pid": holder.pid,
            "started": 0,
            "renewed": 0,
            "token": "t",
        }
        (boot.volume.leases / f"{lease_name('m/m.onnx')}.lease").write_text(json.dumps(record))
        with pytest.raises(BootstrapError) as info:
            boot.run()
        assert info.value.exit_code == LOCK
        assert server.requests() == []
        waits = boot.events("wait")
        assert waits and waits[0]["detail"]["owner"] == "other:1"
    finally:
        holder.kill()
        holder.wait()


# -- other sources -----------------------------------------------------------------------------


def test_hf_source_through_hf_endpoint(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    (root / "org" / "repo" / "sub").mkdir(parents=True)
    (root / "org" / "repo" / "sub" / "m.onnx").write_bytes(MODEL)
    with FaultServer(root, hf=True) as hub:
        boot = Boot(
            tmp_path,
            entry("m/m.onnx", f"hf://org/repo/sub/m.onnx?revision={PIN}"),
            HF_ENDPOINT=hub.url,
            HF_TOKEN="hf_secret_token_value",
        )
        boot.run()
        rec = assert_published(boot)
        assert rec["sha256_from"] == "source"
        assert rec["source"] == f"hf://org/repo/sub/m.onnx?revision={PIN}"
        assert "hf_secret_token_value" not in boot.stream.getvalue()
        assert "hf_secret_token_value" not in json.dumps(rec)
        # The token goes to the Hub, never to the CDN it redirects to.
        rows = hub.requests("org/repo/sub/m.onnx")
        assert all(r.auth for r in rows if r.status == 302)
        assert not any(r.auth for r in rows if r.method == "GET")


def test_hf_wrong_sha_in_headers_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    (root / "org" / "repo").mkdir(parents=True)
    (root / "org" / "repo" / "m.onnx").write_bytes(MODEL)
    with FaultServer(root, hf=True) as hub:
        hub.fault("org/repo/m.onnx", "bad_etag")
        boot = Boot(tmp_path, entry("m/m.onnx", f"hf://org/repo/m.onnx?revision={PIN}"), HF_ENDPOINT=hub.url)
        with pytest.raises(BootstrapError, match="sha256"):
            boot.run()
        assert_nothing_published(boot)
        assert len(boot.quarantined()) == 1


def test_expired_cdn_url_is_resolved_again(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    (root / "org" / "repo").mkdir(parents=True)
    (root / "org" / "repo" / "m.onnx").write_bytes(MODEL)
    with FaultServer(root, hf=True) as hub:
        hub.fault("org/repo/m.onnx", "status", status=403, times=1, methods=("GET",))
        boot = Boot(tmp_path, entry("m/m.onnx", f"hf://org/repo/m.onnx?revision={PIN}"), HF_ENDPOINT=hub.url)
        boot.run()
        assert_published(boot)
        heads = hub.requests("org/repo/m.onnx", method="HEAD")
        assert len([r for r in heads if r.status == 302]) == 2  # the probe, then the refresh


def test_a_new_revision_in_the_manifest_fetches_again(tmp_path: Path, server: FaultServer) -> None:
    boot = Boot(tmp_path, entry("m/m.onnx", f"{server.url}/m.onnx"))
    boot.run()
    other = onnx_bytes(1000, seed=9)
    (server.root / "m2.onnx").write_bytes(other)
    boot.manifest.write_text(entry("m/m.onnx", f"{server.url}/m2.onnx"))
    boot.run()
    assert_published(boot, data=other)


def test_file_source_and_directory_mirror(tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    src.write_bytes(MODEL)
    boot = Boot(tmp_path, entry("m/m.onnx", src.as_uri()))
    boot.run()
    assert_published(boot)
    mirror = tmp_path / "mirror"
    (mirror / "n").mkdir(parents=True)
    (mirror / "n" / "n.onnx").write_bytes(MODEL)
    (tmp_path / "b2").mkdir()
    boot2 = Boot(
        tmp_path / "b2", entry("n/n.onnx", "file:///nonexistent/n.onnx"), BOOTSTRAP_MIRROR=str(mirror)
    )
    boot2.run()
    assert_published(boot2, "n/n.onnx")


# -- zips --------------------------------------------------------------------------------------

BUFFALO = {name: onnx_bytes(2000, seed=i) for i, name in enumerate(
    ["det_10g.onnx", "w600k_r50.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"]
)}  # fmt: skip


def test_zip_is_unpacked_verified_and_not_kept(tmp_path: Path, server: FaultServer) -> None:
    (server.root / "buffalo_l.zip").write_bytes(zip_bytes(BUFFALO))
    boot = Boot(
        tmp_path,
        entry(
            "insightface/models/buffalo_l.zip",
            f"{server.url}/buffalo_l.zip",
            fmt="zip",
            unpack="insightface/models/buffalo_l",
        ),
    )
    plan, _ = boot.run()
    target = boot.models / "insightface/models/buffalo_l"
    assert plan.models == {"insightface/models/buffalo_l": str(target)}
    assert sorted(p.name for p in target.iterdir()) == sorted(BUFFALO)
    for name, data in BUFFALO.items():
        assert (target / name).read_bytes() == data
    rec = boot.record("insightface/models/buffalo_l")
    assert {f["path"]: (f["size"], f["sha256"]) for f in rec["files"]} == {
        n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in BUFFALO.items()
    }
    assert rec["zip"]["dest"] == "insightface/models/buffalo_l.zip"
    assert not (boot.models / "insightface/models/buffalo_l.zip").exists()
    assert boot.leftovers() == []
    # A changed unpacked file is noticed, set aside and fetched again.
    (target / "det_10g.onnx").write_bytes(b"<html>oops</html>")
    boot.run()
    assert (target / "det_10g.onnx").read_bytes() == BUFFALO["det_10g.onnx"]
    assert len(boot.quarantined()) == 1


@pytest.mark.parametrize("evil", ["../escape.onnx", "/abs.onnx"])
def test_zip_that_escapes_is_rejected(tmp_path: Path, server: FaultServer, evil: str) -> None:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("det_10g.onnx", BUFFALO["det_10g.onnx"])
        zf.writestr(zipfile.ZipInfo(evil), b"x")
    (server.root / "evil.zip").write_bytes(buf.getvalue())
    boot = Boot(tmp_path, entry("z.zip", f"{server.url}/evil.zip", fmt="zip", unpack="z"))
    with pytest.raises(BootstrapError, match="member"):
        boot.run()
    assert not (boot.models / "z").exists() and not (tmp_path / "escape.onnx").exists()
    assert len(boot.quarantined()) == 1
    assert boot.leftovers() == []


def test_zip_with_a_broken_onnx_inside_is_rejected(tmp_path: Path, server: FaultServer) -> None:
    (server.root / "b.zip").write_bytes(zip_bytes({**BUFFALO, "det_10g.onnx": BUFFALO["det_10g.onnx"][:-10]}))
    boot = Boot(tmp_path, entry("b.zip", f"{server.url}/b.zip", fmt="zip", unpack="b"))
    with pytest.raises(BootstrapError):
        boot.run()
    assert not (boot.models / "b").exists()
    assert boot.leftovers() == []


# -- S3 (moto) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip("moto_server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def s3_env(url: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def s3_put(url: str, bucket: str, key: str, data: bytes) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
        region_name="us-east-1",
    )
    existing = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def test_s3_source(tmp_path: Path, moto_s3: str) -> None:
    s3_put(moto_s3, "weights", "models/m.onnx", MODEL)
    boot = Boot(tmp_path, entry("m/m.onnx", "s3://weights/models/m.onnx"), **s3_env(moto_s3))
    boot.run()
    assert assert_published(boot)["source"] == "s3://weights/models/m.onnx"
    assert "testing-secret" not in boot.stream.getvalue()


def test_s3_mirror_first_then_fallback(tmp_path: Path, moto_s3: str, server: FaultServer) -> None:
    s3_put(moto_s3, "mirror", "pre/m/m.onnx", MODEL)
    boot = Boot(
        tmp_path,
        entry("m/m.onnx", f"{server.url}/m.onnx"),
        BOOTSTRAP_MIRROR="s3://mirror/pre",
        **s3_env(moto_s3),
    )
    boot.run()
    assert boot.record("m/m.onnx")["source"] == "s3://mirror/pre/m/m.onnx"
    assert server.requests() == []
    # A mirror without the file (404) falls back to the file's own source.
    (tmp_path / "x").mkdir()
    boot2 = Boot(
        tmp_path / "x",
        entry("m/m.onnx", f"{server.url}/m.onnx"),
        BOOTSTRAP_MIRROR="s3://mirror/other",
        **s3_env(moto_s3),
    )
    boot2.run()
    assert boot2.record("m/m.onnx")["source"] == f"{server.url}/m.onnx"


def test_s3_bad_object_is_quarantined(tmp_path: Path, moto_s3: str) -> None:
    s3_put(moto_s3, "weights", "bad.onnx", b"<!DOCTYPE html><html>AccessDenied</html>")
    boot = Boot(tmp_path, entry("m/m.onnx", "s3://weights/bad.onnx"), **s3_env(moto_s3))
    with pytest.raises(BootstrapError) as info:
        boot.run()
    assert info.value.exit_code == WEIGHTS
    assert_nothing_published(boot)
    assert len(boot.quarantined()) == 1
