"""Many workers boot at once on one volume, and builders die at random instants (F12, F13, F14)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bootstrap import env as envmod
from tests.envkit import check_env_works, env_end, env_environ, fixture_project, leftovers, published_envs
from tests.helpers import BOOTSTRAP, REPO, run_bootstrap

UNTIL_ENV = ["run", "--until", "env"]
SEED = 20261123


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixture_project(tmp_path_factory.mktemp("fixture"))


def _start(volume: Path, project: Path, worker: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*BOOTSTRAP, *UNTIL_ENV],
        env=env_environ(volume, project, BOOTSTRAP_WORKER_ID=worker, **env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a SIGKILL takes uv with it, as a container stop does
    )


def _boot_many(volume: Path, project: Path, n: int, **env: str) -> list[dict[str, object]]:
    procs = [_start(volume, project, f"w{i}", **env) for i in range(n)]
    details = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        details.append(env_end(out))
    return details


@pytest.mark.slow
def test_eight_workers_at_once_build_once(project: Path, volume: Path) -> None:
    details = _boot_many(volume, project, 8)
    keys = {d["key"] for d in details}
    assert len(keys) == 1
    assert sorted(d["reused"] for d in details) == [False] + [True] * 7
    (final,) = published_envs(volume)
    assert final.name in keys and leftovers(volume) == []
    check_env_works(final)
    # the seven that waited said so, naming the builder
    waits = []
    for i in range(8):
        log = (volume / ".bootstrap" / "logs" / f"w{i}" / "boot.jsonl").read_text().splitlines()
        waits += [json.loads(x) for x in log if '"wait"' in x]
    assert waits and all(
        str(w["detail"].get("owner", "")).startswith("w") for w in waits if "owner" in w["detail"]
    )
    assert not list((volume / ".bootstrap" / "leases").glob("*.lease"))


@pytest.mark.slow
def test_eight_workers_without_locks_publish_exactly_one_env(project: Path, volume: Path) -> None:
    details = _boot_many(volume, project, 8, BOOTSTRAP_LOCKS="off")
    keys = {d["key"] for d in details}
    assert len(keys) == 1
    (final,) = published_envs(volume)
    assert final.name in keys
    # several may have built; exactly one published; the others discarded theirs
    assert [d["reused"] for d in details].count(False) == 1
    assert leftovers(volume) == []
    check_env_works(final)
    ready = json.loads((final / "READY").read_text())
    assert ready["builder"] in {f"w{i}" for i in range(8)}


@pytest.mark.slow
def test_builder_killed_at_random_instants_never_leaves_a_usable_half_env(
    project: Path, volume: Path
) -> None:
    rng = random.Random(SEED)
    # A timed build (warm uv cache, as every later one) gives the window kill instants come from.
    assert (
        run_bootstrap(
            UNTIL_ENV, env_environ(volume, project, BOOTSTRAP_WORKER_ID="cold"), timeout=300
        ).returncode
        == 0
    )
    (final,) = published_envs(volume)
    envmod.remove_tree(final)
    t0 = time.monotonic()
    first = run_bootstrap(UNTIL_ENV, env_environ(volume, project, BOOTSTRAP_WORKER_ID="timer"), timeout=300)
    window = time.monotonic() - t0
    assert first.returncode == 0, first.stderr[-2000:]
    kills = 0
    for i in range(40):
        if kills >= 22:
            break
        envmod.remove_tree(final)  # the harness forgets the env: the next boot must build it
        proc = _start(volume, project, f"k{i}")
        time.sleep(rng.uniform(0.0, window * 0.9))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        # whatever the instant, a published env is whole: READY, and it works
        for env_dir in published_envs(volume):
            assert envmod.is_ready(env_dir), f"instant {i}: {env_dir} published without READY"
            check_env_works(env_dir)
        nxt = run_bootstrap(UNTIL_ENV, env_environ(volume, project, BOOTSTRAP_WORKER_ID=f"n{i}"), timeout=300)
        assert nxt.returncode == 0, f"instant {i}: {nxt.stderr[-2000:]}"
        used = volume / ".bootstrap" / "envs" / env_end(nxt.stdout)["key"]
        assert envmod.is_ready(used)
        check_env_works(used)
        # leftovers of the dead builder are gone after the next boot (or, at the latest, gc)
        if leftovers(volume):
            gc = run_bootstrap(["gc"], env_environ(volume, project))
            assert gc.returncode == 0
        assert leftovers(volume) == [], f"instant {i}: {leftovers(volume)}"
    assert kills >= 20
