"""`bootstrap timing` (issue 7): real boots timed per phase, a JSON report and a PNG chart."""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import pytest

from bootstrap.cli import build_parser, timing_options
from bootstrap.errors import ConfigError
from bootstrap.manifest import ModelFile
from bootstrap.timing import (
    PHASES,
    SEGMENTS,
    Repeat,
    Scenario,
    ScenarioResult,
    TimingConfig,
    TimingReport,
    corrupt_one,
    parse_scenarios,
    phases_from,
    plain_url,
    startup_ms,
    summarize,
    table,
)
from bootstrap.timing.options import cpus_for
from bootstrap.timing.report import machine_info
from bootstrap.timing.scenarios import host_views
from bootstrap.volume import Volume
from tests import moosefs as mfs
from tests.helpers import SHARED_UV_CACHE, base_environ, run_bootstrap, seed_uv_cache

EVERY_PHASE = (*PHASES, "startup")


def test_cpus_per_boot_gives_each_slot_its_own_block_of_cores() -> None:
    assert cpus_for(0, None, [0, 1, 2, 3]) is None
    assert cpus_for(0, 2, [0, 1, 2, 3]) == [0, 1]
    assert cpus_for(1, 2, [0, 1, 2, 3]) == [2, 3]
    assert cpus_for(2, 2, [0, 1, 2, 3]) == [0, 1]  # more boots than blocks: round again
    assert cpus_for(1, 1, [4, 6]) == [6]  # the cores this process may use, not 0..n
    with pytest.raises(ConfigError, match="this machine lets the boots use 2 core"):
        cpus_for(0, 3, [0, 1])


def test_scenarios_parse_with_a_worker_count() -> None:
    assert parse_scenarios(["cold", "concurrent", "4", "warm", "concurrent", "baseline"]) == [
        Scenario("cold"),
        Scenario("concurrent", 4),
        Scenario("warm"),
        Scenario("concurrent", 3),
        Scenario("baseline"),
    ]
    with pytest.raises(ConfigError, match="unknown timing scenario 'hot'"):
        parse_scenarios(["hot"])


def test_unknown_scenario_is_a_config_error_on_the_command_line(tmp_path: Path) -> None:
    proc = run_bootstrap(["timing", "lukewarm", "--out", str(tmp_path)], base_environ())
    assert proc.returncode == 2
    assert "unknown timing scenario 'lukewarm'" in proc.stderr
    assert "hint: scenarios are cold, warm, concurrent, recover, baseline" in proc.stderr


def test_phases_come_from_the_timeline_and_add_up_to_the_total() -> None:
    t0 = 1000.0
    events = [
        {"ts": t0 + 0.2, "phase": "preflight", "event": "start"},
        {"ts": t0 + 0.3, "phase": "preflight", "event": "end", "ms": 100.0},
        {"ts": t0 + 5.3, "phase": "env", "event": "end", "ms": 5000.0},
        {"ts": t0 + 5.4, "phase": "weights", "event": "wait", "detail": {}},
        {"ts": t0 + 7.3, "phase": "weights", "event": "end", "ms": 2000.0},
        {"ts": t0 + 8.9, "phase": "import", "event": "end", "ms": 1500.0},
        {"ts": t0 + 9.4, "phase": "warm", "event": "end", "ms": 500.0},
        {"ts": t0 + 9.5, "phase": "ready", "event": "end", "ms": 9300.0},
        {"ts": t0 + 9.9, "phase": "job", "event": "end", "ms": 3.0},
    ]
    phases = phases_from(events, t0, t0 + 10.0)
    assert phases == {
        "preflight": 100.0,
        "env": 5000.0,
        "weights": 2000.0,
        "import": 1500.0,
        "warm": 500.0,
        "ready": 9300.0,
        "first_job": 500.0,
        "total": 10000.0,
    }
    assert startup_ms(phases) == 400.0  # 10 000 − (100 + 5000 + 2000 + 1500 + 500) − 500
    # A boot that never answered has no total, first job or startup.
    failed = phases_from(events[:3], t0, None)
    assert failed["env"] == 5000.0 and failed["total"] is None and failed["first_job"] is None
    assert startup_ms(failed) is None


def test_summary_is_median_and_spread_of_successful_repeats() -> None:
    def rep(ok: bool, total: float) -> Repeat:
        return Repeat(ok, dict.fromkeys(EVERY_PHASE, total))

    s = summarize([rep(True, 3.0), rep(True, 1.0), rep(False, 100.0), rep(True, 2.0)])
    assert s.median["total"] == 2.0
    assert s.min["env"] == 1.0 and s.max["env"] == 3.0
    report = TimingReport(
        date="",
        machine=machine_info(),
        config=TimingConfig(repeat=4),
        scenarios=[
            ScenarioResult("warm", "warm", True, s),
            ScenarioResult("baseline", "baseline", True, summarize([rep(True, 8000.0)])),
        ],
    )
    text = table(report)
    assert "0.00 [0.00–0.00]" in text  # 2 ms median, 1–3 ms spread, in seconds
    assert "0.00×" in text.splitlines()[2]  # warm vs baseline: 2 ms / 8 s
    assert text.splitlines()[3].rstrip().endswith("1.00×")


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_corruption_hits_a_verified_file_and_never_its_other_links(tmp_path: Path, how: str) -> None:
    volume = Volume(tmp_path / "vol", "test")
    model = volume.models / "fx" / "tiny.bin"
    model.parent.mkdir(parents=True)
    data = random.Random(7).randbytes(4096)
    model.write_bytes(data)
    mirror = tmp_path / "mirror.bin"
    os.link(model, mirror)  # e.g. a fetcher that hard-linked it from a directory mirror
    record = volume.verified / "fx" / "tiny.bin.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"size": 4096}))
    assert corrupt_one(volume, how) == "fx/tiny.bin"
    after = model.read_bytes()
    assert after != data
    assert len(after) == (4096 if how == "overwrite" else 2048)
    if how == "overwrite":
        assert after.startswith(b"<!DOCTYPE html>")
    assert mirror.read_bytes() == data


def test_recover_without_a_model_file_says_what_to_select(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recover needs a verified model file"):
        corrupt_one(Volume(tmp_path, "test"), "truncate")


def test_baseline_downloads_by_dest_from_the_mirror_or_the_real_source(tmp_path: Path) -> None:
    f = ModelFile("a b/m.onnx", "hf://org/repo/sub/m.onnx?revision=" + "c" * 40, 0, "", "onnx", "", "x")
    assert plain_url(f, str(tmp_path), {}) == (tmp_path / "a b" / "m.onnx").as_uri()
    assert plain_url(f, "https://cdn.example/w/", {}) == "https://cdn.example/w/a%20b/m.onnx"
    assert plain_url(f, None, {}) == f"https://huggingface.co/org/repo/resolve/{'c' * 40}/sub/m.onnx"
    assert plain_url(f, None, {"HF_ENDPOINT": "http://127.0.0.1:9/"}).startswith(
        "http://127.0.0.1:9/org/repo/resolve/"
    )
    # The one hf:// parser (bootstrap.urls): datasets keep their kind, odd names are quoted.
    d = ModelFile("d.bin", "hf://datasets/org/ds/a b.bin?revision=main", 0, "", "raw", "", "x")
    assert plain_url(d, None, {}) == "https://huggingface.co/datasets/org/ds/resolve/main/a%20b.bin"


def test_hosts_take_one_scratch_mount_each_of_one_directory(tmp_path: Path) -> None:
    a, other = tmp_path / "a", tmp_path / "other"
    a.mkdir()
    other.mkdir()
    with pytest.raises(ConfigError, match="--hosts 2 needs 2 --scratch"):
        host_views(a, [], 2)
    with pytest.raises(ConfigError, match="not the same directory"):
        host_views(a, [other], 2, wait_s=0.3)
    view = tmp_path / "view"
    view.symlink_to(a)  # another path to the same directory
    assert host_views(a, [view], 2) == [a, view]
    assert host_views(a, [view], 1) == [a]
    assert list(a.iterdir()) == []  # the marker is gone
    args = build_parser().parse_args(
        ["timing", "concurrent", "4", "--scratch", str(a), "--scratch", str(view), "--hosts", "2"]
    )
    opts = timing_options(args)
    assert (opts.scratch, opts.mounts, opts.hosts) == (a, (view,), 2)
    assert timing_options(build_parser().parse_args(["timing", "cold"])).scratch is None


def test_hosts_over_two_moosefs_mounts_are_one_directory(moosefs: mfs.MooseFS) -> None:
    a = moosefs.a / f"timing-{uuid.uuid4().hex[:8]}"
    a.mkdir()
    b = moosefs.b / a.name
    assert host_views(a, [b], 2) == [a, b]
    with pytest.raises(ConfigError, match="not the same directory"):
        (moosefs.b / f"{a.name}-elsewhere").mkdir()
        host_views(a, [moosefs.b / f"{a.name}-elsewhere"], 2, wait_s=0.5)


@pytest.mark.slow
def test_cold_and_warm_boots_are_timed_per_phase_with_a_json_report_and_a_chart(tmp_path: Path) -> None:
    """Two repeats each of cold and warm: a small fixture model from a directory mirror, and the
    faceswap extra (from a seeded uv cache) made optional so the fixture stands in for its models."""
    from PIL import Image

    mirror = tmp_path / "mirror"
    (mirror / "fx").mkdir(parents=True)
    (mirror / "fx" / "tiny.bin").write_bytes(random.Random(1).randbytes(256 * 1024))
    manifest = tmp_path / "models.toml"
    manifest.write_text(
        '[[file]]\ndest = "fx/tiny.bin"\nsource = "https://127.0.0.1:9/fx/tiny.bin"\n'
        'format = "raw"\ncapability = "faceswap"\n'
    )
    seed = tmp_path / "seed"
    seed_uv_cache(seed, ("faceswap",))
    assert SHARED_UV_CACHE.is_dir()
    out = tmp_path / "out"
    env = base_environ(BOOTSTRAP_OPTIONAL="faceswap")
    proc = run_bootstrap(
        [
            "timing", "cold", "warm", "--repeat", "2", "--out", str(out),
            "--extras", "faceswap", "--manifest", str(manifest), "--mirror", str(mirror),
            "--seed-cache", str(seed / ".bootstrap" / "uv-cache"), "--timeout", "600",
        ],
        env,
        timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "timing.json").read_text())
    assert [s["name"] for s in report["scenarios"]] == ["cold", "warm"]
    assert report["config"]["repeat"] == 2 and report["config"]["extras"] == ["faceswap"]
    for s in report["scenarios"]:
        assert s["ok"] is True
        assert len(s["repeats"]) == 2
        for rep in s["repeats"]:
            assert rep["ok"] is True and len(rep["boots"]) == 1
            boot = rep["boots"][0]
            assert boot["job_status"] == "COMPLETED"
            for phase in EVERY_PHASE:
                assert isinstance(rep["phases"][phase], (int, float)), (s["name"], phase, rep["phases"])
                assert rep["phases"][phase] >= 0
            parts = sum(rep["phases"][p] for p in SEGMENTS)
            assert parts == pytest.approx(rep["phases"]["total"], abs=1.0)
            assert boot["env_reused"] is (s["name"] == "warm")
        for phase in EVERY_PHASE:
            assert s["min"][phase] <= s["median"][phase] <= s["max"][phase]
    cold, warm = report["scenarios"]
    assert warm["median"]["env"] < cold["median"]["env"]
    # The readable table went to stdout; scratch volumes were removed (no --keep).
    assert "scenario" in proc.stdout and "\ncold " in proc.stdout and "\nwarm " in proc.stdout
    assert not [p for p in (out / "scratch").iterdir() if p.name.startswith("vol-")]
    with Image.open(out / "timing.png") as img:
        img.verify()
    with Image.open(out / "timing.png") as img:
        assert img.format == "PNG"
        assert img.size[0] >= 800 and img.size[1] >= 200
    assert (out / "timing.png").stat().st_size > 10_000


@pytest.mark.slow
def test_concurrent_workers_and_a_corrupted_model_are_timed_and_recovered(tmp_path: Path) -> None:
    """``concurrent 2`` reports each worker and the slowest; ``recover`` truncates the verified
    fixture model on a warm volume, and the boot must quarantine it and fetch it again."""
    mirror = tmp_path / "mirror"
    (mirror / "fx").mkdir(parents=True)
    (mirror / "fx" / "tiny.bin").write_bytes(random.Random(2).randbytes(128 * 1024))
    manifest = tmp_path / "models.toml"
    manifest.write_text(
        '[[file]]\ndest = "fx/tiny.bin"\nsource = "https://127.0.0.1:9/fx/tiny.bin"\n'
        'format = "raw"\ncapability = "faceswap"\n'
    )
    seed = tmp_path / "seed"
    seed_uv_cache(seed, ("faceswap",))
    out = tmp_path / "out"
    proc = run_bootstrap(
        [
            "timing", "concurrent", "2", "recover", "--out", str(out), "--no-chart",
            "--extras", "faceswap", "--manifest", str(manifest), "--mirror", str(mirror),
            "--seed-cache", str(seed / ".bootstrap" / "uv-cache"), "--timeout", "600",
            "--cpus-per-boot", "1",
        ],
        base_environ(BOOTSTRAP_OPTIONAL="faceswap"),
        timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not (out / "timing.png").exists()
    report = json.loads((out / "timing.json").read_text())
    concurrent, recover = report["scenarios"]
    assert concurrent["label"] == "concurrent 2" and concurrent["workers"] == 2
    (rep,) = concurrent["repeats"]
    assert len(rep["boots"]) == 2 and len({b["worker_id"] for b in rep["boots"]}) == 2
    assert rep["phases"]["total"] == max(b["phases"]["total"] for b in rep["boots"])
    # One environment serves both: one built it under the lease, the other waited and reused it.
    assert sorted(b["env_reused"] for b in rep["boots"]) == [False, True]
    assert len(concurrent["per_worker"]) == 2
    assert concurrent["per_worker"][0]["median"]["total"] <= concurrent["per_worker"][1]["median"]["total"]
    assert "#1 of 2" in proc.stdout and "#2 of 2" in proc.stdout
    # --cpus-per-boot 1: each worker ran on one core of its own (read from its process)
    cores = sorted(os.sched_getaffinity(0))
    assert sorted(b["cpus"] for b in rep["boots"]) == [[cores[0]], [cores[1 % len(cores)]]]
    (rec,) = recover["repeats"]
    (boot,) = rec["boots"]
    assert boot["ok"] is True and boot["quarantined"] >= 1
    assert boot["env_reused"] is True
    assert "recover: corrupted fx/tiny.bin (truncate)" in proc.stdout
    # The concurrent volume, complete once both boots answered, was the warm volume: no untimed boot.
    assert not list((out / "logs").glob("timing-prepare-*"))


@pytest.mark.slow
def test_concurrent_boots_spread_over_two_moosefs_mounts(tmp_path: Path, moosefs: mfs.MooseFS) -> None:
    """``concurrent 2 --hosts 2``: each worker boots through its own mount of one MooseFS volume;
    both answer, one builds the env and the other reuses it."""
    manifest = tmp_path / "models.toml"
    manifest.write_text("")
    seed = tmp_path / "seed"
    seed_uv_cache(seed, ())
    name = f"timing-{uuid.uuid4().hex[:8]}"
    a, b = moosefs.a / name, moosefs.b / name
    out = tmp_path / "out"
    proc = run_bootstrap(
        [
            "timing", "concurrent", "2", "--hosts", "2", "--scratch", str(a), "--scratch", str(b),
            "--out", str(out), "--no-chart", "--extras", "", "--manifest", str(manifest),
            "--seed-cache", str(seed / ".bootstrap" / "uv-cache"), "--timeout", "600",
        ],
        base_environ(),
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "timing.json").read_text())
    assert report["config"]["hosts"] == [str(a), str(b)]
    (rep,) = report["scenarios"][0]["repeats"]
    assert all(boot["ok"] and boot["job_status"] == "COMPLETED" for boot in rep["boots"]), rep["boots"]
    assert sorted(Path(boot["volume"]).parent for boot in rep["boots"]) == sorted([a, b])
    assert len({Path(boot["volume"]).name for boot in rep["boots"]}) == 1  # one volume, two mounts
    assert sorted(boot["env_reused"] for boot in rep["boots"]) == [False, True]
