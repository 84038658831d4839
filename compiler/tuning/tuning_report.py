"""What a tune shows people: a summary table per kernel and a PNG of best-so-far against trials and time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tensorpress.compiler.tuning.template_search import KernelResult
from tensorpress.runtime.atomic_file import atomic_output

PLOT_FILE = "tuning_progress.png"


def summary_table(results: Sequence[KernelResult]) -> str:
    """kernel, default time, best time, speedup, trials (and time to 95 % of the best), one row each."""
    header = ("kernel", "default", "best", "speedup", "trials", "to 95%", "")
    rows = [header]
    for r in results:
        to_95 = r.seconds_to_within(0.95)
        rows.append(
            (
                r.name,
                _time(r.default_seconds),
                _time(r.best_seconds),
                f"{r.speedup:.2f}x" if math.isfinite(r.speedup) else "-",
                f"{r.trials}/{r.space_size}",
                "-" if to_95 is None else f"{to_95:.0f}s",
                _note(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1])), row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def generic_summary_table(results: Sequence) -> str:
    """generic op, calls per run, default time, best time, speedup, trials; the build applies a record only
    where the best beat the default (generic_records.py)."""
    header = ("generic op", "calls", "default", "best", "speedup", "trials", "")
    rows = [header]
    for r in results:
        speedup = r.speedup
        rows.append(
            (
                r.name,
                str(r.calls),
                "-" if r.default_s is None else _time(r.default_s),
                "-" if r.best_s is None else _time(r.best_s),
                "-" if speedup is None else f"{speedup:.2f}x",
                str(r.trials),
                "" if r.searched else "(finished before)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])), row[-1]]).rstrip()
        for row in rows
    )


def _note(r: KernelResult) -> str:
    if r.skipped:
        return "(finished before)"
    if r.trials == 0:
        return "(not reached: time budget spent)"
    return f"({r.resumed} resumed)" if r.resumed else ""


def _time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "failed"
    return f"{seconds * 1e6:.1f}us" if seconds < 1e-3 else f"{seconds * 1e3:.2f}ms"


def plot_progress(results: Sequence[KernelResult], path: Path) -> Path | None:
    """The best trial time so far, relative to the chosen config's confirmed time (1: found it; trials are
    single timings, so a lucky one dips below), against trials (left) and search seconds (right), one
    line per kernel; written to `path` (PNG). None when no kernel has a finite best time."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.history and math.isfinite(r.best_seconds)]
    if not shown:
        return None
    fig, (by_trial, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in shown:
        best, curve = math.inf, []
        for _, seconds in r.history:
            best = min(best, seconds)
            curve.append(best / r.best_seconds if math.isfinite(best) else math.nan)
        label = r.name if len(r.name) <= 48 else r.name[:45] + "..."
        by_trial.plot(range(1, len(curve) + 1), curve, label=label)
        by_time.plot([elapsed for elapsed, _ in r.history], curve, label=label)
    by_trial.set(xlabel="trials", ylabel="best trial so far / best confirmed time", title="by trials")
    by_time.set(xlabel="search time (s)", title="by time")
    for ax in (by_trial, by_time):
        ax.grid(alpha=0.3)
        ax.axhline(1.0, color="grey", lw=0.8)
    by_trial.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    with atomic_output(path) as f:  # a whole PNG or none
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
