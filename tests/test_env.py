"""Phase env on real filesystems with real uv: fixture projects and a local wheelhouse (no registry)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from bootstrap import env as envmod
from bootstrap import interpreter as interp
from bootstrap.settings import Settings
from bootstrap.volume import Volume
from tests.envkit import (
    check_env_works,
    env_end,
    env_environ,
    fixture_project,
    leftovers,
    published_envs,
)
from tests.helpers import base_environ, can_mount_tmpfs, run_bootstrap, seed_uv_cache, tmpfs

UNTIL_ENV = ["run", "--until", "env"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixture_project(tmp_path_factory.mktemp("fixture"))


def _boot(volume: Path, project: Path, **env: str):  # type: ignore[no-untyped-def]
    return run_bootstrap(UNTIL_ENV, env_environ(volume, project, **env), timeout=300)


def _boot_log(volume: Path, worker: str) -> str:
    return (volume / ".bootstrap" / "logs" / worker / "boot.log").read_text()


def _snapshot(tree: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(tree.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(tree))] = (
                st.st_ino,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


# -- key and estimate ---------------------------------------------------------------------------


def test_key_covers_lock_extras_and_interpreter(project: Path, tmp_path: Path) -> None:
    s = Settings.from_env(base_environ(BOOTSTRAP_PROJECT_DIR=str(project), BOOTSTRAP_VOLUME=str(tmp_path)))
    inputs = envmod.key_inputs(s, ("calc",))
    assert set(inputs) == {"layout", "uv_lock", "extras", "python", "platform", "libc"}
    assert set(inputs["python"]) == {"implementation", "version", "abi", "path"}
    assert inputs["python"]["path"] == os.path.realpath(inputs["python"]["path"])
    key = envmod.env_key(inputs)
    assert key == envmod.env_key(envmod.key_inputs(s, ("calc",)))
    assert key != envmod.env_key(envmod.key_inputs(s, ("calc", "big")))
    assert envmod.env_key(envmod.key_inputs(s, ("big", "calc"))) == envmod.env_key(
        envmod.key_inputs(s, ("calc", "big"))
    )
    other = dict(inputs, python=dict(inputs["python"], version="3.11.8"))
    assert envmod.env_key(other) != key


def test_estimate_counts_the_wheels_of_the_selected_extras(project: Path) -> None:
    lock = project / "uv.lock"
    base, n_base = envmod.estimate_install_bytes(lock, ())
    big, n_big = envmod.estimate_install_bytes(lock, ("big",))
    assert n_base == 1 and n_big == 2
    wheel = next((project.parent / "wheels").glob("bulk-*.whl")).stat().st_size
    assert (
        big - base == int(wheel * envmod.INSTALL_FACTOR)
        or abs(big - base - wheel * envmod.INSTALL_FACTOR) < 2
    )


def test_estimate_reads_registry_sizes_for_this_platform() -> None:
    lock = Path(__file__).resolve().parent.parent / "uv.lock"
    needed, count = envmod.estimate_install_bytes(lock, ("faceswap",))
    base, _ = envmod.estimate_install_bytes(lock, ())
    # onnxruntime-gpu alone is a few hundred MB of wheel: the face-swap set needs GBs installed.
    assert count > 20 and needed > 1e9 and base < needed


# -- build, publish, reuse ----------------------------------------------------------------------


@pytest.mark.slow
def test_build_publishes_a_working_env_then_reuses_it(project: Path, volume: Path) -> None:
    proc = _boot(volume, project, BOOTSTRAP_WORKER_ID="w1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    detail = env_end(proc.stdout)
    assert detail["reused"] is False
    final = volume / ".bootstrap" / "envs" / detail["key"]
    assert published_envs(volume) == [final] and leftovers(volume) == []
    ready = json.loads((final / "READY").read_text())
    assert ready["key"] == detail["key"] and ready["extras"] == ["calc"] and ready["builder"] == "w1"
    assert ready["inputs"]["uv_lock"] == hashlib.sha256((project / "uv.lock").read_bytes()).hexdigest()
    assert envmod.pyvenv_home(final) == ready["home"] == str(Path(ready["python"]).parent)
    assert "relocatable = true" in (final / "pyvenv.cfg").read_text()
    # bytecode compiled at build time (by fastfs with the env's own Python, not by uv), console
    # scripts and `python -m` after the rename
    assert list((final / "lib").glob("python*/site-packages/beta/__pycache__/mod3.*.pyc"))
    site = next(final.glob("lib/python*/site-packages"))
    sources = list((site / "beta").glob("*.py"))
    assert sources and all(list((site / "beta" / "__pycache__").glob(f"{py.stem}.*.pyc")) for py in sources)
    log = _boot_log(volume, "w1")
    assert "--compile-bytecode" not in log and "fastfs.py compile " in log
    assert ready["steps_ms"]["compile"] > 0 and "prefetch_list" in ready["steps_ms"]
    check_env_works(final)
    assert "smoke" in log
    # The prefetch list: the env's files a worker start reads, relative to the env, all there.
    listed = (final / ".prefetch").read_text().splitlines()
    assert listed and all(not p.startswith("/") and (final / p).is_file() for p in listed), listed[:5]
    assert any(p.startswith("lib/") and "/beta/" in p for p in listed), listed  # the smoke's imports
    # ... recorded by the smoke test's own process (one import of everything per build, not two)
    assert "--record worker.main --record runpod" in log
    assert '"files"' not in log  # the list goes into .prefetch, not into the boot log

    again = _boot(volume, project, BOOTSTRAP_WORKER_ID="w2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert env_end(again.stdout) == {"key": detail["key"], "python": detail["python"], "reused": True}
    assert "uv sync" not in _boot_log(volume, "w2")


@pytest.mark.slow
def test_a_half_built_env_without_ready_is_never_used(project: Path, volume: Path) -> None:
    s = Settings.from_env(env_environ(volume, project))
    key = envmod.env_key(envmod.key_inputs(s, ("calc",)))
    fake = volume / ".bootstrap" / "envs" / key
    fake.mkdir(parents=True)
    (fake / "pyvenv.cfg").write_text("home = /nonexistent\n")
    proc = _boot(volume, project, BOOTSTRAP_WORKER_ID="w1")
    # the target exists but holds no READY: never used, set aside, and a real env published
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert env_end(proc.stdout)["reused"] is False
    assert envmod.is_ready(fake)
    check_env_works(fake)
    assert len(list((volume / ".bootstrap" / "envs").glob(envmod.BROKEN_PREFIX + "*"))) == 1


@pytest.mark.slow
def test_ready_env_with_wrong_home_is_set_aside_and_rebuilt(project: Path, volume: Path) -> None:
    assert _boot(volume, project, BOOTSTRAP_WORKER_ID="w1").returncode == 0
    (final,) = published_envs(volume)
    # Simulate an env whose interpreter moved: a copy of it with a home that is not ours.
    cfg = final / "pyvenv.cfg"
    text = cfg.read_text()
    cfg.unlink()  # replace, never edit the (hard-linked) file in place
    cfg.write_text(text.replace("home = ", "home = /elsewhere"))
    proc = _boot(volume, project, BOOTSTRAP_WORKER_ID="w2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert env_end(proc.stdout)["reused"] is False
    assert envmod.pyvenv_home(final) == str(Path(json.loads((final / "READY").read_text())["python"]).parent)
    assert [
        p.name.startswith(envmod.BROKEN_PREFIX) for p in (volume / ".bootstrap" / "envs").iterdir()
    ].count(True) == 1


# -- disk ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a tmpfs")
def test_too_small_volume_exits_11_before_uv_starts(project: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4m") as vol:
        proc = _boot(vol, project, BOOTSTRAP_EXTRAS="calc,big", BOOTSTRAP_WORKER_ID="w1")
        assert proc.returncode == 11, proc.stdout[-2000:] + proc.stderr[-2000:]
        err = proc.stderr
        assert "error: not enough space for the environment" in err
        assert "bytes" in err and "is free" in err and str(vol) in err
        needed = envmod.estimate_install_bytes(project / "uv.lock", ("calc", "big"))[0]
        assert f"({needed} bytes)" in err
        log = _boot_log(vol, "w1")
        assert "$ " not in log  # no uv command ever ran
        assert list((vol / ".bootstrap" / "uv-cache").iterdir()) == []
        assert leftovers(vol) == [] and published_envs(vol) == []
        fail = [e for e in env_events_of(proc.stdout) if e["event"] == "fail"]
        assert fail and fail[0]["detail"]["code"] == 11


def env_events_of(stdout: str) -> list[dict[str, object]]:
    from tests.envkit import env_events

    return env_events(stdout)


# -- degradation --------------------------------------------------------------------------------


@pytest.mark.slow
def test_optional_capability_that_does_not_install_is_dropped(project: Path, volume: Path) -> None:
    proc = _boot(
        volume, project, BOOTSTRAP_EXTRAS="calc,broken", BOOTSTRAP_OPTIONAL="broken", BOOTSTRAP_WORKER_ID="w1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    detail = env_end(proc.stdout)
    assert detail["dropped"] == ["broken"] and detail["reused"] is False
    s = Settings.from_env(env_environ(volume, project))
    assert detail["key"] == envmod.env_key(envmod.key_inputs(s, ("broken", "calc")))
    # published under the key of what it holds
    assert detail["published_key"] == envmod.env_key(envmod.key_inputs(s, ("calc",)))
    final = volume / ".bootstrap" / "envs" / detail["published_key"]
    ready = json.loads((final / "READY").read_text())
    assert ready["extras"] == ["calc"]
    reason = ready["dropped"]["broken"]
    assert reason.startswith("uv sync --extra broken failed:") and "gamma" in reason
    check_env_works(final)
    assert not list(final.glob("lib/python*/site-packages/gamma*"))
    # within 10 minutes the next boot reuses the degraded env (and says what is missing)
    again = _boot(
        volume, project, BOOTSTRAP_EXTRAS="calc,broken", BOOTSTRAP_OPTIONAL="broken", BOOTSTRAP_WORKER_ID="w2"
    )
    assert again.returncode == 0
    d2 = env_end(again.stdout)
    assert (
        d2["reused"] is True
        and d2["dropped"] == ["broken"]
        and d2["published_key"] == detail["published_key"]
    )
    # after the retry interval the full set is tried again (and fails again, reusing the same env)
    record = volume / ".bootstrap" / "envs" / f"{envmod.FAILED_PREFIX}{detail['key']}.json"
    data = json.loads(record.read_text())
    data["at"] -= envmod.RETRY_FULL_AFTER_S + 1
    record.write_text(json.dumps(data))
    third = _boot(
        volume, project, BOOTSTRAP_EXTRAS="calc,broken", BOOTSTRAP_OPTIONAL="broken", BOOTSTRAP_WORKER_ID="w3"
    )
    assert third.returncode == 0
    assert "uv sync --frozen" in _boot_log(volume, "w3")
    assert env_end(third.stdout)["dropped"] == ["broken"]
    assert published_envs(volume) == [final] and leftovers(volume) == []
    # the same extras with 'broken' no longer optional: the degraded env is not an answer
    strict = _boot(volume, project, BOOTSTRAP_EXTRAS="calc,broken", BOOTSTRAP_WORKER_ID="w4")
    assert strict.returncode == 12, strict.stderr[-2000:]


@pytest.mark.slow
def test_required_capability_that_does_not_install_exits_12_with_uvs_message(
    project: Path, volume: Path
) -> None:
    proc = _boot(volume, project, BOOTSTRAP_EXTRAS="calc,broken", BOOTSTRAP_WORKER_ID="w1")
    assert proc.returncode == 12, proc.stderr[-3000:]
    log = _boot_log(volume, "w1")
    assert "gamma" in log and "uv sync failed" in log
    assert "error: Failed to" in log  # uv's own words
    assert published_envs(volume) == [] and leftovers(volume) == []


@pytest.mark.slow
def test_capability_whose_import_fails_degrades_or_exits_12(project: Path, volume: Path) -> None:
    proc = _boot(
        volume,
        project,
        BOOTSTRAP_EXTRAS="calc,noimport",
        BOOTSTRAP_OPTIONAL="noimport",
        BOOTSTRAP_WORKER_ID="w1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    detail = env_end(proc.stdout)
    assert detail["dropped"] == ["noimport"]
    final = volume / ".bootstrap" / "envs" / detail["published_key"]
    ready = json.loads((final / "READY").read_text())
    assert "libGL.so.1" in ready["dropped"]["noimport"] and ready["extras"] == ["calc"]
    assert not list(final.glob("lib/python*/site-packages/delta"))  # removed from what was published

    other = volume.parent / "v2"
    other.mkdir()
    proc = _boot(other, project, BOOTSTRAP_EXTRAS="calc,noimport", BOOTSTRAP_WORKER_ID="w2")
    assert proc.returncode == 12
    assert "libGL.so.1" in _boot_log(other, "w2") and "libGL.so.1" in proc.stderr
    assert published_envs(other) == []


# -- rebuild after a one-package change ---------------------------------------------------------


@pytest.mark.slow
def test_one_package_change_clones_the_previous_env_without_touching_it(project: Path, volume: Path) -> None:
    assert _boot(volume, project, BOOTSTRAP_WORKER_ID="w1").returncode == 0
    (old,) = published_envs(volume)
    before = _snapshot(old)
    changed = fixture_project(project.parent, alpha_pin="==2.0", name="project-alpha2")
    proc = _boot(volume, changed, BOOTSTRAP_WORKER_ID="w2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = volume / ".bootstrap" / "envs" / env_end(proc.stdout)["key"]
    ready = json.loads((new / "READY").read_text())
    assert ready["cloned_from"] == old.name
    assert ready["compiled_files"] == 2  # only the changed package (alpha 2.0: two modules) was compiled
    assert "fastfs.py compile-list " in _boot_log(volume, "w2")
    assert _snapshot(old) == before  # the published env is untouched, byte for byte and inode for inode
    check_env_works(new)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    import subprocess

    out = subprocess.run(
        [str(new / "bin" / "python"), "-c", "import alpha; print(alpha.VERSION)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "2.0"
    # unchanged packages are shared by hard link, bytecode included
    site_old = next(old.glob("lib/python*/site-packages"))
    site_new = next(new.glob("lib/python*/site-packages"))
    assert (site_old / "beta" / "mod3.py").stat().st_ino == (site_new / "beta" / "mod3.py").stat().st_ino
    assert list((site_new / "alpha" / "__pycache__").glob("*.pyc"))
    # metadata files uv may rewrite are private copies
    rec = "beta-1.0.dist-info/RECORD"
    assert (site_old / rec).stat().st_ino != (site_new / rec).stat().st_ino


@pytest.mark.slow
def test_a_failing_clone_falls_back_to_a_fresh_build(project: Path, volume: Path, tmp_path: Path) -> None:
    assert _boot(volume, project, BOOTSTRAP_WORKER_ID="w1").returncode == 0
    (old,) = published_envs(volume)
    before = _snapshot(old)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cp").write_text(
        "#!/bin/sh\necho 'cp: cannot create hard link: Operation not permitted' >&2\nexit 1\n"
    )
    (fake / "cp").chmod(0o755)
    changed = fixture_project(project.parent, alpha_pin="==2.0", name="project-alpha2-fallback")
    proc = _boot(volume, changed, BOOTSTRAP_WORKER_ID="w2", PATH=f"{fake}:{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = volume / ".bootstrap" / "envs" / env_end(proc.stdout)["key"]
    assert json.loads((new / "READY").read_text())["cloned_from"] is None
    assert "clone failed" in _boot_log(volume, "w2")
    check_env_works(new)
    assert _snapshot(old) == before


# -- managed interpreter ------------------------------------------------------------------------


def test_managed_install_command_and_layout(tmp_path: Path) -> None:
    vol = Volume(tmp_path, "BOOTSTRAP_VOLUME")
    argv, env = interp.install_command("uv", vol, "3.11")
    assert argv == ["uv", "python", "install", "--install-dir", str(vol.python), "--no-bin", "3.11"]
    assert env["UV_PYTHON_INSTALL_DIR"] == str(tmp_path / ".bootstrap" / "python")
    assert interp.find_managed(tmp_path, "3.11") is None


def _fake_managed(volume: Path) -> Path:
    """Place the test's interpreter where uv would install it (the download cannot run here)."""
    info = interp.system_interpreter()
    ver = info.version
    d = volume / ".bootstrap" / "python" / f"cpython-{ver}-linux-x86_64-gnu" / "bin"
    d.mkdir(parents=True)
    minor = ".".join(ver.split(".")[:2])
    (d / f"python{minor}").symlink_to(info.executable)
    return d / f"python{minor}"


@pytest.mark.slow
def test_managed_env_is_valid_under_either_mount_path(project: Path, tmp_path: Path) -> None:
    pod = tmp_path / "workspace"
    pod.mkdir()
    exe = _fake_managed(pod)
    proc = _boot(pod, project, BOOTSTRAP_PYTHON="managed", BOOTSTRAP_WORKER_ID="pod")
    assert proc.returncode == 0, proc.stderr[-3000:]
    detail = env_end(proc.stdout)
    final = pod / ".bootstrap" / "envs" / detail["key"]
    ready = json.loads((final / "READY").read_text())
    rel = str(exe.relative_to(pod))
    assert ready["inputs"]["python"]["path"] == rel  # relative to the volume root
    alias = interp.ALIAS_ROOT / (pod / ".bootstrap" / "volume-id").read_text().strip()
    assert envmod.pyvenv_home(final) == str((alias / rel).parent)
    # the same volume mounted elsewhere (serverless): same key, env reused and working
    serverless = tmp_path / "runpod-volume"
    pod.rename(serverless)
    proc = _boot(serverless, project, BOOTSTRAP_PYTHON="managed", BOOTSTRAP_WORKER_ID="sls")
    assert proc.returncode == 0, proc.stderr[-3000:]
    d2 = env_end(proc.stdout)
    assert d2["key"] == detail["key"] and d2["reused"] is True
    assert os.readlink(alias) == str(serverless)
    check_env_works(serverless / ".bootstrap" / "envs" / detail["key"])
    alias.unlink()  # container disk in production; here, do not leave links to a deleted tmp dir


# -- the real project ---------------------------------------------------------------------------


@pytest.mark.slow
def test_real_project_base_env_builds_then_is_reused(volume: Path) -> None:
    seed_uv_cache(volume)
    env = base_environ(
        BOOTSTRAP_VOLUME=str(volume),
        BOOTSTRAP_EXTRAS="",
        BOOTSTRAP_WORKER_ID="real",
        BOOTSTRAP_MIN_FREE_GB="0",
    )
    proc = run_bootstrap(UNTIL_ENV, env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = env_end(proc.stdout)
    assert first["reused"] is False
    final = volume / ".bootstrap" / "envs" / first["key"]
    assert json.loads((final / "READY").read_text())["extras"] == []
    proc = run_bootstrap(UNTIL_ENV, env, timeout=900)
    assert proc.returncode == 0
    assert env_end(proc.stdout)["reused"] is True


def test_find_managed_picks_the_newest_matching_default_build(tmp_path: Path) -> None:
    base = tmp_path / ".bootstrap" / "python"
    for name, exe in [
        ("cpython-3.11.5-linux-x86_64-gnu", "python3.11"),
        ("cpython-3.11.9-linux-x86_64-gnu", "python3.11"),
        ("cpython-3.11.10+freethreaded-linux-x86_64-gnu", "python3.11"),
        ("cpython-3.12.1-linux-x86_64-gnu", "python3.12"),
        ("cpython-3.11.12-linux-x86_64-gnu", "missing"),
    ]:
        (base / name / "bin").mkdir(parents=True)
        (base / name / "bin" / exe).touch()
    found = interp.find_managed(tmp_path, "3.11")
    assert found == base / "cpython-3.11.9-linux-x86_64-gnu" / "bin" / "python3.11"
    assert (
        interp.find_managed(tmp_path, "3.12.1")
        == base / "cpython-3.12.1-linux-x86_64-gnu" / "bin" / "python3.12"
    )
    assert interp.find_managed(tmp_path, "3.13") is None


@pytest.mark.slow
def test_ready_env_without_its_python_is_set_aside_and_rebuilt(project: Path, volume: Path) -> None:
    """A READY env whose bin/python is gone was reused, and every boot exited 1 with nothing logged."""
    assert _boot(volume, project, BOOTSTRAP_WORKER_ID="w1").returncode == 0
    (final,) = published_envs(volume)
    envmod.env_python(final).unlink()
    proc = _boot(volume, project, BOOTSTRAP_WORKER_ID="w2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert env_end(proc.stdout)["reused"] is False
    assert "is missing: the environment is damaged" in _boot_log(volume, "w2")
    assert envmod.env_python(final).exists()
    check_env_works(final)
    aside = [p for p in (volume / ".bootstrap" / "envs").iterdir() if p.name.startswith(envmod.BROKEN_PREFIX)]
    assert len(aside) == 1


@pytest.mark.slow
def test_a_failed_exec_of_the_worker_is_logged_and_named(project: Path, volume: Path) -> None:
    assert _boot(volume, project, BOOTSTRAP_WORKER_ID="w1").returncode == 0
    (final,) = published_envs(volume)
    exe = envmod.env_python(final)
    exe.unlink()
    exe.write_text("not a program\n")  # there, but not executable: exec fails with EACCES
    proc = run_bootstrap(["run"], env_environ(volume, project, BOOTSTRAP_WORKER_ID="w3"), timeout=300)
    assert proc.returncode == 12, proc.stderr[-3000:]
    assert f"exec of {exe} failed" in proc.stderr
    assert f"exec of {exe} failed" in _boot_log(volume, "w3")
    assert "prefetching the worker's files" in _boot_log(volume, "w3")  # started before the exec
    events = [
        json.loads(line)
        for line in (volume / ".bootstrap" / "logs" / "w3" / "boot.jsonl").read_text().splitlines()
    ]
    assert events[-1]["event"] == "fail" and events[-1]["detail"]["code"] == 12
