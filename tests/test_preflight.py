"""Preflight for real: volume resolution, a write probe, free space (SPEC §3, exit 10 and 11)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bootstrap.errors import InsufficientDiskError, VolumeError
from bootstrap.settings import Settings
from bootstrap.volume import Volume, preflight, require_free, resolve_volume
from tests.helpers import base_environ, can_mount_tmpfs, read_jsonl, run_bootstrap, tmpfs

needs_root = pytest.mark.skipif(not can_mount_tmpfs(), reason="mounting tmpfs needs root")


def test_unwritable_volume_exits_10_with_a_hint(tmp_path: Path) -> None:
    if not can_mount_tmpfs():
        pytest.skip("mounting tmpfs needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        proc = run_bootstrap(
            ["run"], base_environ(BOOTSTRAP_VOLUME=str(ro), BOOTSTRAP_EXTRAS=""), cwd=tmp_path
        )
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    assert f"the volume at {ro} is not writable" in proc.stderr
    assert "hint: attach the network volume read-write" in proc.stderr
    # The timeline says it too, as a fail event with code and hint, on stdout.
    fail = [line for line in proc.stdout.splitlines() if '"event": "fail"' in line]
    assert fail and '"code": 10' in fail[0] and '"hint"' in fail[0]


@needs_root
def test_too_small_volume_exits_11_with_bytes_needed_and_free(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "64m") as vol:
        proc = run_bootstrap(
            ["run"], base_environ(BOOTSTRAP_VOLUME=str(vol), BOOTSTRAP_EXTRAS=""), cwd=tmp_path
        )
        events = (
            read_jsonl(vol / ".bootstrap" / "logs" / "vm" / "boot.jsonl")
            if (vol / ".bootstrap" / "logs" / "vm").exists()
            else []
        )
    assert proc.returncode == 11, proc.stdout + proc.stderr
    assert "not enough space for the volume's reserve" in proc.stderr
    assert "2.00 GB (2000000000 bytes)" in proc.stderr  # the reserve, in GB and bytes
    assert "only 0.07 GB (67" in proc.stderr  # free, in GB and bytes
    assert "hint: grow that filesystem by" in proc.stderr
    assert "BOOTSTRAP_MIN_FREE_GB" in proc.stderr
    if events:
        assert events[-1]["event"] == "fail" and events[-1]["detail"]["code"] == 11


@needs_root
def test_lowering_the_reserve_lets_a_small_volume_pass_preflight(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "64m") as vol:
        settings = Settings.from_env({"BOOTSTRAP_VOLUME": str(vol), "BOOTSTRAP_MIN_FREE_GB": "0.01"})
        detail = preflight(settings, resolve_volume(settings))
        assert detail["free_bytes"] > 10**7
        assert (vol / ".bootstrap" / "envs").is_dir()


def test_missing_explicit_volume_is_exit_10(tmp_path: Path) -> None:
    proc = run_bootstrap(["run"], base_environ(BOOTSTRAP_VOLUME=str(tmp_path / "absent")), cwd=tmp_path)
    assert proc.returncode == 10
    assert "does not exist" in proc.stderr and "hint:" in proc.stderr


def test_required_volume_not_mounted_is_exit_10(tmp_path: Path) -> None:
    # On RunPod (RUNPOD_POD_ID set) the volume is required; here neither mount point exists.
    proc = run_bootstrap(["run"], base_environ(RUNPOD_POD_ID="pod123"), cwd=tmp_path)
    assert proc.returncode == 10, proc.stderr
    assert "no network volume" in proc.stderr
    assert "BOOTSTRAP_REQUIRE_VOLUME=0" in proc.stderr
    assert not (tmp_path / ".volume").exists()


def test_resolution_order(tmp_path: Path) -> None:
    mounts: set[Path] = set()
    settings = Settings.from_env({})
    # Nothing mounted and not required: ./.volume, marked degraded for run, not for serve.
    vol = resolve_volume(settings, is_mount=lambda p: p in mounts, cwd=tmp_path)
    assert vol == Volume((tmp_path / ".volume").resolve(), "./.volume", degraded=True)
    assert (
        resolve_volume(settings, allow_local=True, is_mount=lambda p: p in mounts, cwd=tmp_path).degraded
        is False
    )
    mounts.add(Path("/workspace"))
    assert resolve_volume(settings, is_mount=lambda p: p in mounts).how == "/workspace"
    mounts.add(Path("/runpod-volume"))
    assert resolve_volume(settings, is_mount=lambda p: p in mounts).root == Path("/runpod-volume")
    explicit = Settings.from_env({"BOOTSTRAP_VOLUME": str(tmp_path)})
    assert resolve_volume(explicit, is_mount=lambda p: p in mounts).how == "BOOTSTRAP_VOLUME"
    required = Settings.from_env({"RUNPOD_POD_ID": "x"})
    with pytest.raises(VolumeError):
        resolve_volume(required, is_mount=lambda p: False, cwd=tmp_path)


def test_require_free_names_the_filesystem_and_numbers(tmp_path: Path) -> None:
    from bootstrap.volume import DiskUsage

    with pytest.raises(InsufficientDiskError) as info:
        require_free(
            tmp_path, 3 * 10**9, 2 * 10**9, what="the env", usage=lambda p: DiskUsage(10**10, 0, 4 * 10**9)
        )
    err = info.value
    assert err.exit_code == 11
    assert "needs 3.00 GB (3000000000 bytes) plus a reserve of 2.00 GB (2000000000 bytes)" in err.message
    assert "only 4.00 GB (4000000000 bytes) is free" in err.message
    assert "by 1.00 GB" in err.hint
    assert isinstance(err, OSError)
