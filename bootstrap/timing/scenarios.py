"""The scenarios: cold, warm, concurrent N, recover (a corrupted model file), baseline."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bootstrap.atomic import write_atomic
from bootstrap.errors import ConfigError
from bootstrap.settings import Settings
from bootstrap.timing.baseline import run_baseline
from bootstrap.timing.boot import Boot, boot_environ, drive, free_port, new_volume, startup_ms
from bootstrap.timing.options import Options, Scenario, cpus_for
from bootstrap.timing.report import Repeat
from bootstrap.volume import Volume


class Runner:
    """Runs the scenarios of one ``bootstrap timing`` invocation."""

    def __init__(self, settings: Settings, opts: Options, *, say: Callable[[str], None] = print) -> None:
        from bootstrap.render import render

        self.settings = settings
        self.opts = opts
        self.say = say
        self.out = opts.out.resolve()
        self.scratch = (opts.scratch or self.out / "scratch").resolve()
        self.logs = self.out / "logs"
        self.scratch.mkdir(parents=True, exist_ok=True)
        #: the scratch directory as each host sees it (``--hosts``): the first is ``scratch``
        self.views = host_views(self.scratch, [m.resolve() for m in opts.mounts], opts.hosts)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start_sh = render(settings, None, self.scratch / "start.sh", [])
        self._warm: Path | None = None
        self._made: list[Path] = []
        # The settings a boot sees (extras, manifest, mirror after the pass-through options).
        self.boot_settings = Settings.from_env(boot_environ(settings, opts, self.scratch, "timing", 1))

    # volumes
    def volume(self, name: str) -> Path:
        root = new_volume(self.scratch, name, self.opts.seed_cache)
        self._made.append(root)
        return root

    def cleanup(self) -> None:
        if self.opts.keep:
            return
        for root in self._made:
            shutil.rmtree(root, ignore_errors=True)

    def worker_id(self, scenario: str, rep: int, n: int = 0) -> str:
        return f"timing-{scenario}-r{rep}-w{n}-{uuid.uuid4().hex[:6]}"

    def boot(self, volume: Path, worker_id: str, slot: int = 0) -> Boot:
        port = free_port()
        env = boot_environ(self.settings, self.opts, volume, worker_id, port)
        cpus = cpus_for(slot, self.opts.cpus_per_boot, sorted(os.sched_getaffinity(0)))
        # taskset: the whole process tree (start.sh, bootstrap, uv, the worker) inherits it
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus is not None else []
        boot = drive(
            [*pin, str(self.start_sh)],
            env,
            cwd=self.settings.app_dir,
            volume=volume,
            worker_id=worker_id,
            port=port,
            job=self.opts.job,
            log=self.logs / f"{worker_id}.out",
            timeout_s=self.opts.timeout_s,
        )
        boot.volume = str(volume)
        return boot

    def warm_volume(self) -> tuple[Path | None, Boot | None]:
        """A volume holding everything (made by one untimed cold boot), shared by warm and recover."""
        if self._warm is None:
            root = self.volume("warm")
            prep = self.boot(root, self.worker_id("prepare", 0))
            if not prep.ok:
                return None, prep
            self._warm = root
        return self._warm, None

    # scenarios
    def run(self, scenario: Scenario, rep: int) -> Repeat:
        """One repeat of a scenario: its boots, and the phases of the slowest."""
        boots: list[Boot]
        if scenario.name == "cold":
            root = self.volume("cold")
            boots = [self.boot(root, self.worker_id("cold", rep))]
            if boots[0].ok:
                self._warm = root  # the next warm boot needs no untimed preparation
        elif scenario.name == "warm":
            boots = [self.warm(rep)]
        elif scenario.name == "concurrent":
            boots = self.concurrent(scenario.workers, rep)
        elif scenario.name == "recover":
            boots = [self.recover(rep)]
        else:
            boots = [self.baseline(rep)]
        for b in boots:
            b.phases["startup"] = startup_ms(b.phases)
        slowest = max(boots, key=lambda b: b.phases.get("total") or float("inf"))
        return Repeat(all(b.ok for b in boots), dict(slowest.phases), boots)

    def concurrent(self, workers: int, rep: int) -> list[Boot]:
        """N boots at once on one empty volume; once all succeed it is a warm volume too. With
        ``--hosts H`` worker n reaches the volume through host n mod H's mount of it."""
        root = self.volume(f"concurrent{workers}")
        rel = root.relative_to(self.scratch)
        results: list[Boot | None] = [None] * workers
        ids = [self.worker_id("concurrent", rep, n) for n in range(workers)]

        def one(n: int) -> None:
            results[n] = self.boot(self.views[n % len(self.views)] / rel, ids[n], slot=n)

        threads = [threading.Thread(target=one, args=(n,), name=f"timing-{n}") for n in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        boots = [b or Boot(worker_id=ids[n], error="the boot thread died") for n, b in enumerate(results)]
        if all(b.ok for b in boots):
            self._warm = root
        return boots

    def warm(self, rep: int) -> Boot:
        root, failed = self.warm_volume()
        if root is None:
            assert failed is not None
            return failed
        return self.boot(root, self.worker_id("warm", rep))

    def recover(self, rep: int) -> Boot:
        root, failed = self.warm_volume()
        if root is None:
            assert failed is not None
            return failed
        worker_id = self.worker_id("recover", rep)
        try:
            victim = corrupt_one(Volume(root, "timing"), self.opts.corrupt)
        except ConfigError as err:
            return Boot(worker_id=worker_id, error=f"{err.message} ({err.hint})")
        self.say(f"  recover: corrupted {victim} ({self.opts.corrupt})")
        before = count_files(Volume(root, "timing").quarantine)
        boot = self.boot(root, worker_id)
        boot.quarantined = count_files(Volume(root, "timing").quarantine) - before
        if boot.ok and boot.quarantined < 1:
            boot.ok = False
            boot.error = f"the corrupted {victim} was not detected: nothing was quarantined"
        return boot

    def baseline(self, rep: int) -> Boot:
        root = self.volume("baseline")
        return run_baseline(self, root, self.worker_id("baseline", rep))


def host_views(scratch: Path, mounts: list[Path], hosts: int, wait_s: float = 10.0) -> list[Path]:
    """``scratch`` and the first ``hosts - 1`` of ``mounts``, each checked to be the same directory
    (a marker written through ``scratch`` is read back through every other mount)."""
    if hosts < 1:
        raise ConfigError(f"--hosts {hosts}: at least 1", hint="e.g. --hosts 2 --scratch A --scratch B")
    views = [scratch, *mounts][:hosts]
    if len(views) < hosts:
        raise ConfigError(
            f"--hosts {hosts} needs {hosts} --scratch directories (one per host's mount of one "
            f"filesystem), got {len(views)}",
            hint="e.g. --hosts 2 --scratch /mnt/a/timing --scratch /mnt/b/timing (the same directory "
            "through two mounts, as `python -m tests.moosefs start DIR` prints them)",
        )
    if len(views) == 1:
        return views
    marker = f".timing-host-check-{uuid.uuid4().hex[:8]}"
    token = uuid.uuid4().hex
    (scratch / marker).write_text(token)
    try:
        for view in views[1:]:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    if (view / marker).read_text() == token:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"--scratch {view} is not the same directory as --scratch {scratch} (a file "
                        f"written through the first did not appear through the other in {wait_s:g} s)",
                        hint="give each host's mount path of one directory on one filesystem",
                    )
                time.sleep(0.1)
    finally:
        (scratch / marker).unlink(missing_ok=True)
    return views


def count_files(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(len(files) for _, _, files in os.walk(path))


def corrupt_one(volume: Volume, how: str) -> str:
    """Corrupt the first verified single model file on the volume; returns its dest.

    ``truncate`` halves it; ``overwrite`` replaces its bytes with an HTML error page padded to
    the same size (FAILURES F6, with the size still matching).
    """
    records = sorted(volume.verified.rglob("*.json")) if volume.verified.is_dir() else []
    for record in records:
        dest = str(record.relative_to(volume.verified))[: -len(".json")]
        target = volume.models / dest
        if not target.is_file():
            continue  # an unpacked zip's directory: pick a single file instead
        size = target.stat().st_size
        if how == "overwrite":
            page = b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>\n"
            data = (page * (size // len(page) + 1))[:size]
        else:
            data = target.read_bytes()[: size // 2]
        # A new inode: the verified file may share its inode with a mirror or another volume.
        write_atomic(target, data)
        return dest
    raise ConfigError(
        "recover needs a verified model file on the volume, and there is none",
        hint="select a capability with model files (--extras) and a manifest listing them (--manifest)",
    )


# -- the baseline recipe -------------------------------------------------------------------
