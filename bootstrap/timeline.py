"""The boot timeline (SPEC §7): JSON lines on stdout and in ``logs/<worker-id>/`` on the volume.

Each worker has its own directory, so a crashed worker's story survives it and no two workers
ever append to the same file. ``boot.jsonl`` holds the events; ``boot.log`` the same boot for
people (plus free-form lines such as uv's output and tracebacks). A new boot moves the previous
pair to ``boot.prev.*``; the worker process appends to the files its bootstrap started.

Secret values found in the environment are scrubbed from every line written, as a second line
of defence behind code that never formats them in the first place (FAILURES F18).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from bootstrap.errors import INTERNAL, BootstrapError
from bootstrap.settings import Settings, is_secret_name
from bootstrap.urls import scrub_passwords
from bootstrap.volume import JSONL as JSONL  # re-exported: the file names of the layout
from bootstrap.volume import TEXT as TEXT

PHASES = ("preflight", "env", "weights", "import", "warm", "ready", "job")
EVENTS = ("start", "end", "skip", "fail", "wait", "progress")


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every value of ``secrets`` and every password inside a URL replaced by ``***``.

    The one scrubber of everything bootstrap writes: the timeline, stderr, state files, reports.
    """
    for value in secrets:
        if value in text:
            text = text.replace(value, "***")
    return scrub_passwords(text)


def scrub_data(data: Any, secrets: Sequence[str]) -> Any:
    """Every string in ``data`` (dicts and lists walked) passed through `scrub`."""
    if isinstance(data, str):
        return scrub(data, secrets)
    if isinstance(data, dict):
        return {
            scrub(k, secrets) if isinstance(k, str) else k: scrub_data(v, secrets) for k, v in data.items()
        }
    if isinstance(data, list):
        return [scrub_data(v, secrets) for v in data]
    return data


# Values a secret-named variable may hold that are no secret: flags such as
# TOKENIZERS_PARALLELISM=false. Scrubbing them would turn every "false" in a log into "***".
_NOT_SECRETS = frozenset({"true", "false", "none", "null", "yes", "no", "on", "off", "auto"})


def secret_values(environ: Mapping[str, str]) -> tuple[str, ...]:
    """Values of secret-named variables worth scrubbing (4+ characters, not a flag), longest first."""
    values = {
        v
        for k, v in environ.items()
        if is_secret_name(k) and len(v) >= 4 and v.strip().lower() not in _NOT_SECRETS
    }
    return tuple(sorted(values, key=len, reverse=True))


def scrubbed_json(record: Mapping[str, Any], secrets: Sequence[str]) -> str:
    """``record`` as one JSON line with its strings scrubbed: scrubbing the serialized text could
    cut a number or a ``true`` that equals a secret's value and leave a line no reader can parse."""
    plain = json.loads(json.dumps(record, default=str))
    return json.dumps(scrub_data(plain, secrets), sort_keys=False)


class Timeline:
    """Writes timeline events and log lines to a stream and, once attached, to the volume."""

    def __init__(
        self,
        worker_id: str,
        *,
        log_format: str = "text",
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.time,
        secrets: tuple[str, ...] = (),
        debug: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self.log_format = log_format
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.secrets = secrets
        self.debug = debug
        self.started = clock()
        self.log_dir: Path | None = None
        self._jsonl: IO[str] | None = None
        self._text: IO[str] | None = None
        # Lines written before the volume is known; flushed into the files on attach().
        self._pending: list[tuple[str, str]] = []
        self.phase_ms: dict[str, float] = {}
        # Budget watchdogs and lease heartbeats write from other threads.
        self._lock = threading.RLock()

    @classmethod
    def for_settings(cls, settings: Settings, stream: IO[str] | None = None) -> Timeline:
        return cls(
            settings.worker_id,
            log_format=settings.log_format,
            stream=stream,
            secrets=secret_values(settings.environ),
            debug=settings.debug,
        )

    # -- files ---------------------------------------------------------------------------
    def attach(self, log_dir: Path, *, rotate: bool = True) -> None:
        """Start writing to ``log_dir``; with ``rotate``, keep the previous boot as ``boot.prev.*``."""
        log_dir.mkdir(parents=True, exist_ok=True)
        if rotate:
            for name in (JSONL, TEXT):
                path = log_dir / name
                if path.exists():
                    os.replace(path, log_dir / name.replace("boot.", "boot.prev.", 1))
        self.log_dir = log_dir
        self._jsonl = open(log_dir / JSONL, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the timeline
        self._text = open(log_dir / TEXT, "a", encoding="utf-8")  # noqa: SIM115
        for kind, line in self._pending:
            self._write_file(kind, line)
        self._pending.clear()

    def close(self) -> None:
        for f in (self._jsonl, self._text):
            if f is not None:
                with contextlib.suppress(OSError):  # a full volume must not turn exit 11 into 1
                    f.close()
        self._jsonl = self._text = None

    def _scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    def _write_file(self, kind: str, line: str) -> None:
        target = self._jsonl if kind == "json" else self._text
        if target is None:
            self._pending.append((kind, line))
            return
        try:
            target.write(line + "\n")
            target.flush()
        except OSError:
            # A full or failing volume: keep the boot going (its error is on the stream) rather
            # than let the log itself turn exit 11 into an internal error.
            pass

    def _emit_stream(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must never take the boot down
            pass

    # -- events --------------------------------------------------------------------------
    def event(
        self,
        phase: str,
        event: str,
        *,
        ms: float | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one timeline event; returns it as a dict."""
        if phase not in PHASES or event not in EVENTS:
            raise ValueError(f"unknown timeline event {phase}/{event}")
        record: dict[str, Any] = {
            "ts": round(self.clock(), 3),
            "worker": self.worker_id,
            "phase": phase,
            "event": event,
        }
        if ms is not None:
            record["ms"] = round(ms, 1)
        record["detail"] = dict(detail or {})
        line = scrubbed_json(record, self.secrets)
        text = self._scrub(self._text_line(record))
        with self._lock:
            self._write_file("json", line)
            self._write_file("text", text)
            self._emit_stream(line if self.log_format == "json" else text)
        return record

    def log(self, message: str, *, level: str = "info") -> None:
        """A free-form line for people: in boot.log, and on the stream in text format."""
        text = self._scrub(f"[{self.clock() - self.started:7.2f}s] {level:<5} {message}")
        with self._lock:
            self._write_file("text", text)
            if self.log_format == "text":
                self._emit_stream(text)
            elif level in {"warn", "error"}:
                record = {
                    "ts": round(self.clock(), 3),
                    "worker": self.worker_id,
                    "level": level,
                    "message": message,
                }
                self._emit_stream(scrubbed_json(record, self.secrets))

    def _text_line(self, record: Mapping[str, Any]) -> str:
        elapsed = record["ts"] - self.started
        ms = f"{record['ms']:>9.1f} ms" if "ms" in record else " " * 12
        detail = record.get("detail") or {}
        parts = []
        for key, value in detail.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, default=str)
            parts.append(f"{key}={value}")
        return f"[{elapsed:7.2f}s] {record['phase']:<9} {record['event']:<8} {ms}  {' '.join(parts)}".rstrip()

    @contextmanager
    def phase(self, name: str, **start_detail: Any) -> Iterator[dict[str, Any]]:
        """``start`` now, then ``end`` with the duration and the detail the body filled in.

        A `BootstrapError` writes ``fail`` with its code, error and hint; anything else writes
        ``fail`` as INTERNAL with the traceback in boot.log. Either way the error propagates.
        """
        detail: dict[str, Any] = {}
        self.event(name, "start", detail=start_detail or None)
        t0 = time.monotonic()
        try:
            yield detail
        except BootstrapError as err:
            ms = (time.monotonic() - t0) * 1000
            self.phase_ms[name] = ms
            self.event(name, "fail", ms=ms, detail=err.as_detail())
            self.log(f"error: {err.message}", level="error")
            self.log(f"hint: {err.hint}", level="error")
            raise
        except Exception as err:
            ms = (time.monotonic() - t0) * 1000
            self.phase_ms[name] = ms
            tb = traceback.format_exc()
            self.event(
                name,
                "fail",
                ms=ms,
                detail={
                    "code": INTERNAL,
                    "name": "INTERNAL",
                    "error": f"{type(err).__name__}: {err}",
                    "hint": "this is a bug: the traceback is in boot.log; rerun with BOOTSTRAP_DEBUG=1",
                },
            )
            for tb_line in tb.rstrip().splitlines():
                self._write_file("text", self._scrub(tb_line))
            raise
        ms = (time.monotonic() - t0) * 1000
        self.phase_ms[name] = ms
        self.event(name, "end", ms=ms, detail=detail)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a ``boot.jsonl``, skipping a torn last line (a worker killed mid-write)."""
    events: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and "phase" in item:
            events.append(item)
    return events
