"""Phase ``weights``: every selected manifest entry verified on the volume (SPEC §5, §6).

Internal logic:

1. Warm path first, without a thread or a socket: an entry whose ``.verified`` record holds and
   whose size + sniff still match is used as it is (a warm boot makes no network call, and does
   not even import the fetcher: ``http.client``, ``ssl`` and the rest load only in `_fetch`).
2. The rest run a few at once (`bootstrap.weights.fetch.ensure_file`). A failure does not stop
   the others: every entry that can be verified is published first.
3. Optional capabilities' failures degrade them; required ones raise once all are done, naming
   every entry that failed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from bootstrap.errors import BootstrapError, WeightsError
from bootstrap.manifest import ModelFile, ModelRepo, load_all
from bootstrap.plan import Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume
from bootstrap.weights.mirror import check_mirror
from bootstrap.weights.records import FileOutcome, located, why_unverified

if TYPE_CHECKING:
    from bootstrap.weights.transfer import FetchOptions


def validate(settings: Settings) -> list[ModelFile | ModelRepo]:
    """Check the manifest and ``BOOTSTRAP_MIRROR`` before anything is built (exit 2 on a mistake).

    Preflight calls it, so a typo in either costs seconds, not an environment build first.
    Returns the manifest's entries (``[[file]]`` and ``[[repo]]``) of the selected capabilities.
    """
    if settings.mirror:
        check_mirror(settings.mirror)
    return load_all(settings.manifest).selected(settings.extras)


def ensure_weights(
    settings: Settings,
    volume: Volume,
    timeline: Timeline,
    plan: Plan,
    detail: dict[str, Any],
    *,
    options: FetchOptions | None = None,
) -> None:
    """Make every selected manifest file verified on the volume and record its path in ``plan``.

    An optional capability's failure degrades it (``plan.degrade``). A required one does not
    stop the others: once every file that can be verified is published, it raises, naming every
    file that failed: `WeightsError` (13), or `InsufficientDiskError` (11) / `LockTimeoutError`
    (14) when no file failed for another reason.
    """
    files = validate(settings)
    detail["files"] = len(files)
    outcomes: dict[str, FileOutcome] = {}
    failures: dict[str, BaseException] = {}
    # Warm path first, without a thread or a socket: a warm boot makes no network call.
    todo = []
    for f in files:
        if why_unverified(volume, f) is None:
            outcomes[f.published_dest] = FileOutcome(str(located(volume, f.published_dest)), False)
        else:
            todo.append(f)
    if todo:
        _fetch(settings, volume, timeline, todo, options, outcomes, failures)
    required: list[tuple[ModelFile | ModelRepo, BaseException]] = []
    for f in files:
        dest = f.published_dest
        if dest in outcomes:
            plan.models[dest] = outcomes[dest].path
            o = outcomes[dest]
            if o.fetched:
                how = f"fetched from {o.source}"
            elif (o.source or "").startswith("hf-cache:") or not o.path.startswith(str(volume.models)):
                how = f"verified in the HF cache at {o.path}"
            else:
                how = "verified on the volume"
            timeline.log(f"weights: {dest}: ok, {how} ({f.capability})")
            continue
        failure = failures[dest]
        if settings.is_optional(f.capability):
            plan.degrade(f.capability, f"{dest}: {failure}")
            timeline.log(f"degraded: {f.capability}: {dest}: {failure}", level="warn")
        else:
            timeline.log(f"weights: {dest}: FAILED ({f.capability}, required): {failure}", level="error")
            required.append((f, failure))
    detail["ready"] = len(plan.models)
    detail["fetched"] = sorted(d for d, o in outcomes.items() if o.fetched)
    detail["bytes_received"] = sum(o.received for o in outcomes.values())
    detail["bytes_resumed"] = sum(o.resumed for o in outcomes.values())
    if failures:
        detail["failed"] = sorted(failures)
    if required:
        raise _required_failure(required)


def _fetch(
    settings: Settings,
    volume: Volume,
    timeline: Timeline,
    todo: list[ModelFile | ModelRepo],
    options: FetchOptions | None,
    outcomes: dict[str, FileOutcome],
    failures: dict[str, BaseException],
) -> None:
    """Fetch ``todo`` a few at once, filling ``outcomes`` and ``failures``; a bug stops them all."""
    import concurrent.futures

    from bootstrap.weights.fetch import FetchContext, FileFailed, ensure_file
    from bootstrap.weights.progress import Progress
    from bootstrap.weights.repo import ensure_repo
    from bootstrap.weights.transfer import Aborted, FetchOptions

    options = options or FetchOptions()
    progress = Progress(timeline, every_s=options.progress_every_s)
    ctx = FetchContext(
        settings, volume, timeline, options, progress, owner=f"{settings.worker_id}:{os.getpid()}"
    )
    progress.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, options.files_at_once), thread_name_prefix="weights"
        ) as pool:
            futures = {
                pool.submit(ensure_repo if isinstance(f, ModelRepo) else ensure_file, ctx, f): f  # type: ignore[arg-type]
                for f in todo
            }
            for fut in concurrent.futures.as_completed(futures):
                f = futures[fut]
                try:
                    outcomes[f.published_dest] = fut.result()
                except (FileFailed, BootstrapError, Aborted) as err:
                    # The others go on: a large good file still lands this boot.
                    failures[f.published_dest] = err
                except BaseException:
                    ctx.abort.set()  # a bug: stop the others (their journals keep what they had)
                    raise
    finally:
        progress.stop()


def _required_failure(required: list[tuple[ModelFile | ModelRepo, BaseException]]) -> BootstrapError:
    """One error naming every required file that failed (exit 13; 11 or 14 when only disk or
    lock trouble stopped them, since that is what to fix)."""
    listing = "; ".join(f"{f.published_dest} ({f.capability}): {err}" for f, err in required)
    caps = sorted({f.capability for f, _ in required})
    hint = (
        "check the sources and their credentials (HF_TOKEN, AWS_*), or set BOOTSTRAP_MIRROR; "
        f"add {','.join(caps)} to BOOTSTRAP_OPTIONAL to start without it; bad copies are in "
        "quarantine/ (`bootstrap diagnose`)"
    )
    special = [err for _, err in required if isinstance(err, BootstrapError)]
    if len(special) == len(required) and len({type(e) for e in special}) == 1:
        first = special[0]
        if len(required) == 1:
            return first
        return type(first)(f"{len(required)} required models failed: {listing}", hint=first.hint)
    if len(required) == 1:
        f, err = required[0]
        what = f"required model {f.published_dest} (capability {f.capability}) could not be fetched and verified: {err}"
    else:
        what = f"{len(required)} required models could not be fetched and verified: {listing}"
    return WeightsError(what, hint=hint)
