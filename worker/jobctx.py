"""What a running job knows about itself beyond its input: its id, cancellation, a deadline and
progress reporting. For the long tasks (``faceswap_video``, ``animate``).

The handler runs every pipeline through `run_in_thread`, which makes a `JobContext` current for
the pipeline's thread (a ``ContextVar``: ``asyncio.to_thread`` copies the context) and turns an
``asyncio`` cancellation of the job's task — how the runpod SDK stops a job RunPod cancelled —
into `JobContext.cancelled`, which the pipeline checks between frames; it then waits (bounded)
for the thread to stop, so the pipeline's own cleanup (killing ffmpeg, removing temp files)
has run before the cancellation goes on.

Progress (`JobContext.progress`) goes out at most every ``every_s`` seconds, and always for the
last frame: as a ``job`` ``progress`` timeline event, and through the SDK's
``runpod.serverless.progress_update`` when the worker talks to RunPod's job API — that is when
``RUNPOD_WEBHOOK_POST_OUTPUT`` is set. The SDK's local API (``bootstrap serve``) has no such URL
(the SDK would post to a placeholder), so there only the events are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from worker.errors import WorkerFault

T = TypeVar("T")

#: How long a cancelled job's thread may take to stop (kill ffmpeg, remove temp files).
CANCEL_GRACE_S = 30.0
PROGRESS_EVERY_S = 3.0
SDK_URL_VARIABLE = "RUNPOD_WEBHOOK_POST_OUTPUT"


class JobCancelled(Exception):
    """Raised inside the pipeline's thread when the job was cancelled or ran past its deadline."""


Sender = Callable[[dict[str, Any], dict[str, Any]], None]


def sdk_configured() -> bool:
    """Whether the SDK has a job API to post progress to (it read ``RUNPOD_WEBHOOK_POST_OUTPUT``
    at import; without it, its URL is a placeholder it cannot post to)."""
    try:
        from runpod.serverless.modules import rp_http
    except Exception:
        return False
    return str(getattr(rp_http, "JOB_DONE_URL", "")).startswith(("http://", "https://"))


def _sdk_sender(job: dict[str, Any], progress: dict[str, Any]) -> None:
    import runpod

    runpod.serverless.progress_update(job, progress)


@dataclass
class JobContext:
    job: dict[str, Any]
    #: where ``job`` ``progress`` events go (a `bootstrap.timeline.Timeline`), or None
    timeline: Any = None
    #: the SDK's progress_update, or None under the local API
    sdk: Sender | None = None
    deadline: float | None = None  # time.monotonic()
    every_s: float = PROGRESS_EVERY_S
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: every progress record sent, in order (the last few; for tests and the result)
    sent: list[dict[str, Any]] = field(default_factory=list)
    _last: float = 0.0
    _why: str = ""

    @classmethod
    def for_job(cls, job: dict[str, Any], timeline: Any, *, sdk: Sender | None = None) -> JobContext:
        """A context that reports through the SDK only where its job API is configured."""
        return cls(job=job, timeline=timeline, sdk=(sdk or _sdk_sender) if sdk_configured() else None)

    @property
    def job_id(self) -> str | None:
        value = self.job.get("id")
        return str(value) if value is not None else None

    def cancel(self, why: str = "the job was cancelled") -> None:
        self._why = why
        self.cancelled.set()

    def set_deadline(self, seconds: float) -> None:
        """The job must end within ``seconds`` from now (the earlier of two deadlines wins)."""
        at = time.monotonic() + seconds
        self.deadline = at if self.deadline is None else min(self.deadline, at)

    def check(self) -> None:
        """Raise `JobCancelled` once the job is cancelled, or a WorkerFault past its deadline."""
        if self.cancelled.is_set():
            raise JobCancelled(self._why or "the job was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise WorkerFault("the job ran past its deadline and was stopped")

    def progress(self, detail: dict[str, Any], *, final: bool = False) -> bool:
        """Report ``detail`` if ``every_s`` passed since the last report (or ``final``)."""
        now = time.monotonic()
        if not final and self.sent and now - self._last < self.every_s:
            return False
        self._last = now
        record = dict(detail)
        self.sent.append(record)
        del self.sent[:-32]
        if self.timeline is not None:
            self.timeline.event("job", "progress", detail={"id": self.job_id, **record})
        if self.sdk is not None and self.job_id is not None:
            try:
                self.sdk(self.job, record)
            except Exception as err:  # progress is a courtesy: it never fails the job
                if self.timeline is not None:
                    self.timeline.log(f"progress_update failed: {type(err).__name__}: {err}", level="warn")
        return True


_CURRENT: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("job_context", default=None)


def current() -> JobContext:
    """The running job's context; a detached one (no id, no reports) outside `run_in_thread`."""
    ctx = _CURRENT.get()
    return ctx if ctx is not None else JobContext(job={})


async def run_in_thread(fn: Callable[[Any], T], arg: Any, ctx: JobContext) -> T:
    """``fn(arg)`` on a thread with ``ctx`` current; a cancellation stops it before going on."""
    loop = asyncio.get_running_loop()
    token = _CURRENT.set(ctx)
    try:
        context = contextvars.copy_context()
    finally:
        _CURRENT.reset(token)
    future = loop.run_in_executor(None, context.run, fn, arg)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        ctx.cancel()
        # The job is cancelled either way: the thread's own outcome no longer matters.
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(future), CANCEL_GRACE_S)
        raise
