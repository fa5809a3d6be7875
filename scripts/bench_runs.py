"""Repeated bench runs: every number of the runs' results becomes its min / median / max.

The runs' results have the same shape (the same bench); the combined result keeps that
shape with each number replaced by its spread, so a figure is never one lucky run.
"""

from __future__ import annotations

import statistics
from typing import Any


def combine(results: list[Any]) -> Any:
    """One result of the same shape; numbers become {"min", "median", "max", "runs"}."""
    first = results[0]
    if isinstance(first, dict):
        return {key: combine([r.get(key) for r in results]) for key in first}
    numbers = [r for r in results if isinstance(r, int | float) and not isinstance(r, bool)]
    if not numbers:
        return first  # text, flags, lists: the same in every run (targets, sizes)
    return {"min": min(numbers), "median": round(statistics.median(numbers), 3),
            "max": max(numbers), "runs": results}


def rows(combined: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(dotted name, spread) for every number in a combined result."""
    if isinstance(combined, dict) and "runs" in combined and "median" in combined:
        return [(path, combined)]
    if isinstance(combined, dict):
        found: list[tuple[str, dict[str, Any]]] = []
        for key, value in combined.items():
            if key != "targets":  # the same in every run: not a measurement
                found += rows(value, f"{path}.{key}" if path else key)
        return found
    return []


def show(combined: dict[str, Any], runs: int) -> None:
    table = rows(combined)
    width = max((len(name) for name, _ in table), default=10) + 2
    print(f"\nover {runs} runs: min / median / max of every figure above")
    print(f"{'figure':<{width}}{'min':>10}{'median':>10}{'max':>10}")
    for name, spread in table:
        print(f"{name:<{width}}" + "".join(f"{spread[k]:>10.4g}"
                                           for k in ("min", "median", "max")))
