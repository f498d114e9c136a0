"""The worker's lifecycle, explicit: starting → warm → ready, or failed (as cog's worker is).

Setup failure is fatal; a job failure is not.
"""

from __future__ import annotations

import enum
import threading
import time


class State(enum.Enum):
    STARTING = "starting"
    WARM = "warm"  # importing and loading models
    READY = "ready"
    FAILED = "failed"


_ALLOWED = {
    State.STARTING: {State.WARM, State.FAILED},
    State.WARM: {State.READY, State.FAILED},
    State.READY: {State.FAILED},
    State.FAILED: set(),
}


class Lifecycle:
    def __init__(self) -> None:
        self.state = State.STARTING
        self.since = time.monotonic()
        self.error: str | None = None
        self._lock = threading.Lock()

    def to(self, state: State, error: str | None = None) -> None:
        with self._lock:
            if state not in _ALLOWED[self.state]:
                raise RuntimeError(f"worker lifecycle cannot go from {self.state.value} to {state.value}")
            self.state = state
            self.since = time.monotonic()
            if error is not None:
                self.error = error

    @property
    def ready(self) -> bool:
        return self.state is State.READY
