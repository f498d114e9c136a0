"""The worker's lifecycle (issue 10): starting → warm → ready, or failed, tested as cog tests its
worker states — every transition, what a job is answered in each state, what ``health`` says,
and the path `worker.main.boot` really takes with the fixture models (tests/fixture_models.py).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from bootstrap.plan import Capability, Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from tests.fixture_models import BUFFALO_DEST, INSWAPPER_DEST, b64, encode, picture, write_models_dir
from worker.handler import Worker, quiet_sdk_logs
from worker.lifecycle import ALLOWED, Lifecycle, State
from worker.main import boot

BOOT_ERROR = {"code": 15, "name": "WARM", "error": "capability faceswap: warm-load failed", "hint": "look"}
#: a boot error served for far longer than any test runs (the grace thread then exits the process)
NO_EXIT = "1000000000"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_models_dir(tmp_path_factory.mktemp("models"))


def _job() -> dict[str, Any]:
    return {
        "source_image": b64(encode(picture(200, 200, [(60, 60, 100)]))),
        "target_image": b64(encode(picture(300, 240, [(100, 70, 90)]))),
    }


def _worker(models: dict[str, str], required: bool = True) -> tuple[Worker, io.StringIO]:
    stream = io.StringIO()
    plan = Plan(
        worker_id="lc",
        volume="/nonexistent",
        app_dir=".",
        capabilities={"faceswap": Capability(required=required)},
        models=dict(models),
    )
    worker = Worker(
        plan=plan, timeline=Timeline("lc", stream=stream, log_format="json"), lifecycle=Lifecycle()
    )
    worker.capabilities["faceswap"] = Capability(required=required)
    return worker, stream


def _ask(worker: Worker, job_input: Any) -> dict[str, Any]:
    return asyncio.run(worker.handle({"id": "j", "input": job_input}))


# -- transitions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end"), list(itertools.product(State, State)))
def test_every_transition_is_allowed_or_refused(start: State, end: State) -> None:
    lc = Lifecycle()
    path = {State.STARTING: [], State.WARM: [State.WARM], State.READY: [State.WARM, State.READY]}
    for step in path.get(start, []):
        lc.to(step)
    if start is State.FAILED:
        lc.fail(BOOT_ERROR)
    assert lc.state is start
    allowed = end in ALLOWED[start]
    assert allowed == (
        (start, end)
        in {
            (State.STARTING, State.WARM),
            (State.STARTING, State.FAILED),
            (State.WARM, State.READY),
            (State.WARM, State.FAILED),
            (State.READY, State.FAILED),
        }
    )
    if allowed:
        lc.to(end, BOOT_ERROR if end is State.FAILED else None)
        assert lc.state is end and lc.history[-1] is end
    else:
        with pytest.raises(RuntimeError, match=f"cannot go from {start.value} to {end.value}"):
            lc.to(end, BOOT_ERROR)
        assert lc.state is start


def test_failed_needs_its_boot_error() -> None:
    lc = Lifecycle()
    with pytest.raises(RuntimeError, match="boot error"):
        lc.to(State.FAILED)
    assert lc.state is State.STARTING


# -- the handler answers by the state ------------------------------------------------------------


def test_jobs_are_answered_by_the_state(models: dict[str, str]) -> None:
    clock = itertools.count(100.0, 7.0)
    worker, _ = _worker(models)
    worker.lifecycle = Lifecycle(clock=lambda: float(next(clock)))

    # starting: a clear RunPod error, never a run; health answers and says so.
    out = _ask(worker, _job())
    assert set(out) == {"error"}
    assert "not ready yet (state starting" in out["error"] and "health" in out["error"]
    health = _ask(worker, {"task": "health"})
    assert health["state"] == "starting" and health["status"] == "degraded"
    assert "boot_error" not in health

    # warm (importing, loading): the same, naming the state.
    worker.lifecycle.to(State.WARM)
    out = _ask(worker, _job())
    assert set(out) == {"error"} and "state warm" in out["error"]
    assert _ask(worker, {"task": "health"})["state"] == "warm"
    # Even an unknown task is not judged before the worker is ready.
    assert "not ready" in _ask(worker, {"task": "paint"})["error"]

    # ready: the job runs (the real pipeline, loaded by the real warm phase).
    from worker.main import warm_up

    warm_up_worker, _ = _worker(models)
    warm_up(warm_up_worker, Settings.from_env({}))
    worker.pipelines = warm_up_worker.pipelines
    worker.lifecycle.to(State.READY)
    out = _ask(worker, _job())
    assert out["success"] is True and out["swapped"] == 1
    health = _ask(worker, {"task": "health"})
    assert health["state"] == "ready" and health["status"] == "ok"

    # failed: every job gets the boot error; health carries it.
    worker.lifecycle.fail(BOOT_ERROR)
    out = _ask(worker, _job())
    assert out == {"error": "worker failed to boot: WARM (15): capability faceswap: warm-load failed — look"}
    health = _ask(worker, {"task": "health"})
    assert health["state"] == "failed" and health["status"] == "degraded"
    assert health["boot_error"] == BOOT_ERROR


# -- boot(): the path really taken -----------------------------------------------------------------


def test_boot_goes_starting_warm_ready(models: dict[str, str]) -> None:
    worker, stream = _worker(models)
    assert boot(worker, Settings.from_env({})) is None
    assert worker.lifecycle.history == [State.STARTING, State.WARM, State.READY]
    assert worker.capability_table() == {"faceswap": {"status": "ok", "reason": None}}
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    ready = [e for e in events if e.get("phase") == "ready"]
    assert len(ready) == 1 and ready[0]["detail"]["capabilities"] == {
        "faceswap": {"status": "ok", "reason": None}
    }
    assert _ask(worker, _job())["success"] is True


def _broken(models: dict[str, str], tmp_path: Path) -> dict[str, str]:
    wrong = tmp_path / "inswapper_128.onnx"
    wrong.write_bytes(Path(models[BUFFALO_DEST], "w600k_r50.onnx").read_bytes())  # not a swapper
    return {**models, INSWAPPER_DEST: str(wrong)}


def test_a_warm_load_failure_is_failed_and_exits_15(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    worker, _ = _worker(_broken(models, tmp_path))
    assert boot(worker, Settings.from_env({})) == 15
    assert worker.lifecycle.history == [State.STARTING, State.WARM, State.FAILED]
    assert worker.lifecycle.error is not None and worker.lifecycle.error["code"] == 15
    assert "ArcFaceONNX" in capsys.readouterr().err


def test_a_warm_load_failure_with_serve_error_answers_the_boot_error(
    models: dict[str, str], tmp_path: Path
) -> None:
    worker, _ = _worker(_broken(models, tmp_path))
    settings = Settings.from_env({"BOOTSTRAP_ON_FATAL": "serve-error", "BOOTSTRAP_FATAL_GRACE_S": NO_EXIT})
    assert boot(worker, settings) is None
    assert worker.lifecycle.history == [State.STARTING, State.WARM, State.FAILED]
    out = _ask(worker, _job())
    assert set(out) == {"error"} and out["error"].startswith("worker failed to boot: WARM (15):")
    health = _ask(worker, {"task": "health"})
    assert health["state"] == "failed" and health["boot_error"]["code"] == 15


def test_a_boot_error_from_bootstrap_fails_without_warming(models: dict[str, str]) -> None:
    worker, _ = _worker(models)
    worker.plan.fatal = {"code": 13, "name": "WEIGHTS", "error": "m/model.bin: not found", "hint": "h"}
    settings = Settings.from_env({"BOOTSTRAP_ON_FATAL": "serve-error", "BOOTSTRAP_FATAL_GRACE_S": NO_EXIT})
    assert boot(worker, settings) is None
    assert worker.lifecycle.history == [State.STARTING, State.FAILED]
    assert worker.pipelines == {}  # nothing was loaded
    assert "WEIGHTS (13)" in _ask(worker, _job())["error"]


def test_an_optional_capability_that_fails_degrades_and_the_worker_is_ready(
    models: dict[str, str], tmp_path: Path
) -> None:
    worker, _ = _worker(_broken(models, tmp_path), required=False)
    assert boot(worker, Settings.from_env({})) is None
    assert worker.lifecycle.state is State.READY
    cap = worker.capabilities["faceswap"]
    assert isinstance(cap, Capability) and cap.status == "unavailable"
    assert cap.reason is not None and "ArcFaceONNX" in cap.reason
    health = _ask(worker, {"task": "health"})
    assert health["state"] == "ready" and health["status"] == "degraded"
    assert health["capabilities"]["faceswap"]["status"] == "unavailable"
    out = _ask(worker, _job())
    assert set(out) == {"error"} and "capability faceswap is unavailable" in out["error"]
    assert "ArcFaceONNX" in out["error"]


# -- the SDK's log level ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "debug", "level"),
    [
        ({}, False, "INFO"),
        ({}, True, None),
        ({"RUNPOD_LOG_LEVEL": "DEBUG"}, False, "DEBUG"),
        ({"RUNPOD_LOG_LEVEL": "WARN"}, True, "WARN"),
        ({"RUNPOD_DEBUG_LEVEL": "DEBUG"}, False, None),
    ],
)
def test_sdk_log_level(environ: dict[str, str], debug: bool, level: str | None) -> None:
    env = dict(environ)
    quiet_sdk_logs(env, debug=debug)
    assert env.get("RUNPOD_LOG_LEVEL") == level


# -- faults: one classification ------------------------------------------------------------------


class _Raising:
    """A loaded pipeline whose run raises what a runtime raises (the handler is under test)."""

    name = "faceswap"

    def __init__(self, err: BaseException) -> None:
        self.err = err

    def run(self, job_input: dict[str, Any]) -> dict[str, Any]:
        raise self.err

    def device(self) -> dict[str, Any]:
        return {"gpu": None, "providers": []}


@pytest.mark.parametrize(
    ("err", "message", "refresh"),
    [
        (RuntimeError("CUDNN_STATUS_EXECUTION_FAILED"), "CUDA error while running the models", True),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"), "GPU out of memory while running the models", True),
        (MemoryError(), "out of memory while running the models", True),
        (ValueError("shape mismatch"), "internal error: ValueError: shape mismatch", False),
    ],
)
def test_runtime_errors_are_classified_once_by_the_handler(
    err: BaseException, message: str, refresh: bool
) -> None:
    worker, stream = _worker({})
    worker.pipelines["faceswap"] = _Raising(err)
    worker.lifecycle.to(State.WARM)
    worker.lifecycle.to(State.READY)
    out = _ask(worker, _job())
    assert out["error"].startswith(message), out
    assert out.get("refresh_worker", False) is refresh
    assert message in stream.getvalue()  # and logged


# -- F10: the first job close to steady state ----------------------------------------------------


def test_warm_up_runs_every_session_and_the_first_job_loads_nothing(
    models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted on onnxruntime itself: sessions created and runs per session, and every file
    of a model opened (an audit hook), during warm-up and during the first job."""
    import sys

    import onnxruntime

    created: list[str] = []
    runs: dict[int, int] = {}
    opened: list[str] = []
    recording = {"on": False}
    real_init, real_run = onnxruntime.InferenceSession.__init__, onnxruntime.InferenceSession.run

    def counting_init(self: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        created.append(str(path) if isinstance(path, (str, Path)) else f"<{len(path)} bytes>")
        real_init(self, path, *args, **kwargs)

    def counting_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        runs[id(self)] = runs.get(id(self), 0) + 1
        return real_run(self, *args, **kwargs)

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if recording["on"] and event == "open" and str(args[0]).endswith(".onnx"):
            opened.append(str(args[0]))

    monkeypatch.setattr(onnxruntime.InferenceSession, "__init__", counting_init)
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", counting_run)
    sys.addaudithook(audit)  # cannot be removed: it records only while `recording` is on

    worker, _ = _worker(models)
    recording["on"] = True
    assert boot(worker, Settings.from_env({})) is None
    recording["on"] = False
    pipe = worker.pipelines["faceswap"]
    sessions = pipe._sessions()  # type: ignore[attr-defined]
    # The warm phase loaded the three models and ran each of them (the warm-up).
    named = sorted(Path(c).name for c in created if not c.startswith("<"))
    assert named == ["det_10g.onnx", "inswapper_128.onnx", "w600k_r50.onnx"], created
    assert len(created) == 4, created  # and the detector's fixed-size session, built at warm-up
    warm_ran = set(runs)
    assert len(warm_ran) == 3, runs  # detection (at the job's fixed size), recognition, swapping
    assert {id(s) for s in sessions[1:]} <= warm_ran
    assert opened, "the audit hook saw the models being read at warm-up"

    created.clear()
    opened.clear()
    before = dict(runs)
    recording["on"] = True
    try:
        out = _ask(worker, _job())
    finally:
        recording["on"] = False
    assert out["success"] is True
    # The first job created no session and opened no model file; it ran exactly the sessions
    # the warm-up had already run.
    assert created == [] and opened == []
    assert {k for k, n in runs.items() if n > before.get(k, 0)} == warm_ran
