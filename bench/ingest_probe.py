"""A Ray Train loop that only consumes data: what each worker receives, and how fast.

Used by the ingest benchmark and the tests (disjoint, complete epochs across workers). Scaffolding,
not part of the package: `probe_loop()` returns the loop registered with cloudpickle by value, so
Ray Train workers run it without importing `bench`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def ingest_probe_loop(config: dict) -> dict:
    """Iterate `epochs` passes of the train shard; write this rank's rows (when `out_dir` is
    given) and return tokens/s and, with `step_s`, the fraction of time spent waiting for data
    while a simulated step of `step_s` seconds runs after each batch."""
    import ray.train

    from ft_ray.train.runtime import RayRuntime

    rt = RayRuntime()
    rows, tokens, wait = [], 0, 0.0
    t0 = time.perf_counter()
    for _ in range(config.get("epochs", 1)):
        it = rt.batches("train", config["batch_size"])
        while True:
            w0 = time.perf_counter()
            batch = next(it, None)
            wait += time.perf_counter() - w0
            if batch is None:
                break
            tokens += batch.numel()
            if config.get("out_dir"):
                rows.append(batch.numpy())
            if config.get("step_s"):
                time.sleep(config["step_s"])  # stands in for a training step of known length
    elapsed = time.perf_counter() - t0
    if config.get("out_dir"):
        out = Path(config["out_dir"]) / f"rank{rt.rank}.npy"
        np.save(out, np.concatenate(rows) if rows else np.empty((0, 0), np.int64))
    stats = {"rank": rt.rank, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
             "wait_frac": wait / elapsed}
    ray.train.report({"stats": json.dumps(stats)})
    return stats


def probe_loop():
    """`ingest_probe_loop`, pickled by value (the workers need not find this module)."""
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ingest_probe_loop
