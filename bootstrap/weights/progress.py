"""Download progress: a bar on a terminal (stderr), ``progress`` timeline events otherwise (SPEC §7)."""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any


class Progress:
    """Bytes received across every file of the phase; thread-safe `add`."""

    def __init__(
        self,
        timeline: Any,
        *,
        every_s: float = 5.0,
        stream: IO[str] | None = None,
        tty: bool | None = None,
    ) -> None:
        self.timeline = timeline
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty() if tty is None else tty
        except (AttributeError, ValueError):
            self.tty = False
        self.lock = threading.Lock()
        self.bytes = 0
        self.total = 0
        self.files_active = 0
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._window: list[tuple[float, int]] = []

    def expect(self, n: int) -> None:
        """Add ``n`` bytes to the total still to fetch."""
        with self.lock:
            self.total += n

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            done, total = self.bytes, self.total
        self._window.append((now, done))
        while len(self._window) > 2 and now - self._window[0][0] > 10:
            self._window.pop(0)
        t_old, b_old = self._window[0]
        rate = (done - b_old) / (now - t_old) if now > t_old else 0.0
        if rate <= 0 and now > self.t0:
            rate = done / (now - self.t0)
        left = max(0, total - done)
        return {
            "bytes": done,
            "total": total,
            "bytes_per_s": round(rate),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
        }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        interval = 0.25 if self.tty else self.every_s
        while not self._stop.wait(interval):
            self.emit()

    def emit(self) -> None:
        snap = self.snapshot()
        if self.tty:
            self._bar(snap)
        elif snap["total"]:
            self.timeline.event("weights", "progress", detail=snap)

    def _bar(self, snap: dict[str, Any]) -> None:
        total = snap["total"] or 1
        frac = min(1.0, snap["bytes"] / total)
        width = 30
        fill = int(frac * width)
        eta = f"{snap['eta_s']:.0f}s" if snap["eta_s"] is not None else "?"
        line = (
            f"\rweights [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% "
            f"{snap['bytes'] / 1e6:,.0f}/{total / 1e6:,.0f} MB {snap['bytes_per_s'] / 1e6:,.1f} MB/s eta {eta} "
        )
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self.bytes:
                self.emit()
                if self.tty:
                    try:
                        self.stream.write("\n")
                        self.stream.flush()
                    except (OSError, ValueError):
                        pass
