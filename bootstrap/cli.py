"""The ``bootstrap`` command line: wires subcommands to functions, catches errors once.

Every error the user can act on is a `BootstrapError`: printed as ``error:`` and ``hint:`` and
returned as its exit code. Anything else is a bug (exit 1); its traceback is shown only with
``BOOTSTRAP_DEBUG=1`` (and always lands in the boot log of a ``run``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bootstrap import errors
from bootstrap.errors import BootstrapError, ConfigError
from bootstrap.settings import Settings
from bootstrap.timeline import scrub, secret_values

if TYPE_CHECKING:
    from bootstrap.timing import Options


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from bootstrap.run import run

    return run(settings, until=args.until)


def _cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from bootstrap.run import run

    return run(settings, until="weights")


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from bootstrap.run import run, serve_settings

    return run(serve_settings(settings, args.host, args.port), serve=True)


def _cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    from bootstrap.render import render

    out = render(settings, args.template, args.output, args.set)
    print(f"rendered {out}")
    return 0


def _cmd_timing(args: argparse.Namespace, settings: Settings) -> int:
    from bootstrap.timing import run_timing

    return run_timing(settings, timing_options(args))


def timing_options(args: argparse.Namespace) -> Options:
    """The command line (`bootstrap.cli`) → `Options`."""
    from bootstrap.timing import HEALTH_JOB, Options, parse_scenarios

    job = dict(HEALTH_JOB)
    if args.job:
        raw = args.job
        if raw.startswith("@"):  # a file: a real job's base64 images outgrow one argument (128 KiB)
            try:
                raw = Path(raw[1:]).read_text(encoding="utf-8")
            except OSError as err:
                raise ConfigError(f"--job {args.job}: {err}", hint="give --job JSON or --job @FILE") from None
        try:
            job = json.loads(raw)
        except ValueError as err:
            raise ConfigError(
                f"--job is not JSON: {err}", hint='e.g. --job \'{"input": {"task": "health"}}\''
            ) from None
        if not isinstance(job, dict) or not isinstance(job.get("input"), dict):
            raise ConfigError(
                "--job must be a RunPod job object with an 'input' object", hint='e.g. {"input": {...}}'
            )
    return Options(
        scenarios=parse_scenarios(args.scenario),
        repeat=args.repeat,
        out=Path(args.out),
        scratch=Path(args.scratch[0]) if args.scratch else None,
        mounts=tuple(Path(m) for m in (args.scratch or [])[1:]),
        hosts=args.hosts,
        cpus_per_boot=args.cpus_per_boot,
        job=job,
        extras=args.extras,
        manifest=args.manifest,
        mirror=args.mirror,
        seed_cache=Path(args.seed_cache).resolve() if args.seed_cache else None,
        corrupt=args.corrupt,
        timeout_s=args.timeout,
        keep=args.keep,
        chart=not args.no_chart,
    )


def _cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    from bootstrap.gc import run_gc

    return run_gc(settings, dry_run=args.dry_run, models=args.models, out=sys.stdout)


def explain_text(code: errors.ExitCode) -> str:
    return f"exit code {code.code} ({code.name}): {code.meaning}\nwhat to do: {code.todo}"


def _cmd_diagnose(args: argparse.Namespace, settings: Settings | None) -> int:
    from bootstrap.diagnose import run_diagnose

    # Reads the environment itself: a bad setting is reported (exit 3), not fatal (exit 2).
    return run_diagnose(args.json, os.environ)


def _cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    code = errors.lookup(args.code)
    if code is None:
        known = ", ".join(f"{e.code} {e.name}" for e in errors.EXPLAINED.values())
        print(f"error: unknown exit code {args.code!r}", file=sys.stderr)
        print(f"hint: known codes are {known}", file=sys.stderr)
        return errors.CONFIG
    print(explain_text(code))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootstrap",
        description="Boot a RunPod worker from its network volume: preflight, env, weights, then the worker.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the whole boot, then exec the worker")
    p.add_argument("--until", choices=("env", "weights"), help="stop after this phase (exit 0 or its code)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("prepare", help="fill the volume from a pod shell (run --until weights)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("serve", help="a local run serving the SDK's local API; every capability optional")
    p.add_argument("--host", help="default 127.0.0.1 (or BOOTSTRAP_SERVE_API's)")
    p.add_argument("--port", type=int, help="default 8000 (or BOOTSTRAP_SERVE_API's)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("render", help="render start.sh.tmpl into start.sh")
    p.add_argument("--template", type=Path, help="default: start.sh.tmpl beside the app")
    p.add_argument("--output", type=Path, help="default: start.sh beside the template")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a placeholder's value")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("diagnose", help="what is wrong on this worker or volume, and what to do (reads only)")
    p.add_argument("--json", action="store_true", help="one JSON object (report_version 1) instead of text")
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("explain", help="what an exit code means and what to do")
    p.add_argument("code", help="a number (13) or a name (WEIGHTS)")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("gc", help="remove unused envs, dead builders' leftovers, old quarantine")
    p.add_argument("--dry-run", action="store_true", help="list what would go and how much, remove nothing")
    p.add_argument(
        "--models", action="store_true", help="also verified model files the manifest does not list"
    )
    p.set_defaults(func=_cmd_gc)

    p = sub.add_parser(
        "timing", help="time real boots per phase: cold, warm, concurrent N, recover, baseline"
    )
    p.add_argument(
        "scenario", nargs="+", metavar="SCENARIO", help="cold | warm | concurrent N | recover | baseline"
    )
    p.add_argument(
        "--repeat", type=int, default=1, metavar="K", help="boots per scenario: median and min/max [1]"
    )
    p.add_argument(
        "--out", default="timing", metavar="DIR", help="where timing.json, timing.png and logs go [./timing]"
    )
    p.add_argument(
        "--scratch",
        metavar="DIR",
        action="append",
        help="where scratch volumes are made [OUT/scratch]; any directory, e.g. on a MooseFS mount. "
        "Repeated: the same directory through each host's mount of one filesystem (for --hosts)",
    )
    p.add_argument(
        "--hosts",
        type=int,
        default=1,
        metavar="N",
        help="concurrent: spread the workers round-robin over the first N --scratch mounts [1]",
    )
    p.add_argument(
        "--cpus-per-boot",
        type=int,
        default=None,
        metavar="K",
        help="pin each boot to K cores of its own (worker n of concurrent gets cores n*K…, as if on its "
        "own host; cold, warm and recover the first K; baseline is not pinned): concurrent then measures coordination, not two "
        "workers sharing one machine's CPUs [no pinning]",
    )
    p.add_argument(
        "--job", metavar="JSON", help='the first job, or @FILE holding it [{"input": {"task": "health"}}]'
    )
    p.add_argument("--extras", metavar="LIST", help="BOOTSTRAP_EXTRAS for the boots [inherited]")
    p.add_argument("--manifest", metavar="PATH", help="BOOTSTRAP_MANIFEST for the boots [inherited]")
    p.add_argument("--mirror", metavar="DIR|URL", help="BOOTSTRAP_MIRROR for the boots [inherited]")
    p.add_argument(
        "--seed-cache",
        metavar="DIR",
        help="hard-link this uv cache into each scratch volume (a warm uv cache)",
    )
    p.add_argument(
        "--corrupt",
        choices=("truncate", "overwrite"),
        default="truncate",
        help="recover: how the model file is corrupted",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="longest wait for one boot's first answer [3600]",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch volumes")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.set_defaults(func=_cmd_timing)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = False
    try:
        if args.command == "diagnose":  # diagnose reports bad settings instead of stopping on them
            return int(args.func(args, None))
        settings = Settings.from_env()
        debug = settings.debug
        return int(args.func(args, settings))
    except BootstrapError as err:
        if debug:
            traceback.print_exc()
        secrets = secret_values(os.environ)  # stderr is scrubbed like every stream bootstrap writes
        print(f"error: {scrub(err.message, secrets)}", file=sys.stderr)
        print(f"hint: {scrub(err.hint, secrets)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(
            f"error: internal error: {type(err).__name__}: {scrub(str(err), secret_values(os.environ))}",
            file=sys.stderr,
        )
        print(
            "hint: this is a bug; rerun with BOOTSTRAP_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return errors.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
