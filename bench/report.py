"""From runs to numbers: the per-system table, the router's overhead over the
floor, and the plot.

Latencies pool every request of every round (p50, p90 and p99 apart, as the
notes ask: rare ~1 s stalls on these machines show in p99, not in p50).
Throughput is the median of the rounds, with their range beside it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.workload import Run

REFERENCE = "dprouter"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass(frozen=True)
class Cell:
    """One system at one concurrency, over all rounds."""

    tokens_per_s: float
    tokens_per_s_range: tuple[float, float]
    requests_per_s: float
    ttft_ms: tuple[float, float, float]  # p50, p90, p99
    itl_ms: tuple[float, float, float]
    cpu_us_per_token: float | None
    # Tokens a streamed message carried, on average: above 1 where a stream's
    # tokens came faster than its front end sent them (vLLM merges them).
    tokens_per_message: float
    requests: int
    errors: int
    refusals: int  # retried after their RetryInfo delay

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Cell:
        timings = [t for run in runs for t in run.timings if t.arrivals]
        ttft = [t.ttft * 1000 for t in timings]
        itl = [gap * 1000 for t in timings for gap in t.inter_token()]
        rates = [sum(t.output_tokens for t in run.timings) / run.wall_s for run in runs]
        cpu = [run.front_end_cpu_s for run in runs]
        tokens = sum(t.output_tokens for t in timings)
        return cls(
            tokens_per_s=statistics.median(rates),
            tokens_per_s_range=(min(rates), max(rates)),
            requests_per_s=statistics.median(len(run.timings) / run.wall_s for run in runs),
            ttft_ms=(percentile(ttft, 0.5), percentile(ttft, 0.9), percentile(ttft, 0.99)),
            itl_ms=(percentile(itl, 0.5), percentile(itl, 0.9), percentile(itl, 0.99)),
            cpu_us_per_token=(
                sum(c for c in cpu if c is not None) / tokens * 1e6
                if tokens and all(c is not None for c in cpu)
                else None
            ),
            tokens_per_message=tokens / max(sum(len(t.tokens) for t in timings), 1),
            requests=len(timings),
            errors=sum(len(run.errors) for run in runs),
            refusals=sum(t.refusals for run in runs for t in run.timings),
        )


# system -> concurrency -> its runs
Results = dict[str, dict[int, list[Run]]]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float | None, digits: int, sign: str = "") -> str:
    """`value` to `digits` places; n/a when there is none (NaN: no samples,
    as the gaps between tokens of one-token requests)."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:{sign},.{digits}f}"


def _with_ratio(value: float | None, reference: float | None, digits: int) -> str:
    text = _number(value, digits)
    if value is not None and reference and not math.isnan(value) and not math.isnan(reference):
        text += f" ({value / reference:.2f}x)"
    return text


def _below(value: float, target: float) -> str:
    return "n/a" if math.isnan(value) else "yes" if value < target else "no"


def _requests(cell: Cell) -> str:
    notes = [f"{cell.errors} failed"] if cell.errors else []
    notes += [f"{cell.refusals} refusals retried"] if cell.refusals else []
    return f"{cell.requests}" + (f" ({', '.join(notes)})" if notes else "")


def systems_table(results: Results) -> str:
    """Per system and concurrency; in brackets, the value over dprouter's."""
    cells = {s: {c: Cell.of(runs) for c, runs in by_c.items()} for s, by_c in results.items()}
    reference = cells.get(REFERENCE, {})
    rows = []
    for concurrency in sorted({c for by_c in cells.values() for c in by_c}):
        for system, by_c in cells.items():
            if (cell := by_c.get(concurrency)) is None:
                continue
            ref = reference.get(concurrency) if system != REFERENCE else None
            low, high = cell.tokens_per_s_range
            rows.append([
                system, concurrency,
                _with_ratio(cell.tokens_per_s, ref.tokens_per_s if ref else None, 0),
                f"{low:,.0f}-{high:,.0f}",
                _with_ratio(cell.requests_per_s, ref.requests_per_s if ref else None, 1),
                _with_ratio(cell.ttft_ms[0], ref.ttft_ms[0] if ref else None, 1),
                _number(cell.ttft_ms[1], 1),
                _with_ratio(cell.ttft_ms[2], ref.ttft_ms[2] if ref else None, 1),
                _with_ratio(cell.itl_ms[0], ref.itl_ms[0] if ref else None, 2),
                _number(cell.itl_ms[1], 2),
                _with_ratio(cell.itl_ms[2], ref.itl_ms[2] if ref else None, 2),
                _with_ratio(cell.cpu_us_per_token, ref.cpu_us_per_token if ref else None, 0),
                _number(cell.tokens_per_message, 2),
                _requests(cell),
            ])  # fmt: skip
    return table(
        ["system", "concurrency", "output tok/s", "tok/s range", "req/s", "TTFT p50 ms",
         "TTFT p90 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p90 ms", "ITL p99 ms",
         "front-end CPU us/token", "tokens/message", "requests"],
        rows,
    )  # fmt: skip


def overhead_table(results: Results, floor: str, levels: Sequence[int]) -> str:
    """dprouter minus the in-process floor, against its targets: router-added
    TTFT p50 under 1 ms and ITL p50 under 0.3 ms."""
    rows = []
    for concurrency in sorted(set(levels)):  # one row when the run had one concurrency
        runs, floor_runs = results.get(REFERENCE, {}), results.get(floor, {})
        if concurrency not in runs or concurrency not in floor_runs:
            continue
        ours, base = Cell.of(runs[concurrency]), Cell.of(floor_runs[concurrency])
        ttft = ours.ttft_ms[0] - base.ttft_ms[0]
        itl = ours.itl_ms[0] - base.itl_ms[0]
        rows.append([
            concurrency, _number(ttft, 2, "+"), _below(ttft, 1),
            _number(itl, 3, "+"), _below(itl, 0.3),
            _number(ours.ttft_ms[2] - base.ttft_ms[2], 1, "+"),
            _number(ours.itl_ms[2] - base.itl_ms[2], 2, "+"),
        ])  # fmt: skip
    return table(
        ["concurrency", "TTFT p50 added ms", "< 1 ms", "ITL p50 added ms", "< 0.3 ms",
         "TTFT p99 added ms", "ITL p99 added ms"],
        rows,
    )  # fmt: skip


def plot(results: Results, title: str, path: Path) -> bool:
    """Four panels against concurrency; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels: list[tuple[str, Callable[[Cell], float], str]] = [
        ("output tokens/s", lambda c: c.tokens_per_s, "linear"),
        ("TTFT p50 (ms)", lambda c: c.ttft_ms[0], "log"),
        ("ITL p50 (ms)", lambda c: c.itl_ms[0], "linear"),
        ("front-end CPU per token (us)", lambda c: c.cpu_us_per_token or float("nan"), "linear"),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (label, value, scale) in zip(axes.flat, panels, strict=True):
        for system, by_c in results.items():
            levels = sorted(by_c)
            ax.plot(levels, [value(Cell.of(by_c[c])) for c in levels], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale(scale)
        ax.set_xlabel("concurrency")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
