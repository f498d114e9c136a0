"""Phase ``weights``: every selected manifest entry verified on the volume (SPEC §5, §6).

Internal logic:

1. Warm path first, without a thread or a socket: an entry whose ``.verified`` record holds and
   whose size + sniff still match is used as it is (a warm boot makes no network call).
2. The rest run a few at once (`bootstrap.weights.fetch.ensure_file`). A failure does not stop
   the others: every entry that can be verified is published first.
3. Optional capabilities' failures degrade them; required ones raise once all are done, naming
   every entry that failed.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

from bootstrap.errors import BootstrapError, InsufficientDiskError, LockTimeoutError, WeightsError
from bootstrap.manifest import ModelFile, load_manifest, selected
from bootstrap.plan import Plan
from bootstrap.settings import Settings
from bootstrap.timeline import Timeline
from bootstrap.volume import Volume
from bootstrap.weights.fetch import FetchContext, FileFailed, FileOutcome, ensure_file
from bootstrap.weights.progress import Progress
from bootstrap.weights.records import why_unverified
from bootstrap.weights.transfer import Aborted, FetchOptions


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

    An optional capability's failure degrades it (``plan.degrade``); a required one raises:
    `WeightsError` (13), `InsufficientDiskError` (11) or `LockTimeoutError` (14).
    """
    options = options or FetchOptions()
    files = selected(load_manifest(settings.manifest), settings.extras)
    progress = Progress(timeline, every_s=options.progress_every_s)
    ctx = FetchContext(
        settings, volume, timeline, options, progress, owner=f"{settings.worker_id}:{os.getpid()}"
    )
    detail["files"] = len(files)
    outcomes: dict[str, FileOutcome] = {}
    failures: list[tuple[ModelFile, BaseException]] = []
    # Warm path first, without a thread or a socket: a warm boot makes no network call.
    todo = []
    for f in files:
        if why_unverified(volume, f) is None:
            outcomes[f.published_dest] = FileOutcome(str(volume.models / f.published_dest), False)
        else:
            todo.append(f)
    if todo:
        progress.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, options.files_at_once), thread_name_prefix="weights"
            ) as pool:
                futures = {pool.submit(ensure_file, ctx, f): f for f in todo}
                for fut in concurrent.futures.as_completed(futures):
                    f = futures[fut]
                    try:
                        outcomes[f.published_dest] = fut.result()
                    except (FileFailed, InsufficientDiskError, LockTimeoutError, Aborted) as err:
                        failures.append((f, err))
                        if not settings.is_optional(f.capability) and not isinstance(err, Aborted):
                            ctx.abort.set()  # the boot will stop: others keep their journals
                    except BaseException:
                        ctx.abort.set()
                        raise
        finally:
            progress.stop()
    for f in files:
        if f.published_dest in outcomes:
            plan.models[f.published_dest] = outcomes[f.published_dest].path
    required: list[tuple[ModelFile, BaseException]] = []
    for f, failure in sorted(failures, key=lambda item: files.index(item[0])):
        if settings.is_optional(f.capability):
            plan.degrade(f.capability, f"{f.published_dest}: {failure}")
            timeline.log(f"degraded: {f.capability}: {f.published_dest}: {failure}", level="warn")
        elif not isinstance(failure, Aborted):
            required.append((f, failure))
    detail["ready"] = len(plan.models)
    detail["fetched"] = sorted(d for d, o in outcomes.items() if o.fetched)
    detail["bytes_received"] = sum(o.received for o in outcomes.values())
    detail["bytes_resumed"] = sum(o.resumed for o in outcomes.values())
    if failures:
        detail["failed"] = sorted(f.published_dest for f, _ in failures)
    if required:
        f, first = required[0]
        if isinstance(first, BootstrapError):
            raise first
        more = f" (and {len(required) - 1} more)" if len(required) > 1 else ""
        raise WeightsError(
            f"required model {f.published_dest} (capability {f.capability}) could not be fetched and verified: {first}{more}",
            hint=(
                "check the source and its credentials (HF_TOKEN, AWS_*), or set BOOTSTRAP_MIRROR; "
                f"add {f.capability} to BOOTSTRAP_OPTIONAL to start without it; bad copies are in "
                "quarantine/ (`bootstrap diagnose`)"
            ),
        )
