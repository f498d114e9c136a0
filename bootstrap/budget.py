"""Per-phase budgets (SPEC §3 ``BOOTSTRAP_PHASE_BUDGET_S``, FAILURES F17).

A watchdog thread that, when a phase's budget runs out, logs ``fail`` with BUDGET (17), kills
the phase's child processes (uv, a downloader) and exits the process. Standard library only
(psutil when present): the worker uses it for its warm phase.

The phase's end and the watchdog race for one decision: whichever claims it first wins. A
phase that ends after the watchdog claimed it waits for the exit with 17 — a boot never logs
a budget failure and then goes on (or exits 0).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bootstrap.errors import BUDGET, BudgetError
from bootstrap.timeline import Timeline


def _kill_children() -> None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is one of bootstrap's own dependencies
        return
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextmanager
def budget(timeline: Timeline, phase: str, seconds: float | None) -> Iterator[None]:
    """Exit with BUDGET (17) if the body runs longer than ``seconds``."""
    if not seconds:
        yield
        return
    done = threading.Event()
    lock = threading.Lock()
    decided: list[str] = []  # "ended" or "expired": the first claim wins

    def claim(outcome: str) -> bool:
        with lock:
            if not decided:
                decided.append(outcome)
            return decided[0] == outcome

    def expire() -> None:
        if done.wait(seconds) or not claim("expired"):
            return
        err = BudgetError(
            f"phase {phase} ran past its budget of {seconds:g} s",
            hint=(
                f"raise it with BOOTSTRAP_PHASE_BUDGET_S={phase}=SECONDS (and the endpoint's init "
                "timeout), or fill the volume before deploying with `bootstrap prepare`"
            ),
        )
        timeline.event(phase, "fail", ms=seconds * 1000, detail=err.as_detail())
        timeline.log(f"error: {err.message}", level="error")
        timeline.log(f"hint: {err.hint}", level="error")
        _kill_children()
        timeline.close()
        os._exit(BUDGET)

    watchdog = threading.Thread(target=expire, name=f"budget:{phase}", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        if not claim("ended"):
            watchdog.join()  # it is failing the boot and exits with 17; it never returns here
            raise BudgetError(f"phase {phase} ran past its budget of {seconds:g} s")
