"""The chart: one horizontal bar per scenario, its phases stacked in boot order."""

from __future__ import annotations

from pathlib import Path

from bootstrap.timing.boot import SEGMENTS
from bootstrap.timing.report import TimingReport

COLORS = {
    "preflight": "#9e9e9e",
    "env": "#1f77b4",
    "weights": "#ff7f0e",
    "import": "#2ca02c",
    "warm": "#d62728",
    "startup": "#bcbd22",
    "first_job": "#9467bd",
}
LABELS = {"first_job": "first job", "startup": "startup (interpreters, exec, API)"}


def chart(report: TimingReport, path: Path) -> Path:
    """The waterfall: one horizontal bar per scenario, its phases stacked in boot order.

    Each bar is the scenario's median phases; a whisker spans the min–max of the totals; the
    label at the end gives the total and its ratio to the baseline's.
    """
    import matplotlib  # the `timing` dependency group; never needed by a boot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in report.scenarios if s.summary.median.get("total") is not None]
    base = next((s.summary.median["total"] for s in scenarios if s.name == "baseline"), None)
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.7 * max(1, len(scenarios))), dpi=130)
    ys = list(range(len(scenarios)))[::-1]
    longest = (
        max((s.summary.max.get("total") or s.summary.median["total"] or 0.0 for s in scenarios), default=1.0)
        / 1000
    )
    for seg in SEGMENTS:
        for y, s in zip(ys, scenarios, strict=True):
            med = s.summary.median
            left = sum((med.get(p) or 0.0) for p in SEGMENTS[: SEGMENTS.index(seg)]) / 1000
            width = (med.get(seg) or 0.0) / 1000
            label = LABELS.get(seg, seg) if y == ys[0] else None
            ax.barh(
                y, width, left=left, height=0.62, color=COLORS[seg], edgecolor="white", lw=0.6, label=label
            )
            if width > 0.035 * longest:
                ax.text(
                    left + width / 2, y, f"{width:.1f}", ha="center", va="center", fontsize=8, color="white"
                )
    for y, s in zip(ys, scenarios, strict=True):
        total = (s.summary.median["total"] or 0.0) / 1000
        lo = (s.summary.min.get("total") or total * 1000) / 1000
        hi = (s.summary.max.get("total") or total * 1000) / 1000
        if hi > lo:
            whisker = [[total - lo], [hi - total]]
            # Just above the bar, clear of the segment labels: min–max of the totals.
            ax.errorbar(total, y + 0.38, xerr=whisker, fmt="none", ecolor="#333333", capsize=2, lw=1)
        text = f"{total:.1f} s"
        if base and s.name != "baseline":
            text += f"  ({total * 1000 / base:.2f}× baseline)"
        ax.text(total + longest * 0.012, y, text, va="center", fontsize=9, fontweight="bold")
    ax.set_yticks(ys, [s.label + ("" if s.ok else " (failed)") for s in scenarios])
    ax.set_xlim(0, longest * 1.3)
    ax.set_xlabel("seconds from container start to the first job's answer")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if scenarios:
        ax.legend(
            loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(SEGMENTS), fontsize=8, frameon=False
        )
    else:
        ax.text(0.5, 0.5, "no boot succeeded", transform=ax.transAxes, ha="center", va="center")
    machine, config = report.machine, report.config
    extras = ",".join(config.extras) or "base only"
    fig.suptitle(
        f"bootstrap cold start by phase — median of {config.repeat}, extras: {extras}\n"
        f"{machine.cpu}, {machine.cores} cores, {machine.memory_gb} GB, {report.date[:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
