"""One manifest file onto the volume: lease, sources in order, disk check, transfer, verify, publish.

Internal logic, per file (`ensure_file`; the phase runs several at once):

1. Take the lease ``file-<sha256 of dest>`` (bounded wait, exit 14); a waiter that sees the
   file become verified meanwhile just uses it.
2. Sources in order: ``BOOTSTRAP_MIRROR`` (by dest), then the file's own. For each: probe the
   size (and the Hub's sha256), adopt an interrupted download of the same bytes if there is one,
   check free space for the bytes still needed (plus the unpacked size of a zip) on every
   filesystem written — before creating anything — then transfer (`transfer.Transfer`).
3. Verify: size, sha256, sniff and format check. A bad file goes to ``quarantine/`` with its
   reason, and the next source is tried (a bad resumed file is first fetched again from zero).
4. Publish: fsync, one rename into place (a zip: unpacked into a temp directory, each file
   hashed and fsynced, then one rename of the directory; the zip is not kept), then the record.
   A copy that lost a race (locks off) is discarded when the published one verifies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap import lease as leases
from bootstrap.errors import InsufficientDiskError, format_bytes
from bootstrap.manifest import ModelFile
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume, fsync_dir, require_free
from bootstrap.weights.hfcache import use_cached_file
from bootstrap.weights.mirror import mirror_url
from bootstrap.weights.progress import Progress
from bootstrap.weights.protocol import Probe, Source, SourceFailed, Transient
from bootstrap.weights.records import (
    FileOutcome,
    located,
    quarantine,
    read_record,
    why_unverified,
    write_record,
)
from bootstrap.weights.sources import make_source
from bootstrap.weights.transfer import (
    UNKNOWN_SPACE_EVERY,
    Aborted,
    FetchOptions,
    Transfer,
    TransferResult,
    covered_bytes,
    identity,
    owner_alive,
    read_journal,
    same_target,
    write_journal,
)
from bootstrap.weights.verify import BadFile, check_format, format_for, sniff_problem, zip_members

PART_SUFFIX = ".part"
UNPACK_SUFFIX = ".unpack"


class FileFailed(Exception):
    """Every source of one file failed; the message lists each source's reason."""


@dataclass
class FetchContext:
    """What every file of one weights phase shares."""

    settings: Settings
    volume: Volume
    timeline: Timeline
    options: FetchOptions
    progress: Progress
    abort: threading.Event = field(default_factory=threading.Event)
    owner: str = ""
    received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def lease_name(dest: str) -> str:
    """``file-<sha256 of dest>`` (SPEC §5)."""
    return "file-" + hashlib.sha256(dest.encode()).hexdigest()


# -- one file ----------------------------------------------------------------------------------


def ensure_file(ctx: FetchContext, f: ModelFile) -> FileOutcome:
    """Make ``f`` verified (see the module's internal logic) and say where it is."""
    volume, settings = ctx.volume, ctx.settings
    final = volume.models / f.published_dest

    def done() -> bool:
        return why_unverified(volume, f) is None

    lease = leases.acquire(
        volume.leases,
        lease_name(f.dest),
        owner=ctx.owner,
        ttl_s=settings.lease_ttl_s,
        timeout_s=settings.lock_timeout_s,
        timeline=ctx.timeline,
        phase="weights",
        done=done,
        enabled=settings.locks,
    )
    if lease is None:
        return FileOutcome(str(located(volume, f.published_dest)), False)
    try:
        if done():
            return FileOutcome(str(located(volume, f.published_dest)), False)
        cached = use_cached_file(settings, volume, f, ctx.owner)
        if cached is not None:
            ctx.timeline.log(f"weights: {f.dest}: verified in the HF cache at {cached}, used in place")
            return FileOutcome(cached, False, f"hf-cache:{cached}")
        reasons: list[str] = []
        urls = []
        if settings.mirror:
            urls.append(mirror_url(settings.mirror, f.dest))
        urls.append(f.source)
        for url in urls:
            if ctx.abort.is_set():
                raise Aborted("stopped: another required file failed")
            source = make_source(
                url, settings.environ, timeout_s=ctx.options.timeout_s, policy=ctx.options.addresses
            )
            try:
                return _from_source(ctx, f, source, fresh=False)
            except (SourceFailed, BadFile) as err:
                reasons.append(f"{source.label}: {err}")
                ctx.timeline.log(f"weights: {f.dest}: {source.label} failed: {err}", level="warn")
            except FileNotFoundError as err:
                # Our part directory was adopted by another worker that judged us dead (possible
                # only without locks, or after a stall past the lease TTL): it finishes the file.
                reasons.append(f"{source.label}: {err}")
            if done():
                return FileOutcome(str(final), False)
        raise FileFailed("; ".join(reasons))
    finally:
        lease.release()


def _probe(ctx: FetchContext, source: Source) -> Probe:
    failures = 0
    while True:
        try:
            return source.probe()
        except Transient as err:
            failures += 1
            if ctx.abort.wait(ctx.options.retry_delay(err, failures, source.label)):
                raise Aborted("stopped: another required file failed") from None


@dataclass
class Downloaded:
    """A verified download, still in its part directory (``data``), ready to be published."""

    part: Path
    data: Path
    result: TransferResult
    probe: Probe
    members: list[Any]


def _from_source(ctx: FetchContext, f: ModelFile, source: Source, *, fresh: bool) -> FileOutcome:
    """Fetch, verify and publish ``f`` from one source; raise `SourceFailed`/`BadFile` to move on."""
    volume = ctx.volume
    got = download(ctx, f, source, volume.models / f.dest, fresh=fresh)
    part, data, result, probe = got.part, got.data, got.result, got.probe
    record: dict[str, Any] = {
        "dest": f.published_dest,
        "source": source.label,
        "manifest_source": f.source,
        "size": result.size,
        "sha256": result.sha256,
        "sha256_from": "manifest" if f.sha256 else ("source" if probe.sha256 else "computed"),
        "format": f.format,
        "worker": ctx.owner,
    }
    if f.format == "zip":
        _publish_zip(ctx, f, part, data, got.members, volume.models / f.unpack, record)
    else:
        _publish_file(ctx, f, part, data, volume.models / f.dest, record)
    return FileOutcome(
        str(volume.models / f.published_dest), True, source.label, result.received, result.resumed
    )


def download(
    ctx: FetchContext,
    f: ModelFile,
    source: Source,
    dest_path: Path,
    *,
    fresh: bool = False,
    blob: str | None = None,
) -> Downloaded:
    """Fetch ``f``'s bytes from ``source`` into a part directory beside ``dest_path`` and verify
    them (size, sha256, git ``blob`` id when given, format); a bad file is quarantined and
    `BadFile` raised (a bad resumed file is first fetched once more from zero)."""
    volume = ctx.volume
    probe, size, expected_sha = _probe_checked(ctx, f, source)
    if hasattr(source, "size"):
        source.size = size
    ident = identity(probe, size or 0, expected_sha, source.label) if size is not None else None
    directory = dest_path.parent

    # Find an interrupted download of the same bytes (and clean dead leftovers) — no writes yet
    # beyond removing leftovers, so a failed disk check leaves nothing behind.
    adopt, ranges = (
        (None, []) if (fresh or ident is None) else _find_partial(ctx, directory, dest_path.name, ident)
    )
    covered = covered_bytes(ranges, size) if size is not None else 0
    remaining = (size or 0) - covered
    unpack_dir = volume.models / f.unpack if f.format == "zip" else None
    _check_disk(ctx, f, directory, remaining, unpack_dir, size or 0)

    part, ranges, covered = _claim_part(ctx, dest_path, ident, adopt, ranges, covered)
    if covered:
        ctx.timeline.log(
            f"weights: {f.dest}: resuming {source.label} with {format_bytes(covered)} already on the volume"
        )
    ctx.progress.expect(remaining)
    result = _transfer(ctx, f, source, part, size, ranges)
    data = part / "data"
    blob = blob or probe.blob
    try:
        members = _verify(data, f, result, size, expected_sha, blob)
    except BadFile as err:
        where = quarantine(
            volume,
            data,
            f.dest,
            str(err),
            source=source.label,
            size=result.size,
            sha256=result.sha256,
            worker=ctx.owner,
        )
        shutil.rmtree(part, ignore_errors=True)
        ctx.timeline.log(
            f"weights: {f.dest} from {source.label} is bad ({err}); quarantined as {where.name}", level="warn"
        )
        if result.resumed and not fresh:
            # The resumed part may be what was wrong: fetch it once more from zero.
            return download(ctx, f, source, dest_path, fresh=True, blob=blob)
        raise
    return Downloaded(part, data, result, probe, members)


def _probe_checked(ctx: FetchContext, f: ModelFile, source: Source) -> tuple[Probe, int | None, str | None]:
    """The source's probe, checked against the manifest: (probe, size, expected sha256)."""
    probe = _probe(ctx, source)
    if f.size and probe.size is not None and probe.size != f.size:
        raise SourceFailed(f"the source has {probe.size} bytes, the manifest says {f.size}")
    if f.sha256 and probe.sha256 and probe.sha256 != f.sha256:
        raise SourceFailed(f"the source's sha256 {probe.sha256} is not the manifest's {f.sha256}")
    return probe, f.size or probe.size, f.sha256 or probe.sha256


def _claim_part(
    ctx: FetchContext,
    dest_path: Path,
    ident: dict[str, Any] | None,
    adopt: Path | None,
    ranges: list[tuple[int, int]],
    covered: int,
) -> tuple[Path, list[tuple[int, int]], int]:
    """This worker's part directory: ``adopt`` renamed (the claim), else a new one born with its
    journal. Returns (part, the ranges it holds, bytes covered)."""
    directory = dest_path.parent
    token = uuid.uuid4().hex[:12]
    directory.mkdir(parents=True, exist_ok=True)
    part = directory / f".{dest_path.name}.{token}{PART_SUFFIX}"
    header = {**(ident or {}), "owner": ctx.owner, "host": socket.gethostname(), "pid": os.getpid()}
    if adopt is not None:
        try:
            adopt.rename(part)  # the claim: exactly one adopter can rename it
            write_journal(part / "journal", header, ranges)
        except OSError:
            adopt, ranges, covered = None, [], 0
    if adopt is None:
        # Born complete: the journal is written before the directory gets its .part name, so
        # no other worker ever sees a part without its header.
        born = directory / f".{dest_path.name}.{token}.new"
        born.mkdir()
        write_journal(born / "journal", header, [])
        born.rename(part)
        ranges = []
    return part, ranges, covered


def _transfer(
    ctx: FetchContext,
    f: ModelFile,
    source: Source,
    part: Path,
    size: int | None,
    ranges: list[tuple[int, int]],
) -> TransferResult:
    """Run the transfer into ``part``; a full disk is exit 11, a vanished part a failed source."""
    directory = part.parent
    transfer = Transfer(
        source,
        part / "data",
        part / "journal",
        size,
        ranges,
        ctx.options,
        on_bytes=ctx.progress.add,
        abort=ctx.abort,
        space_check=lambda: require_free(
            directory,
            UNKNOWN_SPACE_EVERY,
            ctx.settings.min_free_bytes,
            what=f"fetching {f.dest} (its source gives no size)",
        ),
    )
    try:
        try:
            result = transfer.run()
        except BaseException:
            if size is None:
                shutil.rmtree(part, ignore_errors=True)  # without a size there is nothing to resume
            raise
    except FileNotFoundError as err:
        raise SourceFailed(f"the download's directory vanished (adopted by another worker?): {err}") from None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientDiskError(
                f"the volume filled up while fetching {f.dest}: {err.strerror}",
                hint="grow the volume, free space with `bootstrap gc`, or lower BOOTSTRAP_MIN_FREE_GB",
            ) from err
        raise
    ctx.timeline.log(
        f"weights: {f.dest}: {format_bytes(result.received)} from {source.label} in {result.seconds:.1f} s"
        + (f" (resumed {format_bytes(result.resumed)})" if result.resumed else "")
        + (f"; survived: {'; '.join(sorted(set(result.errors))[:3])}" if result.errors else "")
    )
    return result


def _verify(
    data: Path,
    f: ModelFile,
    result: TransferResult,
    size: int | None,
    expected_sha: str | None,
    blob: str | None,
) -> list[Any]:
    """Raise `BadFile` unless the received bytes are the expected ones; a zip's members."""
    if size is not None and result.size != size:
        raise BadFile(f"got {result.size} bytes, expected {size}")
    if expected_sha and result.sha256 != expected_sha:
        raise BadFile(f"sha256 {result.sha256} is not the expected {expected_sha}")
    if blob and not expected_sha and git_blob_id(data) != blob:
        raise BadFile(f"git blob id {git_blob_id(data)} is not the source's {blob}")
    if f.format == "zip":
        why = sniff_problem(data, "zip")
        if why:
            raise BadFile(why)
        return zip_members(data)
    check_format(data, f.format)
    return []


def git_blob_id(path: Path) -> str:
    """Git's object id of a file: ``sha1(b"blob <size>\\0" + bytes)`` (the Hub's id of a non-LFS file)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as src:
        while chunk := src.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _find_partial(
    ctx: FetchContext, directory: Path, name: str, ident: dict[str, Any]
) -> tuple[Path | None, list[tuple[int, int]]]:
    """The best interrupted download of the same bytes to adopt; remove dead ones of others."""
    best: tuple[int, Path, list[tuple[int, int]]] | None = None
    if not directory.is_dir():
        return None, []
    for born in directory.glob(f".{name}.*.new"):
        with contextlib.suppress(OSError):
            if not owner_alive({}, ctx.settings.lease_ttl_s, born.stat().st_mtime):
                shutil.rmtree(born, ignore_errors=True)  # a worker died while creating it
    for part in directory.glob(f".{name}.*{PART_SUFFIX}"):
        journal = part / "journal"
        header, ranges = read_journal(journal)
        try:
            mtime = journal.stat().st_mtime
        except OSError:
            mtime = 0.0
        # Holding the lease, any other part is abandoned; without locks, only a dead writer's.
        alive = (
            header is not None
            and not ctx.settings.locks
            and owner_alive(header, ctx.settings.lease_ttl_s, mtime)
        )
        if header is None:
            with contextlib.suppress(OSError):
                mtime = max(mtime, part.stat().st_mtime)
            if owner_alive({}, ctx.settings.lease_ttl_s, mtime):
                continue  # being written right now (or just now): not ours to judge
            shutil.rmtree(part, ignore_errors=True)
            continue
        if alive:
            continue
        if not same_target(header, ident):
            shutil.rmtree(part, ignore_errors=True)  # a dead download of other bytes: a leftover
            continue
        got = covered_bytes(ranges, ident["size"])
        if best is None or got > best[0]:
            best = (got, part, ranges)
    if best is None:
        return None, []
    return best[1], best[2]


def _filesystem(path: Path) -> tuple[int, Path]:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe.stat().st_dev, probe


def _check_disk(
    ctx: FetchContext, f: ModelFile, directory: Path, remaining: int, unpack_dir: Path | None, zip_size: int
) -> None:
    """Bytes still needed plus the reserve, on every filesystem this file writes (exit 11)."""
    needs: dict[int, tuple[Path, int, str]] = {}
    dev, _ = _filesystem(directory)
    needs[dev] = (directory, remaining, f"fetching {f.dest}")
    if unpack_dir is not None:
        udev, _ = _filesystem(unpack_dir.parent)
        # Unpacked ONNX barely compresses: the zip's size is the estimate until its directory is read.
        path, n, what = needs.get(udev, (unpack_dir.parent, 0, ""))
        needs[udev] = (path, n + zip_size, f"{what + ' and ' if what else ''}unpacking {f.dest}")
    for path, needed, what in needs.values():
        require_free(path, needed, ctx.settings.min_free_bytes, what=what)


def _publish_file(
    ctx: FetchContext, f: ModelFile, part: Path, data: Path, final: Path, record: dict[str, Any]
) -> None:
    """One rename into place, then the record; a lost race keeps the published copy."""
    volume = ctx.volume
    why = why_unverified(volume, f)
    if why is None:
        shutil.rmtree(part, ignore_errors=True)  # a racer (locks off) published first: ours goes
        return
    if final.exists() and read_record(volume, f.published_dest) is not None:
        quarantine(volume, final, f.dest, f"replaced: {why}", worker=ctx.owner)
    os.replace(data, final)  # one atomic rename: readers see the old file or the new, never half
    fsync_dir(final.parent)
    write_record(volume, f.published_dest, record)
    shutil.rmtree(part, ignore_errors=True)


def _publish_zip(
    ctx: FetchContext,
    f: ModelFile,
    part: Path,
    data: Path,
    members: list[Any],
    unpack_dir: Path,
    record: dict[str, Any],
) -> None:
    """Unpack into a temp directory beside the target (each file hashed, checked, fsynced), rename."""
    import zipfile

    volume = ctx.volume
    total = sum(m.file_size for m in members)
    require_free(unpack_dir.parent, total, ctx.settings.min_free_bytes, what=f"unpacking {f.dest}")
    unpack_dir.parent.mkdir(parents=True, exist_ok=True)
    cleanup_leftovers(unpack_dir.parent, unpack_dir.name, ctx.settings.lease_ttl_s)
    tmp = unpack_dir.parent / f".{unpack_dir.name}.{uuid.uuid4().hex[:12]}{UNPACK_SUFFIX}"
    tmp.mkdir()
    (tmp / ".owner").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    listing = []
    try:
        with zipfile.ZipFile(data) as zf:
            for m in members:
                target = tmp / m.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                n = 0
                with zf.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(1024 * 1024):
                        h.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if n != m.file_size:
                    raise BadFile(f"zip member {m.filename} unpacked to {n} bytes, expected {m.file_size}")
                check_format(target, format_for(m.filename))
                listing.append({"path": str(Path(m.filename)), "size": n, "sha256": h.hexdigest()})
        (tmp / ".owner").unlink()
        for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
            fsync_dir(d)
    except BadFile as err:
        shutil.rmtree(tmp, ignore_errors=True)
        quarantine(volume, data, f.dest, str(err), source=record["source"], worker=ctx.owner)
        shutil.rmtree(part, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _ in range(5):
        why = why_unverified(volume, f)
        if why is None:
            shutil.rmtree(tmp, ignore_errors=True)  # a racer (locks off) published first
            break
        if unpack_dir.exists():
            quarantine(volume, unpack_dir, f.unpack, f"replaced: {why}", worker=ctx.owner)
        try:
            tmp.rename(unpack_dir)  # one rename publishes the whole directory
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue  # a racer renamed its copy in between: look again
        fsync_dir(unpack_dir.parent)
        write_record(
            volume,
            f.unpack,
            {
                **record,
                "dest": f.unpack,
                "zip": {"dest": f.dest, "size": record["size"], "sha256": record["sha256"]},
                "size": total,
                "sha256": None,
                "files": listing,
            },
        )
        break
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(part, ignore_errors=True)  # the zip is not kept


def cleanup_leftovers(directory: Path, name: str, ttl_s: float) -> int:
    """Remove dead writers' ``.<name>.*.unpack`` temp directories in ``directory``; how many."""
    removed = 0
    for tmp in directory.glob(f".{name}.*{UNPACK_SUFFIX}") if directory.is_dir() else []:
        owner_file = tmp / ".owner"
        try:
            header = json.loads(owner_file.read_text())
            mtime = owner_file.stat().st_mtime
        except (OSError, ValueError):
            try:
                header, mtime = {}, tmp.stat().st_mtime
            except OSError:
                continue
        if not owner_alive(header if isinstance(header, dict) else {}, ttl_s, mtime):
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed
