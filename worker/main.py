"""The worker process: read the plan, import and warm-load every enabled pipeline, then serve.

Run by `bootstrap run` as ``<env>/bin/python -m worker --plan <volume>/.bootstrap/state/<id>.json``.

Internal logic:

1. starting: read settings and the plan; attach to this worker's boot log.
2. import (phase ``import``): import the runpod SDK and each enabled capability's pipeline
   module. A required one failing exits 15 (WARM); an optional one is marked unavailable.
3. warm (phase ``warm``): ``load()`` each pipeline — models from the plan's paths, a warm-up
   run — so the first job costs what the hundredth does (FAILURES F10).
4. ready: one ``ready`` ``end`` event, then `runpod.serverless.start` serves jobs.

With ``BOOTSTRAP_ON_FATAL=serve-error`` a fatal boot error is answered to every job for
``BOOTSTRAP_FATAL_GRACE_S`` seconds, then the process exits with the error's code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bootstrap.budget import budget
from bootstrap.errors import BootstrapError, GpuError, WarmLoadError
from bootstrap.plan import Capability, read_plan
from bootstrap.settings import PLAN, Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume
from worker import pipelines  # noqa: F401 - registers the capabilities
from worker.capabilities import CAPABILITIES
from worker.handler import Worker, make_handler, quiet_sdk_logs
from worker.lifecycle import Lifecycle, State
from worker.pipelines.base import LoadContext
from worker.webhook import WebhookConfig


def _fatal_exit_later(worker: Worker, seconds: float, code: int) -> None:
    def later() -> None:
        time.sleep(seconds)
        worker.timeline.log(
            f"fatal grace period of {seconds:g} s is over: exiting with {code}", level="error"
        )
        worker.timeline.close()
        os._exit(code)

    threading.Thread(target=later, name="fatal-grace", daemon=True).start()


def warm_up(worker: Worker, settings: Settings) -> None:
    """Phases import and warm: every enabled capability imported and loaded, or degraded."""
    plan, timeline = worker.plan, worker.timeline
    enabled: list[str] = []
    worker.lifecycle.to(State.WARM)
    with timeline.phase("import") as detail:
        try:
            import runpod  # noqa: F401 - the SDK must import before anything else counts as ready
        except Exception as err:
            raise WarmLoadError(
                f"the runpod SDK does not import in {sys.prefix}: {type(err).__name__}: {err}",
                hint=f"the environment is damaged: run `bootstrap diagnose`; moving {sys.prefix} aside makes the next boot rebuild it",
            ) from err

        for name, cap in plan.capabilities.items():
            if cap.status != "ok":
                worker.capabilities[name] = Capability("unavailable", cap.required, cap.reason)
                continue
            spec = CAPABILITIES.get(name)
            try:
                if spec is None:
                    raise ImportError(f"no pipeline is registered for capability {name!r}")
                importlib.import_module(spec.pipeline)
            except Exception as err:
                reason = f"import failed: {type(err).__name__}: {err}"
                if cap.required:
                    raise WarmLoadError(
                        f"capability {name}: {reason}",
                        hint="the env's smoke test should have caught this: run `bootstrap diagnose`",
                    ) from err
                worker.capabilities[name] = Capability("unavailable", cap.required, reason)
                continue
            enabled.append(name)
        detail["capabilities"] = enabled
    worker.boot_ms["import"] = round(timeline.phase_ms["import"], 1)
    ctx = LoadContext(settings=settings, models=dict(plan.models), env_key=plan.env_key)
    with budget(timeline, "warm", settings.budget("warm")), timeline.phase("warm") as detail:
        for name in enabled:
            spec = CAPABILITIES[name]
            module = importlib.import_module(spec.pipeline)
            try:
                worker.pipelines[name] = module.load(ctx)
                # a capability that needs another one reuses its loaded pipeline (video → faceswap)
                ctx.extra.setdefault("pipelines", {})[name] = worker.pipelines[name]
            except BootstrapError:
                raise
            except Exception as err:
                reason = f"warm-load failed: {type(err).__name__}: {err}"
                if plan.capabilities[name].required:
                    raise WarmLoadError(f"capability {name}: {reason}") from err
                worker.capabilities[name] = Capability("unavailable", False, reason)
                continue
            worker.capabilities[name] = Capability("ok", plan.capabilities[name].required, None)
            # Which provider really runs the models, in the boot log too (FAILURES F15).
            info = worker.pipelines[name].device()
            detail.setdefault("device", {})[name] = {
                "gpu": info.get("gpu"),
                "providers": info.get("providers"),
            }
            if info.get("fallback"):
                timeline.log(f"{name}: {info['fallback']}", level="warn")
        detail["loaded"] = sorted(worker.pipelines)
    worker.boot_ms["warm"] = round(timeline.phase_ms["warm"], 1)


def boot(worker: Worker, settings: Settings) -> int | None:
    """Drive the lifecycle to ready, or to failed; an exit code when the worker must not serve.

    starting → warm → ready; a boot error (the plan's, or the warm phase's) → failed, then with
    ``BOOTSTRAP_ON_FATAL=serve-error`` every job is answered with it for the grace period.
    """
    plan, timeline = worker.plan, worker.timeline
    fatal: dict[str, Any] | None = plan.fatal
    if fatal is None:
        try:
            warm_up(worker, settings)
        except (WarmLoadError, GpuError) as err:
            worker.lifecycle.fail(err.as_detail())
            if settings.on_fatal != "serve-error":
                timeline.close()
                print(f"error: {err.message}\nhint: {err.hint}", file=sys.stderr)
                return err.exit_code
            fatal = err.as_detail()
    if fatal is not None:
        if worker.lifecycle.state is not State.FAILED:
            worker.lifecycle.fail(fatal)
        timeline.log(
            f"serving the boot error for {settings.fatal_grace_s:g} s: {fatal.get('error')}",
            level="error",
        )
        # The SDK is loaded first, so the grace period is spent serving, not importing.
        with contextlib.suppress(Exception):
            import runpod  # noqa: F401
        _fatal_exit_later(worker, settings.fatal_grace_s, int(fatal.get("code", 1)))
        return None
    worker.lifecycle.to(State.READY)
    timeline.event(
        "ready",
        "end",
        ms=(time.time() - plan.boot_started) * 1000 if plan.boot_started else None,
        detail={"capabilities": worker.capability_table()},
    )
    return None


def serve(worker: Worker, settings: Settings) -> None:
    import runpod

    argv = [sys.argv[0]]
    if settings.serve_api is not None:
        host, port = settings.serve_api
        argv += ["--rp_serve_api", "--rp_api_host", host, "--rp_api_port", str(port)]
    sys.argv = argv
    concurrency = settings.worker_concurrency
    runpod.serverless.start(
        {"handler": make_handler(worker), "concurrency_modifier": lambda _current: concurrency}
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--plan", type=Path, default=os.environ.get(PLAN))
    args = parser.parse_args(argv)
    if args.plan is None:
        print("error: no plan: run the worker through `bootstrap run`", file=sys.stderr)
        return 2
    plan = read_plan(args.plan)
    settings = plan.worker_settings()  # the boot's settings; the environment adds credentials
    timeline = Timeline.for_settings(settings)
    timeline.started = plan.boot_started or timeline.started
    timeline.attach(Volume(Path(plan.volume), "plan").log_dir(settings.worker_id), rotate=False)
    worker = Worker(
        plan=plan,
        timeline=timeline,
        lifecycle=Lifecycle(),
        concurrency=settings.worker_concurrency,
        webhooks=WebhookConfig.from_settings(settings),
    )
    worker.boot_ms.update(plan.boot_ms)
    for name, cap in plan.capabilities.items():
        worker.capabilities[name] = Capability(cap.status, cap.required, cap.reason)
    quiet_sdk_logs(os.environ, debug=settings.debug)  # before runpod is imported
    code = boot(worker, settings)
    if code is not None:
        return code
    serve(worker, settings)
    return 0
