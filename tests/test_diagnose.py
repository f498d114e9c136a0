"""`bootstrap diagnose` (issue 6, SPEC §8): each broken state is produced by driving the product
into it for real — real boots, real kills, real read-only and full filesystems — and diagnose must
name the right section as broken with the right hint, in text and in JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from bootstrap import diagnose as dg
from bootstrap.settings import Settings
from tests import test_weights_repo
from tests.helpers import (
    BOOTSTRAP,
    REPO,
    base_environ,
    can_mount_tmpfs,
    read_jsonl,
    run_bootstrap,
    seed_uv_cache,
    tmpfs,
)
from tests.httpserver import FaultServer
from tests.test_weights_fetch import Boot
from tests.test_weights_repo import FILES, PIN, WANTED, make_cache, repo_entry

hub = test_weights_repo.hub  # the HF-like server fixture

needs_root = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount tmpfs")

CHECK_KEYS = {"name", "status", "detail", "hint"}


# -- helpers ----------------------------------------------------------------------------------


def diagnose(env: dict[str, str], cwd: Path | None = None) -> tuple[int, str, dict[str, Any]]:
    """Run `bootstrap diagnose` and `bootstrap diagnose --json`; (exit code, text, json)."""
    text = run_bootstrap(["diagnose"], env, cwd=cwd, timeout=300)
    js = run_bootstrap(["diagnose", "--json"], env, cwd=cwd, timeout=300)
    assert text.returncode == js.returncode, (text.stdout, js.stdout)
    assert text.returncode in (0, 3), text.stdout + text.stderr
    return text.returncode, text.stdout, json.loads(js.stdout)


def section(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["sections"] if s["name"] == name)


def check(report: dict[str, Any], sec: str, name: str) -> dict[str, Any]:
    found = [c for c in section(report, sec)["checks"] if c["name"] == name]
    assert found, f"no check {name!r} in {sec}: {[c['name'] for c in section(report, sec)['checks']]}"
    return found[0]


def assert_broken(
    rc: int, text: str, report: dict[str, Any], sec: str, name: str, *hint_words: str
) -> dict[str, Any]:
    """The section and check are broken, in JSON and in text, with a hint holding ``hint_words``."""
    assert rc == 3, text
    assert report["status"] == "broken"
    assert section(report, sec)["status"] == "broken", section(report, sec)
    c = check(report, sec, name)
    assert c["status"] == "broken", c
    for word in hint_words:
        assert word in c["hint"], (word, c["hint"])
    # Text: the section header says broken, and the check's line and hint are there.
    assert f"{sec.replace('_', ' ')}: broken" in text, text
    flat = " ".join(text.split())
    assert " ".join(c["hint"].split()) in flat, text
    assert any(line.split()[:2] == ["broken", name] for line in text.splitlines() if line.strip()), text
    # Broken sections come before ok ones.
    first = [
        line for line in text.splitlines() if line.endswith((": broken", ": ok", ": degraded", ": unknown"))
    ]
    assert first[0].endswith(": broken"), first
    return c


def lay_out(volume: Path, tmp_path: Path, **env: str) -> None:
    """Let the product lay the volume out: a real boot that passes preflight, then fails fast in env."""
    no_lock = tmp_path / "no-lock-project"
    no_lock.mkdir(exist_ok=True)
    # A project with one empty capability and no uv.lock: preflight reads its pyproject.toml, env fails.
    (no_lock / "pyproject.toml").write_text(
        '[project]\nname = "no-lock"\nversion = "0"\n[project.optional-dependencies]\nfaceswap = []\n'
    )
    proc = run_bootstrap(
        ["run", "--until", "env"],
        base_environ(
            BOOTSTRAP_VOLUME=str(volume),
            BOOTSTRAP_PROJECT_DIR=str(no_lock),
            BOOTSTRAP_WORKER_ID="layout",
            **env,
        ),
    )
    assert proc.returncode == 12, proc.stdout + proc.stderr  # no uv.lock: ENV, after preflight laid out
    assert (volume / ".bootstrap" / "envs").is_dir()


def write_manifest(
    path: Path, source: str, dest: str = "demo/model.onnx", capability: str = "faceswap"
) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""\
            [[file]]
            dest = "{dest}"
            source = "{source}"
            format = "onnx"
            capability = "{capability}"
            """
        )
    )
    return path


# -- shape and rendering ----------------------------------------------------------------------


def test_empty_volume_report_shape(volume: Path) -> None:
    rc, text, report = diagnose(base_environ(BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS=""))
    assert rc == 0, text
    assert set(report) == {"report_version", "status", "sections"}
    assert report["report_version"] == 1
    assert [s["name"] for s in report["sections"]] == list(dg.SECTIONS)
    for s in report["sections"]:
        assert set(s) == {"name", "status", "checks"}
        assert s["status"] in {"ok", "degraded", "broken", "unknown"}
        for c in s["checks"]:
            want = CHECK_KEYS | ({"exit_code", "exit_name"} if s["name"] == "last_boot" else set())
            assert set(c) == want, c
            assert c["status"] in {"ok", "degraded", "broken", "unknown"}
            assert (c["hint"] is None) == (c["status"] == "ok"), c
    # An empty volume is fine: nothing built yet is degraded, not broken; diagnose wrote nothing.
    assert report["status"] == "degraded"
    assert check(report, "env", "ready")["status"] == "degraded"
    assert "bootstrap prepare" in check(report, "env", "ready")["hint"]
    assert check(report, "volume", "writable")["status"] == "ok"
    assert list(volume.iterdir()) == []


def test_text_renderer_puts_broken_first_and_aligns() -> None:
    report = dg.Report(
        sections=[
            dg.Section("platform", [dg.Check("runpod", dg.Status.OK, "local")]),
            dg.Section(
                "volume",
                [
                    dg.Check("found", dg.Status.OK, "/v"),
                    dg.Check("writable", dg.Status.BROKEN, "read-only\nsecond line", hint="remount it"),
                ],
            ),
            dg.Section("gpu", [dg.Check("device", dg.Status.UNKNOWN, "none", hint="fine on CPU")]),
        ]
    )
    lines = dg.render_text(report).splitlines()
    assert lines[0] == "bootstrap diagnose: BROKEN (1 broken, 1 unknown)"
    headers = [line for line in lines if not line.startswith(" ") and line][1:]
    assert headers == ["volume: broken", "gpu: unknown", "platform: ok"]
    i = lines.index("volume: broken")
    assert lines[i + 1].split()[:2] == ["broken", "writable"]
    assert lines[i + 2].strip() == "second line"
    assert lines[i + 3].strip() == "→ remount it"
    col = lines[i + 1].index("read-only")
    assert lines[i + 2].index("second line") == col == lines[i + 3].index("→")
    assert report.exit_code == 3
    with pytest.raises(ValueError):
        dg.Check("x", dg.Status.DEGRADED, "no hint")


def test_own_bug_is_exit_1_unless_something_is_broken(volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ctx: dg.Context) -> list[dg.Check]:
        raise RuntimeError("a bug in a section")

    monkeypatch.setitem(dg.SECTION_FNS, "leases", boom)  # type: ignore[index]
    settings = Settings.from_env(base_environ(BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS=""))
    report = dg.collect(settings)
    assert report.exit_code == 1
    assert report.internal_errors == ["leases: RuntimeError: a bug in a section"]
    only = report.section("leases").checks
    assert [(c.name, c.status) for c in only] == [("diagnose", dg.Status.UNKNOWN)]
    assert "BOOTSTRAP_DEBUG=1" in (only[0].hint or "")
    # The other sections still ran.
    assert report.section("volume").status is dg.Status.OK


def test_bad_setting_is_reported_not_fatal(volume: Path) -> None:
    env = base_environ(BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="", BOOTSTRAP_MIN_FREE_GB="lots")
    rc, text, report = diagnose(env)
    c = assert_broken(rc, text, report, "settings", "config", "BOOTSTRAP_MIN_FREE_GB")
    assert "'lots' is not a number" in c["detail"]
    # The rest of the report still ran, on the default.
    assert check(report, "volume", "writable")["status"] == "ok"
    assert run_bootstrap(["run"], env).returncode == 2  # the product refuses the same setting


# -- volume -----------------------------------------------------------------------------------


def test_no_volume(tmp_path: Path) -> None:
    if os.path.ismount("/runpod-volume") or os.path.ismount("/workspace"):
        pytest.skip("this machine has a real volume mounted")
    env = base_environ(BOOTSTRAP_REQUIRE_VOLUME="1", BOOTSTRAP_EXTRAS="")
    assert run_bootstrap(["run"], env, cwd=tmp_path).returncode == 10  # the product: exit 10 VOLUME
    rc, text, report = diagnose(env, cwd=tmp_path)
    assert_broken(rc, text, report, "volume", "found", "attach a network volume", "BOOTSTRAP_VOLUME")
    for name in ("env", "leases", "last_boot"):
        assert section(report, name)["status"] == "unknown"
    # Not required: degraded, and diagnose does not create ./.volume (it never repairs).
    rc, _text, report = diagnose(base_environ(BOOTSTRAP_EXTRAS=""), cwd=tmp_path)
    assert check(report, "volume", "found")["status"] == "degraded"
    assert not (tmp_path / ".volume").exists()
    # A BOOTSTRAP_VOLUME that does not exist.
    rc, text, report = diagnose(base_environ(BOOTSTRAP_VOLUME=str(tmp_path / "nope"), BOOTSTRAP_EXTRAS=""))
    c = assert_broken(rc, text, report, "volume", "found", "BOOTSTRAP_VOLUME")
    assert "does not exist" in c["detail"]


@needs_root
def test_unwritable_volume(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    with tmpfs(vol, "16m"):
        lay_out(vol, tmp_path, BOOTSTRAP_MIN_FREE_GB="0.001")
        subprocess.run(["mount", "-o", "remount,ro", str(vol)], check=True)
        env = base_environ(BOOTSTRAP_VOLUME=str(vol), BOOTSTRAP_EXTRAS="", BOOTSTRAP_MIN_FREE_GB="0.001")
        assert run_bootstrap(["run"], env).returncode == 10  # the product agrees: VOLUME
        rc, text, report = diagnose(env)
        c = assert_broken(rc, text, report, "volume", "writable", "read-write", "BOOTSTRAP_VOLUME")
        assert "Read-only file system" in c["detail"]
        # Last boot still readable on the read-only volume.
        assert check(report, "last_boot", "layout")["exit_code"] == 12


@needs_root
def test_full_disk(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    with tmpfs(vol, "8m"):
        env = base_environ(BOOTSTRAP_VOLUME=str(vol), BOOTSTRAP_EXTRAS="", BOOTSTRAP_MIN_FREE_GB="0.001")
        lay_out(vol, tmp_path, BOOTSTRAP_MIN_FREE_GB="0.001")
        with open(vol / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        assert os.statvfs(vol).f_bavail == 0
        assert run_bootstrap(["run"], env).returncode == 11  # the product agrees: DISK
        rc, text, report = diagnose(env)
        c = assert_broken(rc, text, report, "volume", "free_space", "bootstrap gc", "BOOTSTRAP_MIN_FREE_GB")
        assert "bytes" in c["detail"]
        w = assert_broken(rc, text, report, "volume", "writable", "bootstrap gc")
        assert "full" in w["detail"]


@needs_root
def test_pod_at_workspace(tmp_path: Path) -> None:
    """In a private mount namespace, a tmpfs at /workspace is a pod's volume: found, not broken."""
    created = not Path("/workspace").exists()
    if os.path.ismount("/workspace") or os.path.ismount("/runpod-volume"):
        pytest.skip("this machine has a real volume mounted")
    Path("/workspace").mkdir(exist_ok=True)
    try:
        env = base_environ(RUNPOD_POD_ID="pod123", BOOTSTRAP_EXTRAS="", BOOTSTRAP_MIN_FREE_GB="0.001")
        script = (
            f"mount -t tmpfs -o size=64m tmpfs /workspace && {sys.executable} -m bootstrap diagnose --json"
        )
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert check(report, "volume", "found")["detail"].startswith("/workspace (found by /workspace)")
        assert check(report, "volume", "mount")["status"] == "ok"
        assert "/runpod-volume" in check(report, "platform", "mount_path")["detail"]
        assert "a RunPod pod" in check(report, "platform", "runpod")["detail"]
        assert report["status"] != "broken"
    finally:
        if created:
            with contextlib.suppress(OSError):
                Path("/workspace").rmdir()


# -- env --------------------------------------------------------------------------------------

SLOW_BACKEND = '''
"""An in-tree build backend that blocks in build_wheel while SLOW_BUILD_MARKER is set."""
import base64, hashlib, os, time, zipfile

NAME, VERSION = "slowpkg", "1.0"
DIST = f"{NAME}-{VERSION}.dist-info"
METADATA = f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: {VERSION}\\n"


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    os.makedirs(os.path.join(metadata_directory, DIST), exist_ok=True)
    with open(os.path.join(metadata_directory, DIST, "METADATA"), "w") as f:
        f.write(METADATA)
    return DIST


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    marker = os.environ.get("SLOW_BUILD_MARKER")
    if marker:
        open(marker, "w").close()
        time.sleep(600)
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    files = {
        f"{NAME}/__init__.py": b"",
        f"{DIST}/METADATA": METADATA.encode(),
        f"{DIST}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: slow\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    rows = []
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{path},sha256={digest},{len(data)}")
        rows.append(f"{DIST}/RECORD,,")
        z.writestr(f"{DIST}/RECORD", "\\n".join(rows) + "\\n")
    return name
'''


def slow_project(root: Path) -> Path:
    """A fixture project whose one local dependency builds only as long as the test lets it."""
    pkg = root / "slowpkg"
    pkg.mkdir(parents=True)
    (pkg / "backend.py").write_text(SLOW_BACKEND)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n\n'
        '[project]\nname = "slowpkg"\nversion = "1.0"\n'
    )
    (root / "pyproject.toml").write_text(
        '[project]\nname = "fixture"\nversion = "0"\nrequires-python = ">=3.11"\ndependencies = ["slowpkg"]\n\n'
        '[tool.uv.sources]\nslowpkg = { path = "slowpkg" }\n'
    )
    env = base_environ(UV_CACHE_DIR=str(root / ".lock-cache"))
    subprocess.run(["uv", "lock", "--offline", "--quiet"], cwd=root, env=env, check=True, timeout=120)
    return root


@pytest.mark.slow
def test_half_built_env_left_by_a_killed_builder(tmp_path: Path, volume: Path) -> None:
    project = slow_project(tmp_path / "project")
    marker = tmp_path / "building"
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_PROJECT_DIR=str(project), BOOTSTRAP_EXTRAS="",
        BOOTSTRAP_WORKER_ID="builder",
    )  # fmt: skip
    proc = subprocess.Popen(
        [*BOOTSTRAP, "run", "--until", "env"], env={**env, "SLOW_BUILD_MARKER": str(marker)}, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the builder exited before building"
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the builder dies mid-build, as a worker does
        proc.wait(30)
    assert [p.name for p in (volume / ".bootstrap" / "envs").iterdir() if p.name.startswith(".tmp-")]
    rc, text, report = diagnose(env)
    c = assert_broken(rc, text, report, "env", "half_built", "bootstrap prepare", "bootstrap gc")
    assert ".tmp-" in c["detail"]
    assert check(report, "env", "ready")["status"] != "ok"
    # The killed builder's boot log says where it stopped.
    boot = check(report, "last_boot", "builder")
    assert boot["status"] == "unknown" and "env" in boot["detail"]


@pytest.mark.slow
def test_env_built_for_another_interpreter(tmp_path: Path, volume: Path) -> None:
    """An env built on the volume by another Python (a pod's) is not this image's: env is broken."""
    other = Path("/usr/bin/python3.11")
    ours = subprocess.run(
        [sys.executable, "-c", "import sys; print(getattr(sys, '_base_executable', sys.executable))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not other.exists() or os.path.realpath(other) == os.path.realpath(ours):
        pytest.skip("needs a second Python 3.11 at /usr/bin/python3.11")
    # A bootstrap installation for the other interpreter (its own filelock/psutil), from uv's cache.
    venv = tmp_path / "other-venv"
    uv_env = base_environ()
    subprocess.run(["uv", "venv", "--quiet", "--python", str(other), str(venv)], env=uv_env, check=True)
    pip = ["uv", "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "filelock", "psutil"]
    if subprocess.run([*pip, "--offline"], env=uv_env, check=False, capture_output=True).returncode != 0:
        subprocess.run(pip, env=uv_env, check=True, capture_output=True, timeout=300)
    seed_uv_cache(volume, ())
    env = base_environ(BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="", BOOTSTRAP_WORKER_ID="pod")
    built = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "bootstrap", "run", "--until", "env"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    rc, text, report = diagnose(env)
    c = assert_broken(rc, text, report, "env", "ready", "bootstrap prepare", "THIS image")
    assert "another interpreter" in c["detail"]
    assert "/usr/bin/python3.11" in c["detail"]
    # The pod's own boot stopped after env with exit 0.
    pod = check(report, "last_boot", "pod")
    assert (pod["status"], pod["exit_code"], pod["exit_name"]) == ("ok", 0, "OK")


# -- leases -----------------------------------------------------------------------------------

HOLD_LEASE = """
import sys, time
from pathlib import Path
from bootstrap.lease import acquire
lease = acquire(Path(sys.argv[1]), sys.argv[2], owner="w-dead:1", ttl_s=float(sys.argv[3]), timeout_s=10)
print("held", flush=True)
time.sleep(600)
"""


def hold_lease(leases: Path, name: str, ttl: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LEASE, str(leases), name, str(ttl)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_stale_lease(volume: Path, tmp_path: Path) -> None:
    lay_out(volume, tmp_path)
    leases = volume / ".bootstrap" / "leases"
    env = base_environ(BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="", BOOTSTRAP_LEASE_TTL_S="1")
    holder = hold_lease(leases, "env-0123456789abcdef", 1.0)  # renewed every 1/3 s
    try:
        # Judged with a TTL of 10 s, so a slow heartbeat on a busy machine does not look stale.
        _rc, _text, report = diagnose({**env, "BOOTSTRAP_LEASE_TTL_S": "10"})
        live = check(report, "leases", "env-0123456789abcdef")
        assert live["status"] == "ok" and "w-dead:1" in live["detail"]
    finally:
        holder.kill()  # SIGKILL: no release, the lease file stays
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert (leases / "env-0123456789abcdef.lease").exists()
    time.sleep(1.5)  # past BOOTSTRAP_LEASE_TTL_S=1 without a heartbeat
    rc, text, report = diagnose(env)
    c = assert_broken(
        rc, text, report, "leases", "env-0123456789abcdef", "BOOTSTRAP_LEASE_TTL_S",
        f"rm {leases / 'env-0123456789abcdef.lease'}",
    )  # fmt: skip
    assert "stale" in c["detail"] and "w-dead:1" in c["detail"]


# -- timeouts ---------------------------------------------------------------------------------


def test_a_hung_read_cannot_hang_diagnose(volume: Path, tmp_path: Path) -> None:
    """A lease "file" whose read blocks forever (a FIFO, like a hung network volume) costs one check."""
    leases = volume / ".bootstrap" / "leases"
    leases.mkdir(parents=True)
    fifo = leases / "env-hung.lease"
    os.mkfifo(fifo)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\nsleep 600\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    environ = base_environ(
        BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="", PATH=f"{fake_bin}:{os.environ['PATH']}"
    )
    settings = Settings.from_env(environ)
    options = dg.Options(probe_timeout_s=1, gpu_timeout_s=1, section_timeout_s=2)
    try:
        report = dg.collect(settings, options)
    finally:
        with contextlib.suppress(OSError):  # let the stuck reader go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    leases_section = report.section("leases")
    assert leases_section.status is dg.Status.BROKEN
    assert "did not finish within 2 s" in leases_section.checks[0].detail
    device = next(c for c in report.section("gpu").checks if c.name == "device")
    assert device.status is dg.Status.DEGRADED  # not required
    assert "did not answer within 1 s" in device.detail
    required = dg.collect(Settings.from_env({**environ, "BOOTSTRAP_REQUIRE_GPU": "1"}), options, only=["gpu"])
    assert required.section("gpu").checks[0].status is dg.Status.BROKEN
    assert report.section("settings").status is dg.Status.OK  # the rest answered
    assert report.section("platform").status is dg.Status.OK


# -- weights and last boot --------------------------------------------------------------------


@pytest.fixture
def faceswap_volume(volume: Path, env_volume_factory: Any) -> Path:
    return env_volume_factory(volume, ("faceswap",))  # type: ignore[no-any-return]


def boot_missing_model(
    volume: Path, tmp_path: Path, **extra: str
) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    manifest = write_manifest(tmp_path / "models.toml", f"file://{tmp_path}/nowhere/model.onnx")
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="faceswap", BOOTSTRAP_MANIFEST=str(manifest),
        BOOTSTRAP_WORKER_ID="w13", **extra,
    )  # fmt: skip
    proc = run_bootstrap(["run"], env, timeout=600)
    assert proc.returncode == 13, proc.stdout[-3000:] + proc.stderr[-3000:]
    return env, proc


@pytest.mark.slow
def test_missing_required_model(faceswap_volume: Path, tmp_path: Path) -> None:
    env, _proc = boot_missing_model(faceswap_volume, tmp_path)
    rc, text, report = diagnose(env)
    c = assert_broken(
        rc, text, report, "weights", "demo/model.onnx", "bootstrap prepare", "BOOTSTRAP_OPTIONAL"
    )
    assert "required by faceswap" in c["detail"]
    # Optional instead: degraded, exit 0 as far as weights go.
    _rc, _text, report = diagnose({**env, "BOOTSTRAP_OPTIONAL": "faceswap"})
    assert check(report, "weights", "demo/model.onnx")["status"] == "degraded"


@pytest.mark.slow
def test_quarantined_model(faceswap_volume: Path, tmp_path: Path) -> None:
    """The source serves an HTML error page as the model: the fetcher quarantines it, the boot exits 13."""
    bad = tmp_path / "served" / "model.onnx"
    bad.parent.mkdir()
    bad.write_text("<!DOCTYPE html><html><body>Access denied</body></html>\n" * 20)
    manifest = write_manifest(tmp_path / "models.toml", bad.as_uri())
    env = base_environ(
        BOOTSTRAP_VOLUME=str(faceswap_volume), BOOTSTRAP_EXTRAS="faceswap", BOOTSTRAP_MANIFEST=str(manifest),
        BOOTSTRAP_WORKER_ID="wq",
    )  # fmt: skip
    proc = run_bootstrap(["run"], env, timeout=600)
    assert proc.returncode == 13, proc.stdout[-3000:] + proc.stderr[-3000:]
    quarantine = faceswap_volume / ".bootstrap" / "quarantine"
    assert [p for p in quarantine.iterdir() if not p.name.endswith(".json")], (
        "the product quarantined nothing"
    )
    rc, text, report = diagnose(env)
    c = assert_broken(
        rc, text, report, "weights", "demo/model.onnx", "failed verification", "BOOTSTRAP_MIRROR"
    )
    assert "quarantined copy: " + str(quarantine) in c["detail"]
    assert "html" in c["detail"].lower()
    assert "1 file(s)" in check(report, "weights", "quarantine")["detail"]


@pytest.mark.slow
def test_last_boot_exited_13(faceswap_volume: Path, tmp_path: Path) -> None:
    env, _proc = boot_missing_model(faceswap_volume, tmp_path)
    rc, text, report = diagnose(env)
    c = assert_broken(rc, text, report, "last_boot", "w13", "bootstrap explain 13")
    assert (c["exit_code"], c["exit_name"]) == (13, "WEIGHTS")
    assert "in phase weights" in c["detail"]
    assert "explain 13: a required model could not be fetched" in c["detail"]
    assert "last error lines of boot.log" in c["detail"]
    assert "exited 13 (WEIGHTS)" in text
    # The env the boot used is fine and was probed with its own Python.
    assert check(report, "env", "ready")["status"] == "ok"
    assert check(report, "env", "interpreter")["status"] == "ok"
    ort = check(report, "gpu", "onnxruntime")
    assert "onnxruntime" in ort["detail"] and "CPUExecutionProvider" in ort["detail"]


@pytest.mark.slow
def test_secrets_never_printed(faceswap_volume: Path, tmp_path: Path) -> None:
    secrets = {
        "HF_TOKEN": "hf_FAKEtokenA1b2C3d4E5f6G7h8",
        "AWS_SECRET_ACCESS_KEY": "FAKEawsSecret0123456789abcdefXYZ",
        "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID01234",
        "AWS_SESSION_TOKEN": "FAKEsessionTokenQwErTy987",
        "BUCKET_SECRET_ACCESS_KEY": "FAKEbucketSecret55aa66bb",
        "BUCKET_ACCESS_KEY_ID": "FAKEbucketKeyId77cc88",
        "RUNPOD_API_KEY": "rpa_FAKEapiKey99dd00ee",
        "MY_DB_PASSWORD": "FAKEpassw0rd!quux",
        "SOME_SERVICE_CREDENTIALS": "FAKEcredZZ11yy22",
    }
    env, proc = boot_missing_model(faceswap_volume, tmp_path, RUNPOD_POD_ID="podx", **secrets)
    rc, text, report = diagnose(env)
    assert rc == 3
    log_dir = faceswap_volume / ".bootstrap" / "logs" / "w13"
    haystacks = {
        "run stdout": proc.stdout,
        "run stderr": proc.stderr,
        "boot.log": (log_dir / "boot.log").read_text(),
        "boot.jsonl": (log_dir / "boot.jsonl").read_text(),
        "diagnose text": text,
        "diagnose json": json.dumps(report),
    }
    assert read_jsonl(log_dir / "boot.jsonl"), "the boot wrote a timeline"
    assert '"phase": "weights"' in proc.stdout  # the timeline went to stdout too
    for where, hay in haystacks.items():
        for name, value in secrets.items():
            assert value not in hay, f"{name}'s value appears in {where}"
    # Diagnose says they are set, and how long, nothing more.
    for name, value in secrets.items():
        assert check(report, "settings", name)["detail"] == f"set ({len(value)} chars) (env)"
    assert "RUNPOD_API_KEY=set (" in check(report, "platform", "runpod")["detail"]
    # A password inside a URL setting (a mirror with userinfo) is masked by diagnose too.
    mirror = {**env, "BOOTSTRAP_MIRROR": "https://mirroruser:FAKEmirrorPass42@127.0.0.1:9/m"}
    _rc, text, report = diagnose(mirror)
    for hay in (text, json.dumps(report)):
        assert "FAKEmirrorPass42" not in hay
    assert (
        check(report, "settings", "BOOTSTRAP_MIRROR")["detail"]
        == "https://mirroruser:***@127.0.0.1:9/m (env)"
    )


FAKE_SMI = """#!/bin/sh
# A stand-in for nvidia-smi (this machine has no GPU): one A40 whose driver supports CUDA 12.2.
case "$1" in
  --query-gpu=*) echo "NVIDIA A40, 535.104.05, 46068 MiB" ;;
  *) echo "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |" ;;
esac
"""


@pytest.mark.slow
def test_gpu_driver_older_than_the_wheels(faceswap_volume: Path, tmp_path: Path) -> None:
    """F15: the env's onnxruntime-gpu wants a newer CUDA than the driver, and falls back to CPU."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    manifest = tmp_path / "empty.toml"
    manifest.write_text("")
    env = base_environ(
        BOOTSTRAP_VOLUME=str(faceswap_volume),
        BOOTSTRAP_EXTRAS="faceswap",
        BOOTSTRAP_MANIFEST=str(manifest),
        PATH=f"{fake_bin}:{os.environ['PATH']}",
    )
    rc, text, report = diagnose(env)
    assert rc == 0, text  # not required: degraded
    assert check(report, "gpu", "device")["detail"].startswith("NVIDIA A40, 535.104.05")
    versions = check(report, "gpu", "cuda_versions")
    assert versions["status"] == "degraded"
    assert "the driver supports CUDA up to 12.2" in versions["detail"]
    ort = check(report, "gpu", "onnxruntime")
    assert ort["status"] == "degraded"
    assert "falls back to CPU" in ort["detail"]
    # Required: the same findings are broken, with what to do.
    rc, text, report = diagnose({**env, "BOOTSTRAP_REQUIRE_GPU": "1"})
    assert_broken(rc, text, report, "gpu", "cuda_versions", "CUDA version filter")
    assert_broken(rc, text, report, "gpu", "onnxruntime", "BOOTSTRAP_REQUIRE_GPU=0")


@pytest.mark.slow
def test_degraded_env_and_a_required_extra_that_fails(tmp_path: Path, volume: Path) -> None:
    """An optional extra that cannot install: a degraded env is in use (degraded, not broken);
    the same extra required: the boot exits 12 and diagnose names it."""
    from tests.envkit import env_environ, fixture_project

    project = fixture_project(tmp_path / "fixture")
    env = env_environ(volume, project, BOOTSTRAP_EXTRAS="calc,broken", BOOTSTRAP_OPTIONAL="broken")
    assert run_bootstrap(["run", "--until", "env"], env).returncode == 0
    rc, text, report = diagnose(env)
    ready = check(report, "env", "ready")
    assert ready["status"] == "degraded", ready
    assert "dropped broken" in ready["detail"] and "(READY)" in ready["detail"]
    assert "BOOTSTRAP_EXTRAS" in ready["hint"]
    assert check(report, "env", "interpreter")["status"] == "ok"  # the env in use was probed
    required = env_environ(
        tmp_path / "vol2", project, BOOTSTRAP_EXTRAS="calc,broken", BOOTSTRAP_WORKER_ID="w12"
    )
    (tmp_path / "vol2").mkdir()
    assert run_bootstrap(["run", "--until", "env"], required).returncode == 12
    rc, text, report = diagnose(required)
    c = assert_broken(rc, text, report, "last_boot", "w12", "bootstrap explain 12")
    assert (c["exit_code"], c["exit_name"]) == (12, "ENV")
    e = assert_broken(rc, text, report, "env", "ready", "BOOTSTRAP_OPTIONAL")
    assert "latest attempt to build an environment failed (worker w12, exit 12 ENV)" in e["detail"]


def test_the_env_key_diagnose_reports_is_over_the_capability_closure(tmp_path: Path) -> None:
    """video needs faceswap: a boot builds the env of both, and diagnose must name that key."""
    from bootstrap.env import env_key, key_inputs
    from bootstrap.run import with_capability_closure

    (tmp_path / "vol").mkdir()
    s = Settings.from_env(base_environ(BOOTSTRAP_VOLUME=str(tmp_path / "vol"), BOOTSTRAP_EXTRAS="video"))
    closed = with_capability_closure(s)
    assert closed.extras != s.extras  # the closure adds faceswap
    report = dg.collect(s, dg.Options(), only=["env"])
    key = next(c for c in report.section("env").checks if c.name == "key")
    assert key.detail.startswith(env_key(key_inputs(closed, closed.extras))), key.detail
    assert "extras faceswap,video" in key.detail


# -- repos, the HF cache, the filesystem --------------------------------------------------------


def test_weights_shows_each_repo_file_the_hf_cache_snapshots_and_volume_names_moosefs(
    tmp_path: Path, hub: FaultServer
) -> None:
    cache = tmp_path / "hf-cache"
    snap = make_cache(cache, PIN)
    boot = Boot(tmp_path, repo_entry(), HF_ENDPOINT=hub.url)
    boot.run()  # speech/tiny fetched, verified and published
    # A second repo the manifest now lists, never fetched; its source carries a password.
    boot.manifest.write_text(
        repo_entry() + repo_entry("speech/missing", source=f"hf://org/tiny?revision={PIN}")
    )
    root = boot.root.resolve()
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw,relatime - overlay overlay rw\n"
        f"45 22 0:40 / {root} rw,nosuid,nodev,relatime - fuse mfs\\04310.0.0.9:9421 rw,user_id=0\n"
    )
    settings = Settings.from_env({**boot.environ, "BOOTSTRAP_HF_CACHE": str(cache)})
    report = dg.collect(settings, dg.Options(mountinfo=info), only=("weights", "volume"))
    weights = {c.name: c for c in report.section("weights").checks}
    tiny = weights["speech/tiny"]
    assert tiny.status is dg.Status.OK and tiny.detail.startswith("verified repo, 3 file(s)"), tiny.detail
    for rel in WANTED:
        assert f"ok {boot.models / 'speech/tiny' / rel}" in tiny.detail
    missing = weights["speech/missing"]
    assert missing.status is dg.Status.BROKEN and "not fetched yet" in missing.detail, missing.detail
    assert missing.hint and "bootstrap prepare" in missing.hint
    cached = weights["hf_cache"]
    assert cached.status is dg.Status.OK and f"{cache}: 1 snapshot(s)" in cached.detail
    assert f"org/tiny@{PIN} (models): {len(FILES)} file(s)" in cached.detail and str(snap) in cached.detail
    fs = {c.name: c for c in report.section("volume").checks}["filesystem"]
    assert fs.detail == f"MooseFS (fuse, mfs#10.0.0.9:9421) at {root}"

    # One file of the published repo goes bad: the entry is broken and names that file only.
    (boot.models / "speech/tiny/model.safetensors").write_bytes(b"short")
    report = dg.collect(settings, dg.Options(mountinfo=info), only=("weights",))
    tiny = {c.name: c for c in report.section("weights").checks}["speech/tiny"]
    assert tiny.status is dg.Status.BROKEN
    bad = [line for line in tiny.detail.splitlines()[1:] if not line.startswith("ok: ")]
    assert len(bad) == 1 and bad[0].endswith("/speech/tiny/model.safetensors"), tiny.detail


def test_a_password_in_a_repo_source_is_never_shown(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    manifest = tmp_path / "models.toml"
    manifest.write_text(
        repo_entry("speech/x", source="https://user:hunter2@example.com/base", files=["a.json"])
    )
    settings = Settings.from_env(
        base_environ(BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_MANIFEST=str(manifest), BOOTSTRAP_EXTRAS="t")
    )
    report = dg.collect(settings, only=("weights",))
    detail = {c.name: c for c in report.section("weights").checks}["speech/x"].detail
    assert "hunter2" not in detail and "user:***@example.com" in detail, detail


def _bin_without(tmp_path: Path, *hidden: str) -> Path:
    """A PATH directory with every program of this PATH except ``hidden`` (symlinked)."""
    out = tmp_path / "bin-without"
    out.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = Path(d) / name
            if name not in hidden and not (out / name).exists() and os.access(target, os.X_OK):
                (out / name).symlink_to(target)
    return out


def test_ffmpeg_and_nvenc_are_checked_for_the_capabilities_that_encode_video(
    volume: Path, tmp_path: Path
) -> None:
    """video runs ffmpeg and ffprobe from the image: diagnose runs them too (env section), and
    asks, as the pipeline's warm-load does, whether NVENC really encodes (gpu section)."""
    manifest = tmp_path / "empty.toml"
    manifest.write_text("")
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume), BOOTSTRAP_EXTRAS="video", BOOTSTRAP_MANIFEST=str(manifest)
    )
    _, _, report = diagnose(env)
    ff = check(report, "env", "ffmpeg")
    assert ff["status"] == "ok" and "ffprobe" in ff["detail"] and "video" in ff["detail"], ff
    nvenc = check(report, "gpu", "nvenc")  # no GPU here: the CPU encoder, said so
    assert nvenc["status"] == "unknown" and "libx264" in nvenc["detail"], nvenc

    # A GPU whose container lacks the driver's libraries (this machine, with a stand-in
    # nvidia-smi): Debian's ffmpeg lists h264_nvenc, the one-frame trial fails, and says why.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text(FAKE_SMI)
    (fake_bin / "nvidia-smi").chmod(0o755)
    _, _, report = diagnose({**env, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    nvenc = check(report, "gpu", "nvenc")
    assert nvenc["status"] == "degraded", nvenc
    assert (
        "trial failed: no NVIDIA driver in this container" in nvenc["detail"] and "libx264" in nvenc["detail"]
    )

    # ffmpeg missing from the image: video is required, so broken, with the fix; optional, degraded.
    no_ffmpeg = {**env, "PATH": str(_bin_without(tmp_path, "ffmpeg", "ffprobe"))}
    c = assert_broken(*diagnose(no_ffmpeg), "env", "ffmpeg", "apt-get install ffmpeg")
    assert "ffmpeg and ffprobe not found on PATH" in c["detail"]
    _, _, report = diagnose({**no_ffmpeg, "BOOTSTRAP_OPTIONAL": "video"})
    assert check(report, "env", "ffmpeg")["status"] == "degraded"

    # A capability that runs no program: nothing to check.
    _rc, _text, report = diagnose({**env, "BOOTSTRAP_EXTRAS": "faceswap"})
    assert check(report, "env", "ffmpeg")["detail"].startswith("not needed")
    assert "nvenc" not in {c["name"] for c in section(report, "gpu")["checks"]}
