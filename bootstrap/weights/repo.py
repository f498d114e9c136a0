"""One ``[[repo]]`` entry: a whole repository fetched, verified and published as one directory (SPEC §6).

Internal logic (`ensure_repo`, under the lease ``file-<sha256 of dest>``):

1. A repository found in the Hugging Face cache (``BOOTSTRAP_HF_CACHE``) at the pinned revision
   is verified where it lies (`bootstrap.weights.hfcache`), recorded, and used in place.
2. The file list: ``files``, else the repo's ``.verified`` record, else the Hub's tree API at
   the pinned revision (paginated by ``Link``), filtered by ``include``. Each file comes with
   what the Hub publishes about it: size, the LFS sha256, or the git blob id.
3. A staging directory ``.<name>.<token>.stage/`` beside the target: ``header.json`` (owner and
   source) and ``files/``. A dead worker's staging of the same source is adopted by renaming it
   (one claim), like a download journal; its files are checked again and only a bad or missing
   one is fetched. A good file of an earlier, damaged copy is hard-linked in, not fetched.
4. Each file: ``BOOTSTRAP_MIRROR`` at ``<mirror>/<dest>/<path>`` first, then the repo's own
   source; fetched with resume (`bootstrap.weights.fetch.download`), verified by the LFS sha256
   or the git blob id, by size, and by format (a safetensors header that tiles its file).
5. Publish: ``files/`` becomes ``models/<dest>`` with one rename (an old copy is renamed aside
   first and removed after), then ``.verified/<dest>.json`` lists every file with size and sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from bootstrap import lease as leases
from bootstrap.manifest import ModelFile, ModelRepo
from bootstrap.urls import HfRef, parse_hf, scheme_of, shown
from bootstrap.volume import fsync_dir
from bootstrap.weights.fetch import (
    FetchContext,
    FileFailed,
    download,
    git_blob_id,
    lease_name,
)
from bootstrap.weights.hfcache import cache_root, verify_snapshot
from bootstrap.weights.mirror import mirror_url
from bootstrap.weights.protocol import SourceFailed, Transient
from bootstrap.weights.records import FileOutcome, quarantine, read_record, why_unverified, write_record
from bootstrap.weights.sources import (
    HF_DEFAULT_ENDPOINT,
    HTTPConnection,
    HTTPSource,
    make_source,
)
from bootstrap.weights.transfer import Aborted, owner_alive
from bootstrap.weights.verify import BadFile, check_format, format_for

STAGE_SUFFIX = ".stage"
_LINK_NEXT = re.compile(r"<([^>]+)>\s*;\s*rel=\"?next\"?")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RepoFile:
    """One file of a repository and what its source vouches for."""

    path: str
    size: int | None = None
    #: the LFS sha256 (the Hub's ``lfs.oid`` or ``X-Linked-Etag``), or a recorded sha256
    sha256: str | None = None
    #: the git blob id of a non-LFS file (the tree API's ``oid``)
    blob: str | None = None
    lfs: bool = False


# -- the file list -----------------------------------------------------------------------------


def hf_endpoint(environ: Any) -> str:
    return str(environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).strip()


def tree_listing(ctx: FetchContext, ref: HfRef) -> list[RepoFile]:
    """Every file of ``ref`` at its revision, from the Hub's tree API (following ``Link: next``)."""
    environ = ctx.settings.environ
    url: str | None = ref.tree_url(hf_endpoint(environ))
    source = HTTPSource(
        str(url),
        label=f"hf://{ref.repo}",
        token=environ.get("HF_TOKEN") or None,
        timeout_s=ctx.options.timeout_s,
        policy=ctx.options.addresses,
    )
    conn = HTTPConnection(source)
    out: list[RepoFile] = []
    pages = 0
    try:
        while url is not None:
            pages += 1
            if pages > 1000:
                raise SourceFailed("the tree listing has more than 1000 pages")
            failures = 0
            while True:
                try:
                    resp = conn._request("GET", url, {"Accept": "application/json"})
                    body = resp.read()
                    break
                except Transient as err:
                    failures += 1
                    if ctx.abort.wait(ctx.options.retry_delay(err, failures, source.label)):
                        raise Aborted("stopped") from None
            if resp.status != 200:
                raise SourceFailed(f"the tree API answered HTTP {resp.status} {resp.reason}")
            try:
                items = json.loads(body)
            except ValueError:
                raise SourceFailed("the tree API did not answer JSON") from None
            if not isinstance(items, list):
                raise SourceFailed("the tree API did not answer a list")
            for item in items:
                if not isinstance(item, dict) or item.get("type") != "file":
                    continue
                lfs = item.get("lfs") if isinstance(item.get("lfs"), dict) else None
                sha = str(lfs.get("oid", "")) if lfs else ""
                out.append(
                    RepoFile(
                        str(item.get("path", "")),
                        int(item["size"]) if isinstance(item.get("size"), int) else None,
                        sha if _HEX64.fullmatch(sha) else None,
                        None if lfs else (str(item.get("oid")) or None),
                        lfs is not None,
                    )
                )
            m = _LINK_NEXT.search(resp.getheader("Link", "") or "")
            url = m.group(1) if m else None
    finally:
        conn.close()
    return out


def file_list(ctx: FetchContext, r: ModelRepo) -> tuple[list[RepoFile], str]:
    """(files, where the list came from): ``files``, else the record, else the Hub's tree API."""
    if r.files:
        return [RepoFile(p) for p in r.files], "manifest"
    record = read_record(ctx.volume, r.dest)
    if record and record.get("manifest_source") == r.source and record.get("include") == list(r.include):
        listed = [
            RepoFile(str(i["path"]), i.get("size"), i.get("sha256"), None, bool(i.get("lfs")))
            for i in record.get("files", [])
            if isinstance(i, dict) and "path" in i
        ]
        if listed:
            return listed, "record"
    if scheme_of(r.source) != "hf":
        raise FileFailed(f"cannot list the files of {r.dest}: give files = [...] in the manifest")
    ref = parse_hf(r.source, repo_only=True)
    every = tree_listing(ctx, ref)
    chosen = [f for f in every if r.wants(f.path)]
    if not chosen:
        raise FileFailed(f"hf://{ref.repo}@{ref.revision} has no file matching include {list(r.include)}")
    return chosen, "tree"


def file_urls(settings: Any, r: ModelRepo, path: str) -> list[str]:
    """Where one file of ``r`` may come from, in order: the mirror by dest, then the source."""
    urls = []
    if settings.mirror:
        urls.append(mirror_url(settings.mirror, f"{r.dest}/{path}"))
    scheme = scheme_of(r.source)
    if scheme == "hf":
        ref = parse_hf(r.source, repo_only=True)
        urls.append(
            f"hf://{ref.kind + '/' if ref.kind else ''}{ref.repo}/{quote(path)}?revision={ref.revision}"
        )
    elif scheme == "file":
        urls.append(Path(unquote(urlsplit(r.source).path), path).as_uri())
    else:
        urls.append(r.source.rstrip("/") + "/" + quote(path))
    return urls


# -- the entry ---------------------------------------------------------------------------------


def ensure_repo(ctx: FetchContext, r: ModelRepo) -> FileOutcome:
    """Make ``r`` verified (in the volume or in the HF cache) and say where it is."""
    volume, settings = ctx.volume, ctx.settings
    final = volume.models / r.dest

    def done() -> bool:
        return why_unverified(volume, r) is None

    def where() -> str:
        record = read_record(volume, r.dest) or {}
        return str(record.get("location") or final)

    lease = leases.acquire(
        volume.leases,
        lease_name(r.dest),
        owner=ctx.owner,
        ttl_s=settings.lease_ttl_s,
        timeout_s=settings.lock_timeout_s,
        timeline=ctx.timeline,
        phase="weights",
        done=done,
        enabled=settings.locks,
    )
    if lease is None:
        return FileOutcome(where(), False)
    try:
        if done():
            return FileOutcome(where(), False)
        cached = _from_hf_cache(ctx, r)
        if cached is not None:
            return cached
        return _fetch_repo(ctx, r)
    finally:
        lease.release()


def _from_hf_cache(ctx: FetchContext, r: ModelRepo) -> FileOutcome | None:
    """RunPod's cached models: the pinned snapshot verified where it lies, or None."""
    root = cache_root(ctx.settings, ctx.volume)
    if root is None or scheme_of(r.source) != "hf":
        return None
    ref = parse_hf(r.source, repo_only=True)
    snap = root / ref.cache_dir_name / "snapshots" / ref.revision
    if not snap.is_dir():
        return None
    listing, why = verify_snapshot(snap, r.wants, list(r.files))
    if why is not None:
        ctx.timeline.log(f"weights: {r.dest}: the HF cache's {snap} is not used: {why}", level="warn")
        return None
    write_record(
        ctx.volume,
        r.dest,
        {
            "dest": r.dest,
            "kind": "repo",
            "source": f"hf-cache:{snap}",
            "manifest_source": r.source,
            "include": list(r.include),
            "location": str(snap),
            "size": sum(i["size"] for i in listing),
            "files": listing,
            "worker": ctx.owner,
        },
    )
    ctx.timeline.log(
        f"weights: {r.dest}: verified in the HF cache at {snap} ({len(listing)} files), used in place"
    )
    return FileOutcome(str(snap), False, f"hf-cache:{snap}")


def _stage_header(ctx: FetchContext, r: ModelRepo) -> dict[str, Any]:
    return {
        "v": 1,
        "dest": r.dest,
        "source": r.source,
        "owner": ctx.owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _write_header(stage: Path, header: dict[str, Any]) -> None:
    tmp = stage / f".header.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(header), encoding="utf-8")
    os.replace(tmp, stage / "header.json")


def _adopt_or_make_stage(ctx: FetchContext, r: ModelRepo, directory: Path, name: str) -> Path:
    """A dead worker's staging of the same source, claimed by rename; else a new one."""
    token = uuid.uuid4().hex[:12]
    mine = directory / f".{name}.{token}{STAGE_SUFFIX}"
    header = _stage_header(ctx, r)
    for stage in sorted(directory.glob(f".{name}.*{STAGE_SUFFIX}")):
        try:
            old = json.loads((stage / "header.json").read_text(encoding="utf-8"))
            mtime = (stage / "header.json").stat().st_mtime
        except (OSError, ValueError):
            old, mtime = None, 0.0
            with contextlib.suppress(OSError):
                mtime = stage.stat().st_mtime
        if not isinstance(old, dict):
            if not owner_alive({}, ctx.settings.lease_ttl_s, mtime):
                shutil.rmtree(stage, ignore_errors=True)
            continue
        # Holding the lease, any other staging is abandoned; without locks, only a dead writer's.
        if not ctx.settings.locks and owner_alive(old, ctx.settings.lease_ttl_s, mtime):
            continue
        if old.get("source") != r.source:
            shutil.rmtree(stage, ignore_errors=True)
            continue
        try:
            stage.rename(mine)  # the claim: exactly one adopter can rename it
        except OSError:
            continue
        _write_header(mine, header)
        ctx.timeline.log(f"weights: {r.dest}: adopting an interrupted staging directory ({stage.name})")
        return mine
    born = directory / f".{name}.{token}.new"
    born.mkdir(parents=True)
    (born / "files").mkdir()
    _write_header(born, header)
    born.rename(mine)
    return mine


def _good(path: Path, rf: RepoFile) -> str | None:
    """Why a file already on the volume is not ``rf`` (size, sha256 or blob id, format), or None."""
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if rf.size is not None and size != rf.size:
        return f"{size} bytes, expected {rf.size}"
    if rf.sha256:
        if _sha256(path) != rf.sha256:
            return "its sha256 does not match"
    elif rf.blob and git_blob_id(path) != rf.blob:
        return "its git blob id does not match"
    fmt = format_for(path.name)
    if fmt == "raw" and not rf.lfs:
        return None  # a small text file: its hash said it all (an HTML page may be a real file)
    try:
        check_format(path, fmt)
    except BadFile as err:
        return str(err)
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _fetch_repo(ctx: FetchContext, r: ModelRepo) -> FileOutcome:
    volume = ctx.volume
    final = volume.models / r.dest
    try:
        listing, listed_by = file_list(ctx, r)
    except (SourceFailed, Transient) as err:
        raise FileFailed(f"listing the files of {shown(r.source)}: {err}") from None
    directory, name = final.parent, final.name
    directory.mkdir(parents=True, exist_ok=True)
    stage = _adopt_or_make_stage(ctx, r, directory, name)
    files_dir = stage / "files"
    old_record = read_record(volume, r.dest) or {}
    old_sha = {i.get("path"): i.get("sha256") for i in old_record.get("files", []) if isinstance(i, dict)}
    received = resumed = 0
    fetched_from: set[str] = set()
    out: list[dict[str, Any]] = []
    for rf in listing:
        if ctx.abort.is_set():
            raise Aborted("stopped")
        rel = PurePosixPath(rf.path)
        if rel.is_absolute() or ".." in rel.parts or not rf.path:
            raise FileFailed(f"{r.dest}: the listing names an unsafe path {rf.path!r}")
        target = files_dir / rf.path
        if target.exists():
            why = _good(target, rf)
            if why is None:
                out.append(_entry(rf, target))
                continue
            quarantine(volume, target, f"{r.dest}/{rf.path}", f"staged copy: {why}", worker=ctx.owner)
        # A good file of an earlier published copy (a damaged repo): hard-link it, do not fetch.
        old = final / rf.path
        expect = RepoFile(rf.path, rf.size, rf.sha256 or old_sha.get(rf.path), rf.blob, rf.lfs)
        if old.is_file() and (expect.sha256 or expect.blob):
            why = _good(old, expect)
            if why is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(old, target)
                out.append(_entry(rf, target))
                continue
            quarantine(volume, old, f"{r.dest}/{rf.path}", f"published copy: {why}", worker=ctx.owner)
        got = _fetch_file(ctx, r, rf, target)
        received += got.received
        resumed += got.resumed
        if got.source:
            fetched_from.add(got.source)
        out.append(_entry(rf, target, got.sha256))
    _drop_strays(files_dir, {rf.path for rf in listing})
    for d in sorted({p.parent for p in files_dir.rglob("*")} | {files_dir}, reverse=True):
        fsync_dir(d)
    # On any failure the staging stays for the next lease holder to adopt.
    _publish(ctx, r, stage, final, out, listed_by, sorted(fetched_from))
    return FileOutcome(str(final), True, ", ".join(sorted(fetched_from)) or None, received, resumed)


def _drop_strays(files_dir: Path, wanted: set[str]) -> None:
    """Remove what is not a listed file (a dead download's part directory, an old file)."""
    for p in sorted(files_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        rel = p.relative_to(files_dir).as_posix()
        if rel in wanted:
            continue
        if p.is_dir() and not p.is_symlink():
            if not any(w.startswith(rel + "/") for w in wanted):
                shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@dataclass
class _Got:
    sha256: str
    received: int
    resumed: int
    source: str | None


def _fetch_file(ctx: FetchContext, r: ModelRepo, rf: RepoFile, target: Path) -> _Got:
    """One file of the repo into the staging directory, from the mirror, then the source."""
    reasons = []
    fmt = format_for(rf.path)
    for url in file_urls(ctx.settings, r, rf.path):
        if ctx.abort.is_set():
            raise Aborted("stopped")
        source = make_source(
            url, ctx.settings.environ, timeout_s=ctx.options.timeout_s, policy=ctx.options.addresses
        )
        # As a ModelFile, the download machinery (journal, resume, quarantine) serves it as is.
        f = ModelFile(f"{r.dest}/{rf.path}", url, rf.size or 0, rf.sha256 or "", fmt, "", r.capability)
        try:
            got = download(ctx, f, source, target, blob=rf.blob)
        except (SourceFailed, BadFile) as err:
            reasons.append(f"{source.label}: {err}")
            ctx.timeline.log(f"weights: {r.dest}/{rf.path}: {source.label} failed: {err}", level="warn")
            continue
        os.replace(got.data, target)
        shutil.rmtree(got.part, ignore_errors=True)
        return _Got(got.result.sha256, got.result.received, got.result.resumed, source.label)
    raise FileFailed(f"{rf.path}: " + "; ".join(reasons))


def _entry(rf: RepoFile, path: Path, sha256: str | None = None) -> dict[str, Any]:
    return {
        "path": rf.path,
        "size": path.stat().st_size,
        "sha256": sha256 or rf.sha256 or _sha256(path),
        "lfs": rf.lfs,
    }


def _publish(
    ctx: FetchContext,
    r: ModelRepo,
    stage: Path,
    final: Path,
    listing: list[dict[str, Any]],
    listed_by: str,
    sources: list[str],
) -> None:
    """``files/`` becomes ``models/<dest>`` in one rename, then the record."""
    volume = ctx.volume
    if why_unverified(volume, r) is None:
        shutil.rmtree(stage, ignore_errors=True)  # a racer (locks off) published first
        return
    aside = None
    if final.exists():
        aside = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.old"
        final.rename(aside)  # a damaged or outdated copy: its good files are linked in already
    (stage / "files").rename(final)  # one rename publishes the whole directory
    fsync_dir(final.parent)
    write_record(
        volume,
        r.dest,
        {
            "dest": r.dest,
            "kind": "repo",
            "source": ", ".join(sources) or "volume",
            "manifest_source": r.source,
            "include": list(r.include),
            "listed_by": listed_by,
            "size": sum(i["size"] for i in listing),
            "files": listing,
            "worker": ctx.owner,
        },
    )
    shutil.rmtree(stage, ignore_errors=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
