"""`make bench`: run every benchmark suite, print one table, write bench/results/*.json and
bench/results/summary.md. `python -m bench.run [--quick] [suite ...]`."""

from __future__ import annotations

import argparse
import importlib
import time

from bench.common import RESULTS_DIR, format_table, machine, write_results

SUITES = ["bench_model", "bench_data", "bench_train", "bench_serve", "bench_scoring", "bench_tune"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("suites", nargs="*", default=SUITES)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    sections = []
    for name in args.suites:
        t0 = time.time()
        print(f"== {name}", flush=True)
        rows = importlib.import_module(f"bench.{name}").run(quick=args.quick)
        table = format_table(rows)
        print(table, flush=True)
        write_results(name, rows, {"seconds": time.time() - t0})
        sections.append(f"## {name}\n\n{table}\n")
    m = machine()
    header = (f"# Benchmark summary\n\nMachine: {m['processor']}, {m['cpu_threads']} torch threads, "
              f"torch {m['torch']}, Python {m['python']} ({m['platform']}).\n\n")
    (RESULTS_DIR / "summary.md").write_text(header + "\n".join(sections))
    print(f"wrote {RESULTS_DIR / 'summary.md'}")


if __name__ == "__main__":
    main()
