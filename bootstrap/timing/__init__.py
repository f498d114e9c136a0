"""`bootstrap timing`: the cold-start timing script and the project's performance yardstick (SPEC §9).

Drives real boots end to end against scratch volumes — the rendered ``start.sh`` → ``bootstrap
run`` → the worker → its first job through the SDK's local API (``BOOTSTRAP_SERVE_API``) — and
reports per-phase times from each boot's own timeline (``logs/<worker-id>/boot.jsonl``).

Scenarios:

- ``cold``: an empty volume.
- ``warm``: everything on the volume (a cold boot first, untimed — or the volume the last
  ``cold`` or ``concurrent`` repeat of this run left — then the timed boots).
- ``concurrent N``: N workers at once on one empty volume; each is reported and the slowest
  stands for the repeat.
- ``recover``: a warm volume whose verified model file was corrupted (truncated, or overwritten
  with an error page of the same size): the boot must detect it, quarantine it and fetch again.
- ``baseline``: the recipe this project replaces, run the same way: ``python -m venv`` +
  ``pip install`` of the same pinned requirements on the volume, the weights downloaded with one
  stream and no verification, then the worker started directly.

Phases per boot (milliseconds): ``preflight env weights import warm`` are the ``ms`` of each
phase's ``end`` event; ``ready`` is the worker's ``ready`` event (boot start → ready);
``first_job`` is ready → the first job's answer; ``total`` is process start → that answer, on
this script's clock; ``startup`` is what ``total`` holds beyond the named phases (interpreter
starts, the ``exec``, the SDK's server coming up). ``--repeat K`` gives medians and min/max.

Output: a table on stdout, ``DIR/timing.json`` (every repeat of every scenario, and medians)
and ``DIR/timing.png`` (the phases per scenario as horizontal stacked bars; matplotlib comes
from the ``timing`` dependency group and is imported only to draw it).

Internal logic of one boot:

1. a fresh worker id, a free loopback port; ``start.sh`` started in its own process group;
2. poll the port (or the process's exit); POST the job to ``/runsync``; note the answer's time;
3. SIGTERM the process group (SIGKILL after a grace period);
4. read the boot's timeline from the volume and derive the phases.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from collections.abc import Callable

from bootstrap.errors import ConfigError
from bootstrap.settings import Settings
from bootstrap.timing.baseline import plain_url
from bootstrap.timing.boot import BOOT_PHASES, PHASES, SEGMENTS, Boot, phases_from, startup_ms
from bootstrap.timing.chart import chart
from bootstrap.timing.options import HEALTH_JOB, SCENARIOS, Options, Scenario, parse_scenarios
from bootstrap.timing.report import (
    Repeat,
    ScenarioResult,
    Summary,
    TimingConfig,
    TimingReport,
    job_summary,
    load_avg,
    machine_info,
    per_worker,
    summarize,
    table,
)
from bootstrap.timing.scenarios import Runner, corrupt_one

__all__ = [
    "BOOT_PHASES",
    "HEALTH_JOB",
    "PHASES",
    "SCENARIOS",
    "SEGMENTS",
    "Boot",
    "Options",
    "Repeat",
    "Runner",
    "Scenario",
    "ScenarioResult",
    "Summary",
    "TimingConfig",
    "TimingReport",
    "chart",
    "corrupt_one",
    "parse_scenarios",
    "phases_from",
    "plain_url",
    "run_timing",
    "startup_ms",
    "summarize",
    "table",
]


def run_timing(settings: Settings, opts: Options, *, say: Callable[[str], None] = print) -> int:
    """Run every scenario ``opts.repeat`` times; write the JSON and the chart; print the table.

    Returns 0 when every boot succeeded, 1 otherwise.
    """
    if opts.repeat < 1:
        raise ConfigError("--repeat must be at least 1", hint="e.g. --repeat 3")
    if opts.seed_cache is not None and not opts.seed_cache.is_dir():
        raise ConfigError(
            f"--seed-cache {opts.seed_cache} is not a directory", hint="give a uv cache directory"
        )
    draw = opts.chart and importlib.util.find_spec("matplotlib") is not None
    if opts.chart and not draw:
        say(
            "note: no chart — matplotlib is missing (`uv sync --group timing`); the table and JSON still come"
        )
    runner = Runner(settings, opts, say=say)
    bs = runner.boot_settings
    report = TimingReport(
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        machine=machine_info(),
        config=TimingConfig(
            repeat=opts.repeat,
            extras=list(bs.extras),
            manifest=str(bs.manifest),
            mirror=bs.mirror,
            job=job_summary(opts.job),
            seed_cache=str(opts.seed_cache) if opts.seed_cache else None,
            corrupt=opts.corrupt,
            scratch=str(runner.scratch),
            hosts=[str(v) for v in runner.views],
        ),
    )
    try:
        for scenario in opts.scenarios:
            report.scenarios.append(_run_scenario(runner, scenario, opts.repeat, say))
    finally:
        if not opts.keep:
            say("removing the scratch volumes …")
        runner.cleanup()
    report.machine.load_avg_end = load_avg()
    opts.out.mkdir(parents=True, exist_ok=True)
    json_path = report.write(opts.out / "timing.json")
    say("")
    say(table(report))
    m = report.machine
    start, end = (str(a[0]) if a else "?" for a in (m.load_avg_start, m.load_avg_end))
    load = f"load average {start} → {end}"
    say(f"{m.cpu}, {m.cores} cores, {m.memory_gb} GB; {load}; {report.date}")
    say(f"\nwrote {json_path}")
    if draw:
        say(f"wrote {chart(report, opts.out / 'timing.png')}")
    return 0 if report.ok else 1


def _run_scenario(
    runner: Runner, scenario: Scenario, repeat: int, say: Callable[[str], None]
) -> ScenarioResult:
    repeats: list[Repeat] = []
    for rep in range(repeat):
        say(f"{scenario.label}: repeat {rep + 1}/{repeat} …")
        result = runner.run(scenario, rep)
        for b in result.boots:
            if not b.ok:
                say(f"  {b.worker_id} FAILED (exit {b.exit_code}): {b.error}")
                say(f"  its output: {b.log}")
        total = result.phases.get("total")
        say(f"  {'ok' if result.ok else 'FAILED'}" + (f", {total / 1000:.2f} s" if total else ""))
        repeats.append(result)
    return ScenarioResult(
        name=scenario.name,
        label=scenario.label,
        workers=scenario.workers,
        ok=all(r.ok for r in repeats),
        repeats=repeats,
        summary=summarize(repeats),
        per_worker=per_worker(repeats, scenario.workers)
        if scenario.name == "concurrent" and scenario.workers > 1
        else [],
    )
