"""The worker's lifecycle, explicit: starting → warm → ready, or failed (as cog's worker is).

- ``starting``: the process reads its plan; nothing is imported yet.
- ``warm``: the pipelines are being imported and loaded (models, warm-up runs).
- ``ready``: every enabled pipeline is loaded; jobs run.
- ``failed``: the boot failed (in bootstrap, or at import/warm-load); jobs are answered with
  the boot error (``BOOTSTRAP_ON_FATAL=serve-error``) until the process exits.

Setup failure is fatal; a job failure is not. The handler answers by the state
(`Lifecycle.refusal`), and ``health`` reports it as ``state`` (SPEC §10).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Mapping
from typing import Any

from worker.errors import WorkerFault


class State(enum.Enum):
    STARTING = "starting"
    WARM = "warm"  # importing and loading models
    READY = "ready"
    FAILED = "failed"


ALLOWED: Mapping[State, frozenset[State]] = {
    State.STARTING: frozenset({State.WARM, State.FAILED}),
    State.WARM: frozenset({State.READY, State.FAILED}),
    State.READY: frozenset({State.FAILED}),
    State.FAILED: frozenset(),
}


class Lifecycle:
    """The state, when it was entered, and (once failed) the boot error served to jobs."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.state = State.STARTING
        self.since = clock()
        #: the boot error (code, name, error, hint), once failed
        self.error: dict[str, Any] | None = None
        #: every state entered, in order (the boot log and tests read the path taken)
        self.history: list[State] = [State.STARTING]
        self._lock = threading.Lock()

    def to(self, state: State, error: Mapping[str, Any] | None = None) -> None:
        """Move to ``state``; a transition the lifecycle does not allow is a bug (RuntimeError)."""
        with self._lock:
            if state not in ALLOWED[self.state]:
                raise RuntimeError(f"worker lifecycle cannot go from {self.state.value} to {state.value}")
            if state is State.FAILED and error is None:
                raise RuntimeError("a failed worker needs its boot error")
            self.state = state
            self.since = self._clock()
            self.history.append(state)
            if error is not None:
                self.error = dict(error)

    def fail(self, error: Mapping[str, Any]) -> None:
        """Failed from whatever state the worker is in (the boot error is kept)."""
        self.to(State.FAILED, error)

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def refusal(self) -> WorkerFault | None:
        """What a job is answered in this state instead of running, or None when ready."""
        state = self.state
        if state is State.READY:
            return None
        if state is State.FAILED:
            err = self.error or {}
            return WorkerFault(
                f"worker failed to boot: {err.get('name')} ({err.get('code')}): {err.get('error')} — {err.get('hint')}"
            )
        waited = max(0.0, self._clock() - self.since)
        return WorkerFault(
            f"the worker is not ready yet (state {state.value} for {waited:.0f} s: "
            "its models are still loading); send the job again once `health` says state ready"
        )
