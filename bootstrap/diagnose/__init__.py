"""``bootstrap diagnose`` (SPEC §8): what is wrong on this worker or volume, and what to do.

Results are data: `collect` returns a `Report` of `Section`s, each a list of typed `Check`s
(status ``ok | degraded | broken | unknown``; anything not ok carries a ``hint``: a command to
run or a setting to change). `render_text` (for people: aligned, broken first) and
`render_json` (for scripts: ``report_version`` 1) print it; neither computes anything.

Diagnose READS and NEVER REPAIRS: it creates no directory, takes no lease and moves no file.
The only write is the volume's probe: one uniquely named temp file, removed at once.

Internal logic:

1. Find the volume as `bootstrap run` would (`resolve_volume`), but never create ``./.volume``:
   the lookup runs with "volume required" semantics and the fallback is only looked at.
2. Run every section in its own daemon thread with a deadline. A hung network volume (a stat
   that never returns) or a hung GPU (``nvidia-smi`` or CUDA init stuck) then costs one
   "did not answer" check, never a hung command. Subprocesses get their own timeouts too.
3. Checks that need the worker's packages (torch CUDA init, onnxruntime providers) run with the
   environment's own Python in a subprocess; ``bootstrap`` itself never imports them.
4. Secrets are never formatted; as a second line of defence every rendered string is scrubbed
   of the values of secret-named variables (`bootstrap.timeline.secret_values`).

The report's status is ``broken`` if any check is broken, else ``degraded`` if any is degraded,
else ``ok``: ``unknown`` (say, no GPU on a CPU machine) is shown with its hint but lowers nothing.
"""

from __future__ import annotations

from bootstrap.diagnose.collector import SECTION_FNS, SectionFn, collect, run_diagnose, settings_or_problem
from bootstrap.diagnose.context import Context, Options, ProbeTimeout, find_volume, with_timeout
from bootstrap.diagnose.fmt import human_age, human_bytes
from bootstrap.diagnose.model import REPORT_VERSION, SECTIONS, SEVERITY, Check, Report, Section, Status
from bootstrap.diagnose.render import render_json, render_text
from bootstrap.diagnose.weights import Quarantined, quarantined

__all__ = [
    "REPORT_VERSION",
    "SECTIONS",
    "SECTION_FNS",
    "SEVERITY",
    "Check",
    "Context",
    "Options",
    "ProbeTimeout",
    "Quarantined",
    "Report",
    "Section",
    "SectionFn",
    "Status",
    "collect",
    "find_volume",
    "human_age",
    "human_bytes",
    "quarantined",
    "render_json",
    "render_text",
    "run_diagnose",
    "settings_or_problem",
    "with_timeout",
]
