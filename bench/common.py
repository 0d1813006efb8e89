"""Shared benchmark plumbing: timing, result rows, the printed table and the JSON/markdown files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    name: str  # what was measured
    value: float
    unit: str = ""
    target: str = ""  # e.g. "<= 1.24", ">= 5"; empty when the row is a report, not a goal
    note: str = ""

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def format_table(rows: list[Row]) -> str:
    lines = ["| benchmark | value | target | met | note |", "|---|---|---|---|---|"]
    for r in rows:
        met = {None: "", True: "yes", False: "NO"}[r.met]
        lines.append(f"| {r.name} | {r.value:.4g} {r.unit} | {r.target} | {met} | {r.note} |")
    return "\n".join(lines)


def write_results(suite: str, rows: list[Row], extra: dict | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{suite}.json"
    payload = {"suite": suite, "machine": machine(), "rows": [asdict(r) | {"met": r.met} for r in rows]}
    payload.update(extra or {})
    path.write_text(json.dumps(payload, indent=2))
    return path
