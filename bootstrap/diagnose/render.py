"""Printing a `Report`: `render_text` for people, `render_json` for scripts; neither computes anything."""

from __future__ import annotations

import json

from bootstrap.diagnose.model import SECTIONS, SEVERITY, Report, Status
from bootstrap.timeline import scrub


def render_json(report: Report) -> str:
    """The SPEC §8 JSON object (``report_version`` 1), one line per call site's choice: indented."""
    return json.dumps(report.to_json(), indent=2, ensure_ascii=False)


def render_text(report: Report) -> str:
    """For people: sections and checks broken first, aligned columns, hints under each check."""
    counts = {st: 0 for st in Status}
    for s in report.sections:
        for c in s.checks:
            counts[c.status] += 1
    summary = ", ".join(
        f"{counts[st]} {st}" for st in (Status.BROKEN, Status.DEGRADED, Status.UNKNOWN) if counts[st]
    )
    lines = [f"bootstrap diagnose: {report.status.upper()}" + (f" ({summary})" if summary else "")]
    order = {n: i for i, n in enumerate(SECTIONS)}
    sections = sorted(report.sections, key=lambda s: (-SEVERITY[s.status], order.get(s.name, 99)))
    width = max((len(c.name) for s in sections for c in s.checks), default=8)
    width = min(max(width, 8), 40)
    pad = " " * (2 + 9 + 1 + width + 2)
    for s in sections:
        lines.append("")
        lines.append(f"{s.name.replace('_', ' ')}: {s.status}")
        checks = sorted(s.checks, key=lambda c: -SEVERITY[c.status])
        for c in checks:
            detail = c.detail.splitlines() or [""]
            name = c.name if len(c.name) <= width else c.name[: width - 1] + "…"
            lines.append(f"  {c.status!s:<9} {name:<{width}}  {detail[0]}")
            lines += [pad + d for d in detail[1:]]
            if c.hint:
                lines.append(pad + "→ " + c.hint)
    if report.internal_errors:
        lines.append("")
        lines.append("diagnose itself failed on: " + "; ".join(report.internal_errors))
    return scrub("\n".join(lines), report.secrets)
