"""Writing a file atomically: the one writer every record, plan, script and report goes through.

A reader sees the old file or the new one, never half of one, and a crash leaves at most a
``.<name>.<random>.tmp`` beside the target (``bootstrap gc`` removes old ones):

1. a uniquely named temp file in the target's directory (same filesystem: the rename is atomic;
   unique: two writers never share a temp file), created exclusively;
2. the bytes written and fsynced;
3. an optional check of the temp file (a rendered script is syntax-checked before it is published);
4. one ``rename`` onto the target, then an fsync of the directory so the rename is durable.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse a directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_temp(directory: Path, data: bytes | str, *, stem: str, mode: int = 0o644) -> Path:
    """``directory/.<stem>.<random>.tmp`` holding ``data``, fsynced; the caller publishes or removes it."""
    tmp = directory / f".{stem}.{uuid.uuid4().hex}.tmp"
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the umask must not narrow what the file is for (an executable script)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_atomic(
    path: Path, data: bytes | str, *, mode: int = 0o644, check: Callable[[Path], None] | None = None
) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, data, stem=path.name, mode=mode)
    try:
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: Path, data: Any, **dumps: Any) -> Path:
    """`write_atomic` of ``data`` as JSON (``dumps`` go to `json.dumps`, e.g. ``indent=2``)."""
    return write_atomic(path, json.dumps(data, **dumps))
