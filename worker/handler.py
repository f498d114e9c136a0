"""The SDK entry: one async handler that routes a job by ``input.task`` (SPEC §10).

Models are loaded before the first job (see `worker.main`); a job only runs a loaded pipeline,
off the event loop, bounded by ``WORKER_CONCURRENCY``. The answer depends on the lifecycle
state (`worker.lifecycle`): not ready yet (starting, warm) is a RunPod error saying so, failed
is the boot error, ready runs the job; ``health`` is answered in every state. The worker never
dies on a bad job: every answer is a structured output or a RunPod error, and out-of-memory or
CUDA errors (classified in one place, `worker.device.classify_runtime_error`) ask RunPod to
replace the worker.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from bootstrap.plan import Capability, Plan
from bootstrap.timeline import Timeline
from worker import jobctx, webhook
from worker.capabilities import CAPABILITIES, by_task
from worker.device import classify_runtime_error
from worker.errors import JobError, WorkerFault
from worker.lifecycle import Lifecycle, State
from worker.pipelines.base import Pipeline

DEFAULT_TASK = "faceswap"
VERSION_PACKAGES = (
    "runpod",
    "onnxruntime-gpu",
    "onnxruntime",
    "insightface",
    "opencv-python-headless",
    "numpy",
    "torch",
)


#: The runpod SDK's own log level; it reads these once, when it is imported.
SDK_LOG_LEVEL = "RUNPOD_LOG_LEVEL"
SDK_LOG_LEVEL_OLD = "RUNPOD_DEBUG_LEVEL"


def quiet_sdk_logs(environ: MutableMapping[str, str], *, debug: bool) -> None:
    """Start the SDK at INFO unless ``BOOTSTRAP_DEBUG=1``; a level the user set wins.

    At DEBUG (its default) the SDK logs every job's whole output (``Handler output: …``,
    ``run_job return: …``): base64 pictures and presigned URLs, bearer links, in RunPod's log
    view. Call before `runpod` is imported.
    """
    if debug or environ.get(SDK_LOG_LEVEL, "").strip() or environ.get(SDK_LOG_LEVEL_OLD, "").strip():
        return
    environ[SDK_LOG_LEVEL] = "INFO"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Worker:
    """Everything a job needs, built once at warm-load."""

    plan: Plan
    timeline: Timeline
    lifecycle: Lifecycle
    concurrency: int = 1
    #: capability → loaded pipeline
    pipelines: dict[str, Pipeline] = field(default_factory=dict)
    #: capability → its status, the plan's own type (health shows status and reason)
    capabilities: dict[str, Capability] = field(default_factory=dict)
    boot_ms: dict[str, float] = field(default_factory=dict)
    #: the worker's own webhooks (SPEC §11)
    webhooks: webhook.WebhookConfig = field(default_factory=webhook.WebhookConfig)
    _sem: asyncio.Semaphore | None = None

    def capability_table(self) -> dict[str, dict[str, Any]]:
        """``{name: {"status", "reason"}}``, as health and the ``ready`` event show it."""
        return {name: {"status": c.status, "reason": c.reason} for name, c in self.capabilities.items()}

    def health(self) -> dict[str, Any]:
        caps = self.capability_table()
        state = self.lifecycle.state
        ok = state is State.READY and all(c["status"] == "ok" for c in caps.values())
        device: dict[str, Any] = {"gpu": None, "providers": []}
        for pipe in self.pipelines.values():
            info = pipe.device()
            device["gpu"] = device["gpu"] or info.get("gpu")
            for p in info.get("providers", []):
                if p not in device["providers"]:
                    device["providers"].append(p)
            for key in ("encoder", "torch"):
                if info.get(key) is not None:
                    device[key] = info[key]
        out: dict[str, Any] = {
            "status": "ok" if ok else "degraded",
            "state": state.value,
            "capabilities": caps,
            "device": device,
            "versions": package_versions(),
            "env_key": self.plan.env_key,
            "boot_ms": dict(self.boot_ms),
        }
        if state is State.FAILED and self.lifecycle.error is not None:
            # Not "error": the SDK treats an output's "error" key as the job failing.
            out["boot_error"] = dict(self.lifecycle.error)
        return out

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        job_input = job.get("input") if isinstance(job, dict) else None
        task = job_input.get("task", DEFAULT_TASK) if isinstance(job_input, dict) else None
        hook: webhook.Target | None = None
        try:
            hook = webhook.parse(job_input, self.webhooks)  # URL_NOT_ALLOWED before any work
            out = await self._dispatch(job_input, job)
        except JobError as err:
            out = err.output()
        except WorkerFault as err:
            out = err.output()
        except Exception as err:  # CUDA trouble or a bug: answer, log, keep serving
            out = self._fault(err).output()
        ms = (time.monotonic() - t0) * 1000
        out = await webhook.after_job(
            hook, job if isinstance(job, dict) else {}, out, self.webhooks, self.timeline
        )
        detail: dict[str, Any] = {
            "task": task if isinstance(task, str) else None,
            "id": job.get("id") if isinstance(job, dict) else None,
        }
        if "code" in out:
            detail["code"] = out["code"]
        if "error" in out:
            detail["error"] = out["error"]
        self.timeline.event("job", "end", ms=ms, detail=detail)
        return out

    def _fault(self, err: Exception) -> WorkerFault:
        """An unexpected exception as a RunPod error: out-of-memory and CUDA errors (one
        classification, `device.classify_runtime_error`) ask for a new worker; a bug does not."""
        found = classify_runtime_error(err)
        if found is not None:
            message, refresh = found
            self.timeline.log(f"job failed: {message}", level="error")
            return WorkerFault(message, refresh=refresh)
        self.timeline.log("job failed with an unexpected error:\n" + traceback.format_exc(), level="error")
        return WorkerFault(f"internal error: {type(err).__name__}: {err}")

    async def _dispatch(self, job_input: Any, job: Any = None) -> dict[str, Any]:
        if not isinstance(job_input, dict):
            raise JobError("INVALID_INPUT", "the job's input must be a JSON object")
        task = job_input.get("task", DEFAULT_TASK)
        if not isinstance(task, str):
            raise JobError("INVALID_INPUT", "'task' must be a string")
        if task == "health":
            return self.health()
        refusal = self.lifecycle.refusal()
        if refusal is not None:  # starting/warm: not ready yet; failed: the boot error
            raise refusal
        spec = by_task(task)
        if spec is None:
            known = sorted({"health"} | {t for s in CAPABILITIES.values() for t in s.tasks})
            raise JobError("UNKNOWN_TASK", f"unknown task {task!r}; known tasks: {', '.join(known)}")
        pipeline = self.pipelines.get(spec.name)
        if pipeline is None:
            cap = self.capabilities.get(spec.name)
            reason = cap.reason if cap is not None else "not selected in BOOTSTRAP_EXTRAS"
            raise WorkerFault(f"capability {spec.name} is unavailable on this worker: {reason}")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        async with self._sem:
            ctx = jobctx.JobContext.for_job(job if isinstance(job, dict) else {}, self.timeline)
            return await jobctx.run_in_thread(pipeline.run, job_input, ctx)


def make_handler(worker: Worker) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        return await worker.handle(job)

    return handler
