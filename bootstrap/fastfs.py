"""Fast file work on a slow-metadata volume (MooseFS over FUSE): many small files in parallel.

On RunPod's network volume each metadata operation (create, stat, rename, mkdir) waits for a
round trip to the MooseFS master, while bandwidth is plentiful. A step that touches thousands
of small files one after another (an env's ``.py``/``.pyc`` files, the imports of a worker) is
bound by that latency, not by the CPU, so it runs far faster with many more threads than cores:
the waits overlap. Everything here is stdlib only and never changes a published artifact.

- `copy_tree`: publish a tree built on local disk into a temp directory on the volume (the
  caller then fsyncs, writes READY and renames, exactly as for a tree built in place), with
  files copied by a thread pool; mtimes are kept, so the ``.pyc`` files compiled locally stay
  valid (their header records the source's mtime and size).
- `compile_tree`: bytecode for a tree in place with a thread pool (``py_compile`` releases the
  GIL while it waits on the filesystem).
- `imported_files` / `prefetch`: the files an import of some modules reads (from ``sys.modules``
  and ``/proc/self/maps`` of the env's own Python), and reading them in parallel so that the
  worker's imports then hit the page cache.
"""

# ruff: noqa: PTH102, PTH113, PTH115, PTH116, PTH211 - os-level calls on purpose: one syscall each, no Path objects in hot loops
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: threads for latency-bound file work; far more than cores, since each mostly waits
THREADS = 32
_CHUNK = 1 << 20


def _copy_file(src: str, dst: str, st: os.stat_result) -> int:
    """Stream one file, keep mode and times; returns bytes copied."""
    fd_in = os.open(src, os.O_RDONLY)
    try:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(st.st_mode))
        try:
            copied = 0
            while True:
                try:
                    n = os.copy_file_range(fd_in, fd_out, 1 << 30)
                except OSError:
                    n = -1
                if n <= 0:
                    break
                copied += n
            if n < 0:  # no copy_file_range across these filesystems: read/write
                os.lseek(fd_in, copied, os.SEEK_SET)
                while chunk := os.read(fd_in, _CHUNK):
                    os.write(fd_out, chunk)
                    copied += len(chunk)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return copied


def copy_tree(src: Path, dst: Path, *, threads: int = THREADS) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` (which must not exist): directories first, in order, then every
    file and symlink by a pool of ``threads``; directory times last. Returns (files, bytes).

    Hard links inside ``src`` become separate copies (a volume env must not share inodes with
    container disk anyway). Nothing is fsynced here: the caller syncs once before READY.
    """
    os.mkdir(dst)
    dirs: list[tuple[str, os.stat_result]] = [(str(dst), os.stat(src))]
    files: list[tuple[str, str, os.stat_result]] = []
    links: list[tuple[str, str]] = []
    for root, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(root, src)
        out_root = str(dst) if rel == "." else os.path.join(dst, rel)
        for name in dirnames:
            s, d = os.path.join(root, name), os.path.join(out_root, name)
            st = os.lstat(s)
            if stat.S_ISLNK(st.st_mode):
                links.append((os.readlink(s), d))
            else:
                os.mkdir(d, stat.S_IMODE(st.st_mode))
                dirs.append((d, st))
        for name in filenames:
            s, d = os.path.join(root, name), os.path.join(out_root, name)
            st = os.lstat(s)
            if stat.S_ISLNK(st.st_mode):
                links.append((os.readlink(s), d))
            elif stat.S_ISREG(st.st_mode):
                files.append((s, d, st))
    with ThreadPoolExecutor(threads) as pool:
        copied = sum(pool.map(lambda f: _copy_file(*f), files))
        list(pool.map(lambda link: os.symlink(*link), links))
    for d, st in reversed(dirs):
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    return len(files), copied


def compile_tree(root: Path, *, threads: int = THREADS, procs: int = 1) -> int:
    """Compile every ``.py`` under ``root`` to ``__pycache__`` (timestamp-checked, as uv and
    compileall write them) with ``threads`` threads in each of ``procs`` processes (the CPU
    part holds the GIL, the filesystem waits do not); returns how many files were compiled.

    Run it with the env's own Python (``<env>/bin/python fastfs.py compile DIR``): bytecode is
    specific to the interpreter's version.
    """
    sources = sorted(os.path.join(r, n) for r, _, names in os.walk(root) for n in names if n.endswith(".py"))
    if procs > 1:
        shares = [sources[i::procs] for i in range(procs)]
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "compile-list", str(threads)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in shares
        ]
        for proc, share in zip(workers, shares, strict=True):
            assert proc.stdin is not None
            proc.stdin.write("\n".join(share))
            proc.stdin.close()
        total = 0
        for proc in workers:
            assert proc.stdout is not None
            total += int(proc.stdout.read().strip() or 0)
            proc.stdout.close()
            proc.wait()
        return total
    return _compile_files(sources, threads)


def _compile_files(sources: Sequence[str], threads: int) -> int:
    import py_compile

    def one(path: str) -> bool:
        # As compileall: a file that does not compile is left without bytecode (quiet=2 makes
        # py_compile return None for it instead of raising).
        try:
            return py_compile.compile(path, quiet=2) is not None
        except OSError:
            return False

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, sources))


def loaded_files() -> list[str]:
    """Every file this interpreter has read for its imports so far: each module's source and
    bytecode (``sys.modules``) and the shared libraries mapped (``/proc/self/maps``)."""
    files = set()
    for mod in list(sys.modules.values()):
        for attr in ("__file__", "__cached__"):
            f = getattr(mod, attr, None)
            if isinstance(f, str):
                files.add(f)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    files.add(parts[5].strip())
    except OSError:
        pass
    return sorted(files)


# Run by the env's Python: this file is loaded by its path (argv[1]) — not put on sys.path,
# where bootstrap's own modules would shadow the standard library's (gc, …).
_RECORD = """
import importlib, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_fastfs", sys.argv[1])
fastfs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fastfs)
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass
print(json.dumps(fastfs.loaded_files()))
"""


def imported_files(
    python: Path, modules: Sequence[str], *, under: Path | None = None, pythonpath: str | None = None
) -> list[str]:
    """Every file importing ``modules`` with ``python`` reads: sources, bytecode and the shared
    libraries mapped (from ``/proc/self/maps``); only those under ``under`` when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [str(python), "-c", _RECORD, __file__, *modules], capture_output=True, text=True, check=True, env=env
    ).stdout
    return existing(json.loads(out.splitlines()[-1]), under)


def existing(files: Iterable[str], under: Path | None = None) -> list[str]:
    """The ``files`` that are regular files (only those below ``under`` when given)."""
    prefix = str(under).rstrip("/") + "/" if under is not None else ""
    return [f for f in files if f.startswith(prefix) and os.path.isfile(f)]


def _read_all(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        total = 0
        while chunk := os.read(fd, _CHUNK):
            total += len(chunk)
        return total
    finally:
        os.close(fd)


def prefetch(paths: Iterable[str], *, threads: int = THREADS) -> int:
    """Read ``paths`` in parallel so later reads hit the page cache; returns bytes read.
    A missing file is skipped: prefetching is only ever a hint."""
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(_read_all, list(paths)))


def main(argv: Sequence[str]) -> int:
    """``compile DIR [THREADS [PROCS]]``, ``compile-list THREADS`` (paths on stdin) or
    ``prefetch ROOT LIST`` (LIST: paths relative to ROOT, one a line)."""
    if argv[:1] == ["compile"] and len(argv) >= 2:
        threads = int(argv[2]) if len(argv) > 2 else THREADS
        procs = int(argv[3]) if len(argv) > 3 else 1
        print(compile_tree(Path(argv[1]), threads=threads, procs=procs))
        return 0
    if argv[:1] == ["compile-list"] and len(argv) == 2:
        print(_compile_files([line for line in sys.stdin.read().splitlines() if line], int(argv[1])))
        return 0
    if argv[:1] == ["prefetch"] and len(argv) == 3:
        # a detached helper at boot: reads ROOT/<each line of LIST> while the worker imports
        root = Path(argv[1])
        names = Path(argv[2]).read_text().splitlines()
        print(prefetch(str(root / n) for n in names if n and not n.startswith("/")))
        return 0
    print("usage: fastfs.py compile DIR [THREADS [PROCS]] | prefetch ROOT LIST", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
