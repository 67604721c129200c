"""Markdown tables from a benchmark's rows, with formats named in words ("int", "float:4").

The formats are names, not functions, so that a result's JSON carries them: docs/benchmarks.md's
tables are rendered from the committed records alone (bench/records.py), by the same code that
prints them when a benchmark runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

LEFT_ALIGNED = ("config", "method", "metric", "model")


def cell(value: Any, spec: str | None) -> str:
    """One value as the table shows it: `spec` is int, ratio, float:N, percent:N, sci:N or
    signed-percent:N (None: floats to 4 significant digits, others as str)."""
    if value is None:
        return ""
    kind, _, digits = (spec or "").partition(":")
    if kind == "int":
        return f"{round(value):,}"
    if kind == "ratio":
        return f"{value:.3g}x" if value < 100 else f"{value:,.0f}x"
    if kind == "float":
        return f"{value:.{int(digits)}f}"
    if kind == "percent":
        return f"{value:.{int(digits)}%}"
    if kind == "signed-percent":
        return f"{value:+.{int(digits)}%}"
    if kind == "sci":
        return f"{value:.{int(digits)}e}"
    if kind:
        raise ValueError(f"unknown table format {spec!r}")
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any]], formats: Mapping[str, str]
) -> str:
    """The rows as a GitHub markdown table: the first column and the names left, numbers right."""
    align = [":---" if i == 0 or c in LEFT_ALIGNED else "---:" for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += [
        "| " + " | ".join(cell(row.get(c), formats.get(c)) for c in columns) + " |" for row in rows
    ]
    return "\n".join(lines)


def per_round(series: Mapping[str, Sequence[float | None]], spec: str, first_round: int = 0) -> str:
    """One value per round, a row per config and a column `r<N>` per round from `first_round`
    (a series holds every round from 0, so a cost that has no round 0 starts at 1)."""
    rounds = max(len(values) for values in series.values())
    columns = ["config", *(f"r{r}" for r in range(first_round, rounds))]
    rows = [
        {"config": config} | {f"r{r}": values[r] for r in range(first_round, len(values))}
        for config, values in series.items()
    ]
    return markdown(columns, rows, {c: spec for c in columns[1:]})
