"""Settings are read once into a frozen object; bad values are CONFIG errors with a hint."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest

from bootstrap import errors
from bootstrap.errors import ConfigError, WeightsError
from bootstrap.settings import Settings, parse_budgets, redact
from bootstrap.timeline import Timeline, read_events, secret_values
from tests.helpers import base_environ, run_bootstrap


def test_defaults_match_the_spec(tmp_path: Path) -> None:
    s = Settings.from_env({})
    assert s.volume is None and s.require_volume is False
    assert s.extras == ("faceswap",) and s.optional == frozenset()
    assert s.manifest.name == "models.toml" and s.manifest.parent.name == "worker"
    assert s.min_free_bytes == 2 * 10**9
    assert (s.lock_timeout_s, s.lease_ttl_s) == (900, 30)
    assert dict(s.phase_budget_s) == {"preflight": 60, "env": 1800, "weights": 1800, "warm": 600}
    assert (s.on_fatal, s.fatal_grace_s, s.log_format, s.python) == ("exit", 600, "text", "system")
    assert s.serve_api is None and s.locks is True and s.require_gpu is False
    assert s.hf_cache is None  # resolved against the volume by weights.hfcache.cache_root
    assert (s.worker_concurrency, s.worker_max_input_bytes, s.worker_max_pixels) == (
        1,
        25 * 1024 * 1024,
        40_000_000,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.debug = True  # type: ignore[misc]


def test_runpod_defaults() -> None:
    s = Settings.from_env({"RUNPOD_POD_ID": "abc123", "RUNPOD_ENDPOINT_ID": "ep"})
    assert s.require_volume is True
    assert s.log_format == "json"
    assert s.worker_id == "abc123"
    assert Settings.from_env({"RUNPOD_POD_ID": "abc", "BOOTSTRAP_WORKER_ID": "mine"}).worker_id == "mine"


def test_values_are_parsed() -> None:
    s = Settings.from_env(
        {
            "BOOTSTRAP_EXTRAS": " FaceSwap, video,faceswap ",
            "BOOTSTRAP_OPTIONAL": "video",
            "BOOTSTRAP_PHASE_BUDGET_S": "env=60",
            "BOOTSTRAP_SERVE_API": "0.0.0.0:9000",
            "BOOTSTRAP_LOCKS": "off",
            "BOOTSTRAP_MIN_FREE_GB": "0.5",
            "BOOTSTRAP_HF_CACHE": "/cache/hub",
        }
    )
    assert s.hf_cache == Path("/cache/hub") and s.sources["BOOTSTRAP_HF_CACHE"] == "env"
    assert ("BOOTSTRAP_HF_CACHE", "/cache/hub", "env") in s.shown()
    assert s.extras == ("faceswap", "video")
    assert s.is_optional("video") and not s.is_optional("faceswap")
    assert s.phase_budget_s["env"] == 60 and s.phase_budget_s["weights"] == 1800
    assert s.serve_api == ("0.0.0.0", 9000)
    assert s.locks is False
    assert s.min_free_bytes == 500_000_000
    assert Settings.from_env({"BOOTSTRAP_EXTRAS": ""}).extras == ()


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("BOOTSTRAP_MIN_FREE_GB", "lots", "set BOOTSTRAP_MIN_FREE_GB to a number"),
        ("BOOTSTRAP_LEASE_TTL_S", "0", "≥ 1"),
        ("BOOTSTRAP_ON_FATAL", "retry", "exit, serve-error"),
        ("BOOTSTRAP_PHASE_BUDGET_S", "boot=5", "PHASE=SECONDS"),
        ("BOOTSTRAP_PHASE_BUDGET_S", "env=-1", "e.g. env=1200"),
        ("BOOTSTRAP_SERVE_API", "host:port", "127.0.0.1:8000"),
        ("BOOTSTRAP_REQUIRE_GPU", "maybe", "1 or 0"),
        ("BOOTSTRAP_EXTRAS", "face swap!", "comma list"),
        ("BOOTSTRAP_WORKER_ID", "../etc", "letters, digits"),
    ],
)
def test_bad_values_are_config_errors_with_a_hint(name: str, value: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert info.value.exit_code == 2
    assert hint in info.value.hint


def test_bad_setting_exits_2_from_the_cli(tmp_path: Path) -> None:
    proc = run_bootstrap(["run"], base_environ(BOOTSTRAP_MIN_FREE_GB="lots"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: BOOTSTRAP_MIN_FREE_GB='lots' is not a number")
    assert "hint:" in proc.stderr


def test_parse_budgets_overrides_only_the_named_phase() -> None:
    assert parse_budgets("weights=5, warm=7") == {"preflight": 60, "env": 1800, "weights": 5, "warm": 7}


def test_secrets_are_redacted_and_scrubbed() -> None:
    assert redact("HF_TOKEN", "hf_abcdef") == "set (9 chars)"
    assert redact("AWS_SECRET_ACCESS_KEY", None) == "unset"
    assert redact("BOOTSTRAP_VOLUME", "/v") == "/v"
    env = {"HF_TOKEN": "hf_supersecretvalue", "MY_DB_PASSWORD": "pw123456", "BOOTSTRAP_VOLUME": "/v"}
    shown = dict((n, v) for n, v, _ in Settings.from_env(env).shown())
    assert shown["HF_TOKEN"] == "set (19 chars)"
    stream = io.StringIO()
    tl = Timeline("w", log_format="json", stream=stream, secrets=secret_values(env))
    tl.log("token is hf_supersecretvalue and pw pw123456")
    tl.event("env", "start", detail={"oops": "hf_supersecretvalue"})
    assert "hf_supersecretvalue" not in stream.getvalue() and "***" in stream.getvalue()


def test_explain_every_code() -> None:
    for code in errors.EXIT_CODES:
        proc = run_bootstrap(["explain", str(code.code)], base_environ())
        assert proc.returncode == 0
        assert proc.stdout.startswith(f"exit code {code.code} ({code.name}): ")
        assert "what to do:" in proc.stdout
    assert run_bootstrap(["explain", "weights"], base_environ()).stdout.startswith("exit code 13 (WEIGHTS)")
    unknown = run_bootstrap(["explain", "42"], base_environ())
    assert unknown.returncode == 2 and "known codes are 0 OK" in unknown.stderr


def test_exit_code_table_matches_the_spec() -> None:
    assert [(e.code, e.name) for e in errors.EXIT_CODES] == [
        (0, "OK"), (1, "INTERNAL"), (2, "CONFIG"), (10, "VOLUME"), (11, "DISK"), (12, "ENV"),
        (13, "WEIGHTS"), (14, "LOCK"), (15, "WARM"), (16, "GPU"), (17, "BUDGET"),
    ]  # fmt: skip
    assert WeightsError("x").as_detail() == {
        "code": 13,
        "name": "WEIGHTS",
        "error": "x",
        "hint": errors.BY_CODE[13].todo,
    }


def test_timeline_phase_records_fail_and_survives_a_torn_line(tmp_path: Path) -> None:
    stream = io.StringIO()
    tl = Timeline("w9", log_format="text", stream=stream)
    tl.attach(tmp_path / "logs" / "w9")
    with pytest.raises(WeightsError), tl.phase("weights") as detail:
        detail["files"] = 1
        raise WeightsError("model missing", hint="fetch it")
    tl.close()
    jsonl = tmp_path / "logs" / "w9" / "boot.jsonl"
    with open(jsonl, "a") as f:
        f.write('{"ts": 1, "phase": "we')  # a worker killed mid-write
    events = read_events(jsonl)
    assert [(e["phase"], e["event"]) for e in events] == [("weights", "start"), ("weights", "fail")]
    assert events[1]["detail"] == {
        "code": 13,
        "name": "WEIGHTS",
        "error": "model missing",
        "hint": "fetch it",
    }
    assert set(events[1]) == {"ts", "worker", "phase", "event", "ms", "detail"}
    assert "hint: fetch it" in (tmp_path / "logs" / "w9" / "boot.log").read_text()
    assert "weights   fail" in stream.getvalue()
    json.dumps(events)


def test_budget_exceeded_exits_17_and_kills_uv(tmp_path: Path, volume: Path) -> None:
    # A fresh volume with an empty uv cache: the env build takes longer than a 1 s budget.
    proc = run_bootstrap(
        ["run", "--until", "env"],
        base_environ(
            BOOTSTRAP_VOLUME=str(volume),
            BOOTSTRAP_EXTRAS="",
            BOOTSTRAP_PHASE_BUDGET_S="env=1",
            BOOTSTRAP_WORKER_ID="b1",
        ),
        timeout=120,
    )
    assert proc.returncode == 17, proc.stdout + proc.stderr
    events = read_events(volume / ".bootstrap" / "logs" / "b1" / "boot.jsonl")
    fail = events[-1]
    assert (fail["phase"], fail["event"]) == ("env", "fail")
    assert fail["detail"]["code"] == 17 and "BOOTSTRAP_PHASE_BUDGET_S=env=" in fail["detail"]["hint"]
    # Nothing half-built was published.
    assert not [p for p in (volume / ".bootstrap" / "envs").iterdir() if not p.name.startswith(".")]


def test_password_in_a_url_is_scrubbed_from_the_timeline() -> None:
    stream = io.StringIO()
    tl = Timeline("w", log_format="text", stream=stream)
    tl.log("mirror https://bob:hunter2secret@mirror.internal/models failed; http://host:8080/x ok")
    out = stream.getvalue()
    assert "hunter2secret" not in out
    assert "https://bob:***@mirror.internal/models" in out
    assert "http://host:8080/x" in out


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BOOTSTRAP_PHASE_BUDGET_S", "env=nan"),
        ("BOOTSTRAP_PHASE_BUDGET_S", "weights=inf"),
        ("BOOTSTRAP_PHASE_BUDGET_S", "warm=0"),
        ("BOOTSTRAP_PHASE_BUDGET_S", "env=-inf"),
        ("BOOTSTRAP_MIN_FREE_GB", "inf"),
        ("BOOTSTRAP_MIN_FREE_GB", "nan"),
        ("BOOTSTRAP_LOCK_TIMEOUT_S", "inf"),
    ],
)
def test_only_finite_numbers_are_settings(name: str, value: str) -> None:
    """nan and inf parse as floats: a budget of nan never expires, MIN_FREE_GB=inf was exit 1."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert info.value.exit_code == 2 and name in info.value.message


def test_an_infinite_reserve_exits_2_from_the_cli(tmp_path: Path) -> None:
    proc = run_bootstrap(["run"], base_environ(BOOTSTRAP_MIN_FREE_GB="inf"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: BOOTSTRAP_MIN_FREE_GB='inf' must be a finite number")


RACE = """
import io, sys, time
from bootstrap.budget import budget
from bootstrap.timeline import Timeline

class SlowAfterFirst(io.StringIO):
    # the fail event is written at once; every later line (error, hint) takes a while
    def write(self, s):
        if self.getvalue():
            time.sleep(0.5)
        sys.stderr.write(s)
        sys.stderr.flush()
        return super().write(s)

timeline = Timeline("race", log_format="json", stream=SlowAfterFirst())
with budget(timeline, "env", 0.2):
    time.sleep(0.35)  # the phase ends while the watchdog is failing it
print("phase ended", flush=True)
"""


def test_a_budget_expiring_as_the_phase_ends_never_logs_a_failure_then_exits_0() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", RACE], capture_output=True, text=True, timeout=60, check=False
    )
    failed = '"event": "fail"' in proc.stderr
    assert failed, proc.stderr  # the watchdog fired first here, by construction
    assert proc.returncode == 17, (proc.returncode, proc.stdout, proc.stderr)
    assert "phase ended" not in proc.stdout


@pytest.mark.parametrize(
    ("code", "word"),
    [(3, "diagnose"), (130, "SIGINT"), (137, "memory limit"), (139, "native code"), (143, "SIGTERM")],
)
def test_explain_names_the_codes_a_runpod_user_sees_that_are_not_ours(code: int, word: str) -> None:
    proc = run_bootstrap(["explain", str(code)], base_environ())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"exit code {code} (") and word in proc.stdout
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    e = errors.lookup(code)
    assert e is not None and f"| {e.code} | `{e.name}` | {e.meaning} | {e.todo} |" in readme
