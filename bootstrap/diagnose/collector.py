"""Running every section in its own thread with a deadline, into a `Report`; the command itself."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bootstrap.diagnose.context import Context, Options, ProbeTimeout, find_volume, with_timeout
from bootstrap.diagnose.env import check_env
from bootstrap.diagnose.gpu import check_gpu
from bootstrap.diagnose.last_boot import check_last_boot
from bootstrap.diagnose.leases import check_leases
from bootstrap.diagnose.model import SECTIONS, Check, Report, Section, Status
from bootstrap.diagnose.platform import check_platform
from bootstrap.diagnose.render import render_json, render_text
from bootstrap.diagnose.settings import check_settings
from bootstrap.diagnose.volume import check_volume
from bootstrap.diagnose.weights import check_weights
from bootstrap.env import env_key, key_inputs
from bootstrap.errors import BootstrapError
from bootstrap.run import with_capability_closure
from bootstrap.settings import KNOWN, Settings
from bootstrap.timeline import secret_values

SectionFn = Callable[[Context], list[Check]]

SECTION_FNS: Mapping[str, SectionFn] = {
    "platform": check_platform,
    "volume": check_volume,
    "env": check_env,
    "leases": check_leases,
    "weights": check_weights,
    "gpu": check_gpu,
    "last_boot": check_last_boot,
    "settings": check_settings,
}


def _section_deadline(name: str, o: Options) -> float:
    if name == "gpu":
        return 3 * o.gpu_timeout_s + o.probe_timeout_s  # nvidia-smi twice, the NVENC trial, the probe
    return o.section_timeout_s


def image_key_inputs(settings: Settings) -> dict[str, Any]:
    """The key inputs of the env a boot of this image would use: over the capability closure
    of BOOTSTRAP_EXTRAS, as `bootstrap run` computes it (an unknown capability is the error)."""
    closed = with_capability_closure(settings)
    return key_inputs(closed, closed.extras)


def collect(
    settings: Settings,
    options: Options | None = None,
    *,
    config_problem: Check | None = None,
    only: Iterable[str] = SECTIONS,
    debug: bool = False,
) -> Report:
    """Run every section (each in its own thread, each with a deadline) into a `Report`.

    ``config_problem`` is a broken settings check when the real settings could not be read
    (the report then runs on the settings that could).
    """
    o = options or Options()
    wanted = [n for n in SECTIONS if n in set(only)]
    report = Report(sections=[], secrets=secret_values(settings.environ))
    try:
        volume, found = with_timeout(
            lambda: find_volume(settings, o.cwd), o.probe_timeout_s, "the volume's lookup"
        )
    except ProbeTimeout as err:
        volume, found = (
            None,
            Check(
                "found",
                Status.BROKEN,
                f"{err}: a mount point is hanging",
                hint="the network volume is not answering: restart the pod or terminate the worker",
            ),
        )
    except BootstrapError as err:
        volume, found = None, Check("found", Status.BROKEN, err.message, hint=err.hint)
    ctx = Context(settings=settings, options=o, volume=volume, volume_problem=found)
    # The key once, here, before any thread: sysconfig's lazy first read is not thread-safe
    # (a racing reader saw SOABI as None and computed another key).
    try:
        ctx.key_inputs = with_timeout(
            lambda: image_key_inputs(settings), o.probe_timeout_s, "the env key's inputs"
        )
        ctx.key = env_key(ctx.key_inputs)
    except BootstrapError as err:
        ctx.key_error = err
    except ProbeTimeout as err:  # a managed interpreter on a hung volume
        ctx.key_error = BootstrapError(
            str(err), hint="the volume or its interpreter is hanging: see the volume section"
        )
    results: dict[str, Section] = {}
    threads: dict[str, threading.Thread] = {}
    lock = threading.Lock()

    def run(name: str) -> None:
        t0 = time.monotonic()
        try:
            checks = SECTION_FNS[name](ctx)
        except Exception as err:
            tb = traceback.format_exc()
            with lock:
                report.internal_errors.append(f"{name}: {type(err).__name__}: {err}")
                if debug:
                    print(tb, file=sys.stderr)
            checks = [
                Check(
                    "diagnose",
                    Status.UNKNOWN,
                    f"diagnose failed on this section: {type(err).__name__}: {err}",
                    hint="a bug in diagnose: rerun with BOOTSTRAP_DEBUG=1 for the traceback and report it",
                )
            ]
        with lock:
            results[name] = Section(
                name, checks, carries_exit=name == "last_boot", ms=(time.monotonic() - t0) * 1000
            )

    for name in wanted:
        threads[name] = threading.Thread(target=run, args=(name,), name=f"diagnose:{name}", daemon=True)
        threads[name].start()
    start = time.monotonic()
    for name in wanted:
        threads[name].join(max(0.0, start + _section_deadline(name, o) - time.monotonic()))
    for name in wanted:
        with lock:
            section = results.get(name)
        if section is None:
            section = Section(
                name,
                [
                    Check(
                        "answer",
                        Status.BROKEN,
                        f"the {name} checks did not finish within {_section_deadline(name, o):g} s: "
                        "something they read is hanging",
                        hint="a hung network volume or GPU: restart the pod or terminate the worker",
                        exit_code=None,
                    )
                ],
                carries_exit=name == "last_boot",
            )
        if name == "settings" and config_problem is not None:
            section.checks.insert(0, config_problem)
        report.sections.append(section)
    return report


def settings_or_problem(environ: Mapping[str, str]) -> tuple[Settings, Check | None]:
    """Settings from ``environ``; if a variable is bad, a broken check for it and settings without it.

    Diagnose must report a bad setting, not stop on it: each variable the error names is
    dropped (so its default applies) until the rest reads cleanly.
    """
    env = dict(environ)
    problems: list[BootstrapError] = []
    for _ in range(len(KNOWN) + 1):
        try:
            settings = Settings.from_env(env)
        except BootstrapError as err:
            problems.append(err)
            named = [n for n in KNOWN if n in err.message and n in env]
            if not named:
                break
            for n in named:
                env.pop(n)
            continue
        if not problems:
            return settings, None
        text = "; ".join(p.message for p in problems)
        return settings, Check(
            "config",
            Status.BROKEN,
            f"{text} (boots exit 2; this report uses the default instead)",
            hint="; ".join(p.hint for p in problems),
        )
    raise problems[-1]


# -- rendering --------------------------------------------------------------------------------


def run_diagnose(as_json: bool, environ: Mapping[str, str], *, stream: Any = None) -> int:
    """`bootstrap diagnose [--json]`: print the report; 0, 3 when something is broken, 1 for a bug.

    ``environ`` is the process environment, handed in by the CLI (the entry point).
    """
    out = stream if stream is not None else sys.stdout
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is not None:  # a non-UTF-8 terminal must not turn "→" into exit 1
        reconfigure(errors="replace")
    settings, problem = settings_or_problem(environ)
    report = collect(settings, config_problem=problem, debug=settings.debug)
    out.write((render_json(report) if as_json else render_text(report)) + "\n")
    out.flush()
    return report.exit_code
