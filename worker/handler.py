"""The SDK entry: one async handler that routes a job by ``input.task`` (SPEC §10).

Models are loaded before the first job (see `worker.main`); a job only runs a loaded pipeline,
off the event loop, bounded by ``WORKER_CONCURRENCY``. The worker never dies on a bad job:
every answer is a structured output or a RunPod error.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bootstrap.plan import Plan
from bootstrap.timeline import Timeline
from worker.capabilities import CAPABILITIES, by_task
from worker.errors import JobError, WorkerFault
from worker.lifecycle import Lifecycle
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
    #: capability → {"status", "reason"} for health
    capabilities: dict[str, dict[str, Any]] = field(default_factory=dict)
    boot_ms: dict[str, float] = field(default_factory=dict)
    #: a boot error served to every job (BOOTSTRAP_ON_FATAL=serve-error)
    fatal: dict[str, Any] | None = None
    _sem: asyncio.Semaphore | None = None

    def health(self) -> dict[str, Any]:
        caps = {name: dict(info) for name, info in self.capabilities.items()}
        ok = all(c["status"] == "ok" for c in caps.values()) and self.fatal is None
        device: dict[str, Any] = {"gpu": None, "providers": []}
        for pipe in self.pipelines.values():
            info = pipe.device()
            device["gpu"] = device["gpu"] or info.get("gpu")
            for p in info.get("providers", []):
                if p not in device["providers"]:
                    device["providers"].append(p)
            if "torch" in info:  # a torch capability: worker.torchdev.describe()
                device["torch"] = info["torch"]
        out: dict[str, Any] = {
            "status": "ok" if ok else "degraded",
            "capabilities": caps,
            "device": device,
            "versions": package_versions(),
            "env_key": self.plan.env_key,
            "boot_ms": dict(self.boot_ms),
        }
        if self.fatal is not None:
            # Not "error": the SDK treats an output's "error" key as the job failing.
            out["boot_error"] = self.fatal
        return out

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        job_input = job.get("input") if isinstance(job, dict) else None
        task = job_input.get("task", DEFAULT_TASK) if isinstance(job_input, dict) else None
        try:
            out = await self._dispatch(job_input)
        except JobError as err:
            out = err.output()
        except WorkerFault as err:
            out = err.output()
        except MemoryError:
            out = WorkerFault("out of memory while running the job", refresh=True).output()
        except Exception as err:  # a bug: answer, log, keep serving
            self.timeline.log(
                "job failed with an unexpected error:\n" + traceback.format_exc(), level="error"
            )
            text = f"{type(err).__name__}: {err}"
            refresh = "CUDA" in text or "cuda" in text
            out = WorkerFault(f"internal error: {text}", refresh=refresh).output()
        ms = (time.monotonic() - t0) * 1000
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

    async def _dispatch(self, job_input: Any) -> dict[str, Any]:
        if not isinstance(job_input, dict):
            raise JobError("INVALID_INPUT", "the job's input must be a JSON object")
        task = job_input.get("task", DEFAULT_TASK)
        if not isinstance(task, str):
            raise JobError("INVALID_INPUT", "'task' must be a string")
        if task == "health":
            return self.health()
        if self.fatal is not None:
            raise WorkerFault(
                f"worker failed to boot: {self.fatal.get('name')} ({self.fatal.get('code')}): {self.fatal.get('error')} — {self.fatal.get('hint')}"
            )
        spec = by_task(task)
        if spec is None:
            known = sorted({"health"} | {t for s in CAPABILITIES.values() for t in s.tasks})
            raise JobError("UNKNOWN_TASK", f"unknown task {task!r}; known tasks: {', '.join(known)}")
        pipeline = self.pipelines.get(spec.name)
        if pipeline is None:
            info = self.capabilities.get(spec.name, {"reason": "not selected in BOOTSTRAP_EXTRAS"})
            raise WorkerFault(f"capability {spec.name} is unavailable on this worker: {info.get('reason')}")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        async with self._sem:
            return await asyncio.to_thread(pipeline.run, job_input)


def make_handler(worker: Worker) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        return await worker.handle(job)

    return handler
