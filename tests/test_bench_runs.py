"""scripts/bench --runs N: every figure becomes min / median / max over the runs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_runs  # noqa: E402


def test_numbers_become_their_spread_and_the_rest_stays() -> None:
    runs = [{"press": {"p50_ms": 8.0, "n": 40}, "mode": "copy", "steady": None},
            {"press": {"p50_ms": 6.0, "n": 40}, "mode": "copy", "steady": 3.0},
            {"press": {"p50_ms": 9.5, "n": 40}, "mode": "copy", "steady": 4.0}]
    combined = bench_runs.combine(runs)
    assert combined["press"]["p50_ms"] == {"min": 6.0, "median": 8.0, "max": 9.5,
                                           "runs": [8.0, 6.0, 9.5]}
    assert combined["mode"] == "copy"
    # A run without the figure is shown, not hidden: its None stays in "runs".
    assert combined["steady"]["median"] == 3.5 and combined["steady"]["runs"][0] is None
    names = [name for name, _ in bench_runs.rows(combined)]
    assert names == ["press.p50_ms", "press.n", "steady"]
