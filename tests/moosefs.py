"""A real MooseFS on one machine: master + chunkserver + two FUSE mounts of one filesystem.

RunPod's network volume is MooseFS mounted over FUSE. This module starts the same thing
(Debian's ``moosefs-master``, ``moosefs-chunkserver``, ``moosefs-client`` 3.0.117) so tests and
benchmarks run on the filesystem the product is written for:

- The chunkserver refuses a master on a 127.x address, so the daemons and the two ``mfsmount``
  processes run inside a network namespace of their own (``unshare -n``) whose ``lo`` carries one
  extra, non-loopback address (`ADDRESS`). Nothing else is in that namespace and nothing leaves
  it; nothing outside it ever connects to that address. The FUSE mounts live in the ordinary
  mount namespace, so they are visible everywhere.
- Two mounts of the one filesystem stand for two hosts' views of the volume ("host A", "host B").
- A `Host` is a UTS + pid (+ mount, for its own ``/proc``) namespace with its own hostname
  (``host-a``, ``host-b``) whose pid 1 only reaps orphans. Workers run in it through
  ``nsenter``; they stay in the root network namespace, where the loopback test servers are.
  So lease ownership ("same host, pid dead → stale at once") and takeover by the TTL are
  exercised as across real hosts.

Everything is stopped by pid (and unmounted) by `MooseFS.stop`. By hand::

    python -m tests.moosefs start /tmp/mfs     # prints the two mount points
    python -m tests.moosefs stop /tmp/mfs
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: the master's address, only ever on the private network namespace's own ``lo``
ADDRESS = "10.77.0.1"
MASTER_PORT = 9421
TOOLS = ("mfsmaster", "mfschunkserver", "mfsmount", "unshare", "nsenter", "ip", "umount")
EMPTY_METADATA = Path("/var/lib/mfs/metadata.mfs.empty")
STATE_FILE = "moosefs.json"
HOSTS = ("host-a", "host-b")

#: pid 1 of a host namespace: set the hostname, then reap orphans until told to stop
_HOST_INIT = r"""
import os, signal, socket, sys
socket.sethostname(sys.argv[1])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
print("ready", flush=True)
while True:
    sig = signal.sigwait({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
    if sig != signal.SIGCHLD:
        os._exit(0)  # pid 1 leaving ends every process of this host
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
"""


def unavailable_reason() -> str | None:
    """Why a MooseFS fixture cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "MooseFS fixture needs root (network namespace, FUSE mounts)"
    if not Path("/dev/fuse").exists():
        return "MooseFS fixture needs /dev/fuse (modprobe fuse; mknod /dev/fuse c 10 229)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as err:
        return f"MooseFS fixture cannot open /dev/fuse: {err}"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (
            f"MooseFS fixture needs {', '.join(missing)} "
            "(apt-get install moosefs-master moosefs-chunkserver moosefs-client fuse3 iproute2)"
        )
    if not EMPTY_METADATA.exists():
        return f"MooseFS fixture needs {EMPTY_METADATA} (package moosefs-master)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"MooseFS fixture cannot create a network namespace: {probe.stderr.strip()}"
    return None


def _wait(pred: Any, timeout: float, what: str, logs: Sequence[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    tails = "".join(f"\n--- {p}:\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
    raise RuntimeError(f"MooseFS: {what} not ready after {timeout:.0f} s{tails}")


def _mounted(path: Path) -> bool:
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
            return True
    return False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


#: the processes this interpreter started, by pid, waited for when stopped
_PROCS: dict[int, subprocess.Popen[Any]] = {}


def _stop_pids(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL processes this fixture started (all at once, so their
    shutdowns overlap)."""
    procs = {pid: _PROCS.pop(pid, None) for pid in pids}
    for pid in procs:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in procs):
        for proc in procs.values():
            if proc is not None:
                proc.poll()
        time.sleep(0.05)
    for pid, proc in procs.items():
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()


@dataclass
class Host:
    """A simulated host: its own hostname, pids and ``/proc``; the root network namespace."""

    name: str
    #: the volume as this host mounts it
    mount: Path
    #: the ``unshare`` process (root pid namespace) and pid 1 of the host, as the root sees it
    unshare_pid: int
    init_pid: int

    def argv(self, argv: Sequence[str], cwd: Path | None = None) -> list[str]:
        """``argv`` run as a process of this host."""
        wd = str(cwd or Path.cwd())
        return ["nsenter", "-t", str(self.init_pid), "-u", "-p", "-m", f"--wd={wd}", "--", *argv]

    def popen(
        self, argv: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` on this host in a new session: ``os.killpg(p.pid, SIGKILL)`` kills the
        worker and everything it started, as a container stop does."""
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.argv(argv, cwd), env=dict(env), cwd=cwd, **kwargs)

    def run(
        self, argv: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(argv, cwd),
            env=dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@dataclass
class MooseFS:
    """One running MooseFS: daemons in a private network namespace, two mounts, two hosts."""

    root: Path
    #: host name → its mount of the one filesystem
    mounts: dict[str, Path]
    pids: dict[str, int] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def a(self) -> Path:
        return self.mounts[HOSTS[0]]

    @property
    def b(self) -> Path:
        return self.mounts[HOSTS[1]]

    def host(self, name: str) -> Host:
        """The host namespace ``name`` (``host-a``/``host-b``), created on first use."""
        if name not in self.hosts:
            self.hosts[name] = _start_host(name, self.mounts[name], self.root)
            self.pids[f"host:{name}"] = self.hosts[name].unshare_pid
            self.pids[f"init:{name}"] = self.hosts[name].init_pid
            self._save()
        return self.hosts[name]

    def _save(self) -> None:
        state = {"mounts": {k: str(v) for k, v in self.mounts.items()}, "pids": self.pids}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1))

    def stop(self) -> None:
        """Unmount both mounts and stop every process this fixture started, by pid."""
        hosts = [n for n in self.pids if n.startswith("host:")]
        for name in hosts:  # pid 1 of the host leaving ends every process in it
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pids.get(f"init:{name[5:]}", 0) or self.pids[name], signal.SIGTERM)
        _stop_pids([self.pids.pop(n) for n in hosts])
        for name in [n for n in self.pids if n.startswith("init:")]:
            del self.pids[name]
        self.hosts.clear()
        for mount in self.mounts.values():
            if _mounted(mount):
                subprocess.run(["umount", str(mount)], capture_output=True, check=False)
                if _mounted(mount):
                    subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        _stop_pids([self.pids.pop(n) for n in list(self.pids) if n.startswith("mount:")])
        _stop_pids([self.pids.pop(n) for n in ("chunkserver", "master") if n in self.pids], timeout=20)
        _stop_pids([self.pids.pop(n) for n in ("netns",) if n in self.pids])
        self._save()


def _config(root: Path, chunk_space: str) -> tuple[Path, Path]:
    master, cs, chunks = root / "master", root / "chunkserver", root / "chunks"
    for d in (master, cs, chunks):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copy(EMPTY_METADATA, master / "metadata.mfs")
    (root / "mfsexports.cfg").write_text("*  /  rw,alldirs,admin,maproot=0:0\n")
    (root / "mfstopology.cfg").write_text("")
    common = "WORKING_USER = root\nWORKING_GROUP = root\nNICE_LEVEL = 0\nDISABLE_OOM_KILLER = 0\n"
    master_cfg = root / "mfsmaster.cfg"
    master_cfg.write_text(
        common
        + f"DATA_PATH = {master}\nEXPORTS_FILENAME = {root / 'mfsexports.cfg'}\n"
        + f"TOPOLOGY_FILENAME = {root / 'mfstopology.cfg'}\n"
        + "".join(f"{k}_LISTEN_HOST = {ADDRESS}\n" for k in ("MATOML", "MATOCS", "MATOCL"))
        + "BACK_LOGS = 2\nMETADATA_SAVE_FREQ = 24\n"
    )
    (root / "mfshdd.cfg").write_text(f"{chunks} {chunk_space}\n")
    cs_cfg = root / "mfschunkserver.cfg"
    cs_cfg.write_text(
        common
        + f"DATA_PATH = {cs}\nHDD_CONF_FILENAME = {root / 'mfshdd.cfg'}\n"
        + f"MASTER_HOST = {ADDRESS}\nCSSERV_LISTEN_HOST = {ADDRESS}\nHDD_LEAVE_SPACE_DEFAULT = 64MiB\n"
    )
    return master_cfg, cs_cfg


def _in_netns(netns_pid: int, argv: list[str]) -> list[str]:
    # only -n: the daemons share the root mount namespace, so their FUSE mounts are visible to all
    return ["nsenter", "-t", str(netns_pid), "-n", "--", *argv]


def _spawn(argv: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    _PROCS[proc.pid] = proc
    return proc.pid


def start(root: Path, *, chunk_space: str = "-1GiB", hosts: Sequence[str] = HOSTS) -> MooseFS:
    """Start master, chunkserver and one mount per host under ``root``; wait until a file written
    through one mount reads back through the other. ``chunk_space`` is the chunk folder's size
    setting in ``mfshdd.cfg`` (``-1GiB``: leave 1 GiB free on the disk holding it)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    master_cfg, cs_cfg = _config(root, chunk_space)
    fs = MooseFS(root=root, mounts={h: root / "mnt" / h for h in hosts})
    try:
        fs.pids["netns"] = _spawn(["unshare", "-n", "sleep", "infinity"], root / "netns.log")
        _wait(
            lambda: Path(f"/proc/{fs.pids['netns']}/ns/net").exists() and _netns_differs(fs.pids["netns"]),
            10,
            "netns",
        )
        ns = fs.pids["netns"]
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"]):
            subprocess.run(_in_netns(ns, cmd), check=True, capture_output=True)
        fs._save()
        fs.pids["master"] = _spawn(
            _in_netns(ns, ["mfsmaster", "-c", str(master_cfg), "-f", "start"]), root / "master.log"
        )
        fs._save()
        _wait(
            lambda: "listen on" in _text(root / "master.log") and "9421" in _text(root / "master.log"),
            30,
            "mfsmaster",
            [root / "master.log"],
        )
        fs.pids["chunkserver"] = _spawn(
            _in_netns(ns, ["mfschunkserver", "-c", str(cs_cfg), "-f", "start"]), root / "chunkserver.log"
        )
        fs._save()
        _wait(
            lambda: "connected to Master" in _text(root / "chunkserver.log"),
            30,
            "mfschunkserver",
            [root / "chunkserver.log"],
        )
        for name, mount in fs.mounts.items():
            mount.mkdir(parents=True, exist_ok=True)
            argv = [
                "mfsmount",
                "-f",
                "-o",
                f"mfsmaster={ADDRESS}",
                "-o",
                f"mfsport={MASTER_PORT}",
                str(mount),
            ]
            fs.pids[f"mount:{name}"] = _spawn(_in_netns(ns, argv), root / f"mount-{name}.log")
            fs._save()
        for name, mount in fs.mounts.items():
            _wait(lambda m=mount: _mounted(m), 30, f"mount {name}", [root / f"mount-{name}.log"])
        _wait(
            lambda: _round_trip(fs),
            60,
            "a file written on one mount, read on the other",
            [root / "chunkserver.log"],
        )
    except BaseException:
        fs.stop()
        raise
    return fs


def _netns_differs(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _round_trip(fs: MooseFS) -> bool:
    token = uuid.uuid4().hex
    mounts = list(fs.mounts.values())
    probe = mounts[0] / f".probe-{token}"
    try:
        probe.write_text(token)
        ok = all((m / probe.name).read_text() == token for m in mounts)
        probe.unlink()
        return ok
    except OSError:
        with contextlib.suppress(OSError):
            probe.unlink()
        return False


def _start_host(name: str, mount: Path, root: Path) -> Host:
    log = root / f"{name}.log"
    argv = [
        "unshare", "-u", "-p", "-m", "--fork", "--mount-proc", "--kill-child=SIGKILL",
        sys.executable, "-c", _HOST_INIT, name,
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    _PROCS[proc.pid] = proc
    _wait(lambda: "ready" in _text(log), 20, f"host {name}", [log])
    (init,) = _children(proc.pid)
    return Host(name=name, mount=mount, unshare_pid=proc.pid, init_pid=init)


def stop_state(root: Path) -> None:
    """Stop a fixture started by ``python -m tests.moosefs start`` from its state file."""
    state = json.loads((root / STATE_FILE).read_text())
    fs = MooseFS(root=root, mounts={k: Path(v) for k, v in state["mounts"].items()}, pids=dict(state["pids"]))
    fs.stop()


@contextlib.contextmanager
def running(root: Path, **kwargs: Any) -> Iterator[MooseFS]:
    fs = start(root, **kwargs)
    try:
        yield fs
    finally:
        fs.stop()


@pytest.fixture(scope="session", name="moosefs")
def moosefs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooseFS]:
    """One MooseFS for the test session, mounted as host A and host B; skips with the reason
    where it cannot run (not root, no /dev/fuse, packages missing)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with running(tmp_path_factory.mktemp("moosefs")) as fs:
        yield fs


def filesystem_type(path: Path) -> tuple[str, str]:
    """(type, source) of the mount holding ``path``, from ``/proc/self/mountinfo``."""
    best: tuple[int, str, str] = (-1, "", "")
    target = str(path.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mnt = left.split()[4].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best[0]:
            fstype, source = right.split()[:2]
            best = (len(mnt), fstype, source.replace("\\043", "#"))
    return best[1], best[2]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print("usage: python -m tests.moosefs start|stop DIR", file=sys.stderr)
        return 2
    root = Path(args[1]).resolve()
    if args[0] == "stop":
        stop_state(root)
        return 0
    try:
        fs = start(root)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for mount in fs.mounts.values():
        print(mount)
    return 0


if __name__ == "__main__":
    sys.exit(main())
